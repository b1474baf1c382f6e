"""Image vectors for scale benchmarks, generated without images: unit vectors drawn around the
centres of a mixture whose component sizes follow a power law, as a catalog's categories and
styles do. They test memory, throughput and search quality, not what an encoder learns."""
from __future__ import annotations

import numpy as np

BLOCK = 1 << 18  # rows drawn at a time: temporaries stay bounded at any n


def clustered(n: int, components: int, dim: int, spread: float, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
    """(vectors [n, dim] float32, unit; their component [n]): `components` Gaussian centres with
    Zipf-distributed sizes, `spread` the noise around a centre (0.1: tight clusters)."""
    rng = np.random.default_rng(seed)
    sizes = rng.zipf(1.5, components).astype(np.float64)
    centres = rng.normal(size=[components, dim]).astype(np.float32)
    x = np.empty([n, dim], np.float32)
    part = np.empty([n], np.int64)
    for lo in range(0, n, BLOCK):
        hi = min(n, lo + BLOCK)
        part[lo:hi] = rng.choice(components, hi - lo, p=sizes / sizes.sum())
        x[lo:hi] = centres[part[lo:hi]] + spread * rng.normal(size=[hi - lo, dim]).astype(
            np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, part

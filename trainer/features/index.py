"""The one nearest-neighbour index over image vectors: faiss inner product (cosine on unit
vectors), exact or with inverted lists. Visual search (paper 000 §4.1), the catalog embedding's
served index and D's positive mining (Eq. 3's P~_p) all build theirs here.

- 'exact': `IndexFlatIP`, every vector compared.
- 'ivf': `IndexIVFFlat` over `lists` coarse centroids (trained on `sample`, default the vectors),
  `nprobe` of them searched per query: approximate, for catalogs of millions. faiss wants at
  least 39 training points per list, so there are at most len(sample) // 39 lists; with fewer
  than 2 the index is exact.
"""
from __future__ import annotations

import faiss
import numpy as np

KINDS = ("exact", "ivf")
MIN_POINTS_PER_LIST = 39  # faiss's training minimum


def build(vectors: np.ndarray, kind: str = "exact", lists: int = 0, nprobe: int = 16,
          sample: np.ndarray | None = None) -> faiss.Index:
    """An inner-product index holding `vectors` [N, D]; 'ivf' with `lists` inverted lists
    (0: about 4 sqrt(N))."""
    x = np.ascontiguousarray(vectors, np.float32)
    dim = x.shape[1]
    if kind not in KINDS:
        raise ValueError(f"index must be one of {', '.join(KINDS)}, got '{kind}'")
    train = x if sample is None else np.ascontiguousarray(sample, np.float32)
    lists = min(lists or int(4 * np.sqrt(len(x))), len(train) // MIN_POINTS_PER_LIST)
    index: faiss.Index
    if kind == "exact" or lists < 2:
        index = faiss.IndexFlatIP(dim)
    else:
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        ivf.train(train)
        ivf.nprobe = min(nprobe, lists)
        index = ivf
    index.add(x)
    return index


def search(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """[Q, k] rows of `vectors` by descending inner product with each query: exact search."""
    _, found = build(vectors).search(np.ascontiguousarray(queries, np.float32), k)
    return found

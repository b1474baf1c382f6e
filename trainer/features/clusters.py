"""Cluster-ID image features (paper 002 Appendix B, Eq. B2-B3).

faiss k-means over the L2-normalised catalog embeddings; an item's feature is the id of its
nearest centroid (Euclidean, which for unit vectors orders like cosine, Eq. B3), used by the CTR
model as a categorical id. faiss trains on a sample of at most `max_points_per_centroid` points per
centroid, from seeds drawn by k-means|| and picked by greedy k-means++ (`seed_centres`: random
seeds leave several centroids in one tight cluster and none in others, at up to 35% more squared
error, `scripts/bench_kmeans.py`); every item, and any new one, is then assigned to its nearest
centroid. The centroid table is saved (`clusters.npz`) so that a trained CTR model assigns new
items as it was trained.

k defaults to one cluster per `items_per_cluster` catalog items. Paper 002 §5 clusters 6e7 images
into 1e5 clusters (600 per cluster): a cluster id is shared by many items, which is what lets it
generalise like an id feature (App. B). A fixed k that is large for the catalog makes the ids
nearly as sparse as item ids: on the `small` world (8,000 items) k = 256 gave the CTR model no
gain, k = 16 did (docs/results.md, Table B1).
"""
from __future__ import annotations

import dataclasses
import os

import faiss
import numpy as np
import tensorflow as tf

from trainer.configs import ClusterConfig
from trainer.data import npz


@dataclasses.dataclass
class Clusters:
    """Centroids [k, D] of L2-normalised embeddings."""

    centroids: np.ndarray

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])

    def assign(self, vectors: np.ndarray) -> np.ndarray:
        """Nearest-centroid id of each vector [N, D] (normalised first) -> [N] int64."""
        x = _normalized(vectors)
        if x.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"vectors have dimension {x.shape[1]}, the centroids "
                             f"{self.centroids.shape[1]}")
        index = faiss.IndexFlatL2(self.centroids.shape[1])
        index.add(self.centroids)
        return index.search(x, 1)[1][:, 0].astype(np.int64)

    def save(self, path: str) -> None:
        npz.write(path, centroids=self.centroids)

    @classmethod
    def load(cls, path: str) -> Clusters:
        return cls(npz.read(path)["centroids"])


def _normalized(vectors: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit(vectors: np.ndarray, cfg: ClusterConfig, seed: int = 0) -> Clusters:
    """k-means over the normalised `vectors` [N, D]; `seed` seeds sampling and initialisation.
    Each restart seeds on faiss's training sample (`seed_centres`), then runs faiss's Lloyd
    iterations from there."""
    x = _normalized(vectors)
    k = cfg.num_clusters or max(2, round(len(x) / cfg.items_per_cluster))
    if len(x) < k:
        raise ValueError(f"{len(x)} vectors cannot make {k} clusters")
    rng = np.random.default_rng(seed)
    n = min(len(x), k * cfg.max_points_per_centroid)  # faiss's own sample size
    sample = x[np.sort(rng.choice(len(x), n, replace=False))] if n < len(x) else x
    best, best_obj = None, np.inf
    for r in range(max(cfg.restarts, 1)):
        km = faiss.Kmeans(x.shape[1], k, niter=cfg.iterations, seed=seed + r,
                          max_points_per_centroid=cfg.max_points_per_centroid, verbose=False)
        km.train(sample, init_centroids=seed_centres(sample, k, cfg, rng))
        objective = float(np.asarray(km.obj)[-1])
        if objective < best_obj:
            best, best_obj = np.asarray(km.centroids, np.float32), objective
    assert best is not None
    return Clusters(best)


def seed_centres(x: np.ndarray, k: int, cfg: ClusterConfig, rng: np.random.Generator
                 ) -> np.ndarray:
    """k initial centres of `x` [N, D] (float32): k-means|| (Bahmani et al., 2012) when
    `cfg.seeding_rounds` > 0, else k-means++ over all of `x`; either way k-means++ with
    `cfg.seeding_trials` draws per centre picks the final k."""
    trials = cfg.seeding_trials or 2 + int(np.log(k))
    if cfg.seeding_rounds:
        candidates, weights = kmeans_parallel(x, k, rng, cfg.seeding_rounds, cfg.oversampling)
        if len(candidates) >= k:
            return kmeans_plus_plus(candidates, k, rng, trials, weights)
    return kmeans_plus_plus(x, k, rng, trials)


def kmeans_parallel(x: np.ndarray, k: int, rng: np.random.Generator, rounds: int,
                    oversampling: float) -> tuple[np.ndarray, np.ndarray]:
    """k-means|| candidates of `x` [N, D] and their weights (points nearest to each): from one
    random point, each of `rounds` rounds keeps every point independently with probability
    `oversampling` * k * (its squared distance to the nearest candidate) / (the sum of them),
    about `oversampling` * k new candidates. A round is one faiss search of the N points against
    its new candidates (a GEMM, like a Lloyd iteration against that many centroids), where
    k-means++ makes k sequential passes over the N points."""
    n, dim = x.shape
    rows = rng.integers(n, size=1)  # x's rows that are candidates, in order
    d2 = np.full([n], np.inf, np.float32)
    nearest = np.zeros([n], np.int64)  # each point's nearest candidate, a position in `rows`
    old = 0  # candidates searched already
    for r in range(rounds + 1):
        if r:
            p = (oversampling * k / max(float(d2.sum(dtype=np.float64)), 1e-30)) * d2
            new = np.flatnonzero(rng.random(n) < p)
            if not len(new):
                break
            rows = np.concatenate([rows, new])
        index = faiss.IndexFlatL2(dim)
        index.add(x[rows[old:]])
        dist, ids = index.search(x, 1)
        closer = dist[:, 0] < d2
        d2[closer], nearest[closer] = dist[closer, 0], ids[closer, 0] + old
        old = len(rows)
    weights = np.bincount(nearest, minlength=len(rows)).astype(np.float64)
    keep = weights > 0
    return x[rows][keep], weights[keep]


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator, trials: int = 1,
                     weights: np.ndarray | None = None) -> np.ndarray:
    """k centres of `x` [N, D] (float32, points of `weights`, default 1) by k-means++ seeding:
    each next centre is drawn with probability proportional to weight x squared distance to the
    nearest centre so far; with `trials` > 1, the best of that many draws by the resulting
    weighted sum of squared distances (greedy k-means++, as scikit-learn's). One centre costs
    O(N D trials): a [trials, D] x [D, N] product and a running minimum."""
    n = len(x)
    w = np.ones([n]) if weights is None else np.asarray(weights, np.float64)
    w32 = w.astype(np.float32)
    sq = np.einsum("ij,ij->i", x, x)
    centres = np.empty([k, x.shape[1]], np.float32)
    first = int(rng.choice(n, p=w / w.sum()))
    centres[0] = x[first]
    d2 = np.maximum(sq - 2 * (x @ x[first]) + sq[first], 0).astype(np.float32)
    for i in range(1, k):
        total = np.cumsum(w * d2)
        if total[-1] > 0:
            picks = np.searchsorted(total, rng.random(trials) * total[-1], side="right")
            picks = np.minimum(picks, n - 1)
        else:  # every point is a centre already
            picks = rng.integers(n, size=trials)
        dc = (-2 * x[picks]) @ x.T  # squared distances to the draws, 4 passes in all
        dc += sq[None]
        dc += sq[picks][:, None]
        np.minimum(dc, d2[None], out=dc)
        j = int((dc @ w32).argmin()) if trials > 1 else 0
        d2 = np.maximum(dc[j], 0)
        centres[i] = x[picks[j]]
    return centres


def load_or_fit(path: str, vectors: np.ndarray, cfg: ClusterConfig, seed: int = 0) -> Clusters:
    """The centroids saved at `path` (a resumed or restored model keeps its clusters), else
    k-means over `vectors`, saved there."""
    if tf.io.gfile.exists(path):
        clusters = Clusters.load(path)
        if cfg.num_clusters and clusters.num_clusters != cfg.num_clusters:
            raise ValueError(f"{path} holds {clusters.num_clusters} clusters, "
                             f"num_clusters is {cfg.num_clusters}")
        return clusters
    clusters = fit(vectors, cfg, seed)
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    clusters.save(path)
    return clusters

"""Cluster-ID image features (paper 002 Appendix B, Eq. B2-B3).

faiss k-means over the L2-normalised catalog embeddings; an item's feature is the id of its
nearest centroid (Euclidean, which for unit vectors orders like cosine, Eq. B3), used by the CTR
model as a categorical id. faiss trains on a sample of at most `max_points_per_centroid` points per
centroid; every item, and any new one, is then assigned to its nearest centroid. The centroid
table is saved (`clusters.npz`) so that a trained CTR model assigns new items as it was trained.

k defaults to one cluster per `items_per_cluster` catalog items. Paper 002 §5 clusters 6e7 images
into 1e5 clusters (600 per cluster): a cluster id is shared by many items, which is what lets it
generalise like an id feature (App. B). A fixed k that is large for the catalog makes the ids
nearly as sparse as item ids: on the `small` world (8,000 items) k = 256 gave the CTR model no
gain, k = 16 did (README, Table B1).
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
    """k-means over the normalised `vectors` [N, D]; `seed` seeds sampling and initialisation."""
    x = _normalized(vectors)
    k = cfg.num_clusters or max(2, round(len(x) / cfg.items_per_cluster))
    if len(x) < k:
        raise ValueError(f"{len(x)} vectors cannot make {k} clusters")
    cfg = dataclasses.replace(cfg, num_clusters=k)
    rng = np.random.default_rng(seed)
    best, best_obj = None, np.inf
    for r in range(max(cfg.restarts, 1)):
        km = faiss.Kmeans(x.shape[1], cfg.num_clusters, niter=cfg.iterations, seed=seed + r,
                          max_points_per_centroid=cfg.max_points_per_centroid, verbose=False)
        km.train(x, init_centroids=_kmeans_plus_plus(x, cfg, rng))
        objective = float(np.asarray(km.obj)[-1])
        if objective < best_obj:
            best, best_obj = np.asarray(km.centroids, np.float32), objective
    assert best is not None
    return Clusters(best)


def _kmeans_plus_plus(x: np.ndarray, cfg: ClusterConfig, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii, 2007; greedy as scikit-learn's) on a
    sample of the size faiss trains on: each next centre is the best, by the resulting sum of
    squared distances, of 2 + log(k) draws with probability proportional to the squared distance
    to the nearest centre so far."""
    n = min(len(x), cfg.num_clusters * cfg.max_points_per_centroid)
    sample = x[rng.choice(len(x), n, replace=False)] if n < len(x) else x
    sq = (sample ** 2).sum(1)
    trials = 2 + int(np.log(cfg.num_clusters))
    centres = [sample[rng.integers(n)]]
    d2 = np.maximum(sq - 2 * sample @ centres[0] + centres[0] @ centres[0], 0)
    for _ in range(cfg.num_clusters - 1):
        total = d2.sum()
        picks = rng.choice(n, trials, p=d2 / total) if total > 0 else rng.integers(n, size=trials)
        cand = sample[picks]
        dc = np.maximum(sq[None] - 2 * cand @ sample.T + (cand ** 2).sum(1)[:, None], 0)
        new = np.minimum(d2[None], dc)
        best = int(new.sum(1).argmin())
        centres.append(cand[best])
        d2 = new[best]
    return np.stack(centres).astype(np.float32)


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

"""Cluster-ID image features (paper 002 Appendix B, Eq. B2-B3).

faiss k-means over the L2-normalised catalog embeddings; an item's feature is the id of its
nearest centroid (Euclidean, which for unit vectors orders like cosine, Eq. B3), used by the CTR
model as a categorical id. faiss trains on a sample of at most `max_points_per_centroid` points per
centroid; every item, and any new one, is then assigned to its nearest centroid. The centroid
table is saved (`clusters.npz`) so that a trained CTR model assigns new items as it was trained.
"""
from __future__ import annotations

import dataclasses
import io
import os

import faiss
import numpy as np
import tensorflow as tf


@dataclasses.dataclass
class ClusterConfig:
    """k-means settings.

    Attributes:
      num_clusters: k.
      iterations: Lloyd iterations.
      max_points_per_centroid: faiss trains on a random sample of at most this many points per
        centroid.
      seed: Sampling and initialisation seed.
    """

    num_clusters: int = 256
    iterations: int = 25
    max_points_per_centroid: int = 256
    seed: int = 0


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
        buf = io.BytesIO()
        np.savez(buf, centroids=self.centroids)
        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(buf.getvalue())

    @classmethod
    def load(cls, path: str) -> "Clusters":
        with tf.io.gfile.GFile(path, "rb") as f:
            return cls(np.load(io.BytesIO(f.read()))["centroids"])


def _normalized(vectors: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit(vectors: np.ndarray, cfg: ClusterConfig) -> Clusters:
    """k-means over the normalised `vectors` [N, D]."""
    x = _normalized(vectors)
    if len(x) < cfg.num_clusters:
        raise ValueError(f"{len(x)} vectors cannot make {cfg.num_clusters} clusters")
    km = faiss.Kmeans(x.shape[1], cfg.num_clusters, niter=cfg.iterations, seed=cfg.seed,
                      max_points_per_centroid=cfg.max_points_per_centroid, verbose=False)
    km.train(x)
    return Clusters(np.asarray(km.centroids, np.float32))


def load_or_fit(path: str, vectors: np.ndarray, cfg: ClusterConfig) -> Clusters:
    """The centroids saved at `path` (a resumed or restored model keeps its clusters), else
    k-means over `vectors`, saved there."""
    if tf.io.gfile.exists(path):
        clusters = Clusters.load(path)
        if clusters.num_clusters != cfg.num_clusters:
            raise ValueError(f"{path} holds {clusters.num_clusters} clusters, "
                             f"num_clusters is {cfg.num_clusters}")
        return clusters
    clusters = fit(vectors, cfg)
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    clusters.save(path)
    return clusters

"""Cluster-ID features (paper 002 App. B): faiss k-means against scikit-learn, nearest-centroid
assignment of new items, and the saved centroid table."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from trainer import configs
from trainer.features import clusters


def _blobs(rng, k=8, per=200, d=16, noise=0.05):
    centers = rng.normal(size=[k, d])
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    truth = np.repeat(np.arange(k), per)
    x = centers[truth] + noise * rng.normal(size=[k * per, d])
    return x.astype(np.float32), truth


def test_kmeans_agrees_with_scikit_learn_on_separated_data():
    x, truth = _blobs(np.random.default_rng(0))
    fitted = clusters.fit(x, configs.ClusterConfig(num_clusters=8, max_points_per_centroid=64))
    ours = fitted.assign(x)
    theirs = KMeans(8, n_init=10, random_state=0).fit_predict(
        x / np.linalg.norm(x, axis=1, keepdims=True))
    assert adjusted_rand_score(theirs, ours) > 0.95
    assert adjusted_rand_score(truth, ours) > 0.95


def test_new_items_go_to_the_nearest_centroid(tmp_path):
    rng = np.random.default_rng(1)
    x, _ = _blobs(rng)
    fitted = clusters.fit(x, configs.ClusterConfig(num_clusters=8))
    new = rng.normal(size=[50, 16]).astype(np.float32) * 3  # any scale: normalised first
    unit = new / np.linalg.norm(new, axis=1, keepdims=True)
    dist = ((unit[:, None, :] - fitted.centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(fitted.assign(new), dist.argmin(1))
    path = str(tmp_path / "clusters.npz")
    fitted.save(path)
    again = clusters.load_or_fit(path, x[:10], configs.ClusterConfig(num_clusters=8))
    np.testing.assert_array_equal(again.centroids, fitted.centroids)  # loaded, not refitted
    with pytest.raises(ValueError, match="holds 8 clusters"):
        clusters.load_or_fit(path, x, configs.ClusterConfig(num_clusters=4))
    with pytest.raises(ValueError, match="cannot make"):
        clusters.fit(x[:5], configs.ClusterConfig(num_clusters=8))


def test_default_k_is_one_cluster_per_items_per_cluster():
    x, _ = _blobs(np.random.default_rng(2))  # 1,600 vectors
    assert clusters.fit(x, configs.ClusterConfig(items_per_cluster=200)).num_clusters == 8
    assert clusters.fit(x[:100], configs.ClusterConfig()).num_clusters == 2  # at least 2

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


def test_kmeans_parallel_seeds_cover_small_tight_clusters():
    """k-means|| candidates carry all the points as weights, and the greedy k-means++ pick among
    them puts a seed in every planted cluster, the small ones too, where random seeds crowd
    into the big ones."""
    rng = np.random.default_rng(3)
    k, d = 40, 16
    sizes = np.maximum(3, (2000 / np.arange(1, k + 1)).astype(int))  # Zipf: 2000 down to 50
    centres = rng.normal(size=[k, d])
    truth = np.repeat(np.arange(k), sizes)
    x = (centres[truth] + 0.02 * rng.normal(size=[len(truth), d])).astype(np.float32)
    cfg = configs.ClusterConfig()
    candidates, weights = clusters.kmeans_parallel(x, k, rng, cfg.seeding_rounds,
                                                   cfg.oversampling)
    assert weights.sum() == len(x) and (weights > 0).all()
    nearest = ((x[:, None] - candidates[None]) ** 2).sum(-1).argmin(1)  # every point's
    moved = np.abs(np.bincount(nearest, minlength=len(candidates)) - weights).sum() / 2
    assert moved <= 0.01 * len(x), moved  # near ties aside, as faiss assigns them
    assert k <= len(candidates) <= 3 * cfg.seeding_rounds * k
    seeds = clusters.seed_centres(x, k, cfg, rng)

    def covered(points):
        return len(np.unique(((points[:, None] - centres[None]) ** 2).sum(-1).argmin(1)))

    assert covered(seeds) == k
    assert covered(x[rng.choice(len(x), k, replace=False)]) < 0.8 * k  # random seeds do not

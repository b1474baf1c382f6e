"""The CTR stages on the tiny world: the model learns, the command line trains / resumes /
evaluates with D and an encoder's embedding table, and one step under MirroredStrategy equals one
step on one device."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, one_step_on_one_and_two_replicas, read_all
from trainer.data import records
from trainer.features import clusters, embeddings
from trainer.models import ctr, debias, encoder, pretrain
from trainer.train import loop

ENC = encoder.EncoderConfig(depth=10, width_multiplier=0.5, image_size=32, feature_dim=32)


@pytest.fixture(scope="module")
def encoder_dir(tiny_world, tmp_path_factory) -> str:
    """A (briefly) trained S1 encoder model dir, as the CTR stages take it."""
    model_dir = str(tmp_path_factory.mktemp("enc"))
    train = loop.TrainConfig(steps=3, global_batch_size=16, log_interval=3, warmup_steps=0)
    task = pretrain.PretrainTask(
        pretrain.PretrainConfig(catalog_pattern=records.default_pattern(tiny_world, "catalog")),
        ENC, train)
    loop.run(task, train, model_dir, {"encoder": dataclasses.asdict(ENC)})
    return model_dir


def _cfg(world: str, **kw) -> ctr.CtrConfig:
    return ctr.CtrConfig(train_pattern=records.default_pattern(world, "ctr", "train"),
                         test_pattern=records.default_pattern(world, "ctr", "test"),
                         tower_units=(64, 32), **kw)


def test_vocabularies_come_from_training_data_and_round_trip(tiny_world, tmp_path):
    cfg = _cfg(tiny_world, hash_bins={"user_id": 97})
    v = ctr.Vocabularies.from_training_data(cfg.train_pattern, cfg)
    train = read_all(tiny_world, "ctr", "train")
    assert "user_id" not in v.ids  # hashed
    hist = train["click_history_item_ids"][train["click_history_item_ids_mask"]]
    np.testing.assert_array_equal(v.ids["item_id"], np.union1d(train["item_id"], hist))
    assert len(v.price_boundaries) <= cfg.price_buckets - 1
    v.save(str(tmp_path / "v.npz"))
    back = ctr.Vocabularies.load(str(tmp_path / "v.npz"))
    assert back.ids.keys() == v.ids.keys()
    for k in v.ids:
        np.testing.assert_array_equal(back.ids[k], v.ids[k])
    model = ctr.CtrModel(cfg, v)
    assert model.lookups["user_id"].num_bins == 97
    # An item never seen in training shares the out-of-vocabulary row.
    assert int(model.lookups["item_id"](tf.constant([-5], tf.int64))[0]) == 0


def test_ctr_learns_on_the_tiny_world(tiny_world, tmp_path):
    cfg = _cfg(tiny_world)
    train = loop.TrainConfig(steps=150, global_batch_size=128, optimizer="adam",
                             learning_rate=2e-3, warmup_steps=0, log_interval=50,
                             lr_schedule="constant")
    vocab = ctr.vocabularies_for(str(tmp_path), cfg)
    loop.run(ctr.CtrTask(cfg, vocab, train), train, str(tmp_path), {})
    model = ctr.restore(str(tmp_path), cfg, vocab)
    catalog = read_all(tiny_world, "catalog")
    m = ctr.evaluate(model, cfg, catalog["item_id"], catalog["impressions_30d"])
    print(m)
    # Position and item quality alone are worth about 0.6 here; a constant predictor gets 0.5.
    assert m["AUC"] > 0.56
    assert m["samples"] == len(read_all(tiny_world, "ctr", "test")["label"])


def test_evaluation_refuses_items_missing_from_the_catalog(tiny_world, tmp_path):
    cfg = _cfg(tiny_world)
    vocab = ctr.vocabularies_for(str(tmp_path), cfg)
    model = ctr.CtrModel(cfg, vocab)
    catalog = read_all(tiny_world, "catalog")
    with pytest.raises(ValueError, match="not in the catalog"):
        ctr.evaluate(model, cfg, catalog["item_id"][:10], catalog["impressions_30d"][:10])


def test_one_step_same_on_two_replicas_as_on_one_device(tiny_world, encoder_dir, mirrored):
    # With D, which holds the whole model without D. K = 1: the positive draw is deterministic,
    # so both runs see the same positives.
    cfg = _cfg(tiny_world, debias=debias.DebiasConfig(num_similar=1))
    table = embeddings.for_encoder(encoder_dir, records.default_pattern(tiny_world, "catalog"),
                                   records.default_pattern(tiny_world, "queries"))
    positives = debias.mine_positives(table.item_vector, table.category_id,
                                      table.impressions_30d, 1, 5)
    train = loop.TrainConfig(steps=10, global_batch_size=16, optimizer="sgd", learning_rate=0.5,
                             warmup_steps=0, deterministic=True)
    vocab = ctr.Vocabularies.from_training_data(cfg.train_pattern, cfg)

    start, after = one_step_on_one_and_two_replicas(
        lambda: ctr.CtrTask(cfg, vocab, train, table, positives), train, mirrored,
        lambda task: task.model)
    assert sum(int(not np.allclose(a, s)) for a, s in zip(after, start)) > 10


def test_target_attention_and_cross_layers_train(tiny_world, encoder_dir):
    cfg = _cfg(tiny_world, history_pooling="target", cross_layers=1)
    table = embeddings.for_encoder(encoder_dir, records.default_pattern(tiny_world, "catalog"),
                                   records.default_pattern(tiny_world, "queries"))
    train = loop.TrainConfig(steps=1, global_batch_size=32, optimizer="sgd", learning_rate=0.1,
                             warmup_steps=0)
    task = ctr.CtrTask(cfg, ctr.Vocabularies.from_training_data(cfg.train_pattern, cfg), train,
                       table)
    batch = {k: v.numpy() for k, v in next(iter(task.build_inputs(None))).items()}
    loss, _ = loop.one_step(task, train, tf.distribute.OneDeviceStrategy("/cpu:0"), batch)
    assert np.isfinite(loss)
    names = " ".join(v.name for v in task.model.trainable_variables)
    assert "target_attention" in names and "cross_0" in names


@pytest.mark.parametrize("mode", ["vector", "simscore", "cluster_id"])
def test_image_feature_modes(mode, tiny_world, encoder_dir):
    # Paper 002 App. B: Vector feeds the centred, re-normalised vectors; SimScore feeds
    # cos(item, history item) per history slot (Eq. B1); Cluster-ID feeds the nearest centroid's
    # id, also for items added after k-means.
    cfg = _cfg(tiny_world, image_feature_mode=mode)
    table = embeddings.for_encoder(encoder_dir, records.default_pattern(tiny_world, "catalog"),
                                   records.default_pattern(tiny_world, "queries"))
    centroids = clusters.fit(table.item_vector, clusters.ClusterConfig(num_clusters=8))
    train = loop.TrainConfig(steps=1, global_batch_size=32, optimizer="sgd", learning_rate=0.1,
                             warmup_steps=0)
    task = ctr.CtrTask(cfg, ctr.Vocabularies.from_training_data(cfg.train_pattern, cfg), train,
                       table, clusters=centroids)
    batch = {k: v.numpy() for k, v in next(iter(task.build_inputs(None))).items()}
    loss, _ = loop.one_step(task, train, tf.distribute.OneDeviceStrategy("/cpu:0"), batch)
    assert np.isfinite(loss)
    model = task.model
    ids, mask = batch["click_history_item_ids"][:, -20:], batch["click_history_item_ids_mask"][:, -20:]
    parts, _, _, _ = model.image_features(batch, tf.constant(ids), tf.constant(mask))
    row = {int(i): r for r, i in enumerate(table.item_id)}
    vec = lambda i: table.item_vector[row[int(i)]] if int(i) in row else np.zeros(table.dim)  # noqa: E731
    if mode == "vector":
        mean = table.item_vector.mean(axis=0)
        unit = lambda v: (v - mean) / np.linalg.norm(v - mean)  # noqa: E731
        np.testing.assert_allclose(parts[0].numpy(), [unit(vec(i)) for i in batch["item_id"]],
                                   atol=1e-5)
        qrow = {int(q): r for r, q in enumerate(table.query_id)}
        np.testing.assert_allclose(parts[1].numpy(), [unit(table.query_vector[qrow[int(q)]])
                                                      for q in batch["query_id"]], atol=1e-5)
    elif mode == "simscore":
        expected = np.array([[vec(h) @ vec(item) if m else 0.0 for h, m in zip(hs, ms)]
                             for item, hs, ms in zip(batch["item_id"], ids, mask)])
        expected = np.where(mask, (expected - model.score_shift) / model.score_scale, 0.0)
        np.testing.assert_allclose(parts[0].numpy(), expected, atol=1e-4)
        assert parts[1].shape == (32, 1)  # cos(v_p, v_q)
    else:
        got = model.images(tf.constant(table.item_id)).numpy()
        np.testing.assert_array_equal(got, centroids.assign(table.item_vector) + 1)
        assert int(model.images(tf.constant([-7], tf.int64))[0]) == 0  # unknown item
        # The cluster embedding starts at the unit scale of the vectors it stands for.
        rows = np.linalg.norm(model.cluster_embedding.embeddings.numpy(), axis=1)
        assert 0.7 < rows.mean() < 1.3
        # A new item is assigned to its nearest centroid when a model is built on a table
        # that holds it, with the saved centroids.
        new = dataclasses.replace(table, item_id=np.append(table.item_id, 10**12),
                                  item_vector=np.concatenate(
                                      [table.item_vector, centroids.centroids[3:4] + 1e-3]))
        grown = ctr.ClusterTable(new.item_id, new.item_vector, centroids.centroids)
        assert int(grown(tf.constant([10**12], tf.int64))[0]) == 4


def test_command_line_debias_trains_resumes_and_evaluates(tiny_world, encoder_dir, tmp_path):
    model_dir = str(tmp_path / "d")
    base = [sys.executable, "-m", "trainer.task", "--stage=debias", f"--data_dir={tiny_world}",
            f"--model_dir={model_dir}", "--image_features=s1s2",
            f"--image_model_dir={encoder_dir}", f"--s1_model_dir={encoder_dir}",
            "--batch_size=64", "--log_interval=5", "--checkpoint_interval=5"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

    def run(*args):
        out = subprocess.run(base + list(args), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout + out.stderr

    log = run("--train_steps=5")
    assert "have positives" in log
    log = run("--train_steps=10")
    assert "resumed from step 5" in log
    metrics = json.load(open(os.path.join(model_dir, "metrics.json")))
    assert {"AUC", "GAUC", "AUC_bottom10", "AUC_top10"} <= set(metrics)
    assert metrics["debias"] and metrics["image_features"] == "s1s2"
    assert all(0 <= metrics[k] <= 1 for k in ("AUC", "GAUC", "AUC_bottom10", "AUC_top10"))
    config = json.load(open(os.path.join(model_dir, "config.json")))
    assert config["ctr"]["debias"]["num_similar"] == 15
    assert config["train"]["optimizer"] == "adam" and config["train"]["global_batch_size"] == 64
    assert os.path.exists(os.path.join(model_dir, "vocabularies.npz"))
    assert os.path.exists(os.path.join(encoder_dir, embeddings.FILE))
    out = subprocess.run(base[:4] + [f"--data_dir={tiny_world}", f"--model_dir={model_dir}x",
                                     "--image_features=none"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "needs --image_features" in out.stderr


def test_embedding_table_cache_follows_the_checkpoint(tiny_world, encoder_dir):
    catalog = records.default_pattern(tiny_world, "catalog")
    queries = records.default_pattern(tiny_world, "queries")
    a = embeddings.for_encoder(encoder_dir, catalog, queries)
    path = os.path.join(encoder_dir, embeddings.FILE)
    stamp = os.path.getmtime(path)
    b = embeddings.for_encoder(encoder_dir, catalog, queries)
    assert os.path.getmtime(path) == stamp  # served from the cache
    np.testing.assert_array_equal(a.item_vector, b.item_vector)
    assert len(a.query_id) == len(read_all(tiny_world, "queries")["query_id"])
    np.testing.assert_allclose(np.linalg.norm(a.item_vector, axis=1), 1.0, rtol=1e-5)
    # Another data set (here: the catalog without its queries) is not served from the cache.
    c = embeddings.for_encoder(encoder_dir, catalog, None)
    assert len(c.query_id) == 0

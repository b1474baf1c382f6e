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
from trainer import configs
from trainer.ctr import debias
from trainer.ctr import spec as ctr_spec
from trainer.ctr import task as ctr_task
from trainer.ctr.model import CtrModel
from trainer.ctr.tables import ClusterTable, Vocabularies
from trainer.data import records
from trainer.features import clusters, embeddings
from trainer.train import loop

ENC = configs.EncoderConfig(depth=10, width_multiplier=0.5, image_size=32, feature_dim=32)
SPEC = ctr_spec.load("synthetic")


def _table(world: str, encoder_dir: str) -> embeddings.EmbeddingTable:
    return embeddings.for_encoder(encoder_dir, records.default_pattern(world, "catalog"),
                                  records.default_pattern(world, "queries"))


def _cfg(world: str, **kw) -> configs.CtrConfig:
    return configs.CtrConfig(train_pattern=records.default_pattern(world, "ctr", "train"),
                             test_pattern=records.default_pattern(world, "ctr", "test"),
                             tower_units=(64, 32), **kw)


def test_vocabularies_come_from_training_data_and_round_trip(tiny_world, tmp_path):
    cfg = _cfg(tiny_world)
    spec = SPEC.with_hash_bins({"user_id": 97})
    v = Vocabularies.from_training_data(cfg.train_pattern, spec)
    train = read_all(tiny_world, "ctr", "train")
    assert "user_id" not in v.ids  # hashed
    hist = train["click_history_item_ids"][train["click_history_item_ids_mask"]]
    # The history shares the item table: one vocabulary of both.
    np.testing.assert_array_equal(v.ids["item_id"], np.union1d(train["item_id"], hist))
    prefs = train["preferred_category_ids"][train["preferred_category_ids_mask"]]
    np.testing.assert_array_equal(v.ids["category_id"], np.union1d(train["category_id"], prefs))
    assert 1 <= len(v.boundaries["price"]) <= spec.feature("price").buckets - 1
    qs = np.linspace(0, 1, 17)[1:-1]  # the streamed quantiles equal the in-memory ones
    np.testing.assert_allclose(v.boundaries["price"], np.unique(np.quantile(train["price"], qs)),
                               rtol=1e-6)
    v.save(str(tmp_path / "v.npz"))
    back = Vocabularies.load(str(tmp_path / "v.npz"))
    assert back.ids.keys() == v.ids.keys()
    for k in v.ids:
        np.testing.assert_array_equal(back.ids[k], v.ids[k])
    model = CtrModel(cfg, spec, v)
    assert model.lookups["user_id"].num_bins == 97
    # An item never seen in training shares the out-of-vocabulary row.
    assert int(model.lookups["item_id"](tf.constant([-5], tf.int64))[0]) == 0


def test_normalised_and_vector_numeric_features(tiny_world):
    # A spec of the world's columns plus a normalised price: its statistics stream exactly.
    d = SPEC.to_dict()
    d["features"] = [f for f in d["features"] if f["name"] != "price"] + [
        {"name": "price", "kind": "numeric", "transform": "normalize", "log": True}]
    spec = ctr_spec.parse(d, "test")
    v = Vocabularies.from_training_data(records.default_pattern(tiny_world, "ctr", "train"), spec)
    price = np.log1p(read_all(tiny_world, "ctr", "train")["price"].astype(np.float64))
    np.testing.assert_allclose(v.moments["price"][:, 0], [price.mean(), price.std()], rtol=1e-5)
    model = CtrModel(_cfg(tiny_world), spec, v).build_variables()
    batch = {k: tf.constant(x[:4]) for k, x in read_all(tiny_world, "ctr", "test").items()}
    assert np.isfinite(model(batch).numpy()).all()


def test_ctr_learns_on_the_tiny_world(tiny_world, tmp_path):
    cfg = _cfg(tiny_world)
    train = configs.TrainConfig(steps=150, global_batch_size=128, optimizer="adam",
                                learning_rate=2e-3, warmup_steps=0, log_interval=50,
                                lr_schedule="constant")
    catalog = read_all(tiny_world, "catalog")
    m = ctr_task.train_and_evaluate(cfg, SPEC, train, str(tmp_path), catalog["item_id"],
                                    catalog["impressions_30d"])
    print(m)
    # Position and item quality alone are worth about 0.6 here; a constant predictor gets 0.5.
    assert m["AUC"] > 0.56
    assert m["samples"] == len(read_all(tiny_world, "ctr", "test")["label"])
    # The spec and the vocabularies are in the model dir; another spec is refused there.
    assert ctr_spec.load(str(tmp_path / ctr_spec.FILE)).to_dict() == SPEC.to_dict()
    with pytest.raises(ValueError, match="another feature spec"):
        ctr_task.spec_for(str(tmp_path), ctr_spec.load("feed"))


def test_evaluation_refuses_items_missing_from_the_catalog(tiny_world, tmp_path):
    cfg = _cfg(tiny_world)
    vocab = ctr_task.vocabularies_for(str(tmp_path), cfg, SPEC)
    model = CtrModel(cfg, SPEC, vocab)
    catalog = read_all(tiny_world, "catalog")
    with pytest.raises(ValueError, match="not in the catalog"):
        ctr_task.evaluate(model, cfg.test_pattern, catalog["item_id"][:10],
                          catalog["impressions_30d"][:10])


def test_one_step_same_on_two_replicas_as_on_one_device(tiny_world, encoder_dir, mirrored):
    # With D, which holds the whole model without D. K = 1: the positive draw is deterministic,
    # so both runs see the same positives.
    cfg = _cfg(tiny_world, debias=configs.DebiasConfig(num_similar=1))
    table = _table(tiny_world, encoder_dir)
    positives = debias.mine_positives(table.item_vector, table.category_id,
                                      table.impressions_30d < 5, 1)
    train = configs.TrainConfig(steps=10, global_batch_size=16, optimizer="sgd",
                                learning_rate=0.5, warmup_steps=0, deterministic=True)
    vocab = Vocabularies.from_training_data(cfg.train_pattern, SPEC)

    start, after = one_step_on_one_and_two_replicas(
        lambda: ctr_task.CtrTask(cfg, SPEC, vocab, train, table, positives), train, mirrored,
        lambda task: task.model)
    assert sum(int(not np.allclose(a, s)) for a, s in zip(after, start, strict=True)) > 10


def test_target_attention_and_cross_layers_train(tiny_world, encoder_dir):
    cfg = _cfg(tiny_world, history_pooling="target", cross_layers=1)
    train = configs.TrainConfig(steps=1, global_batch_size=32, optimizer="sgd",
                                learning_rate=0.1, warmup_steps=0)
    task = ctr_task.CtrTask(cfg, SPEC, Vocabularies.from_training_data(cfg.train_pattern, SPEC),
                            train, _table(tiny_world, encoder_dir))
    batch = {k: v.numpy() for k, v in next(iter(task.build_inputs(None))).items()}
    loss, _ = loop.one_step(task, train, tf.distribute.OneDeviceStrategy("/cpu:0"), batch)
    assert np.isfinite(loss)
    names = " ".join(v.name for v in task.model.trainable_variables)
    assert "click_history_item_ids_target_attention" in names and "cross_0" in names


@pytest.mark.parametrize("mode", ["vector", "simscore", "cluster_id"])
def test_image_feature_modes(mode, tiny_world, encoder_dir):
    # Paper 002 App. B: Vector feeds the centred, re-normalised vectors; SimScore feeds
    # cos(item, history item) per history slot (Eq. B1); Cluster-ID feeds the nearest centroid's
    # id, also for items added after k-means.
    cfg = _cfg(tiny_world, image_feature_mode=mode)
    table = _table(tiny_world, encoder_dir)
    centroids = clusters.fit(table.item_vector, configs.ClusterConfig(num_clusters=8))
    train = configs.TrainConfig(steps=1, global_batch_size=32, optimizer="sgd",
                                learning_rate=0.1, warmup_steps=0)
    task = ctr_task.CtrTask(cfg, SPEC, Vocabularies.from_training_data(cfg.train_pattern, SPEC),
                            train, table, clusters=centroids)
    batch = {k: v.numpy() for k, v in next(iter(task.build_inputs(None))).items()}
    loss, _ = loop.one_step(task, train, tf.distribute.OneDeviceStrategy("/cpu:0"), batch)
    assert np.isfinite(loss)
    model = task.model
    tensors = {k: tf.constant(v) for k, v in batch.items()}
    v_p, _ = model.item_image(tensors)
    query = model.image_inputs(SPEC.feature("query_image"), tensors, v_p)
    history = model.image_inputs(SPEC.feature("history_images"), tensors, v_p)
    ids, mask = batch["click_history_item_ids"], batch["click_history_item_ids_mask"]
    row = {int(i): r for r, i in enumerate(table.item_id)}
    vec = lambda i: table.item_vector[row[int(i)]] if int(i) in row else np.zeros(table.dim)  # noqa: E731
    if mode == "vector":
        mean = table.item_vector.mean(axis=0)
        unit = lambda v: (v - mean) / np.linalg.norm(v - mean)  # noqa: E731
        np.testing.assert_allclose(v_p.numpy(), [unit(vec(i)) for i in batch["item_id"]],
                                   atol=1e-5)
        qrow = {int(q): r for r, q in enumerate(table.query_id)}
        np.testing.assert_allclose(query[0].numpy(), [unit(table.query_vector[qrow[int(q)]])
                                                      for q in batch["query_id"]], atol=1e-5)
        assert history == []  # the history's vectors go into its attention, beside its ids
    elif mode == "simscore":
        expected = np.array([[vec(h) @ vec(item) if m else 0.0 for h, m in zip(hs, ms, strict=True)]
                             for item, hs, ms in zip(batch["item_id"], ids, mask, strict=True)])
        expected = np.where(mask, (expected - model.score_shift) / model.score_scale, 0.0)
        np.testing.assert_allclose(history[0].numpy(), expected, atol=1e-4)
        assert query[0].shape == (32, 1)  # cos(v_p, v_q)
    else:
        items = model.image_tables["items"]
        got = items(tf.constant(table.item_id)).numpy()
        np.testing.assert_array_equal(got, centroids.assign(table.item_vector) + 1)
        assert int(items(tf.constant([-7], tf.int64))[0]) == 0  # unknown item
        # The cluster embedding starts at the unit scale of the vectors it stands for.
        rows = np.linalg.norm(model.cluster_embedding.embeddings.numpy(), axis=1)
        assert 0.7 < rows.mean() < 1.3
        # A new item is assigned to its nearest centroid when a model is built on a table
        # that holds it, with the saved centroids.
        new = dataclasses.replace(table, item_id=np.append(table.item_id, 10**12),
                                  item_vector=np.concatenate(
                                      [table.item_vector, centroids.centroids[3:4] + 1e-3]))
        grown = ClusterTable(new.item_id, new.item_vector, centroids.centroids)
        assert int(grown(tf.constant([10**12], tf.int64))[0]) == 4


def test_command_line_debias_trains_resumes_and_evaluates(tiny_world, encoder_dir, tmp_path):
    model_dir = str(tmp_path / "d")
    base = [sys.executable, "-m", "trainer.task", "--stage=debias", f"--data_dir={tiny_world}",
            f"--model_dir={model_dir}", "--image_features=s1s2",
            f"--image_model_dir={encoder_dir}", f"--s1_model_dir={encoder_dir}",
            "--batch_size=64", "--log_interval=5", "--checkpoint_interval=5",
            "--set=ctr.debias.positives=not_displayed"]  # the paper's pool, from the logs
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

    def run(*args):
        out = subprocess.run(base + list(args), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout + out.stderr

    log = run("--train_steps=5")
    assert "have positives" in log and "not_displayed items" in log
    log = run("--train_steps=10")
    assert "resumed from step 5" in log
    metrics = json.load(open(os.path.join(model_dir, "metrics.json")))
    assert {"AUC", "GAUC", "AUC_bottom10", "AUC_top10"} <= set(metrics)
    assert metrics["debias"] and metrics["image_features"] == "s1s2"
    assert metrics["feature_spec"] == "synthetic"
    assert all(0 <= metrics[k] <= 1 for k in ("AUC", "GAUC", "AUC_bottom10", "AUC_top10"))
    config = configs.load(model_dir)
    assert isinstance(config, configs.DebiasStage)
    assert config.ctr.debias is not None and config.ctr.debias.num_similar == 15
    assert config.train.optimizer == "adam" and config.train.global_batch_size == 64
    assert config.images.model_dir == encoder_dir
    assert os.path.exists(os.path.join(model_dir, ctr_task.VOCABULARIES))
    assert os.path.exists(os.path.join(model_dir, ctr_spec.FILE))
    assert os.path.exists(os.path.join(encoder_dir, embeddings.FILE))
    out = subprocess.run(base[:4] + [f"--data_dir={tiny_world}", f"--model_dir={model_dir}x",
                                     "--image_features=none"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "needs image features: --image_features" in out.stderr


def test_embedding_table_cache_follows_the_checkpoint(tiny_world, encoder_dir):
    catalog = records.default_pattern(tiny_world, "catalog")
    a = _table(tiny_world, encoder_dir)
    path = os.path.join(encoder_dir, embeddings.FILE)
    stamp = os.path.getmtime(path)
    b = _table(tiny_world, encoder_dir)
    assert os.path.getmtime(path) == stamp  # served from the cache
    np.testing.assert_array_equal(a.item_vector, b.item_vector)
    assert len(a.query_id) == len(read_all(tiny_world, "queries")["query_id"])
    np.testing.assert_allclose(np.linalg.norm(a.item_vector, axis=1), 1.0, rtol=1e-5)
    # Another data set (here: the catalog without its queries) is not served from the cache.
    c = embeddings.for_encoder(encoder_dir, catalog, None)
    assert len(c.query_id) == 0


@pytest.mark.parametrize("mode", ["vector", "simscore"])
def test_image_statistics_streamed_from_the_saved_table_equal_the_tables_own(tmp_path, mode):
    """A saved table is read a chunk at a time (chunks smaller than the table, the last one
    short), never whole: the normalisation a model gets from it equals the one from the table in
    memory, and only the asked-for arrays are read."""
    from trainer.ctr.model import image_statistics
    from trainer.data import npz

    rng = np.random.default_rng(0)
    v = rng.normal(size=[1003, 8]).astype(np.float32)
    table = embeddings.EmbeddingTable(
        np.arange(1003), np.zeros(1003, np.int64), np.arange(1003) % 7,
        v / np.linalg.norm(v, axis=1, keepdims=True), np.arange(5),
        np.ones([5, 8], np.float32) / np.sqrt(8), "a source")
    path = str(tmp_path / embeddings.FILE)
    embeddings.save(table, path)
    saved = embeddings.describe(path)
    assert (saved.items, saved.dim, saved.source) == (1003, 8, "a source")
    chunks = list(npz.chunks(path, "item_vector", rows=100))
    assert [len(c) for c in chunks] == [100] * 10 + [3]
    np.testing.assert_array_equal(np.concatenate(chunks), table.item_vector)
    rows = np.array([1002, 0, 517, 517, 99, 100])
    np.testing.assert_array_equal(embeddings.take_rows(iter(chunks), rows),
                                  table.item_vector[rows])
    streamed, in_memory = image_statistics(saved, mode), image_statistics(table, mode)
    assert streamed.keys() == in_memory.keys()
    for k in streamed:
        np.testing.assert_allclose(streamed[k], in_memory[k], rtol=1e-6)
    assert set(npz.read(path, ["item_id", "source"])) == {"item_id", "source"}
    with pytest.raises(ValueError, match="no \\['vectors'\\] array"):
        npz.read(path, ["vectors"])

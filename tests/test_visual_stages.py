"""The encoder stages end to end on the tiny world: S1, S2, S1+S2, ResNet-C, visual search; one
step under MirroredStrategy equals one step on one device; the command line resumes."""
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
from trainer.data import npz, records
from trainer.eval import visual_search
from trainer.features import embeddings
from trainer.models import classify, encoder, finetune, pretrain
from trainer.train import loop

ENC = configs.EncoderConfig(depth=10, width_multiplier=0.5, image_size=32, feature_dim=64,
                            batch_norm_momentum=0.9)


def _tasks(world: str, enc: configs.EncoderConfig, train: configs.TrainConfig) -> dict:
    catalog = records.default_pattern(world, "catalog")
    sessions = records.default_pattern(world, "search_sessions", "train")
    return {
        "pretrain": lambda e=enc: pretrain.PretrainTask(
            configs.PretrainConfig(catalog_pattern=catalog), e, train),
        "finetune": lambda e=enc: finetune.FinetuneTask(
            configs.FinetuneConfig(sessions_pattern=sessions, catalog_pattern=catalog,
                                   pool_size=32), e, train),
        "classify": lambda e=enc: classify.ClassifyTask(
            configs.ClassifyConfig(catalog_pattern=catalog), e, train),
    }


def _search(world: str) -> configs.SearchEvalConfig:
    return configs.SearchEvalConfig(
        catalog_pattern=records.default_pattern(world, "catalog"),
        judgments_pattern=records.default_pattern(world, "judgments"), ks=(10, 100))


def _train(task, train_cfg, model_dir, enc_cfg):
    loop.run(task, train_cfg, model_dir)
    return encoder.restore(model_dir, enc_cfg)


@pytest.mark.slow  # 3 minutes of training: `make test-slow`
def test_s1_s2_beats_a_random_encoder_and_every_stage_runs(tiny_world, tmp_path):
    # Deterministic: the tiny world's 60 judged queries make HR noisy between runs. S1 needs about
    # 400 steps here: at 200 its HR was still that of a random encoder (0.27 vs 0.27; 0.40 at 400).
    s1_train = configs.TrainConfig(steps=400, global_batch_size=64, learning_rate=2e-3,
                                warmup_steps=5, checkpoint_interval=100, log_interval=100,
                                deterministic=True)
    s2_train = dataclasses.replace(s1_train, steps=100, global_batch_size=32, learning_rate=5e-4)
    s1 = _train(_tasks(tiny_world, ENC, s1_train)["pretrain"](), s1_train, str(tmp_path / "s1"),
                ENC)
    s1s2_cfg = dataclasses.replace(ENC, init_checkpoint=str(tmp_path / "s1"))
    s1s2 = _train(_tasks(tiny_world, s1s2_cfg, s2_train)["finetune"](), s2_train,
                  str(tmp_path / "s1s2"), s1s2_cfg)
    short = dataclasses.replace(s2_train, steps=10)
    resnet_c = _train(_tasks(tiny_world, ENC, short)["classify"](), short, str(tmp_path / "c"),
                      ENC)
    tf.keras.utils.set_random_seed(0)
    random = encoder.Encoder(ENC)
    catalog = records.default_pattern(tiny_world, "catalog")
    metrics = {name: visual_search.evaluate(embeddings.compute(enc, catalog, None).catalog(),
                                            _search(tiny_world))
               for name, enc in [("random", random), ("s1", s1), ("s1s2", s1s2),
                                 ("resnet_c", resnet_c)]}
    print(json.dumps(metrics, indent=1))
    # Measured: random 0.27, S1 0.40, S1+S2 0.58 (random seeds 1, 2 give 0.19, 0.21).
    assert metrics["s1"]["HR"] > metrics["random"]["HR"] + 0.05
    assert metrics["s1s2"]["HR"] > metrics["s1"]["HR"] + 0.05
    for m in metrics.values():
        assert 0 <= m["HR"] <= 1 and m["queries"] > 0


def test_s2_batches_hold_one_category_and_its_negative_pool(tiny_world):
    train = configs.TrainConfig(global_batch_size=16, deterministic=True)
    task = _tasks(tiny_world, ENC, train)["finetune"]()
    catalog = read_all(tiny_world, "catalog")
    category_of = dict(zip(catalog["item_id"].tolist(), catalog["category_id"].tolist(),
                           strict=True))
    seen = set()
    for batch in task.build_inputs(None).take(6):
        cats = set(batch["clicked_category_id"].numpy().tolist())
        assert len(cats) == 1
        pool = batch["pool_item_id"].numpy().tolist()
        assert len(pool) == 32 and len(set(pool)) == 32  # drawn without replacement
        assert {category_of[i] for i in pool} == cats
        assert batch["pool_image"].shape == (32, 32, 32, 3)
        seen |= cats
    assert len(seen) > 1


def test_s2_negatives_are_the_same_on_one_and_two_replicas(tiny_world, mirrored):
    # Several steps of the real input: the global batch, its category and pool, and the loss and
    # negatives per query are those of one device, the pool split between the replicas.
    train = configs.TrainConfig(global_batch_size=16, deterministic=True)
    one_task, two_task = (_tasks(tiny_world, ENC, train)["finetune"]() for _ in range(2))
    one = [{k: v.numpy() for k, v in b.items()} for b in one_task.build_inputs(None).take(4)]
    model = one_task.build_model()
    with mirrored.scope():
        two_task.build_model().set_weights(model.get_weights())

    @tf.function
    def losses(batch):
        loss, metrics = mirrored.run(lambda b: two_task.compute_loss(b, training=False),
                                     args=(batch,))
        return [mirrored.reduce("SUM", x, None) for x in (loss, metrics["negatives_per_query"])]

    dist = iter(mirrored.distribute_datasets_from_function(two_task.build_inputs))
    categories = set()
    for step, expected in enumerate(one):
        batch = next(dist)
        for key in ("query_id", "clicked_item_id", "pool_item_id", "query_clicks"):
            parts = [x.numpy() for x in mirrored.experimental_local_results(batch[key])]
            assert [len(x) for x in parts] == [len(expected[key]) // 2] * 2, key
            np.testing.assert_array_equal(np.concatenate(parts), expected[key], err_msg=key)
        np.testing.assert_allclose(mirrored.experimental_local_results(batch["pool_image"])[1],
                                   expected["pool_image"][16:], atol=1e-6)
        loss, metrics = one_task.compute_loss(expected, training=False)
        loss_2, negatives_2 = losses(batch)
        assert abs(float(loss) - float(loss_2)) < 1e-5 * max(1.0, float(loss)), step
        assert float(metrics["negatives_per_query"]) == float(negatives_2), step
        categories |= set(expected["clicked_category_id"].tolist())
    assert len(categories) > 1
    # Two workers (an input pipeline each, as MultiWorkerMirrored runs them): each reads the
    # whole stream and keeps its replica's rows and share of the pool.
    for worker in (0, 1):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                             num_replicas_in_sync=2)
        task = _tasks(tiny_world, ENC, train)["finetune"]()
        for got, expected in zip(task.build_inputs(context).take(4), one, strict=True):
            for key, n in (("query_id", 8), ("clicked_item_id", 8), ("pool_item_id", 16)):
                np.testing.assert_array_equal(
                    got[key].numpy(), expected[key][worker * n:(worker + 1) * n], err_msg=key)


def test_s2_excludes_every_click_of_the_query_from_its_negatives():
    clicks = finetune.QueryClicks(np.array([7, 7, 7, 9, 7]), np.array([1, 2, 3, 4, 1]))
    got = clicks.lookup(tf.constant([9, 7, 5], tf.int64)).numpy()
    np.testing.assert_array_equal(got, [[4, -1, -1], [1, 2, 3], [-1, -1, -1]])
    v = tf.math.l2_normalize(tf.random.stateless_normal([6, 8], [0, 1]), -1)
    # Two rows of query 7 (clicked 1 and 2); the pool holds 3 (a click of query 7 elsewhere in
    # the logs), 5 and 6: row 0's negatives are 5 and 6 only, as are row 1's.
    meta = {"query_id": tf.constant([7, 7], tf.int64),
            "clicked_item_id": tf.constant([1, 2], tf.int64),
            "clicked_category_id": tf.constant([0, 0], tf.int64),
            "pool_item_id": tf.constant([3, 5, 6], tf.int64),
            "pool_category_id": tf.constant([0, 0, 0], tf.int64),
            "query_clicks": clicks.lookup(tf.constant([7, 7], tf.int64))}
    _, negatives = finetune.s2_loss(v[:2], v[2:4], v[3:6], meta, 0.1)
    assert float(negatives) == 2.0
    del meta["query_clicks"]  # without the logs, 3 is a negative of both rows
    _, negatives = finetune.s2_loss(v[:2], v[2:4], v[3:6], meta, 0.1)
    assert float(negatives) == 3.0


def test_init_checkpoint_must_match_the_backbone(tiny_world, tmp_path):
    train = configs.TrainConfig(steps=1, global_batch_size=8, warmup_steps=0)
    _train(_tasks(tiny_world, ENC, train)["pretrain"](), train, str(tmp_path / "s1"), ENC)
    other = dataclasses.replace(ENC, depth=18, init_checkpoint=str(tmp_path / "s1"))
    with pytest.raises(ValueError, match="depth"):
        encoder.build(other)
    # The same architecture loads: by default the whole encoder equals the checkpoint's (S1 ->
    # S2 keeps S1's linear layer to D); with init_scope='backbone' only the backbone does.
    same = encoder.build(dataclasses.replace(ENC, init_checkpoint=str(tmp_path / "s1")))
    saved = encoder.restore(str(tmp_path / "s1"), ENC)
    assert len(same.weights) == len(saved.weights)
    for a, b in zip(same.weights, saved.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    bb = encoder.build(dataclasses.replace(ENC, init_checkpoint=str(tmp_path / "s1"),
                                           init_scope="backbone"))
    for a, b in zip(bb.backbone.weights, saved.backbone.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.allclose(bb.projection.kernel.numpy(), saved.projection.kernel.numpy())
    # Another D: the whole encoder cannot load, the backbone alone can.
    other_d = dataclasses.replace(ENC, feature_dim=ENC.feature_dim + 8,
                                  init_checkpoint=str(tmp_path / "s1"))
    with pytest.raises(ValueError, match="does not match this encoder"):
        encoder.build(other_d)
    encoder.build(dataclasses.replace(other_d, init_scope="backbone"))
    # A user's own checkpoint holding just a `backbone` object warm-starts too.
    prefix = tf.train.Checkpoint(backbone=saved.backbone).write(str(tmp_path / "user" / "bb"))
    theirs = encoder.build(dataclasses.replace(ENC, init_checkpoint=prefix))
    np.testing.assert_array_equal(theirs.backbone.weights[0].numpy(),
                                  saved.backbone.weights[0].numpy())
    with pytest.raises(FileNotFoundError):
        encoder.build(dataclasses.replace(ENC, init_checkpoint=str(tmp_path / "nothing")))


def test_mixed_precision_embeddings_are_float32_and_unit_norm():
    encoder.set_precision_policy("bfloat16")
    try:
        enc = encoder.Encoder(ENC)
        v = enc(tf.random.uniform([4, 32, 32, 3]))
        assert enc.backbone.compute_dtype == "bfloat16"
    finally:
        encoder.set_precision_policy("none")
    assert v.dtype == tf.float32
    np.testing.assert_allclose(tf.norm(v, axis=1).numpy(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "classify"])
def test_one_step_same_on_two_replicas_as_on_one_device(stage, tiny_world, mirrored):
    # SGD: Adam's first step divides by |g| and would amplify rounding in near-zero gradients.
    train = configs.TrainConfig(steps=10, global_batch_size=8, optimizer="sgd", learning_rate=0.1,
                             warmup_steps=0, deterministic=True)
    enc = dataclasses.replace(ENC, sync_batch_norm=True)
    one_step_on_one_and_two_replicas(_tasks(tiny_world, enc, train)[stage], train, mirrored,
                                     lambda task: task.encoder)


def test_command_line_trains_resumes_and_evaluates(tiny_world, tmp_path):
    model_dir = str(tmp_path / "c")
    base = [sys.executable, "-m", "trainer.task", f"--data_dir={tiny_world}",
            f"--model_dir={model_dir}", "--depth=10", "--width_multiplier=0.5",
            "--feature_dim=32", "--batch_size=16", "--log_interval=2", "--checkpoint_interval=2"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

    def run(*args):
        out = subprocess.run(base + list(args), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout + out.stderr

    run("--stage=classify", "--train_steps=2")
    log = run("--stage=classify", "--train_steps=4")
    assert "resumed from step 2" in log
    config = configs.load(model_dir)  # the one reader of config.json
    assert isinstance(config, configs.ClassifyStage)
    assert config.train.steps == 4 and config.encoder.depth == 10
    assert config.encoder.image_size == 32  # the world's, filled in when the stage started
    assert len(config.classify.categories) == len(np.unique(read_all(tiny_world, "catalog")[
        "category_id"]))
    out = subprocess.run(base + ["--stage=classify", "--train_steps=6", "--depth=18"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "another encoder" in out.stderr
    log = run("--stage=eval_search")
    metrics = json.load(open(os.path.join(model_dir, "metrics.json")))
    assert set(metrics) >= {"HR", "LR@10", "LR@100", "CR@10", "CR@100"}
    parts = npz.read(os.path.join(model_dir, visual_search.PER_QUERY))  # for the bootstrap
    assert len(parts["query_item_id"]) == metrics["queries"]
    assert parts["HR:num"].sum() / parts["HR:den"].sum() == pytest.approx(metrics["HR"])
    assert os.path.exists(os.path.join(model_dir, "projector", "projector_config.pbtxt"))
    meta = open(os.path.join(model_dir, "projector", "metadata.tsv")).readline().split()
    assert meta == ["item_id", "category", "impressions_30d", "style"]
    assert tf.io.gfile.glob(os.path.join(model_dir, "train", "events.out.tfevents.*"))

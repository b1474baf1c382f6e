"""Distribution and fault tolerance: deterministic input gives the same global batches to any
number of workers; COURIER's step is the same on 2 replicas as on one device and under
MultiWorkerMirroredStrategy over 2 worker processes as in one process; a pretrain worker killed
with SIGKILL resumes from its checkpoint and ends with the weights of an uninterrupted run; mixed
precision and gradient checkpointing keep the loss."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, one_step_on_one_and_two_replicas
from trainer import configs
from trainer.data import augment, pipeline, records
from trainer.models import courier, encoder, pretrain
from trainer.train import loop

ENC = configs.EncoderConfig(depth=10, width_multiplier=0.5, image_size=32, feature_dim=32,
                            batch_norm_momentum=0.9)
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
# The command-line flags of a small encoder on the tiny world.
SMALL = ["--depth=10", "--width_multiplier=0.5", "--feature_dim=32", "--deterministic"]


def _courier_task(world: str, train: configs.TrainConfig, enc=ENC) -> courier.CourierTask:
    cfg = configs.CourierConfig(
        pageviews_pattern=records.default_pattern(world, "pageviews", "train"),
        catalog_pattern=records.default_pattern(world, "catalog"))
    return courier.CourierTask(cfg, enc, train)


def _batches(pipe: pipeline.InputPipeline, n: int, ctx=None) -> list[dict]:
    it = iter(pipe.dataset(ctx))
    return [{k: v.numpy() for k, v in next(it).items()} for _ in range(n)]


def test_deterministic_input_is_the_same_global_stream_on_any_number_of_workers(tiny_world):
    def pipe(start_step=0):
        cfg = pipeline.InputConfig(records.default_pattern(tiny_world, "catalog"), "catalog",
                                   global_batch_size=8, image_size=32, deterministic=True,
                                   seed=3, start_step=start_step)
        return pipeline.InputPipeline(cfg, transform=augment.s1_views_transform())

    one = _batches(pipe(), 6)
    # Two workers with one replica each: global batch t is worker 0's batch t then worker 1's.
    workers = [_batches(pipe(), 6, tf.distribute.InputContext(2, i, 2)) for i in range(2)]
    for t in range(6):
        np.testing.assert_array_equal(
            np.concatenate([workers[0][t]["item_id"], workers[1][t]["item_id"]]),
            one[t]["item_id"])
    # A run resumed at step 4 reads what an uninterrupted one reads from step 4 on.
    for w in range(2):
        resumed = _batches(pipe(start_step=4), 2, tf.distribute.InputContext(2, w, 2))
        for a, b in zip(resumed, workers[w][4:], strict=False):
            np.testing.assert_array_equal(a["item_id"], b["item_id"])
            np.testing.assert_array_equal(a["view_1"], b["view_1"])
    resumed = _batches(pipe(start_step=2), 3)
    for a, b in zip(resumed, one[2:5], strict=False):
        np.testing.assert_array_equal(a["view_2"], b["view_2"])


def test_courier_one_step_same_on_two_replicas_as_on_one_device(tiny_world, mirrored):
    # COURIER's first step from a random encoder is ill-conditioned (sharp attention over
    # unnormalised features): on one device, a 1e-6 input perturbation moved weights by up to
    # 6e-4 at learning rate 0.1 with init seed 0, and the two batch-norm formulas by 2e-3. At
    # 0.01 and init seed 1 rounding stays under 1e-5 while weights move by up to 0.38, so a
    # mis-scaled or missing replica's gradient would still show.
    train = configs.TrainConfig(steps=10, global_batch_size=8, optimizer="sgd", learning_rate=0.01,
                             warmup_steps=0, deterministic=True)
    enc = dataclasses.replace(ENC, sync_batch_norm=True)
    start, after = one_step_on_one_and_two_replicas(
        lambda: _courier_task(tiny_world, train, enc), train, mirrored, lambda t: t.encoder,
        seed=1)
    assert max(np.abs(a - s).max() for a, s in zip(after, start, strict=True)) > 0.1


def _weights(model_dir: str) -> dict:
    prefix = tf.train.latest_checkpoint(os.path.join(model_dir, "ckpt"))
    return {name: tf.train.load_variable(prefix, name)
            for name, _ in tf.train.list_variables(prefix) if name.startswith("model/")}


@pytest.mark.e2e
def test_multi_worker_courier_matches_one_process(tiny_world, tmp_path):
    args = [sys.executable, "-m", "trainer.task", "--stage=courier", f"--data_dir={tiny_world}",
            "--train_steps=3", "--batch_size=8", "--log_interval=1", "--checkpoint_interval=3",
            # The well-conditioned start of the one-step test above.
            "--optimizer=sgd", "--learning_rate=0.002", "--warmup_steps=0", "--seed=1"] + SMALL

    def run(name, *flags):
        out = subprocess.run(args + [f"--model_dir={tmp_path / name}", *flags], cwd=REPO,
                             env=ENV, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return str(tmp_path / name)

    one_device = run("one_device")
    mirrored = run("mirrored", "--strategy=mirrored", "--logical_cpus=2")
    multi = str(tmp_path / "multi")
    cluster = {"worker": [f"127.0.0.1:{p}" for p in loop.local_ports(2)]}
    procs = [subprocess.Popen(
        args + [f"--model_dir={multi}", "--strategy=multi_worker_mirrored"], cwd=REPO,
        env={**ENV, "TF_CONFIG": json.dumps({"cluster": cluster,
                                             "task": {"type": "worker", "index": i}})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, logs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "global batch 8 = 2 replicas x 4" in logs[0][1]
    config = configs.load(multi)
    assert config.run.replicas == 2 and config.run.per_replica_batch_size == 4
    assert not os.path.exists(os.path.join(multi, "workers", "worker1", "config.json"))

    one, two, workers = (loop.logged_scalars(os.path.join(d, "train"), "loss")
                         for d in (one_device, mirrored, multi))
    assert sorted(one) == sorted(two) == sorted(workers) == [1, 2, 3]
    # The same global batch and loss as one device (later steps drift: this start amplifies
    # float32 rounding, see above).
    assert abs(one[1] - workers[1]) < 1e-5 * abs(one[1]), (one, workers)
    # Two workers compute what one process computes with two replicas, step after step. The
    # collectives are not bitwise alike: 4e-6 relative at step 3 in one run, exact in another
    # (one device drifts by 1.4e-3 by then).
    for step in two:
        assert abs(two[step] - workers[step]) < 1e-4 * abs(two[step]), (step, two, workers)
    w1, w2 = _weights(mirrored), _weights(multi)
    assert w1.keys() == w2.keys()
    for name in w1:
        np.testing.assert_allclose(w1[name], w2[name], atol=1e-4, err_msg=name)


@pytest.mark.e2e
def test_killed_worker_resumes_to_the_weights_of_an_uninterrupted_run(tiny_world, tmp_path):
    interval = 10
    args = [sys.executable, "-m", "trainer.task", "--stage=pretrain", f"--data_dir={tiny_world}",
            "--train_steps=40", "--batch_size=16", "--log_interval=5",
            f"--checkpoint_interval={interval}"] + SMALL
    whole = str(tmp_path / "whole")
    out = subprocess.run(args + [f"--model_dir={whole}", "--profile_steps=5,10"], cwd=REPO,
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert tf.io.gfile.glob(os.path.join(whole, "train", "plugins", "profile", "*", "*.xplane.pb"))

    killed = str(tmp_path / "killed")
    err_path = str(tmp_path / "killed.log")
    with open(err_path, "w") as err:
        proc = subprocess.Popen(args + [f"--model_dir={killed}"], cwd=REPO, env=ENV,
                                stdout=err, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while _restored_step(killed) < interval and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = [int(s) for s in re.findall(r"step (\d+)/40", open(err_path).read())]
    saved = _restored_step(killed)
    assert interval <= saved < 40 and max(steps_done) - saved < interval + 5

    out = subprocess.run(args + [f"--model_dir={killed}"], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from step {saved}" in out.stdout + out.stderr
    a, b = _weights(whole), _weights(killed)
    assert a.keys() == b.keys() and len(a) > 20
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _restored_step(model_dir: str) -> int:
    try:
        return loop.restored_step(model_dir)
    except (tf.errors.NotFoundError, ValueError):  # caught mid-write: not yet
        return 0


def _s1_task(world: str, enc: configs.EncoderConfig) -> pretrain.PretrainTask:
    return pretrain.PretrainTask(
        configs.PretrainConfig(catalog_pattern=records.default_pattern(world, "catalog")),
        enc, S1_TRAIN)


S1_TRAIN = configs.TrainConfig(steps=10, global_batch_size=8, optimizer="sgd", learning_rate=0.1,
                               warmup_steps=0, deterministic=True)


def _s1_start(world: str) -> tuple[dict, list]:
    """A first batch of S1 and initial weights, in `loop.one_step`'s order."""
    tf.keras.utils.set_random_seed(0)
    task = _s1_task(world, ENC)
    batch = {k: v.numpy() for k, v in next(iter(task.build_inputs(None))).items()}
    model = task.build_model()
    return batch, [v.numpy() for v in loop.trainable_variables(task, model)
                   + model.non_trainable_variables]


def _s1_step(world, enc, batch, weights) -> tuple[float, list]:
    return loop.one_step(_s1_task(world, enc), S1_TRAIN, tf.distribute.OneDeviceStrategy("/cpu:0"),
                         batch, weights)


@pytest.mark.parametrize("policy", ["bfloat16", "float16"])
def test_mixed_precision_gives_the_float32_loss(policy, tiny_world):
    batch, start = _s1_start(tiny_world)
    loss32, _ = _s1_step(tiny_world, ENC, batch, start)
    encoder.set_precision_policy(policy)
    try:  # float16 goes through the loss-scale optimizer
        loss_mp, new = _s1_step(tiny_world, ENC, batch, start)
    finally:
        encoder.set_precision_policy("none")
    assert np.isfinite(loss_mp) and abs(loss_mp - loss32) < 0.02 * abs(loss32), (loss32, loss_mp)
    assert sum(int(not np.allclose(a, b)) for a, b in zip(new, start, strict=True)) > 10


def test_gradient_checkpointing_gives_the_same_step(tiny_world):
    batch, start = _s1_start(tiny_world)
    loss, plain = _s1_step(tiny_world, ENC, batch, start)
    recomputed = dataclasses.replace(ENC, gradient_checkpointing=True)
    loss_gc, checkpointed = _s1_step(tiny_world, recomputed, batch, start)
    assert abs(loss - loss_gc) < 1e-6 and len(plain) == len(checkpointed)
    # Trainable weights after the step, and the batch norms' moving statistics.
    for a, b in zip(plain, checkpointed, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert sum(int(not np.allclose(a, b)) for a, b in zip(plain, start, strict=True)) > 10

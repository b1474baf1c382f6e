"""The CTR and debias stages under `tf.distribute.ParameterServerStrategy`: id embeddings, image
tables and D's positives sharded over parameter servers, lookups from asset files, the
coordinator's training loop on an in-process cluster (2 workers, 2 parameter servers) and on
worker, parameter-server and chief processes started from TF_CONFIG."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from export import ctr as export_ctr
from export_helpers import run_local_cluster
from serving import stand_in_server
from trainer import configs
from trainer.ctr import task as ctr_task
from trainer.data import parse, records
from trainer.stages import common
from trainer.train import loop

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.mark.e2e
def test_ctr_with_d_learns_resumes_and_exports_on_an_in_process_cluster(
        tiny_world, encoder_dir, tmp_path):
    model_dir = str(tmp_path / "ps")
    # Its own process: connecting to a cluster changes the process's eager context for good.
    out = subprocess.run([sys.executable, os.path.join(REPO, "tests", "parameter_server_job.py"),
                          f"--world={tiny_world}", f"--encoder_dir={encoder_dir}",
                          f"--model_dir={model_dir}", "--steps=150"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-5000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    print(json.dumps(result, indent=1))
    assert "debias: resumed from step 150" in out.stdout + out.stderr

    # It learns: the loss falls, and the tiny world's AUC is out of a broken model's reach
    # (position and item quality alone are worth about 0.6; a constant predictor gets 0.5).
    loss = loop.logged_scalars(os.path.join(model_dir, "train"), "loss")
    assert sorted(loss) == [25, 50, 75, 100, 125, 150, 175, 200]
    assert loss[200] < 0.8 * loss[25], loss
    for run in ("first", "resumed"):
        assert result[run]["AUC"] > 0.58, result[run]
    assert loop.restored_step(model_dir) == 200

    # The tables are sharded over both parameter servers.
    sharded = set(result["sharded"])
    for name in ("item_id_embedding/embeddings", "user_id_embedding/embeddings"):
        assert any(s.endswith(name) for s in sharded), sharded
    assert {"vectors", "positive_rows", "positive_weights"} <= sharded

    # One synchronous step equals one device's.
    step = result["one_step"]
    assert abs(step["loss_one_device"] - step["loss_parameter_server"]) < 1e-5
    assert step["largest_weight_difference"] < 1e-5
    assert step["weights_changed"] > 10

    # The checkpoint of sharded variables restores into one device's model and exports; the
    # lookups' ids are assets of the SavedModel, which loads in the stand-in server.
    version = export_ctr.export(model_dir, str(tmp_path / "export"))
    assets = sorted(os.path.basename(p) for p in glob.glob(os.path.join(version, "assets", "*")))
    assert {"item_id_lookup.txt", "user_id_lookup.txt", "items_images_ids.txt"} <= set(assets)
    served = stand_in_server.Version(version)
    assert served.warm_up() > 0
    model = ctr_task.load_trained(model_dir)
    examples = [r.numpy() for r in tf.data.TFRecordDataset(
        sorted(glob.glob(records.default_pattern(tiny_world, "ctr", "test")))).take(64)]
    rows = parse.RecordParser(model.spec.record_kind(), decode=False)(
        parse.record_names(tf.constant("x"), tf.range(64, dtype=tf.int64)),
        tf.constant(examples))
    got = served.run("predict_examples", {"examples": np.array(examples, object)})["ctr"]
    np.testing.assert_allclose(got, tf.sigmoid(model(rows)).numpy(), atol=1e-5)
    served.close()


@pytest.mark.e2e
def test_worker_ps_and_chief_processes_from_tf_config_train(tiny_world, tmp_path):
    model_dir = str(tmp_path / "tf_config")
    args = [sys.executable, "-m", "trainer.task", "--stage=ctr", f"--data_dir={tiny_world}",
            f"--model_dir={model_dir}", "--strategy=parameter_server", "--train_steps=10",
            "--batch_size=64", "--log_interval=5", "--checkpoint_interval=5"]
    log, served, serving = run_local_cluster(args, timeout=600)
    assert serving, "a server exited on its own"
    assert "ctr: step 10/10" in log and "ctr: trained to step 10" in log
    assert loop.restored_step(model_dir) == 10
    metrics = json.load(open(os.path.join(model_dir, "metrics.json")))
    assert 0 <= metrics["AUC"] <= 1
    # The chief evaluated through the Beam evaluate job (a Dask worker process rebuilt the
    # model), not in its own process: its outputs, each AUC with its bound.
    assert metrics["evaluation"] == os.path.join(model_dir, "evaluation")
    assert metrics["AUC_bound"] < 1e-3 and metrics["samples"] == 4000
    assert os.listdir(os.path.join(model_dir, "evaluation", "predictions"))
    assert not os.path.exists(os.path.join(model_dir, "predictions.npz"))
    assert "worker 1: serving" in served[3] and "ps 0: serving" in served[0]
    # Only the chief writes: no worker scratch dirs.
    assert not os.path.exists(os.path.join(model_dir, "workers"))


def test_parameter_server_strategy_needs_workers_and_servers_and_a_ctr_stage(monkeypatch,
                                                                            tmp_path):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]},
                                                "task": {"type": "chief", "index": 0}}))
    with pytest.raises(ValueError, match="needs 'worker' and 'ps' tasks"):
        loop.make_strategy("parameter_server")
    cfg = configs.PretrainStage(data_dir=str(tmp_path), model_dir=str(tmp_path / "m"),
                                train=configs.TrainConfig(strategy="parameter_server"))
    with pytest.raises(common.UsageError, match="trains the CTR stages"):
        common.training(cfg)

"""The declared CTR feature spec: the feed setting of paper 002 (no query photo, demographics or
preferred categories) trains, evaluates and exports on a world whose records lack those columns,
with exactly the spec's inputs in the serving signature; bad specs and specs that do not fit
the records fail naming the file, the feature or the key."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import yaml

from conftest import REPO, raw_records, read_all
from export import ctr as export_ctr
from trainer import configs, registry, task
from trainer.ctr import spec as ctr_spec
from trainer.ctr import task as ctr_task
from trainer.data import records
from trainer.synth import config as worlds
from trainer.synth import marketplace

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
ENC = configs.EncoderConfig(depth=10, width_multiplier=0.5, image_size=32, feature_dim=32)
ABSENT = ("age_bucket", "gender", "preferred_category_ids", "query_id")


def _run(args: list, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=600)
    if ok:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def feed_world(tmp_path_factory) -> str:
    """The tiny world, its `ctr` records written with the feed spec's columns only."""
    d = str(tmp_path_factory.mktemp("feed"))
    marketplace.generate(worlds.get_world("tiny"), d, seed=0,
                         ctr_kind=ctr_spec.load("feed").record_kind())
    return d


def test_built_in_specs_round_trip_and_declare_the_records():
    for name in ("synthetic", "feed"):
        spec = ctr_spec.load(name)
        assert ctr_spec.parse(yaml.safe_load(spec.dump()), "x").to_dict() == spec.to_dict()
        kind = spec.record_kind()
        assert kind.names[:2] == ["label", "page_id"] and kind.names[2:] == spec.inputs
        assert spec.record_kind(serving=True).names == spec.inputs
    feed = ctr_spec.load("feed")
    assert not set(ABSENT) & set(feed.inputs)
    assert set(ABSENT) <= set(ctr_spec.load("synthetic").inputs)
    assert feed.target_image is not None and feed.image_of("query_id") is None


def test_feed_spec_trains_evaluates_and_exports_end_to_end(feed_world, tmp_path):
    train = records.default_pattern(feed_world, "ctr", "train")
    present = set(example_keys(raw_records(train)[0]))
    assert present == {"label", "page_id", *ctr_spec.load("feed").inputs}
    assert not set(ABSENT) & present  # the columns are absent from the records
    enc_dir = str(tmp_path / "s1")
    registry.run(configs.PretrainStage(
        data_dir=feed_world, model_dir=enc_dir, encoder=ENC, train=configs.TrainConfig(
            steps=2, global_batch_size=16, log_interval=2, warmup_steps=0)))
    model_dir = str(tmp_path / "ctr")
    _run(["-m", "trainer.task", "--stage=ctr", "--ctr_spec=feed", f"--data_dir={feed_world}",
          f"--model_dir={model_dir}", "--image_features=s1", f"--image_model_dir={enc_dir}",
          "--image_feature_mode=simscore", "--train_steps=20", "--batch_size=64",
          "--log_interval=10", "--set", "ctr.tower_units=[32, 16]"])
    metrics = json.load(open(os.path.join(model_dir, "metrics.json")))
    assert metrics["feature_spec"] == "feed" and 0 <= metrics["AUC"] <= 1
    assert metrics["samples"] == len(read_all(feed_world, "ctr", "test", features=("label",))[
        "label"])
    assert configs.load(model_dir).ctr.spec == "feed"
    spec = ctr_spec.load(os.path.join(model_dir, ctr_spec.FILE))
    assert spec.to_dict() == ctr_spec.load("feed").to_dict()

    version = export_ctr.export(model_dir, str(tmp_path / "export"))
    loaded = tf.saved_model.load(version)
    serving = loaded.signatures["serving_default"]
    inputs = serving.structured_input_signature[1]
    assert sorted(inputs) == sorted(spec.inputs)  # exactly the spec's features
    assert inputs["click_history_item_ids"].shape.as_list() == [None, None]
    assert inputs["price"].dtype == tf.float32 and inputs["item_id"].dtype == tf.int64
    exported = ctr_spec.load(os.path.join(version, "assets.extra", ctr_spec.FILE))
    assert exported.to_dict() == spec.to_dict()
    # The export scores test records as the trained model does.
    model = ctr_task.load_trained(model_dir)
    rows = {k: v[:50] for k, v in read_all(feed_world, spec.record_kind(), "test").items()}
    want = tf.sigmoid(model(rows)).numpy()
    request = {k: tf.constant(np.where(rows[k + "_mask"], rows[k], -1) if spec.is_sequence(k)
                              else rows[k]) for k in spec.inputs}
    np.testing.assert_allclose(serving(**request)["ctr"].numpy(), want, atol=1e-5)


def example_keys(record: bytes) -> list:
    return list(tf.train.Example.FromString(record).features.feature)


def test_a_spec_that_does_not_fit_the_records_fails_naming_feature_and_file(feed_world,
                                                                             tmp_path):
    out = _run(["-m", "trainer.task", "--stage=ctr", f"--data_dir={feed_world}",
                f"--model_dir={tmp_path / 'm'}", "--train_steps=1"], ok=False)
    assert out.returncode != 0
    assert "lack the feature(s) ['age_bucket', 'gender', 'preferred_category_ids', " \
           "'query_id']" in out.stderr
    assert os.path.join(feed_world, "ctr", "train-00000-of-00004.tfrecord") in out.stderr
    assert not os.path.exists(tmp_path / "m")  # it failed before writing anything


def test_bad_specs_fail_naming_the_file_and_the_feature(tmp_path):
    good = ctr_spec.load("feed").to_dict()

    def fails(spec: dict, match: str) -> None:
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        with pytest.raises(ctr_spec.SpecError, match=match):
            ctr_spec.load(str(path))

    bad = json.loads(json.dumps(good))
    bad["features"][1]["kind"] = "embedding"
    fails(bad, rf"{tmp_path / 'spec.yaml'}: feature 'shop_id': unknown kind 'embedding'; kinds "
               "are categorical, numeric, sequence, image")
    bad = json.loads(json.dumps(good))
    bad["features"][4]["pooling"] = "mean"  # price is numeric
    fails(bad, r"feature 'price' \(numeric\): unknown key\(s\) \['pooling'\]")
    bad = json.loads(json.dumps(good))
    bad["features"].append({"name": "item_id", "kind": "categorical"})
    fails(bad, r"feature\(s\) \['item_id'\] declared twice")
    bad = json.loads(json.dumps(good))
    bad["features"][6]["shared_table"] = "price"
    fails(bad, r"feature 'click_history_item_ids': shared_table 'price' is not an id feature")
    bad = json.loads(json.dumps(good))
    bad["item"] = "offer_id"
    fails(bad, r"item 'offer_id' is not an input column")
    bad = json.loads(json.dumps(good))
    bad["labels"] = "x"
    fails(bad, r"unknown key\(s\) \['labels'\]")
    with pytest.raises(ctr_spec.SpecError, match=r"no feature spec 'fed'.*feed, synthetic"):
        ctr_spec.load("fed")
    # The command line says which spec file and feature.
    bad = json.loads(json.dumps(good))
    bad["features"][0]["kind"] = "id"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    out = _run(["-m", "trainer.task", "--stage=ctr", f"--data_dir={tmp_path}",
                f"--model_dir={tmp_path / 'm'}", f"--ctr_spec={tmp_path / 'bad.yaml'}"], ok=False)
    assert out.returncode != 0
    assert f"{tmp_path / 'bad.yaml'}: feature 'item_id': unknown kind 'id'" in out.stderr


def _config(*argv: str) -> configs.StageConfig:
    """The config tree `python -m trainer.task ARGV` would run."""
    try:
        task.FLAGS(["trainer.task", *argv])
        return task.build_config()
    finally:
        task.FLAGS.unparse_flags()


def test_overrides_are_checked_against_the_tree(tmp_path, capsys):
    cfg = _config("--stage=debias", "--set", "train.learning_rate=5e-4", "--temperature=0.2",
                  "--hash_bins=user_id:97", "--set", "ctr.tower_units=64,32")
    assert isinstance(cfg, configs.DebiasStage) and cfg.train.learning_rate == 5e-4
    assert cfg.ctr.debias is not None and cfg.ctr.debias.temperature == 0.2
    assert cfg.ctr.hash_bins == {"user_id": 97} and cfg.ctr.tower_units == (64, 32)
    with pytest.raises(configs.ConfigError, match="unknown key 'ctr.tower_unitz'; ctr has: spec,"):
        _config("--stage=ctr", "--set", "ctr.tower_unitz=[8]")
    with pytest.raises(configs.ConfigError, match="train.steps: expected int, got 'many'"):
        _config("--stage=pretrain", "--set", "train.steps=many")
    (tmp_path / "c.yaml").write_text("train:\n  learning_rate: fast\n")
    with pytest.raises(configs.ConfigError,
                       match=rf"{tmp_path / 'c.yaml'}: train.learning_rate: expected float"):
        _config("--stage=pretrain", f"--config={tmp_path / 'c.yaml'}")
    # A shorthand flag another stage takes is ignored, with a warning (it always was).
    assert _config("--stage=ctr", "--temperature=0.2") == configs.for_stage("ctr")
    assert "--temperature does not apply to --stage=ctr; ignored" in capsys.readouterr().err
    # A model dir's config.json reruns its run: the file, then the flags.
    saved = configs.save(str(tmp_path / "m"), cfg)
    again = _config(f"--config={saved}", "--train_steps=7")
    assert again.train.steps == 7 and configs.to_dict(again) == configs.to_dict(
        configs.override(cfg, "train.steps", 7))
    # The command line prints such an error without a traceback and fails.
    out = _run(["-m", "trainer.task", "--stage=ctr", "--set", "ctr.tower_unitz=[8]",
                "--print_config"], ok=False)
    assert out.returncode != 0 and "unknown key 'ctr.tower_unitz'" in out.stderr
    assert "Traceback" not in out.stderr

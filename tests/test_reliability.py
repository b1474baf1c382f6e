"""Issue 16: bad input, reused directories and faults lose nothing and are never silent. One test
(or a few) per numbered defect of the issue."""
import glob
import logging
import os
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf
import tf_keras

from conftest import REPO, raw_records, write_records
from trainer import configs, registry
from trainer.ctr import spec as ctr_spec
from trainer.ctr.tables import Vocabularies
from trainer.data import pipeline, records, validate
from trainer.models import classify, courier, finetune
from trainer.train import loop

ENV = dict(os.environ, PYTHONPATH=REPO)
BAD = 3
GARBAGE = b"\x0a\xff\xff not an Example"  # a valid TFRecord frame around bytes that do not parse


@pytest.fixture(scope="module")
def broken_world(tiny_world, tmp_path_factory) -> str:
    """The tiny world with record 3 of the first catalog shard and of the first ctr train shard
    replaced by garbage."""
    d = str(tmp_path_factory.mktemp("broken") / "world")
    shutil.copytree(tiny_world, d)
    for kind, split in (("catalog", "all"), ("ctr", "train")):
        path = pipeline.list_files(records.default_pattern(d, kind, split))[0]
        recs = raw_records(path)
        recs[BAD] = GARBAGE
        write_records(path, recs)
    return d


# 1. --skip_bad_records reaches every read of the input, not only the training stream.

def test_every_input_read_skips_bad_records_when_asked(broken_world, caplog):
    catalog = records.default_pattern(broken_world, "catalog")
    with pytest.raises(validate.BadRecordError, match="--skip_bad_records"):
        pipeline.read_columns(catalog, "catalog", ("item_id",))
    with caplog.at_level(logging.WARNING):
        ids = pipeline.read_columns(catalog, "catalog", ("item_id",), skip_bad_records=True)
    assert "1 bad: skipped" in caplog.text
    store = pipeline.load_image_store(catalog, skip_bad_records=True)
    assert store.size == len(ids["item_id"])

    train = configs.TrainConfig(global_batch_size=8)
    enc = configs.EncoderConfig(depth=10, width_multiplier=0.25, image_size=32, feature_dim=16)
    sessions = records.default_pattern(broken_world, "search_sessions", "train")
    pageviews = records.default_pattern(broken_world, "pageviews", "train")
    makers = {
        "finetune": lambda skip: finetune.FinetuneTask(configs.FinetuneConfig(
            catalog_pattern=catalog, sessions_pattern=sessions), enc, train, skip),
        "courier": lambda skip: courier.CourierTask(configs.CourierConfig(
            catalog_pattern=catalog, pageviews_pattern=pageviews), enc, train, skip),
        "classify": lambda skip: classify.ClassifyTask(configs.ClassifyConfig(
            catalog_pattern=catalog), enc, train, skip),
    }
    for name, make in makers.items():
        with pytest.raises(validate.BadRecordError, match="--skip_bad_records"):
            make(False)
            pytest.fail(f"{name} read the bad catalog record without an error")
        make(True)  # builds its catalog reads without the bad record

    spec = ctr_spec.load("synthetic")
    ctr_train = records.default_pattern(broken_world, "ctr", "train")
    with pytest.raises(validate.BadRecordError):
        Vocabularies.from_training_data(ctr_train, spec)
    assert len(Vocabularies.from_training_data(ctr_train, spec, skip_bad_records=True).ids[
        "item_id"]) > 0


def test_the_ctr_stage_trains_past_bad_records_with_the_flag(broken_world, tmp_path):
    base = [sys.executable, "-m", "trainer.task", "--stage=ctr", f"--data_dir={broken_world}",
            "--train_steps=3", "--batch_size=64", "--log_interval=1"]
    out = subprocess.run(base + [f"--model_dir={tmp_path / 'strict'}"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and f"record {BAD}" in out.stderr, out.stderr[-2000:]
    out = subprocess.run(base + [f"--model_dir={tmp_path / 'skip'}", "--skip_bad_records"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 bad: skipped" in out.stderr
    assert os.path.exists(tmp_path / "skip" / "metrics.json")


def test_records_lost_after_a_corrupt_frame_are_counted(tiny_world, tmp_path):
    good = raw_records(records.default_pattern(tiny_world, "catalog"))[:8]
    offsets = [sum(16 + len(r) for r in good[:i]) for i in range(len(good))]
    # A flipped data byte (the frame's length is intact) and a flipped length byte (the reader
    # has to search for the next valid frame header).
    for name, at in (("data", offsets[BAD] + 12 + 20), ("length", offsets[BAD] + 2)):
        path = write_records(str(tmp_path / f"{name}.tfrecord"), good)
        data = bytearray(open(path, "rb").read())
        data[at] ^= 0xFF
        open(path, "wb").write(bytes(data))
        assert validate.frames_after(path, BAD) == len(good) - BAD - 1, name
    # Truncated inside the last record: nothing follows it.
    path = write_records(str(tmp_path / "cut.tfrecord"), good)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:offsets[-1] + 30])
    assert validate.frames_after(path, len(good) - 1) == 0


# 2. A model dir belongs to one stage and one architecture: another is refused before anything
#    is written.

def test_a_trained_dir_refuses_another_stage_without_touching_it(tiny_world, tmp_path):
    model_dir = str(tmp_path / "s1")
    base = [sys.executable, "-m", "trainer.task", f"--data_dir={tiny_world}",
            f"--model_dir={model_dir}", "--depth=10", "--width_multiplier=0.25",
            "--feature_dim=16", "--batch_size=8", "--train_steps=1"]

    def run(*args):
        return subprocess.run(base + list(args), cwd=REPO, env=ENV, capture_output=True,
                              text=True, timeout=300)

    out = run("--stage=pretrain")
    assert out.returncode == 0, out.stderr[-3000:]
    path = os.path.join(model_dir, configs.FILE)
    before = open(path, "rb").read()
    listing = sorted(os.listdir(model_dir))
    for stage, words in (("classify", "holds a 'pretrain' model"),
                         ("ctr", "holds a 'pretrain' model")):
        out = run(f"--stage={stage}")
        assert out.returncode != 0 and words in out.stderr, (stage, out.stderr[-2000:])
        assert open(path, "rb").read() == before, stage
        assert sorted(os.listdir(model_dir)) == listing, stage
    assert isinstance(configs.load(model_dir), configs.PretrainStage)


# 3. One training process per model dir: a second one is refused naming the holder; the lock of
#    a process that is gone is taken over.

def test_a_second_process_on_a_model_dir_is_refused_and_a_stale_lock_taken_over(tiny_world,
                                                                                tmp_path):
    from trainer.stages import common
    from trainer.train import lock
    model_dir = str(tmp_path / "s1")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from trainer.train import lock; "
         "lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)", model_dir],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = configs.PretrainStage(
            data_dir=tiny_world, model_dir=model_dir, encoder=configs.EncoderConfig(
                depth=10, width_multiplier=0.25, feature_dim=16, image_size=32),
            train=configs.TrainConfig(steps=2, global_batch_size=8, log_interval=2,
                                      warmup_steps=0))
        with pytest.raises(lock.LockedError, match=f"in use by pid {holder.pid} on this host"):
            registry.run(cfg)
        assert sorted(os.listdir(model_dir)) == [lock.NAME]  # nothing else was written
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind, stale
        holder.wait()
    assert os.path.exists(os.path.join(model_dir, lock.NAME))
    registry.run(cfg)
    assert loop.restored_step(model_dir) == 2
    assert not os.path.exists(os.path.join(model_dir, lock.NAME))  # released on return
    # A lock held by this process (a run that failed) does not block the next run in it.
    common.training(cfg)
    registry.run(cfg)
    assert not os.path.exists(os.path.join(model_dir, lock.NAME))


def test_only_the_chief_of_a_multi_worker_job_locks(tmp_path, monkeypatch):
    from trainer.stages import common
    from trainer.train import lock

    class Resolver:
        task_type, task_id = "worker", 1

        def cluster_spec(self):
            return tf.train.ClusterSpec({"worker": ["a:1", "b:1"]})

    class Worker1:
        cluster_resolver = Resolver()
        num_replicas_in_sync = 2

    monkeypatch.setattr(loop, "make_strategy", lambda *a: Worker1())
    model_dir = str(tmp_path / "m")
    os.makedirs(model_dir)
    with open(os.path.join(model_dir, lock.NAME), "w") as f:
        f.write('{"host": "chief-host", "pid": 1}')  # the chief's, on another host
    cfg = configs.PretrainStage(data_dir="d", model_dir=model_dir,
                                train=configs.TrainConfig(global_batch_size=8))
    common.training(cfg)  # worker 1 does not lock
    monkeypatch.setattr(loop, "make_strategy", lambda *a: tf.distribute.get_strategy())
    with pytest.raises(lock.LockedError, match="pid 1 on host chief-host"):
        common.training(cfg)


# 9. The documented model server is published on the loopback interface only.

def test_documented_docker_runs_publish_on_loopback_only():
    import re
    docs = ["README.md", "serving_config/README.md",
            *(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
    found = 0
    for doc in docs:
        text = open(os.path.join(REPO, doc)).read()
        for ports in re.findall(r"docker run[^\n]*(?:\\\n[^\n]*)*", text):
            found += 1
            published = re.findall(r"-p\s+(\S+)", ports)
            assert published and all(p.startswith("127.0.0.1:") for p in published), (doc, ports)
    assert found


# 6. Nonsense values are refused when the config is built or loaded; a non-finite loss stops the
#    run with a named error and the last good checkpoint; the checkpoint interval is kept.

def _config(*argv: str):
    from trainer import task
    try:
        task.FLAGS(["trainer.task", *argv])
        return task.build_config()
    finally:
        task.FLAGS.unparse_flags()


@pytest.mark.parametrize("flag, words", [
    ("--learning_rate=nan", "train.learning_rate: nan is not a finite number"),
    ("--train_steps=-1", "train.steps: -1 is out of range (must be at least 1)"),
    ("--batch_size=0", "train.global_batch_size: 0 is out of range (must be at least 1)"),
    ("--log_interval=0", "train.log_interval: 0 is out of range (must be at least 1)"),
    ("--temperature=0", "pretrain.temperature: 0.0 is out of range (must be greater than 0)"),
    ("--set=pretrain.augment.flip_prob=1.5",
     "pretrain.augment.flip_prob: 1.5 is out of range (must be between 0.0 and 1.0)"),
])
def test_nonsense_values_are_refused_naming_the_key(flag, words):
    with pytest.raises(configs.ConfigError) as e:
        _config("--stage=pretrain", flag)
    assert words in str(e.value)


def test_a_model_dir_with_a_nonsense_config_is_refused_on_load(tmp_path):
    import json
    path = configs.save(str(tmp_path), configs.for_stage("pretrain"))
    d = json.load(open(path))
    d["train"]["steps"] = 0
    json.dump(d, open(path, "w"))
    with pytest.raises(configs.ConfigError, match="train.steps: 0 is out of range"):
        configs.load(str(tmp_path))


class _Toy(loop.Task):
    """A one-weight model trained on x = 1, whose input turns infinite from example `bad_from`."""

    name = "toy"

    def __init__(self, bad_from: int):
        self.bad_from = bad_from

    def build_model(self):
        self.model = tf_keras.Sequential([tf_keras.layers.Dense(1, use_bias=False)])
        self.model.build([None, 1])
        return self.model

    def build_inputs(self, input_context=None):
        x = tf.data.Dataset.range(10_000).map(
            lambda i: tf.where(i >= self.bad_from, float("inf"), 1.0))
        return x.map(lambda x: {"x": tf.reshape(x, [1, 1])})

    def compute_loss(self, batch, training=True):
        return tf.reduce_mean(tf.square(self.model(batch["x"]) - 3.0)), {}


def test_a_non_finite_loss_stops_the_run_keeping_the_last_good_checkpoint(tmp_path):
    import numpy as np

    cfg = configs.TrainConfig(steps=20, global_batch_size=1, learning_rate=0.01, warmup_steps=0,
                              log_interval=2, checkpoint_interval=2, lr_schedule="constant")
    with pytest.raises(loop.NonFiniteLossError, match=r"at step 7 .*ckpt-6"):
        loop.run(_Toy(bad_from=6), cfg, str(tmp_path))
    latest = tf.train.latest_checkpoint(str(tmp_path / "ckpt"))
    assert latest.endswith("ckpt-6")
    weights = tf.train.load_checkpoint(latest)
    for name in weights.get_variable_to_shape_map():
        value = weights.get_tensor(name)
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            assert np.all(np.isfinite(value)), name


def test_the_checkpoint_interval_is_kept_when_logs_are_rarer(tmp_path):
    cfg = configs.TrainConfig(steps=12, global_batch_size=1, warmup_steps=0, log_interval=6,
                              checkpoint_interval=2)
    loop.run(_Toy(bad_from=10**9), cfg, str(tmp_path))
    state = tf.train.get_checkpoint_state(str(tmp_path / "ckpt"))
    steps = sorted(int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths)
    assert steps == [8, 10, 12]  # the last 3 of every 2 steps (logging every 6 saved 6 and 12)


def test_metrics_files_are_strict_json_with_non_finite_values_as_null(tmp_path, caplog):
    import json

    from trainer.eval import write_metrics
    with caplog.at_level(logging.WARNING):
        path = write_metrics(str(tmp_path), {"AUC": float("nan"), "GAUC": 0.6, "samples": 3})
    text = open(path).read()
    assert "NaN" not in text and json.loads(text) == {"AUC": None, "GAUC": 0.6, "samples": 3}
    assert "['AUC'] are not finite" in caplog.text


# 8. Error quality: a GZIP file without the .gz suffix is named as such.

def _read_catalog_file(path: str) -> tuple[pipeline.InputPipeline, str]:
    """The pipeline over one catalog file, and the bad-record error reading it raises."""
    cfg = pipeline.InputConfig(path, "catalog", global_batch_size=4, image_size=32,
                               shuffle=False, repeat=False, drop_remainder=False)
    pipe = pipeline.InputPipeline(cfg)
    with pytest.raises(validate.BadRecordError) as e:
        with pipe.errors_named():
            for _ in pipe.dataset():
                pass
    return pipe, str(e.value)


def test_a_gzip_file_without_its_suffix_is_named_as_gzip(tiny_world, tmp_path):
    recs = raw_records(records.default_pattern(tiny_world, "catalog"))[:8]
    path = str(tmp_path / "catalog-00000-of-00001.tfrecord")
    with tf.io.TFRecordWriter(path, options="GZIP") as w:
        for r in recs:
            w.write(r)
    pipe, error = _read_catalog_file(path)
    assert path in error and "starts like a GZIP file: name it *.gz" in error
    report = validate.scan([path], pipe.parser)  # the whole file is lost, counted
    assert len(report.bad) == 1 and report.lost_records == len(recs) - 1


# 8. Error quality: an image that does not decode is named in one line; a duplicate catalog id
#    names both records.

def _with_image(rec: bytes, body: bytes) -> bytes:
    from tensorflow.core.example import example_pb2
    e = example_pb2.Example.FromString(rec)
    del e.features.feature["image"].bytes_list.value[:]
    e.features.feature["image"].bytes_list.value.append(body)
    return e.SerializeToString()


def test_an_image_that_does_not_decode_is_named_in_one_short_line(tiny_world, tmp_path):
    recs = raw_records(records.default_pattern(tiny_world, "catalog"))[:8]
    recs[BAD] = _with_image(recs[BAD], b"\x89PNG\r\n\x1a\n" + bytes(40))
    path = write_records(str(tmp_path / "all-00000-of-00001.tfrecord"), recs)
    _, message = _read_catalog_file(path)
    assert f"{path}: record {BAD}: feature 'image': not a decodable PNG (" in message
    assert len(message) < 300 and "File \"" not in message and "Detected at node" not in message


def test_a_duplicate_catalog_id_names_both_records(tiny_world, tmp_path, caplog):
    files = pipeline.list_files(records.default_pattern(tiny_world, "catalog"))
    d = tmp_path / "catalog"
    d.mkdir()
    first, second = raw_records(files[0]), raw_records(files[1])
    second[5] = first[2]  # item 2 of the first file again, as record 5 of the second
    a = write_records(str(d / "all-00000-of-00002.tfrecord"), first)
    b = write_records(str(d / "all-00001-of-00002.tfrecord"), second)
    with pytest.raises(validate.BadRecordError) as e:
        pipeline.load_image_store(str(d / "all-*"))
    assert str(e.value).startswith(f"bad input record: {b}: record 5: feature 'item_id': "
                                   f"duplicate item_id ")
    assert f"already in {a}: record 2; ids must be unique" in str(e.value)
    # With the flag the first record of the id is kept, the repeat logged and counted.
    with caplog.at_level(logging.WARNING):
        store = pipeline.load_image_store(str(d / "all-*"), skip_bad_records=True)
    assert store.size == len(first) + len(second) - 1
    assert f"skipping bad record: {b}: record 5: feature 'item_id': duplicate" in caplog.text
    assert "skip_bad_records: 1 records with a duplicate item_id in 2 files: skipped" in \
        caplog.text


# The probe (scripts/probe_bad_input.py; `make probe` runs every stage): its validate rows.

def test_the_probe_names_or_counts_each_planted_record(tiny_world, tmp_path):
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import probe_bad_input as probe
    # One kind (make probe runs them all): a repeated id, which only this row of validate sees.
    target, without, with_ = probe.probe_one(tiny_world, str(tmp_path), "validate",
                                             "duplicate_id", "")
    last = pipeline.list_files(records.default_pattern(tiny_world, "catalog"))[-1]
    want = f"error: record {len(raw_records(last))}"  # the copy appended to the last file
    assert (target, without, with_) == ("catalog", want, want)


# Found by the probe: a grouped stream (S2's batches share a category) held a record whose
# category broke its rules in a window of its own, never read and never named.

def test_a_bad_group_key_is_named_not_held_back(tiny_world, tmp_path):
    from tensorflow.core.example import example_pb2
    path = pipeline.list_files(records.default_pattern(tiny_world, "search_sessions", "train"))[0]
    recs = raw_records(path)
    e = example_pb2.Example.FromString(recs[BAD])
    del e.features.feature["clicked_category_id"].int64_list.value[:]
    e.features.feature["clicked_category_id"].int64_list.value.append(-1)
    recs[BAD] = e.SerializeToString()
    bad = write_records(str(tmp_path / "train-00000-of-00001.tfrecord"), recs)
    cfg = pipeline.InputConfig(bad, "search_sessions", global_batch_size=8, image_size=32,
                               repeat=False, group_by="clicked_category_id",
                               catalog_pattern=records.default_pattern(tiny_world, "catalog"))
    pipe = pipeline.InputPipeline(cfg)
    with pytest.raises(validate.BadRecordError, match=rf"{bad}: record {BAD}: feature "
                                                      r"'clicked_category_id': must be between"):
        with pipe.errors_named():
            for _ in pipe.dataset():
                pass

"""The daily cycle (`--stage=daily`, export/daily.py) on the `tiny_moving` world: day 0's CTR
model warm-started on day 1 keeps its rows by id and gives new ids their own, its export scores a
new item as the model does, the gate keeps the serving version against a worse model, a killed
cycle reruns to the same weights, and a cluster of 2 workers and 2 parameter servers does the
same day as one process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from conftest import REPO, read_all, shared_dir
from export import common
from export import ctr as export_ctr
from export_helpers import ENC, ENV, ctr_config, model_batch, page_rows, run_local_cluster, run_ok
from trainer import configs, registry
from trainer.ctr import daily
from trainer.ctr import spec as ctr_spec
from trainer.ctr import task as ctr_task
from trainer.ctr.tables import Vocabularies
from trainer.features import versions
from trainer.synth import config, marketplace
from trainer.train import lock

# A day's budget. A tiny day's ~470 held-out samples give the AUC difference an interval of about
# +-0.045, so a margin of 0.05 refused a model within noise of the serving one on some runs
# (difference -0.0065 [-0.0529, +0.0346]); 0.15 lets every such model through, and the gate's own
# test sets a margin its much worse model is judged against (the default suits a real day).
DAY_TRAIN = ("--train_steps=20", "--batch_size=64", "--checkpoint_interval=10",
             "--log_interval=10", "--deterministic", "--margin=0.15")


@pytest.fixture(scope="session")
def moving(tmp_path_factory) -> dict:
    """The tiny moving world, an S1 encoder on day 0 and its export, day 0's CTR model and its
    export as the serving version 1: built once for the run."""
    enc_train = configs.TrainConfig(steps=3, global_batch_size=16, log_interval=3, warmup_steps=0)

    def build(root: str) -> None:
        world = os.path.join(root, "world")
        marketplace.generate(config.get_world("tiny_moving"), world, seed=0,
                             ctr_kind=ctr_spec.record_kind("ctr"))
        day0 = os.path.join(world, "day=00")
        enc = os.path.join(root, "s1")
        registry.run(configs.PretrainStage(data_dir=day0, model_dir=enc, encoder=ENC,
                                           train=enc_train))
        run_ok([sys.executable, "-m", "export.encoder", f"--model_dir={enc}",
                f"--export_dir={os.path.join(root, 'encoder_export')}"])
        model = os.path.join(root, "day0")
        registry.run(ctr_config(day0, model, images__encoder="s1", images__model_dir=enc,
                                ctr__test_pattern=os.path.join(day0, "ctr", "holdout-*"),
                                train__steps=60, train__learning_rate=3e-3,
                                train__deterministic=True))
        export_ctr.export(model, os.path.join(root, "serving"))

    root = shared_dir(tmp_path_factory, "moving", {"world": "tiny_moving", "encoder": ENC,
                                                   "train": enc_train, "ctr": 60}, build)
    return {"root": root, "world": os.path.join(root, "world"),
            "encoder_export": os.path.join(root, "encoder_export"),
            "day0": os.path.join(root, "day0"), "serving": os.path.join(root, "serving")}


def serving_copy(moving: dict, path: str) -> str:
    """A copy of the serving base path (version 1: day 0's model) that a test may add to."""
    shutil.copytree(moving["serving"], path)
    return path


def daily_args(moving: dict, day: int, model_dir: str, export_dir: str, *extra: str,
               data_dir: str | None = None, previous: str | None = None) -> list[str]:
    return [sys.executable, "-m", "trainer.task", "--stage=daily",
            f"--data_dir={data_dir or os.path.join(moving['world'], f'day={day:02d}')}",
            f"--model_dir={model_dir}", f"--previous={previous or moving['day0']}",
            f"--encoder_export={moving['encoder_export']}", f"--export_dir={export_dir}",
            *DAY_TRAIN, *extra]


@pytest.fixture(scope="session")
def day1(moving, tmp_path_factory) -> dict:
    """Day 1's cycle from day 0's model, uninterrupted, as a command: its model dir, the export
    base path it added version 2 to, and what it printed."""
    def build(root: str) -> None:
        out = run_ok(daily_args(moving, 1, os.path.join(root, "model"),
                                serving_copy(moving, os.path.join(root, "serving")),
                                f"--search_export_dir={os.path.join(root, 'search')}"))
        with open(os.path.join(root, "stdout.txt"), "w") as f:
            f.write(out)

    root = shared_dir(tmp_path_factory, "day1", {"moving": moving["root"], "train": DAY_TRAIN},
                      build)
    return {"model": os.path.join(root, "model"), "serving": os.path.join(root, "serving"),
            "search": os.path.join(root, "search"),
            "stdout": open(os.path.join(root, "stdout.txt")).read()}


def model_at(model_dir: str, prefix: str):
    """The trained model of `model_dir` with the weights of the checkpoint `prefix`."""
    model = ctr_task.load_trained(model_dir)
    tf.train.Checkpoint(model=model).read(prefix).expect_partial()
    return model


def rows_of(model, table: str, ids: np.ndarray) -> np.ndarray:
    return tf.gather(model.id_embeddings[table].embeddings,
                     model.lookups[table](tf.constant(ids, tf.int64))).numpy()


def test_a_warm_start_keeps_every_row_by_id_and_gives_new_ids_their_own(moving, day1):
    old = ctr_task.load_trained(moving["day0"])
    start = model_at(day1["model"], os.path.join(day1["model"], "ckpt", "ckpt-0"))
    trained = ctr_task.load_trained(day1["model"])
    grown = trained.vocabularies
    for table, old_ids in old.vocabularies.ids.items():
        # Every day-0 id keeps its row (another position in the grown vocabulary), exactly.
        np.testing.assert_array_equal(rows_of(start, table, old_ids), rows_of(old, table, old_ids))
        new_ids = np.setdiff1d(grown.ids[table], old_ids)
        if table not in ("item_id", "user_id"):  # the world adds items and users only
            continue
        assert len(new_ids) > 0, f"day 1 shows no new {table}"
        # New ids have rows of their own: not the out-of-vocabulary row 0, distinct, and as a
        # fresh model initialises them (not a copy of any old row).
        where = start.lookups[table](tf.constant(new_ids, tf.int64)).numpy()
        assert (where > 0).all() and len(np.unique(where)) == len(new_ids)
        new_rows = rows_of(start, table, new_ids)
        oov = start.id_embeddings[table].embeddings.numpy()[0]
        assert not np.any(np.all(np.isclose(new_rows, oov), axis=1))
        assert np.abs(new_rows).max() <= 0.05 + 1e-7  # Keras' uniform initialiser
        # Training then moves them: the new ids were seen on day 1.
        assert not np.allclose(rows_of(trained, table, new_ids), new_rows)
    # Every other weight carries over as it is.
    skip = {id(layer.embeddings) for layer in start.id_embeddings.values()}
    skip |= {id(layer.embeddings) for layer in old.id_embeddings.values()}
    for a, b in zip(daily._weights(start, skip), daily._weights(old, skip), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The day's ids are last seen on day 1, the others on day 0.
    for table, ids in grown.ids.items():
        seen = grown.last_seen[table]
        assert set(np.unique(seen)) <= {0, 1} and (seen == 1).any()
        assert np.array_equal(seen == 0, ~np.isin(ids, read_day_ids(moving, 1, table)))


def read_day_ids(moving: dict, day: int, table: str) -> np.ndarray:
    """The ids a day's training records show in one table (through the day's Beam-free
    vocabulary build)."""
    spec = ctr_spec.load(os.path.join(moving["day0"], ctr_spec.FILE))
    pattern = os.path.join(moving["world"], f"day={day:02d}", "ctr", "train-*")
    return Vocabularies.from_training_data(pattern, spec, 1).ids[table]


def test_the_next_version_records_its_parent_and_scores_a_new_item_as_the_model(moving, day1):
    assert versions.versions(day1["serving"]) == [1, 2]
    info = common.export_info(os.path.join(day1["serving"], "2"))
    assert info["parent_version"] == 1 and info["data_day"] == 1
    assert info["model_dir"] == os.path.abspath(day1["model"])
    gate = info["gate"]
    assert gate["passed"] and not gate["forced"] and gate["low"] > -gate["margin"]
    record = json.load(open(os.path.join(day1["model"], "daily.json")))
    assert record["exported"] == 2 and record["day"] == 1 and record["new_items"] > 0
    assert "daily: exported version 2" in day1["stdout"]
    assert "gate passes: AUC" in day1["stdout"]

    # Day 1's held-out records of items added on day 1, through the export and in process.
    model = ctr_task.load_trained(day1["model"])
    spec = model.spec
    rows = read_all(os.path.join(moving["world"], "day=01"), ctr_spec.load(
        os.path.join(day1["model"], ctr_spec.FILE)).record_kind(), "holdout")
    old_items = ctr_task.image_table_of(moving["day0"]).item_id
    new = np.flatnonzero(~np.isin(rows[spec.item], old_items))
    assert len(new) >= 5
    picked = {k: v[new] for k, v in rows.items()}
    inputs = page_rows(spec, picked, 5)
    want = tf.sigmoid(model(model_batch(spec, inputs))).numpy()
    loaded = tf.saved_model.load(os.path.join(day1["serving"], "2"))
    got = loaded.signatures["serving_default"](
        **{k: tf.constant(v) for k, v in inputs.items()})["ctr"].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # The new items have their image vectors: the grown table holds them, not the OOV row.
    table = model.image_tables["items"]
    assert (table.rows(tf.constant(inputs[spec.item], tf.int64)).numpy() > 0).all()
    # The lookups are assets that grew with the vocabularies; the graph did not.
    v1, v2 = (os.path.join(day1["serving"], v) for v in ("1", "2"))
    ids = open(os.path.join(v2, "assets", "item_id_lookup.txt")).read().split()
    assert len(ids) == len(model.vocabularies.ids["item_id"])
    assert len(ids) > len(open(os.path.join(v1, "assets", "item_id_lookup.txt")).read().split())
    pb = [os.path.getsize(os.path.join(v, "saved_model.pb")) for v in (v1, v2)]
    assert abs(pb[1] - pb[0]) < 0.01 * pb[0], pb


def test_the_days_search_export_finds_the_items_added_today(moving, day1):
    assert versions.versions(day1["search"]) == [1]
    version = os.path.join(day1["search"], "1")
    info = common.export_info(version)
    assert info["data_day"] == 1 and info["model_dir"] == os.path.abspath(day1["model"])
    columns = ("item_id", "image", "category_id")
    today = read_columns(os.path.join(moving["world"], "day=01"), columns)
    yesterday = read_columns(os.path.join(moving["world"], "day=00"), columns)
    # A day's catalog lists the items added that day; the search holds every day's.
    new = ~np.isin(today["item_id"], yesterday["item_id"])
    assert new.any() and info["items"] == len(yesterday["item_id"]) + new.sum()
    found = tf.saved_model.load(version).signatures["search"](
        images=tf.constant(today["image"][new]),
        category=tf.constant(today["category_id"][new]),
        k=tf.fill([int(new.sum())], 5))["item_id"].numpy()
    np.testing.assert_array_equal(found[:, 0], today["item_id"][new])


def read_columns(data_dir: str, columns: tuple) -> dict:
    from trainer.data import pipeline, records
    return pipeline.read_columns(records.default_pattern(data_dir, "catalog"), "catalog", columns)


def test_vocabularies_grow_by_id_and_evict_ids_unseen_for_n_days():
    yesterday = Vocabularies(ids={"user_id": np.array([3, 5, 9])}, boundaries={}, moments={},
                             counts={"user_id": np.array([2, 1, 4])},
                             last_seen={"user_id": np.array([4, 1, 3])})
    today = Vocabularies(ids={"user_id": np.array([5, 7])}, boundaries={}, moments={},
                         counts={"user_id": np.array([10, 1])})
    grown, report = daily.grow_vocabularies(yesterday, today, day=5)
    np.testing.assert_array_equal(grown.ids["user_id"], [3, 5, 7, 9])
    np.testing.assert_array_equal(grown.counts["user_id"], [2, 11, 1, 4])
    np.testing.assert_array_equal(grown.last_seen["user_id"], [4, 5, 5, 3])
    assert report["user_id"] == {"kept": 3, "new": 1, "evicted": 0, "size": 4}
    # Unseen for more than 1 day by day 5: 9 (day 3); 3 (day 4) stays.
    evicted, report = daily.grow_vocabularies(yesterday, today, day=5, evict_after_days=1)
    np.testing.assert_array_equal(evicted.ids["user_id"], [3, 5, 7])
    np.testing.assert_array_equal(evicted.counts["user_id"], [2, 11, 1])
    assert report["user_id"] == {"kept": 2, "new": 1, "evicted": 1, "size": 3}


def test_a_sharply_different_day_is_reported():
    day = daily.DayStatistics(samples=1000, click_rate=0.10, unknown_items=0.05,
                              unknown_users=0.40)
    same = daily.sharp_changes(day, day, 2.0, 1.5, 0.25)
    assert same == ["40.0% of today's samples show users new to the model (limit 25%)"]
    half = daily.DayStatistics(samples=400, click_rate=0.2, unknown_items=0, unknown_users=0)
    out = daily.sharp_changes(half, day, 2.0, 1.5, 0.25)
    assert out[0].startswith("samples 400 against 1000 yesterday (0.40x")
    assert out[1].startswith("click rate 0.2 against 0.1 yesterday (2.00x")


def test_a_refusal_says_when_the_holdout_cannot_resolve_the_margin():
    def decision(low: float, high: float) -> daily.GateDecision:
        return daily.GateDecision(passed=low > -0.005, forced=False, metric="AUC", margin=0.005,
                                  candidate=0.7, serving=0.7, difference=(low + high) / 2,
                                  low=low, high=high, samples=3000)

    wide = str(decision(-0.035, 0.037))
    assert wide.startswith("gate refused") and "too few to resolve that margin" in wide
    assert "half-width is 0.0360" in wide
    worse = str(decision(-0.012, -0.008))  # resolved, and worse: no excuse
    assert worse.startswith("gate refused") and "too few" not in worse
    assert "too few" not in str(decision(-0.004, 0.03))  # passes


def inverted_day(moving: dict, day: int, out: str) -> str:
    """A copy of a day's data dir whose training records' labels are inverted (a click becomes
    none and none a click): a model trained on it learns the opposite of the truth."""
    src = os.path.join(moving["world"], f"day={day:02d}")
    shutil.copytree(src, out)
    for path in sorted(tf.io.gfile.glob(os.path.join(out, "ctr", "train-*"))):
        examples = [tf.train.Example.FromString(r.numpy())
                    for r in tf.data.TFRecordDataset(path)]
        with tf.io.TFRecordWriter(path) as w:
            for e in examples:
                label = e.features.feature["label"].int64_list.value
                label[:] = [1 - label[0]]
                w.write(e.SerializeToString())
    return out


@pytest.mark.e2e
def test_the_gate_keeps_the_serving_version_against_a_worse_model(moving, tmp_path):
    data = inverted_day(moving, 1, str(tmp_path / "day=01"))
    serving = serving_copy(moving, str(tmp_path / "serving"))
    model_dir = str(tmp_path / "model")
    # Inverted labels and a high learning rate: the warm-started model unlearns day 0 (shuffled
    # labels leave it too close to the serving one to tell apart on a tiny day). The gate scores
    # it on all of day 1's true records (4,000 samples rather than the held-out 470).
    original = os.path.join(moving["world"], "day=01", "ctr", "*")
    args = daily_args(moving, 1, model_dir, serving, "--learning_rate=0.05", "--train_steps=40",
                      "--checkpoint_interval=20", "--log_interval=20",
                      f"--set=daily.holdout_pattern={original}", "--margin=0.05", data_dir=data)
    out = run_ok(args)
    assert "gate refused: AUC" in out and "nothing exported; version 1" in out
    assert versions.versions(serving) == [1]
    record = json.load(open(os.path.join(model_dir, "daily.json")))
    assert record["exported"] is None and not record["gate"]["passed"]
    assert record["gate"]["high"] < 0  # worse beyond noise
    # --force exports it anyway, recording that it was forced; training is not redone.
    out = run_ok([*args, "--force"])
    assert "already trained to step 40" in out and "gate forced through" in out
    assert versions.versions(serving) == [1, 2]
    assert common.export_info(os.path.join(serving, "2"))["gate"]["forced"]


@pytest.mark.e2e
def test_a_model_with_d_keeps_its_positives_and_mines_the_new_items(moving, tmp_path):
    day0_data = os.path.join(moving["world"], "day=00")
    enc = os.path.join(moving["root"], "s1")
    day0 = str(tmp_path / "day0")
    registry.run(ctr_config(day0_data, day0, stage="debias", images__encoder="s1",
                            images__model_dir=enc, images__s1_model_dir=enc,
                            ctr__test_pattern=os.path.join(day0_data, "ctr", "holdout-*")))
    model_dir, serving = str(tmp_path / "model"), str(tmp_path / "serving")
    # A first export under an empty base path: no serving version to gate against.
    s1_export = f"--s1_export={moving['encoder_export']}"  # the fixture's encoder is S1
    out = run_ok(daily_args(moving, 1, model_dir, serving, s1_export, previous=day0))
    assert "daily: exported version 1" in out and versions.versions(serving) == [1]
    old, new = (np.load(os.path.join(d, ctr_task.POSITIVES)) for d in (day0, model_dir))
    s1 = np.load(os.path.join(model_dir, ctr_task.S1_TABLE))
    table = np.load(os.path.join(model_dir, "embeddings.npz"))
    np.testing.assert_array_equal(s1["item_id"], table["item_id"])
    n_old = len(old["rows"])
    assert len(new["rows"]) == len(table["item_id"]) > n_old
    # The old items' positives carry over as they were; the new items get theirs, mined among
    # the candidates of their own category.
    np.testing.assert_array_equal(new["rows"][:n_old], old["rows"])
    np.testing.assert_array_equal(new["weights"][:n_old], old["weights"])
    mined = new["rows"][n_old:]
    assert (mined >= 0).any(), "no positives mined for the new items"
    anchors = np.repeat(np.arange(n_old, len(new["rows"]))[:, None], mined.shape[1], 1)
    found = mined >= 0
    np.testing.assert_array_equal(s1["category_id"][mined[found]],
                                  s1["category_id"][anchors[found]])
    assert (new["weights"][n_old:][found] > 0).all()
    model = ctr_task.load_trained(model_dir)  # the grown model with D loads and scores
    assert model.cfg.debias is not None


def test_a_missing_day_stops_the_cycle_and_the_serving_version_stays(moving, tmp_path):
    serving = serving_copy(moving, str(tmp_path / "serving"))
    empty = tmp_path / "day=09"
    (empty / "catalog").mkdir(parents=True)
    out = subprocess.run(daily_args(moving, 9, str(tmp_path / "model"), serving,
                                    data_dir=str(empty)),
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert f"today's train data is missing: no files match '{empty}/ctr/train-*" in out.stderr
    assert "nothing was trained or exported, the serving version stays" in out.stderr
    assert versions.versions(serving) == [1]


@pytest.mark.e2e
def test_a_killed_cycle_reruns_to_the_same_weights_and_a_second_is_refused(moving, day1,
                                                                           tmp_path):
    serving = serving_copy(moving, str(tmp_path / "serving"))
    model_dir = str(tmp_path / "model")
    args = daily_args(moving, 1, model_dir, serving)
    cycle = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not os.path.exists(os.path.join(model_dir, "ckpt", "ckpt-10.index")):
            assert cycle.poll() is None and time.time() < deadline, "no checkpoint 10"
            time.sleep(0.02)
        # A second cycle on the model dir is refused while the first runs.
        cfg = configs.DailyStage(data_dir=os.path.join(moving["world"], "day=01"),
                                 model_dir=model_dir, daily=configs.DailyConfig(
                                     previous=moving["day0"], export_dir=serving,
                                     encoder_export=moving["encoder_export"]))
        with pytest.raises(lock.LockedError, match=f"in use by pid {cycle.pid} on this host"):
            registry.run(cfg)
    finally:
        cycle.kill()  # SIGKILL during training or evaluation, its lock left behind
        cycle.wait()
    assert versions.versions(serving) == [1], "killed too late: it had exported"
    assert os.path.exists(os.path.join(model_dir, lock.NAME))
    out = run_ok(args)
    assert "lock: removing the stale lock" in out and "daily: exported version 2" in out
    assert not os.path.exists(os.path.join(model_dir, lock.NAME))
    want = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(day1["model"],
                                                                            "ckpt")))
    got = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(model_dir, "ckpt")))
    names = sorted(want.get_variable_to_shape_map())
    assert names == sorted(got.get_variable_to_shape_map())
    for name in names:  # the values; the object graph and the lookups' files name the dirs
        if name == "_CHECKPOINTABLE_OBJECT_GRAPH" or name.endswith("_filename/.ATTRIBUTES/"
                                                                   "VARIABLE_VALUE"):
            continue
        np.testing.assert_array_equal(got.get_tensor(name), want.get_tensor(name), err_msg=name)
    # The evaluate job's held-out scores, by record: the same.
    scores = [pq.read_table(os.path.join(d, "evaluation", "predictions")).sort_by("name")
              .column("score").to_numpy() for d in (model_dir, day1["model"])]
    np.testing.assert_array_equal(*scores)
    # A rerun of the finished cycle finds its export: no second version.
    out = run_ok(args)
    assert "daily: exported version 2" in out and versions.versions(serving) == [1, 2]


@pytest.mark.e2e
def test_the_cycle_with_two_workers_and_two_parameter_servers(moving, day1, tmp_path):
    serving = serving_copy(moving, str(tmp_path / "serving"))
    model_dir = str(tmp_path / "model")
    args = [a for a in daily_args(moving, 1, model_dir, serving) if a != "--deterministic"]
    log, _, _ = run_local_cluster([*args, "--strategy=parameter_server"])
    assert "daily: warm-started from" in log and "ctr: trained to step 20" in log
    # The same grown vocabularies and image table as one process (the steps before training
    # are deterministic), and an outcome not worse than it beyond the holdout's noise (the
    # asynchronous updates make a different model, better on some runs: one-sided).
    for name in (ctr_task.VOCABULARIES, "embeddings.npz"):
        a, b = (np.load(os.path.join(d, name)) for d in (model_dir, day1["model"]))
        for k in a.files:
            if k != "source":
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name} {k}")
    ps, one = (json.load(open(os.path.join(d, "daily.json"))) for d in (model_dir, day1["model"]))
    gate = one["gate"]
    assert ps["holdout"]["AUC"] > one["holdout"]["AUC"] - (gate["high"] - gate["low"]), (
        ps["holdout"]["AUC"], one["holdout"]["AUC"], gate)
    assert ps["exported"] == 2 and versions.versions(serving) == [1, 2]
    info = common.export_info(os.path.join(serving, "2"))
    assert info["parent_version"] == 1 and info["data_day"] == 1

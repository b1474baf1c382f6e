"""The CTR model judged by the Beam evaluate job (`trainer.pipelines.evaluate`): its metrics equal
those of its rows computed in one process (GAUC and the slices exactly, each AUC within its stated
bound) and the in-process evaluation's to 1e-3, its per-row predictions equal the model's to
1e-5, the streaming paired bootstrap from its sharded predictions agrees with the in-memory one,
and bad input fails naming the record."""
from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import raw_records, with_bad_value, write_records
from trainer import configs, registry
from trainer.data import npz, records
from trainer.eval import ctr_metrics, read_metrics, significance
from trainer.pipelines import evaluate as evaluate_job

COUNTS = ("samples", "clicks", "gauc_groups", "bottom10_samples", "bottom10_clicks",
          "bottom10_max_impressions", "top10_samples", "top10_min_impressions",
          "low_impression_samples")


def job_rows(out_dir: str) -> dict:
    table = pq.read_table(sorted(glob.glob(os.path.join(out_dir, "predictions", "*.parquet"))))
    return {k: np.asarray(v) for k, v in table.to_pydict().items()}


def assert_matches_in_process(out_dir: str, model_dir: str) -> None:
    """The job's outputs in `out_dir` against the in-process evaluation of the same model at the
    end of its training (`model_dir`'s metrics.json and predictions.npz)."""
    got, want = read_metrics(out_dir), read_metrics(model_dir)
    for k in COUNTS:
        assert got[k] == want[k], k
    # The aggregation is exact: against the metrics of the job's own rows, GAUC to rounding and
    # each AUC within its bound.
    rows = job_rows(out_dir)
    own = ctr_metrics.ctr_metrics(rows["label"], rows["score"], rows["group"], rows["item"],
                                  rows["impressions_30d"])
    assert got["GAUC"] == pytest.approx(own["GAUC"], abs=1e-12)
    for k in ("AUC", "AUC_bottom10", "AUC_top10", "AUC_low_impression"):
        assert abs(got[k] - own[k]) <= got[f"{k}_bound"] + 1e-12, (k, got[k], own[k])
        assert got[f"{k}_bound"] < 1e-3
        # Against the in-process model's: the export's scores differ from it by float noise
        # (below 1e-7), which breaks the exact ties of the cluster_id model's scores one way or
        # the other (0.5496 in process, 0.5495 by the job, for GAUC); the metrics agree to 1e-3.
        assert got[k] == pytest.approx(want[k], abs=1e-3 + got[f"{k}_bound"])
    assert got["GAUC"] == pytest.approx(want["GAUC"], abs=1e-3)
    # The rows: the in-process pass has no record names, so both are put in one order by their
    # columns (ties within a page and item broken by the score, which agrees to 1e-5).
    pred = npz.read(os.path.join(model_dir, "predictions.npz"))
    mine = np.lexsort((rows["score"], rows["item"], rows["group"]))
    theirs = np.lexsort((pred["score"], pred["item"], pred["group"]))
    for k in ("group", "item", "label", "impressions_30d"):
        np.testing.assert_array_equal(rows[k][mine], pred[k][theirs], err_msg=k)
    np.testing.assert_allclose(rows["score"][mine], pred["score"][theirs], atol=1e-5)
    bottom, top = ctr_metrics.impression_slices(pred["item"], pred["impressions_30d"])
    np.testing.assert_array_equal(rows["bottom10"][mine], bottom[theirs])
    np.testing.assert_array_equal(rows["top10"][mine], top[theirs])
    assert len(set(rows["name"])) == len(rows["name"]) == got["samples"]


def job_config(tiny_world: str, export: str, out_dir: str, **kw) -> configs.EvaluateConfig:
    return configs.EvaluateConfig(
        records_pattern=records.default_pattern(tiny_world, "ctr", "test"),
        catalog_pattern=records.default_pattern(tiny_world, "catalog"), model_export=export,
        out_dir=out_dir, batch_size=256, **kw)


@pytest.fixture(scope="module")
def evaluated(tiny_world, exports, tmp_path_factory) -> dict:
    """Both exports judged by the job: `debias` through `--stage=evaluate`, `cluster` through
    the library call, in 3 shards."""
    root = tmp_path_factory.mktemp("evaluated")
    out = {name: str(root / name) for name in ("debias", "cluster")}
    registry.run(configs.EvaluateStage(
        data_dir=tiny_world, model_dir=out["debias"],
        evaluate=configs.EvaluateConfig(model_export=os.path.dirname(exports["debias"]),
                                        batch_size=256)))
    evaluate_job.run(job_config(tiny_world, exports["cluster"], out["cluster"], num_shards=3))
    return out


@pytest.mark.parametrize("name", ["debias", "cluster"])
def test_the_job_equals_the_in_process_evaluation(evaluated, trained, name):
    assert_matches_in_process(evaluated[name], trained[name][0])


def test_the_job_writes_sharded_predictions_and_pages(evaluated):
    assert len(glob.glob(os.path.join(evaluated["cluster"], "predictions", "*.parquet"))) == 3
    pages = pq.read_table(os.path.join(evaluated["cluster"], "pages")).to_pydict()
    rows = job_rows(evaluated["cluster"])
    assert sum(pages["samples"]) == len(rows["name"])
    assert len(set(pages["group"])) == len(pages["group"]) == len(np.unique(rows["group"]))


@pytest.mark.parametrize("metric", ["AUC", "GAUC", "AUC_bottom10", "AUC_top10"])
def test_the_streaming_bootstrap_agrees_with_the_in_memory_one(evaluated, trained, metric):
    a, b = (npz.read(os.path.join(trained[n][0], "predictions.npz")) for n in ("debias", "cluster"))
    # The in-memory one needs both in one order: the job's rows give it.
    memory = significance.compare_ctr(a, b, metric)
    stream = significance.stream_compare_ctr(evaluated["debias"], evaluated["cluster"], metric)
    for got, want in ((stream.a, memory.a), (stream.b, memory.b),
                      (stream.difference, memory.difference)):
        assert got.value == pytest.approx(want.value, abs=1e-3)
        # Two bootstraps (multinomial against double-or-nothing draws): the same spread.
        assert got.half_width == pytest.approx(want.half_width, rel=0.25)
    # A draw depends on the page only: reading 97 rows at a time changes nothing.
    small = significance.stream_compare_ctr(evaluated["debias"], evaluated["cluster"], metric,
                                            rows=97)
    assert small.difference.low == pytest.approx(stream.difference.low, abs=1e-12)
    assert small.difference.high == pytest.approx(stream.difference.high, abs=1e-12)


def test_the_streaming_bootstrap_refuses_predictions_of_other_rows(evaluated, tiny_world,
                                                                   exports, tmp_path):
    part = str(tmp_path / "part")
    cfg = job_config(tiny_world, exports["cluster"], part)
    one_file = sorted(glob.glob(cfg.records_pattern))[0]
    evaluate_job.run(dataclasses.replace(cfg, records_pattern=one_file))
    with pytest.raises(ValueError, match="not predictions of the same test rows"):
        significance.stream_compare_ctr(evaluated["debias"], part, "AUC", resamples=10)


def test_page_weights_are_zero_or_two_with_the_multinomials_moments():
    w = significance.page_weights(np.arange(20_000), 130, seed=3)
    assert set(np.unique(w)) == {0.0, 2.0}
    assert w.mean() == pytest.approx(1.0, abs=0.01) and w.var() == pytest.approx(1.0, abs=0.01)
    np.testing.assert_array_equal(w[5:9], significance.page_weights(np.arange(5, 9), 130, 3))
    assert not np.array_equal(w, significance.page_weights(np.arange(20_000), 130, seed=4))
    # Draws are independent: neighbouring draws and pages do not move together.
    assert abs(np.corrcoef(w[:, 0], w[:, 1])[0, 1]) < 0.03
    assert abs(np.corrcoef(w[:-1, 64], w[1:, 64])[0, 1]) < 0.03


def test_an_item_missing_from_the_catalog_fails_naming_the_record(tiny_world, exports, tmp_path):
    recs = raw_records(records.default_pattern(tiny_world, "ctr", "test"))[:50]
    test = write_records(str(tmp_path / "test-00000-of-00001.tfrecord"), recs)
    catalog = raw_records(records.default_pattern(tiny_world, "catalog"))
    few = write_records(str(tmp_path / "catalog.tfrecord"), catalog[:5])
    cfg = job_config(tiny_world, exports["debias"], str(tmp_path / "out"))
    with pytest.raises(Exception, match=r"record .*test-00000-of-00001.tfrecord:\d+: item_id \d+ "
                       r"is not in the catalog"):
        evaluate_job.run(dataclasses.replace(cfg, records_pattern=test, catalog_pattern=few))


def test_a_bad_record_fails_naming_its_file_record_and_feature(tiny_world, exports, tmp_path):
    test = with_bad_value(records.default_pattern(tiny_world, "ctr", "test"),
                          str(tmp_path / "test-00000-of-00001.tfrecord"), "label", 3, n=40)
    cfg = job_config(tiny_world, exports["debias"], str(tmp_path / "out"))
    with pytest.raises(Exception, match=r"test-00000-of-00001.tfrecord: record 7: feature 'label'"):
        evaluate_job.run(dataclasses.replace(cfg, records_pattern=test))


def test_with_skip_bad_records_a_bad_record_is_left_out_and_counted(tiny_world, exports,
                                                                    tmp_path):
    test = with_bad_value(records.default_pattern(tiny_world, "ctr", "test"),
                          str(tmp_path / "test-00000-of-00001.tfrecord"), "label", 3, n=40)
    cfg = dataclasses.replace(job_config(tiny_world, exports["debias"], str(tmp_path / "out")),
                              records_pattern=test)
    metrics = evaluate_job.run(cfg, skip_bad_records=True)
    assert metrics["samples"] == 39
    assert metrics["counters"]["bad records skipped"] == 1
    assert "test-00000-of-00001.tfrecord:7" not in set(job_rows(str(tmp_path / "out"))["name"])


def test_a_day_without_records_fails_saying_so(tiny_world, exports, tmp_path):
    empty = write_records(str(tmp_path / "test-00000-of-00001.tfrecord"), [])
    cfg = job_config(tiny_world, exports["debias"], str(tmp_path / "out"))
    with pytest.raises(Exception, match="no records to evaluate"):
        evaluate_job.run(dataclasses.replace(cfg, records_pattern=empty))


def test_a_joined_layout_model_is_trained_and_judged_without_the_catalogs_vectors(
        tiny_world, trained, tmp_path, monkeypatch):
    """The `ctr` stage on the join pipeline's records (every image feature `layout: joined`, the
    test day joined too), evaluated by the job: neither the trainer nor the job's worker reads the
    image table's rows (reading them fails this test), and the job's rows equal those of the
    model looking the ids up in the table, as serving does, to 1e-5."""
    from export_helpers import ctr_config
    from trainer.ctr import spec as ctr_spec
    from trainer.ctr import task as ctr_task
    from trainer.features import embeddings
    from trainer.pipelines import join as join_job

    d = ctr_spec.load("synthetic").to_dict()
    d["features"] = [{**f, "layout": "joined"} if f["kind"] == "image" else f
                     for f in d["features"]]
    spec_path = str(tmp_path / "joined.yaml")
    ctr_spec.parse(d, "joined").save(spec_path)
    table = os.path.join(trained["encoder"], embeddings.FILE)
    for split in ("train", "test"):
        join_job.run(records.default_pattern(tiny_world, "ctr", split), ctr_spec.load(spec_path),
                     "vector", table, str(tmp_path / "joined"), split, query_embeddings=table,
                     table_in_memory=True)

    def no_rows(self):
        raise AssertionError(f"{self.path}'s rows were read")

    monkeypatch.setattr(embeddings.TableFile, "load", no_rows)
    model_dir = str(tmp_path / "ctr")
    registry.run(ctr_config(
        tiny_world, model_dir, images__encoder="s1", images__model_dir=trained["encoder"],
        ctr__spec=spec_path, evaluation="job", evaluate__beam_options="",
        ctr__train_pattern=records.default_pattern(str(tmp_path / "joined"), "ctr", "train"),
        ctr__test_pattern=records.default_pattern(str(tmp_path / "joined"), "ctr", "test")))
    monkeypatch.undo()
    rows = job_rows(os.path.join(model_dir, evaluate_job.EVALUATION))
    assert read_metrics(model_dir)["samples"] == len(rows["name"]) == 4000
    by_id = ctr_task.predict(ctr_task.load_trained(model_dir),
                             records.default_pattern(tiny_world, "ctr", "test"))
    assert by_id["score"].std() > 1e-3  # a model that tells records apart
    mine = np.lexsort((rows["score"], rows["item"], rows["group"]))
    theirs = np.lexsort((by_id["score"], by_id["item"], by_id["group"]))
    for k in ("group", "item", "label"):
        np.testing.assert_array_equal(rows[k][mine], by_id[k][theirs], err_msg=k)
    np.testing.assert_allclose(rows["score"][mine], by_id["score"][theirs], atol=1e-5)

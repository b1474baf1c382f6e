"""Beam evaluate: an exported CTR model judged on a day's records at any size, with no process
holding the day's predictions (paper 000 Table 2's metrics, paper 002 §4.3's; the definitions are
`trainer.eval.ctr_metrics`'s).

1. the day's `ctr` records, named `<file>:<index>` and spread over the workers by file;
2. RunInference with `CtrModelHandler`: the export's `predict_examples` signature (what TF
   Serving runs), or with `CheckpointModelHandler`: a trained model dir's latest checkpoint, on
   batches of `batch_size` records, each record parsed and checked by the model's feature spec
   first (a bad record fails the job naming its file, record and feature). On the join
   pipeline's records (`layout: joined` image features joined in) the checkpoint's model reads
   the image features from them, as in training, and holds no image table;
3. each row joined with its item's 30-day impressions from the catalog records, by a shuffle
   (`CoGroupByKey` on the item), so neither side is held whole, of only the catalog items the
   day shows (its distinct items, a side input); an item the catalog lacks fails the job naming
   it;
4. the impression slices, exactly as `ctr_metrics.impression_slices` cuts them: the samples per
   impression level give the level that crosses `fraction` of the samples from each end, and
   only that level's items are ordered by id (`ctr_metrics.slice_cutoff`, `take_items`);
5. sufficient statistics, summed over the workers: per-label histograms of the scores on a
   log-linear grid for all rows, the two slices and the low-impression items (AUC with an error
   bound, `ctr_metrics.histogram_auc`), and each page's size, clicks and AUC (GAUC, grouped by
   page);
6. the rows as sharded Parquet, `predictions/predictions-SSSSS-of-NNNNN.parquet` (name, label,
   score, group, item, impressions_30d, bottom10, top10), and the pages' statistics,
   `pages/pages-*.parquet` (group, samples, clicks, auc): what the streaming paired bootstrap
   reads (`trainer.eval.significance.stream_compare_ctr`).
Then the launching process writes metrics.json from the statistics (`metrics_from`; a few MB).

  python -m trainer.pipelines.evaluate --records='DATA/ctr/test-*' \\
      --catalog='DATA/catalog/*.tfrecord' --export_dir=models/ctr|--checkpoint_dir=runs/ctr \\
      --out_dir=eval \\
      [Beam options: --runner=dask --dask_workers=2 | --runner=DataflowRunner ...]
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import apache_beam as beam
import numpy as np
import pyarrow as pa
import tensorflow as tf
from apache_beam.ml.inference.base import ModelHandler, RunInference

from trainer import configs, tracing
from trainer.ctr import spec as ctr_spec
from trainer.data import npz, parse, pipeline, schema
from trainer.eval import ctr_metrics, significance, write_metrics
from trainer.features import versions
from trainer.pipelines import common

NAMESPACE = "evaluate"
NAMED_SKIPS = 10  # skipped records a worker names; the rest are only counted
STATISTICS = "statistics.npz"
PREDICTIONS_DIR, PAGES_DIR = significance.PREDICTIONS, significance.PAGES
EVALUATION = "evaluation"  # the job's outputs in a trained model dir (the ctr stage, the daily)
RECORD_KEYS = ("counters", "model", "records", "seconds")  # what `run` adds to the metrics
SLICES = ("all", "bottom10", "top10", "low_impression")
PREDICTION_SCHEMA = pa.schema([
    ("name", pa.string()), ("label", pa.int64()), ("score", pa.float32()),
    ("group", pa.int64()), ("item", pa.int64()), ("impressions_30d", pa.int64()),
    ("bottom10", pa.bool_()), ("top10", pa.bool_())])
PAGE_SCHEMA = pa.schema([("group", pa.int64()), ("samples", pa.int64()),
                         ("clicks", pa.int64()), ("auc", pa.float64())])


def export_spec(version_dir: str) -> ctr_spec.CtrSpec:
    """The feature spec a CTR export was trained with (its `assets.extra`)."""
    path = os.path.join(version_dir, "assets.extra", ctr_spec.FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{version_dir} has no assets.extra/{ctr_spec.FILE}: not a CTR "
                                "model export (export.ctr)")
    return ctr_spec.load(path)


class _CtrHandler(ModelHandler[tuple, dict, Any]):
    """RunInference's handler for a CTR model: a batch of named `ctr` records, each checked by
    the model's feature spec (so an error names its record) -> one row per record {name, label,
    group, item, score}. Subclasses load the model and score a batch (`_score`)."""

    def __init__(self, source: str, spec: ctr_spec.CtrSpec, batch_size: int,
                 joined: tuple[str, int] | None = None, skip_bad_records: bool = False):
        """joined: (image_feature_mode, image dimension) when the records carry the spec's
        `layout: joined` image features (the join pipeline's output) and the model reads them
        there. skip_bad_records: a bad record is left out (counted as `bad records skipped`,
        as the in-process evaluation skips it) instead of failing the job."""
        self.source, self.spec, self.batch_size = source, spec, batch_size
        self.joined, self.skip = joined, skip_bad_records
        self._parser: common.BatchParser | None = None
        self._reported = 0  # skipped records seen by this worker

    def _score(self, model: Any, serialized: list[bytes], rows: dict) -> np.ndarray:
        raise NotImplementedError

    def run_inference(self, batch: Sequence[tuple[str, bytes]], model: Any,
                      inference_args: dict | None = None) -> Iterable[dict]:
        if self._parser is None:
            self._parser = common.BatchParser(parse.RecordParser(
                self.spec.record_kind(joined=self.joined), decode=False), skip=self.skip)
        names, serialized = [n for n, _ in batch], [r for _, r in batch]
        rows, keep, bad = self._parser(names, serialized)
        if bad:
            beam.metrics.Metrics.counter(NAMESPACE, "bad records skipped").inc(len(bad))
            for b in bad[:max(NAMED_SKIPS - self._reported, 0)]:
                print(f"evaluate: skipped {b}", flush=True)
            self._reported += len(bad)
            names, serialized = [names[i] for i in keep], [serialized[i] for i in keep]
            if not names:
                return []
        score = np.reshape(self._score(model, serialized, rows), [-1])
        spec = self.spec
        return [{"name": n, "label": int(y), "group": int(g), "item": int(i), "score": float(s)}
                for n, y, g, i, s in zip(names, rows[spec.label], rows[spec.group],
                                         rows[spec.item], score, strict=True)]

    def batch_elements_kwargs(self) -> dict:
        return {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}

    def get_metrics_namespace(self) -> str:
        return NAMESPACE


class CtrModelHandler(_CtrHandler):
    """A CTR export (its version dir): the score from its `predict_examples` signature (the
    model as served)."""

    def load_model(self) -> Any:
        return tf.saved_model.load(self.source)

    def _score(self, model: Any, serialized: list[bytes], rows: dict) -> np.ndarray:
        return model.signatures["predict_examples"](
            examples=tf.constant(serialized))["ctr"].numpy()


class CheckpointModelHandler(_CtrHandler):
    """A trained `ctr`/`debias` model dir: the model rebuilt from what the dir records and its
    latest checkpoint (`ctr.task.load_trained`, as the in-process evaluation and the export do),
    in the worker that scores, so the process that trained it (the parameter-server chief) never
    holds it. On joined records it reads the image features from them, as in training, and holds
    no image table (nor the catalog's vectors)."""

    def load_model(self) -> Any:
        from trainer.ctr import task as ctr_task  # the model's code, only where it scores
        model = ctr_task.load_trained(self.source, joined_records=self.joined is not None)

        def score(batch: dict) -> tf.Tensor:
            return tf.sigmoid(model(batch, training=False))

        return tracing.function(score)

    def _score(self, model: Any, serialized: list[bytes], rows: dict) -> np.ndarray:
        return model({k: tf.constant(v) for k, v in rows.items()}).numpy()


def joined_records(model_dir: str, spec: ctr_spec.CtrSpec, pattern: str
                   ) -> tuple[str, int] | None:
    """(image_feature_mode, image dimension) when the records of `pattern` carry the `layout:
    joined` image features of the model trained in `model_dir` (the join pipeline's output, as
    it trained on), else None: the model looks the ids up in its image table."""
    config = configs.load(model_dir)
    if (not isinstance(config, configs.CtrStage) or config.images.encoder == "none"
            or not spec.joined):
        return None
    mode = config.ctr.image_feature_mode
    if not spec.carries_joined(pipeline.list_files(pattern), mode):
        return None
    from trainer.ctr import task as ctr_task
    return mode, ctr_task.image_file_of(model_dir).dim


class _Impressions(beam.DoFn):
    """Batches of named catalog records -> (item_id, impressions_30d) of the items the day shows
    (the side input): the shuffle that joins them with the rows moves the day's items, not the
    catalog. With `skip`, a bad catalog record is left out (its item then counts as missing)."""

    def __init__(self, skip: bool = False):
        self.skip = skip

    def setup(self) -> None:
        self.parser = common.BatchParser(parse.RecordParser(
            schema.get("catalog"), features=("item_id", "impressions_30d"), decode=False),
            skip=self.skip)
        self.shown: np.ndarray | None = None

    def process(self, batch: Sequence[tuple[str, bytes]], shown: list[int]
                ) -> Iterator[tuple[int, int]]:
        if self.shown is None:  # the same side input for the whole job
            self.shown = np.unique(np.asarray(shown, np.int64))
        rows, _, _ = self.parser([n for n, _ in batch], [r for _, r in batch])
        yield from _shown(self.shown, rows["item_id"], rows["impressions_30d"])


class _NpzImpressions(beam.DoFn):
    """An .npz of `item_id` and `impressions_30d` -> (item_id, impressions_30d) of the items the
    day shows: impressions counted elsewhere (the daily cycle's, from the logs its model learned
    from), read a chunk at a time."""

    def process(self, path: str, shown: list[int]) -> Iterator[tuple[int, int]]:
        day = np.unique(np.asarray(shown, np.int64))
        for ids, levels in zip(npz.chunks(path, "item_id"), npz.chunks(path, "impressions_30d"),
                               strict=True):
            if len(ids) != len(levels):
                raise ValueError(f"{path}: 'item_id' and 'impressions_30d' differ in length")
            yield from _shown(day, ids, levels)


def _shown(day: np.ndarray, ids: np.ndarray, levels: np.ndarray) -> Iterator[tuple[int, int]]:
    keep = np.isin(np.asarray(ids, np.int64), day)
    yield from zip(np.asarray(ids)[keep].tolist(), np.asarray(levels)[keep].tolist(), strict=True)


def _with_impressions(kv, item_name: str, catalog: str) -> Iterator[dict]:
    item, grouped = kv
    levels = sorted(set(grouped["catalog"]))
    if len(levels) > 1:
        raise ValueError(f"{catalog}: item_id {item} is listed with different impressions_30d "
                         f"{levels}")
    for row in grouped["rows"]:
        if not levels:
            raise ValueError(f"record {row['name']}: {item_name} {item} is not in the catalog "
                             f"({catalog}), so its impressions are unknown")
        yield {**row, "impressions_30d": levels[0]}


def _cutoffs(level_samples: list, fraction: float, records: str) -> dict:
    """{"bottom10" | "top10": (level, samples wanted from that level's items)}."""
    if not level_samples:
        raise ValueError(f"{records}: no records to evaluate")
    levels = np.array([k for k, _ in level_samples], np.int64)
    samples = np.array([n for _, n in level_samples], np.int64)
    return {"bottom10": ctr_metrics.slice_cutoff(levels, samples, fraction),
            "top10": ctr_metrics.slice_cutoff(levels, samples, fraction, most=True)}


def _at_cutoff(row: dict, cutoffs: dict) -> Iterator[tuple[tuple[str, int], int]]:
    for side, (level, _) in cutoffs.items():
        if row["impressions_30d"] == level:
            yield (side, row["item"]), 1


def _taken(kv, cutoffs: dict) -> tuple[str, list[int]]:
    side, counts = kv
    counts = list(counts)
    items = np.array([i for i, _ in counts], np.int64)
    samples = np.array([n for _, n in counts], np.int64)
    return side, ctr_metrics.take_items(items, samples, cutoffs[side][1]).tolist()


class _Slices(beam.DoFn):
    """Marks each row's slices: below (above) the cutoff level, or at it and taken."""

    def __init__(self, low_impressions: int):
        self.low_impressions = low_impressions
        self._taken: dict | None = None

    def process(self, row: dict, cutoffs: dict, taken: dict) -> Iterator[dict]:
        if self._taken is None:  # side inputs are the same for the whole job
            self._taken = {side: set(items) for side, items in taken.items()}
        level = row["impressions_30d"]
        (low, _), (high, _) = cutoffs["bottom10"], cutoffs["top10"]
        bottom = level < low or (level == low and row["item"] in self._taken["bottom10"])
        top = level > high or (level == high and row["item"] in self._taken["top10"])
        yield {**row, "bottom10": bool(bottom), "top10": bool(top),
               "low_impression": bool(level < self.low_impressions)}


def _histogram_part(rows: list[dict], bits: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch's (flat bins of [slice, label, bin], counts), non-zero only."""
    bins = ctr_metrics.num_score_bins(bits)
    score_bin = ctr_metrics.score_bins(np.array([r["score"] for r in rows], np.float32), bits)
    label = np.array([r["label"] for r in rows], np.int64)
    flat = []
    for s, name in enumerate(SLICES):
        keep = (np.ones(len(rows), bool) if name == "all"
                else np.array([r[name] for r in rows], bool))
        flat.append(((s * 2 + label) * bins + score_bin)[keep])
    keys, counts = np.unique(np.concatenate(flat), return_counts=True)
    return keys, counts


class _SumHistograms(beam.CombineFn):
    """Sparse parts -> the dense histograms [slices, 2 (non-click, click), bins]."""

    def __init__(self, bits: int):
        self.size = len(SLICES) * 2 * ctr_metrics.num_score_bins(bits)

    def create_accumulator(self):
        return None  # dense only once a part arrives

    def add_input(self, acc, part):
        acc = np.zeros(self.size, np.int64) if acc is None else acc
        np.add.at(acc, part[0], part[1])
        return acc

    def merge_accumulators(self, accs):
        out = None
        for a in accs:
            if a is not None:
                out = a.copy() if out is None else out + a
        return out

    def extract_output(self, acc):
        return np.zeros(self.size, np.int64) if acc is None else acc


def _page(kv) -> dict:
    group, rows = kv
    rows = list(rows)
    labels = np.array([y for y, _ in rows], np.int64)
    scores = np.array([s for _, s in rows], np.float32)
    return {"group": int(group), "samples": len(rows), "clicks": int(labels.sum()),
            "auc": ctr_metrics.auc(labels, scores)}


class _SumPages(beam.CombineFn):
    """Pages -> [sum n_g AUC_g, sum n_g, groups] over pages with both classes (GAUC)."""

    def create_accumulator(self):
        return np.zeros(3)

    def add_input(self, acc, page):
        if not np.isnan(page["auc"]):
            acc += (page["samples"] * page["auc"], page["samples"], 1)
        return acc

    def merge_accumulators(self, accs):
        return np.sum(list(accs), axis=0)

    def extract_output(self, acc):
        return acc


def _write_statistics(_, path: str, histograms, pages, cutoffs, bits: int) -> None:
    npz.write(path, histograms=np.reshape(histograms, [len(SLICES), 2, -1]), pages=pages,
              cutoffs=np.array([cutoffs["bottom10"][0], cutoffs["top10"][0]], np.int64),
              mantissa_bits=np.int64(bits))


def metrics_from(statistics: dict) -> dict:
    """Table 2's metrics (`ctr_metrics.ctr_metrics`'s keys) from the job's statistics, with each
    histogram AUC's error bound (`<metric>_bound`)."""
    hist = statistics["histograms"]
    out: dict = {}
    names = {"all": "AUC", "bottom10": "AUC_bottom10", "top10": "AUC_top10",
             "low_impression": "AUC_low_impression"}
    for s, name in enumerate(SLICES):
        value, bound = ctr_metrics.histogram_auc(hist[s, 1], hist[s, 0])
        out[names[name]], out[names[name] + "_bound"] = value, bound
    weighted, weight, groups = statistics["pages"]
    samples = hist.sum(axis=(1, 2))
    clicks = hist[:, 1].sum(-1)
    out.update({"GAUC": float(weighted / weight) if weight else float("nan"),
                "samples": int(samples[0]), "clicks": int(clicks[0]), "gauc_groups": int(groups),
                "bottom10_samples": int(samples[1]), "bottom10_clicks": int(clicks[1]),
                "bottom10_max_impressions": int(statistics["cutoffs"][0]),
                "top10_samples": int(samples[2]),
                "top10_min_impressions": int(statistics["cutoffs"][1]),
                "low_impression_samples": int(samples[3])})
    return out


def metrics_only(result: dict) -> dict:
    """`run`'s result without the job's record (`RECORD_KEYS`)."""
    return {k: v for k, v in result.items() if k not in RECORD_KEYS}


def run(cfg: configs.EvaluateConfig, beam_args: Sequence[str] = (),
        skip_bad_records: bool = False) -> dict:
    """Runs the job; writes and returns the metrics (`metrics_from`) with the job's record.
    With `skip_bad_records`, bad records of the day and of the catalog are left out and counted
    (`counters["bad records skipped"]`) instead of failing the job."""
    for what, value in (("records", cfg.records_pattern), ("catalog", cfg.catalog_pattern),
                        ("out_dir", cfg.out_dir)):
        if not value:
            raise ValueError(f"evaluate: no {what} given")
    if bool(cfg.model_export) == bool(cfg.checkpoint_dir):
        raise ValueError("evaluate: give one model: an export (model_export) or a trained model "
                         "dir (checkpoint_dir)")
    handler: ModelHandler
    if cfg.model_export:
        judged = versions.version_dir(cfg.model_export)  # one version for every worker
        spec = export_spec(judged)
        handler = CtrModelHandler(judged, spec, cfg.batch_size,
                                  skip_bad_records=skip_bad_records)
    else:
        judged = cfg.checkpoint_dir
        spec = ctr_spec.load(os.path.join(judged, ctr_spec.FILE))
        handler = CheckpointModelHandler(judged, spec, cfg.batch_size,
                                         joined_records(judged, spec, cfg.records_pattern),
                                         skip_bad_records)
    spec.check_files(pipeline.list_files(cfg.records_pattern))  # before any work
    for sub in (PREDICTIONS_DIR, PAGES_DIR):  # another model's or day's
        if tf.io.gfile.exists(os.path.join(cfg.out_dir, sub)):
            tf.io.gfile.rmtree(os.path.join(cfg.out_dir, sub))
    tf.io.gfile.makedirs(cfg.out_dir)
    stats_path = os.path.join(cfg.out_dir, STATISTICS)
    bits, catalog = cfg.mantissa_bits, cfg.catalog_pattern

    def build(p: beam.Pipeline) -> None:
        scored = (p | "Read" >> common.ReadNamedRecords(cfg.records_pattern)
                  | "Progress" >> beam.ParDo(common.Progress(NAMESPACE, "records scored"))
                  | "Score" >> RunInference(handler))
        shown = beam.pvalue.AsList(scored | "Items" >> beam.Map(lambda r: r["item"])
                                   | "DayItems" >> beam.Distinct())
        if catalog.endswith(".npz"):
            items = (p | "ImpressionsFile" >> beam.Create([catalog])
                     | "Impressions" >> beam.ParDo(_NpzImpressions(), shown))
        else:
            items = (p | "ReadCatalog" >> common.ReadNamedRecords(catalog)
                     | "CatalogBatches" >> beam.BatchElements(min_batch_size=1024,
                                                              max_batch_size=1024)
                     | "Impressions" >> beam.ParDo(_Impressions(skip_bad_records), shown))
        rows = ({"rows": scored | "ByItem" >> beam.Map(lambda r: (r["item"], r)),
                 "catalog": items}
                | "JoinCatalog" >> beam.CoGroupByKey()
                | "WithImpressions" >> beam.FlatMap(_with_impressions, spec.item, catalog))
        cutoffs = beam.pvalue.AsSingleton(
            rows | "Levels" >> beam.Map(lambda r: (r["impressions_30d"], 1))
            | "PerLevel" >> beam.CombinePerKey(sum)
            | "AllLevels" >> beam.combiners.ToList()
            | "Cutoffs" >> beam.Map(_cutoffs, cfg.fraction, cfg.records_pattern))
        taken = beam.pvalue.AsDict(
            rows | "AtCutoff" >> beam.FlatMap(_at_cutoff, cutoffs)
            | "PerItem" >> beam.CombinePerKey(sum)
            | "BySide" >> beam.Map(lambda kv: (kv[0][0], (kv[0][1], kv[1])))
            | "SideItems" >> beam.GroupByKey()
            | "Taken" >> beam.Map(_taken, cutoffs))
        marked = rows | "Slices" >> beam.ParDo(_Slices(cfg.low_impressions), cutoffs, taken)
        histograms = (marked | "Batches" >> beam.BatchElements(min_batch_size=1024,
                                                                max_batch_size=1024)
                      | "HistogramParts" >> beam.Map(_histogram_part, bits)
                      | "Histograms" >> beam.CombineGlobally(_SumHistograms(bits)))
        pages = (marked | "ByPage" >> beam.Map(lambda r: (r["group"], (r["label"], r["score"])))
                 | "Pages" >> beam.GroupByKey() | "PageAUC" >> beam.Map(_page))
        page_sums = pages | "GAUC" >> beam.CombineGlobally(_SumPages())
        _ = (marked | "PredictionRows" >> beam.Map(
                lambda r: {k: r[k] for k in PREDICTION_SCHEMA.names})
             | "WritePredictions" >> beam.io.WriteToParquet(
                 os.path.join(cfg.out_dir, PREDICTIONS_DIR, "predictions"), PREDICTION_SCHEMA,
                 file_name_suffix=".parquet", num_shards=cfg.num_shards,
                 shard_name_template="-SSSSS-of-NNNNN"))
        _ = pages | "WritePages" >> beam.io.WriteToParquet(
            os.path.join(cfg.out_dir, PAGES_DIR, "pages"), PAGE_SCHEMA,
            file_name_suffix=".parquet", num_shards=cfg.num_shards,
            shard_name_template="-SSSSS-of-NNNNN")
        _ = (p | "One" >> beam.Create([None])
             | "WriteStatistics" >> beam.Map(
                 _write_statistics, stats_path, beam.pvalue.AsSingleton(histograms),
                 beam.pvalue.AsSingleton(page_sums), cutoffs, bits))

    t0 = time.time()
    counters = common.run(NAMESPACE, build, beam_args)
    metrics = metrics_from(npz.read(stats_path))
    metrics.update(seconds=round(time.time() - t0, 1), model=judged,
                   records=cfg.records_pattern, counters=counters)
    write_metrics(cfg.out_dir, metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    defaults = configs.EvaluateConfig()
    p = common.command_line(__doc__)
    p.add_argument("--records", required=True, help="The day's `ctr` TFRecords (glob, "
                   "comma-separated globs).")
    p.add_argument("--catalog", required=True, help="The catalog TFRecords (the items' "
                   "impressions_30d).")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--export_dir", help="The CTR export (base or version).")
    model.add_argument("--checkpoint_dir", help="Or a trained ctr/debias model dir.")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--batch_size", type=int, default=defaults.batch_size)
    p.add_argument("--num_shards", type=int, default=defaults.num_shards,
                   help=common.NUM_SHARDS_HELP)
    args, beam_args = p.parse_known_args(argv)
    cfg = configs.EvaluateConfig(records_pattern=args.records, catalog_pattern=args.catalog,
                                 model_export=args.export_dir or "",
                                 checkpoint_dir=args.checkpoint_dir or "", out_dir=args.out_dir,
                                 batch_size=args.batch_size, num_shards=args.num_shards)
    try:
        metrics = run(cfg, beam_args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                      for k, v in metrics.items() if k != "counters"}))


if __name__ == "__main__":
    main()

"""The daily cycle (`python -m trainer.task --stage=daily`; docs/daily.md): yesterday's CTR model
trained on with today's data, checked against the serving model, and exported as the next
version. The steps, in order, each skipped on a rerun when its output is there (so a cycle killed
at any point reruns to the same result; with `train.deterministic` the same weights):

1. today's data: every file pattern must match readable files, else the cycle stops naming it
   and the serving version stays; the day's volume, click rate and share of unknown ids are
   compared with yesterday's and what differs sharply is reported before training;
2. vocabularies: today's part counted by the Beam vocab job, grown into yesterday's
   (`trainer.ctr.daily.grow_vocabularies`, with eviction);
3. image features: today's new items embedded by the Beam embed job with the fixed encoder's
   export and appended to yesterday's image table; centroids, image normalisation and (with D)
   the positives of the old items carry over, the new items' positives are mined;
4. weights: today's model built on them and warm-started from yesterday's by id
   (`trainer.ctr.daily.warm_start`), saved as today's step-0 checkpoint;
5. training on today's records only, resumable (the training loop);
6. the gate: today's model (its checkpoint) and the serving version (its export) scored on
   today's held-out pages by the Beam evaluate job, judged by the streaming paired bootstrap
   over pages from the two jobs' sharded predictions;
7. the export of the next version (its `export_info.json` records the parent version, the data
   day and the gate's figures), unless the gate refuses it (`daily.force` exports anyway); with
   `daily.search_export_dir`, the visual search request (`export.search`) over today's grown
   catalog as that model's next version too.

This module sits above the training package because its last step is an export; the registry
names it as the `daily` stage's runner.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import tempfile

import numpy as np
import tensorflow as tf
import tf_keras

from export import common
from export import ctr as export_ctr
from export import search as export_search
from trainer import configs
from trainer.ctr import daily, debias
from trainer.ctr import spec as ctr_spec
from trainer.ctr import task as ctr_task
from trainer.ctr.model import CtrModel, image_statistics
from trainer.ctr.tables import Vocabularies
from trainer.data import jsonfile, npz, pipeline
from trainer.features import clusters as clusters_lib
from trainer.features import embeddings as embeddings_lib
from trainer.features import versions
from trainer.pipelines import evaluate as evaluate_pipeline
from trainer.stages import common as stage_common
from trainer.train import loop

RECORD = "daily.json"  # a cycle's record in today's model dir: what it did and decided
IMPRESSIONS = "impressions.npz"  # the items' impressions the held-out slices rank by
# The evaluate job's outputs in today's model dir: today's model's, the serving version's.
CANDIDATE_EVALUATION = evaluate_pipeline.EVALUATION
SERVING_EVALUATION = evaluate_pipeline.EVALUATION + "_serving"


@stage_common.releases_lock
def run_daily(cfg: configs.DailyStage) -> None:
    if cfg.train.strategy == "multi_worker_mirrored":
        raise stage_common.UsageError(
            "--stage=daily runs on one machine (one_device, mirrored) or with parameter servers "
            "(parameter_server, the CTR model's scale-out path), not multi_worker_mirrored")
    cfg, strategy = stage_common.training(cfg)  # first: the strategy; the chief takes the lock
    d = cfg.daily
    for key in ("previous", "export_dir", "encoder_export"):
        if not getattr(d, key):
            raise stage_common.UsageError(f"--stage=daily needs daily.{key} (--{key}=... or "
                                          f"--set daily.{key}=...)")
    patterns = {"train": stage_common.pattern(cfg, d.train_pattern, "ctr", "train"),
                "holdout": stage_common.pattern(cfg, d.holdout_pattern, "ctr", "holdout"),
                "catalog": stage_common.pattern(cfg, d.catalog_pattern, "catalog")}
    for what, file_pattern in patterns.items():  # before any work: the serving version stays
        try:
            pipeline.list_files(file_pattern)
        except FileNotFoundError:
            raise FileNotFoundError(f"today's {what} data is missing: no files match "
                                    f"'{file_pattern}'; nothing was trained or exported, the "
                                    "serving version stays") from None
    yesterday = configs.load(d.previous)
    if not isinstance(yesterday, configs.CtrStage):
        raise stage_common.UsageError(f"daily.previous: {d.previous} holds a "
                                      f"'{yesterday.stage}' run, not a CTR model")
    _check_encoder_export(d.encoder_export, d.previous)
    record = jsonfile.read(os.path.join(d.previous, RECORD)) or {}
    day = d.day or record.get("day", 0) + 1
    spec = ctr_spec.load(os.path.join(d.previous, ctr_spec.FILE))
    spec.check_files(pipeline.list_files(patterns["train"]))
    today_cfg = dataclasses.replace(
        yesterday, data_dir=cfg.data_dir, model_dir=cfg.model_dir, seed=cfg.seed,
        skip_bad_records=cfg.skip_bad_records, train=cfg.train, run=cfg.run,
        ctr=dataclasses.replace(yesterday.ctr, train_pattern=patterns["train"],
                                test_pattern=patterns["holdout"]))
    tf.io.gfile.makedirs(cfg.model_dir)
    previous_vocab = Vocabularies.load(os.path.join(d.previous, ctr_task.VOCABULARIES))
    stats = _day_statistics(patterns["train"], spec, previous_vocab, cfg.skip_bad_records)
    before = (daily.DayStatistics(**record["statistics"]) if "statistics" in record else
              _day_statistics(yesterday.ctr.train_pattern, spec, previous_vocab,
                              cfg.skip_bad_records))
    warnings = daily.sharp_changes(stats, before, d.volume_ratio, d.click_rate_ratio,
                                   d.unknown_share)
    print(f"daily: day {day} in {cfg.data_dir}: {stats.samples} samples, click rate "
          f"{stats.click_rate:.4f}, {stats.unknown_items:.1%} with items and "
          f"{stats.unknown_users:.1%} with users new to {d.previous}")
    for w in warnings:
        print(f"warning: daily: day {day} differs sharply from the day before: {w}")
    vocab_report = _grow_vocabularies(cfg, spec, previous_vocab, patterns["train"], day)
    table, new_items = _grow_tables(cfg, yesterday, spec, patterns["catalog"], patterns["train"])
    _grow_item_features(cfg, yesterday, patterns["catalog"])
    configs.save(cfg.model_dir, today_cfg)
    spec = ctr_task.spec_for(cfg.model_dir, spec)
    # What the model is built on besides the table, as today's dir now holds it.
    features = ModelFeatures(_positives(cfg.model_dir), _clusters(cfg.model_dir),
                             ctr_task.image_statistics_of(cfg.model_dir))
    _warm_start(cfg, today_cfg, spec, strategy, table, features)
    vocabularies = ctr_task.vocabularies_for(cfg.model_dir, today_cfg.ctr, spec)
    impressions = _impressions(table, vocabularies, spec)
    metrics = ctr_task.train_and_evaluate(
        today_cfg.ctr, spec, cfg.train, cfg.model_dir, table.item_id, impressions, table,
        features.positives, features.clusters, cfg.skip_bad_records, strategy, cfg.seed,
        features.image_statistics, evaluate_here=False)
    # The held-out pages scored by the Beam evaluate job, the slices ranked by the impressions
    # the model learned from.
    impressions_path = os.path.join(cfg.model_dir, IMPRESSIONS)
    npz.write(impressions_path, item_id=table.item_id, impressions_30d=impressions)
    candidate = _evaluate(cfg, patterns["holdout"], impressions_path, CANDIDATE_EVALUATION,
                          checkpoint_dir=cfg.model_dir)
    metrics.update(evaluate_pipeline.metrics_only(candidate))
    decision, version = _gate_and_export(cfg, day, patterns["holdout"], impressions_path)
    out = {"day": day, "previous": os.path.abspath(d.previous),
           "data_dir": os.path.abspath(cfg.data_dir),
           "statistics": dataclasses.asdict(stats), "warnings": warnings,
           "vocabularies": vocab_report, "new_items": new_items,
           "holdout": {k: v for k, v in metrics.items() if not isinstance(v, dict)},
           "gate": dataclasses.asdict(decision) if decision else None, "exported": version}
    with tf.io.gfile.GFile(os.path.join(cfg.model_dir, RECORD), "w") as f:
        json.dump(out, f, indent=2)
    print(f"daily: day {day}: {new_items} new items; vocabularies "
          + ", ".join(f"{t} {r['size']} (+{r['new']}, -{r['evicted']})"
                      for t, r in vocab_report.items()))
    if decision:
        print(f"daily: {decision}")
    print(f"daily: exported version {version} to {d.export_dir}" if version else
          f"daily: nothing exported; version {versions.versions(d.export_dir)[-1]} of "
          f"{d.export_dir} keeps serving")


def _check_encoder_export(export: str, previous: str) -> None:
    """Warns when the encoder export that embeds the new items does not record the model's
    image-feature encoder as its source (its vectors would not be comparable)."""
    info = common.export_info(versions.version_dir(export))
    ours, theirs = ctr_task.encoder_dir(previous), info.get("model_dir", "")
    if os.path.abspath(ours) != os.path.abspath(theirs):
        print(f"warning: daily: {export} was exported from {theirs}, and {previous}'s image "
              f"features come from {ours}: the new items' vectors must come from the same "
              "encoder (a copied dir is fine; another encoder needs a full retrain)")


def _day_statistics(pattern: str, spec: ctr_spec.CtrSpec, vocabularies: Vocabularies,
                    skip_bad_records: bool) -> daily.DayStatistics:
    """A day's volume, click rate and ids unknown to `vocabularies`, from one pass over the
    label, item and user columns."""
    user = next((f.name for f in spec.features if f.name == "user_id"), None)
    columns = (spec.label, spec.item, *([user] if user else []))
    cols = pipeline.read_columns(pattern, spec.record_kind(), columns, skip_bad_records)
    item_table = spec.feature(spec.item).table_name
    return daily.DayStatistics.of(cols[spec.label], cols[spec.item],
                                  cols[user] if user else np.zeros([0], np.int64),
                                  vocabularies, item_table,
                                  spec.feature(user).table_name if user else None)


def _grow_vocabularies(cfg: configs.DailyStage, spec: ctr_spec.CtrSpec,
                       previous: Vocabularies, train_pattern: str, day: int) -> dict:
    """Today's vocabularies (`vocabularies.npz`), unless a rerun finds them: today's ids counted
    by the Beam vocab job, grown into yesterday's."""
    path = os.path.join(cfg.model_dir, ctr_task.VOCABULARIES)
    report_path = os.path.join(cfg.model_dir, "vocabularies_grown.json")
    if tf.io.gfile.exists(path) and tf.io.gfile.exists(report_path):
        return jsonfile.read(report_path) or {}
    from trainer.pipelines import vocab as vocab_pipeline
    with tempfile.TemporaryDirectory() as tmp:
        today = vocab_pipeline.run(train_pattern, spec, os.path.join(tmp, "today.npz"), 1,
                                   cfg.daily.beam_options.split())
    grown, report = daily.grow_vocabularies(previous, today, day, cfg.daily.evict_after_days)
    grown.save(path)
    with tf.io.gfile.GFile(report_path, "w") as f:
        json.dump(report, f)
    return report


def _grow_tables(cfg: configs.DailyStage, yesterday: configs.CtrStage, spec: ctr_spec.CtrSpec,
                 catalog_pattern: str, train_pattern: str
                 ) -> tuple[embeddings_lib.EmbeddingTable, int]:
    """Today's image table (`embeddings.npz`: yesterday's and today's new items, embedded by
    the Beam embed job), with the centroids, the image normalisation and (with D) the positives
    carried over; unless a rerun finds it. Returns the table and how many items are new."""
    d, out = cfg.daily, cfg.model_dir
    path = os.path.join(out, embeddings_lib.FILE)
    previous = ctr_task.image_table_of(d.previous)
    if tf.io.gfile.exists(path):
        table = embeddings_lib.load(path)
        return table, len(table.item_id) - len(previous.item_id)
    mode = yesterday.ctr.image_feature_mode
    stats = ctr_task.image_statistics_of(d.previous) or image_statistics(previous, mode)
    npz.write(os.path.join(out, ctr_task.IMAGE_STATISTICS), **stats)
    for name in (ctr_task.CLUSTERS,):
        if tf.io.gfile.exists(os.path.join(d.previous, name)):
            tf.io.gfile.copy(os.path.join(d.previous, name), os.path.join(out, name), True)
    catalog = pipeline.unique_rows(pipeline.read_columns(
        catalog_pattern, "catalog", ("item_id", "category_id", "impressions_30d"),
        cfg.skip_bad_records), catalog_pattern, "item_id", cfg.skip_bad_records)
    new = ~np.isin(catalog["item_id"], previous.item_id)
    vectors = (_embed(d.encoder_export, catalog_pattern, previous.item_id,
                      catalog["item_id"][new], d.beam_options) if new.any()
               else np.zeros([0, previous.dim], np.float32))
    table, rows = daily.grow_table(previous, catalog["item_id"][new],
                                   catalog["category_id"][new], catalog["impressions_30d"][new],
                                   vectors, f"{catalog_pattern} by {d.encoder_export}")
    if yesterday.ctr.debias is not None:
        if not d.s1_export:
            raise stage_common.UsageError("a model with D needs daily.s1_export to mine the new "
                                          "items' positives")
        s1_previous = _s1_table(d.previous, yesterday)
        s1, _ = daily.grow_table(s1_previous, catalog["item_id"][new],
                                 catalog["category_id"][new], catalog["impressions_30d"][new],
                                 _embed(d.s1_export, catalog_pattern, s1_previous.item_id,
                                        catalog["item_id"][new], d.beam_options) if new.any()
                                 else np.zeros([0, s1_previous.dim], np.float32),
                                 f"{catalog_pattern} by {d.s1_export}")
        if not np.array_equal(s1.item_id, table.item_id):
            raise RuntimeError("the S1 and image-feature tables list the catalog differently")
        debias_cfg = yesterday.ctr.debias
        displayed = (debias.displayed_items(s1.item_id, train_pattern, spec.record_kind(),
                                            spec.item, cfg.skip_bad_records)
                     if debias_cfg.positives == "not_displayed" else None)
        positives = daily.mine_new_positives(
            _previous_positives(d.previous), s1, rows, debias_cfg,
            debias.candidates(debias_cfg, s1.impressions_30d, displayed))
        npz.write(os.path.join(out, ctr_task.POSITIVES), rows=positives[0],
                  weights=positives[1])
        embeddings_lib.save(s1, os.path.join(out, ctr_task.S1_TABLE))
    embeddings_lib.save(table, path)  # last: its presence says the step is done
    return table, len(rows)


def _grow_item_features(cfg: configs.DailyStage, yesterday: configs.CtrStage,
                        catalog_pattern: str) -> None:
    """Today's item feature table (`item_features.npz`: every item's catalog columns and bid, for
    the served search request): yesterday's with today's catalog rows (new items, and today's
    prices and bids); yesterday's is its own table, or (a model trained by the `ctr` stage) its
    data dir's catalog."""
    path = os.path.join(cfg.model_dir, export_search.ITEM_FEATURES)
    if tf.io.gfile.exists(path):
        return
    own = os.path.join(cfg.daily.previous, export_search.ITEM_FEATURES)
    old = (npz.read(own) if tf.io.gfile.exists(own) else export_search.read_item_features(
        stage_common.pattern(yesterday, "", "catalog"), cfg.skip_bad_records))
    npz.write(path, **export_search.merge_item_features(
        old, export_search.read_item_features(catalog_pattern, cfg.skip_bad_records)))


def _embed(export_dir: str, catalog_pattern: str, known: np.ndarray, item_id: np.ndarray,
           beam_options: str) -> np.ndarray:
    """[len(item_id), D] vectors of these catalog items by an encoder export: the Beam embed
    job over the catalog records, skipping the `known` items (`trainer.pipelines.embed`)."""
    from trainer.pipelines import embed as embed_pipeline
    with tempfile.TemporaryDirectory() as tmp:
        npz.write(os.path.join(tmp, "known.npz"), ids=np.asarray(known, np.int64))
        embed_pipeline.run(configs.CatalogEmbedConfig(
            catalog_pattern=catalog_pattern, encoder_export=export_dir,
            out_dir=os.path.join(tmp, "out"), known_ids=os.path.join(tmp, "known.npz")),
            "catalog", beam_options.split())
        data = npz.read(os.path.join(tmp, "out", embeddings_lib.FILE))
    order = {int(i): r for r, i in enumerate(data["item_id"])}
    missing = [int(i) for i in item_id if int(i) not in order]
    if missing:
        raise ValueError(f"{catalog_pattern}: the embed job gave no vector for items "
                         f"{missing[:5]} (bad records skipped?)")
    return data["embedding"][[order[int(i)] for i in item_id]]


def _s1_table(previous: str, config: configs.CtrStage) -> embeddings_lib.EmbeddingTable:
    """With D: the S1 table of yesterday's model (its copy), else its S1 encoder's."""
    own = os.path.join(previous, ctr_task.S1_TABLE)
    if tf.io.gfile.exists(own):
        return embeddings_lib.load(own)
    return embeddings_lib.load(os.path.join(config.images.s1_model_dir, embeddings_lib.FILE))


def _previous_positives(previous: str) -> tuple[np.ndarray, np.ndarray]:
    """Yesterday's D positives, which the `ctr` stage and the cycle keep in the model dir."""
    positives = _positives(previous)
    if positives is None:
        raise FileNotFoundError(f"{os.path.join(previous, ctr_task.POSITIVES)} is missing: the "
                                "cycle carries D's positives over from the previous model dir "
                                "(train it again with --stage=ctr)")
    return positives


def _positives(model_dir: str) -> tuple[np.ndarray, np.ndarray] | None:
    """D's positives kept in a model dir (rows, weights), or None (a model without D)."""
    path = os.path.join(model_dir, ctr_task.POSITIVES)
    if not tf.io.gfile.exists(path):
        return None
    data = npz.read(path)
    return data["rows"], data["weights"]


@dataclasses.dataclass(frozen=True)
class ModelFeatures:
    """What today's model is built on besides its vocabularies and image table, read once from
    today's dir: D's positives, the Cluster-ID centroids, the image normalisation."""

    positives: tuple[np.ndarray, np.ndarray] | None
    clusters: clusters_lib.Clusters | None
    image_statistics: dict | None


def _clusters(model_dir: str) -> clusters_lib.Clusters | None:
    path = os.path.join(model_dir, ctr_task.CLUSTERS)
    return clusters_lib.Clusters.load(path) if tf.io.gfile.exists(path) else None


def _warm_start(cfg: configs.DailyStage, today: configs.CtrStage, spec: ctr_spec.CtrSpec,
                strategy: tf.distribute.Strategy, table: embeddings_lib.EmbeddingTable,
                features: ModelFeatures) -> None:
    """Today's step-0 checkpoint: today's model (grown vocabularies and tables) with yesterday's
    weights, by id, and a fresh optimizer; skipped when today's model dir has a checkpoint (a
    rerun). New ids' rows are the seeded initialiser's, so a rerun makes the same ones."""
    if tf.train.latest_checkpoint(os.path.join(cfg.model_dir, "ckpt")):
        return
    old = ctr_task.load_trained(cfg.daily.previous)
    vocabularies = ctr_task.vocabularies_for(cfg.model_dir, today.ctr, spec)
    tf_keras.utils.set_random_seed(cfg.seed)
    with strategy.scope():
        new = CtrModel(today.ctr, spec, vocabularies, table, features.positives,
                       features.clusters, features.image_statistics).build_variables()
        carried = daily.warm_start(new, old)
        optimizer = loop.build_optimizer(cfg.train)
        global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    # What the training loop checkpoints, at step 0; the manager's state file names it, so the
    # loop starts from it.
    ckpt_dir = os.path.join(cfg.model_dir, "ckpt")
    ckpt = tf.train.Checkpoint(model=new, optimizer=optimizer, global_step=global_step)
    ckpt.save_counter  # noqa: B018  (created, so the restore finds every object it tracks)
    ckpt.write(os.path.join(ckpt_dir, "ckpt-0"))
    with tf.io.gfile.GFile(os.path.join(ckpt_dir, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "ckpt-0"\nall_model_checkpoint_paths: "ckpt-0"\n')
    print(f"daily: warm-started from {cfg.daily.previous}: rows carried over by id: "
          + ", ".join(f"{t} {n} of {len(vocabularies.ids[t]) + 1}" for t, n in carried.items()))


def _impressions(table: embeddings_lib.EmbeddingTable, vocabularies: Vocabularies,
                 spec: ctr_spec.CtrSpec) -> np.ndarray:
    """Each table item's impressions in the logs the model has learned from (the grown
    vocabulary's counts), which the impression slices of the evaluation rank by."""
    t = spec.feature(spec.item).table_name
    ids = np.asarray(vocabularies.ids.get(t, []))
    counts = np.asarray(vocabularies.counts.get(t, np.zeros(len(ids))))
    pos = np.clip(np.searchsorted(ids, table.item_id), 0, max(len(ids) - 1, 0))
    known = len(ids) > 0 and (ids[pos] == table.item_id)
    return np.where(known, counts[pos] if len(ids) else 0, 0).astype(np.int64)


def _evaluate(cfg: configs.DailyStage, holdout: str, impressions: str, out: str,
              checkpoint_dir: str = "", model_export: str = "") -> dict:
    """The evaluate job on the held-out pages (on `daily.beam_options`' runner), into
    `model_dir/out`."""
    ev = configs.EvaluateConfig(records_pattern=holdout, catalog_pattern=impressions,
                                checkpoint_dir=checkpoint_dir, model_export=model_export,
                                out_dir=os.path.join(cfg.model_dir, out))
    return evaluate_pipeline.run(ev, shlex.split(cfg.daily.beam_options), cfg.skip_bad_records)


def _gate_and_export(cfg: configs.DailyStage, day: int, holdout: str, impressions: str
                     ) -> tuple[daily.GateDecision | None, int | None]:
    """The gate against the serving version (none on the first export) and, if it passes or is
    forced, the export of the next version; a rerun after the export finds it."""
    d = cfg.daily
    served = versions.versions(d.export_dir) if tf.io.gfile.isdir(d.export_dir) else []
    for v in reversed(served):  # a rerun after the export: the version is there already
        if common.export_info(os.path.join(d.export_dir, str(v))).get(
                "model_dir") == os.path.abspath(cfg.model_dir):
            gate_path = os.path.join(cfg.model_dir, "gate.json")
            saved = jsonfile.read(gate_path)
            return (daily.GateDecision(**saved) if saved else None), v
    decision = None
    if served:
        # The serving model as it serves (its export), on the same pages and impressions.
        _evaluate(cfg, holdout, impressions, SERVING_EVALUATION,
                  model_export=os.path.join(d.export_dir, str(served[-1])))
        decision = daily.gate(os.path.join(cfg.model_dir, CANDIDATE_EVALUATION),
                              os.path.join(cfg.model_dir, SERVING_EVALUATION), d.margin,
                              d.metric, d.force, cfg.seed)
        with tf.io.gfile.GFile(os.path.join(cfg.model_dir, "gate.json"), "w") as f:
            json.dump(dataclasses.asdict(decision), f, indent=2)
        if not (decision.passed or decision.forced):
            return decision, None
    lineage = {"parent_version": served[-1] if served else None, "data_day": day,
               "data_dir": os.path.abspath(cfg.data_dir),
               "gate": dataclasses.asdict(decision) if decision else None}
    searched = (versions.versions(d.search_export_dir)
                if d.search_export_dir and tf.io.gfile.isdir(d.search_export_dir) else [])
    done = searched and common.export_info(os.path.join(
        d.search_export_dir, str(searched[-1]))).get("model_dir") == os.path.abspath(cfg.model_dir)
    if d.search_export_dir and not done:  # first: the CTR version marks the day exported
        search = export_search.export(
            cfg.model_dir, d.search_export_dir, skip_bad_records=cfg.skip_bad_records,
            extra_info=lineage, item_features=npz.read(os.path.join(
                cfg.model_dir, export_search.ITEM_FEATURES)))
        print(f"daily: exported the visual search request over "
              f"{common.export_info(search)['items']} items to {search}")
    path = export_ctr.export(cfg.model_dir, d.export_dir, extra_info=lineage)
    return decision, int(os.path.basename(path))

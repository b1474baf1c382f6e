"""Command-line entry point: `python -m trainer.task --stage=NAME [flags]`.

Stages:
  synth     generate a synthetic marketplace into --data_dir (--world, --seed)
  inspect   pipeline smoke run over every record kind in --data_dir; prints batch shapes, the
            world's statistics and throughput, and writes preview.png (catalog and S1 views)
  validate  scan the records of --data_dir (or --file_pattern of --kind) and report bad records
  pretrain  S1: self-supervised contrastive pretraining of the encoder on catalog images (paper 000
            Eq. 1) into --model_dir
  finetune  S2: click-supervised contrastive fine-tuning with category negative pools (Eq. 2);
            --init_checkpoint=S1_MODEL_DIR for S1+S2, none for S2 alone
  classify  ResNet-C: the encoder trained as a category classifier (the Table 1 baseline)
  eval_search  visual search with the encoder of --model_dir: HR, LR@K, CR@K (paper 000 §4.1) to
            metrics.json, the embedding table (embeddings.npz), and a TensorBoard projector
  ctr       the CTR predictor (paper 000 §3.2, paper 002 App. A) with --image_features from an
            encoder (none, resnet_c, s1, s2, s1s2), trained on the train days and evaluated on the
            test day: AUC, GAUC, bottom/top-10% impression AUC to --model_dir/metrics.json
  debias    the same with the debiasing network D and its gate (Eq. 3-4): S1+S2+D
  courier   COURIER: contrastive user-intention reconstruction pretraining of the encoder on page
            views and click histories (paper 002 Eq. 1-7; --courier_ablation for Table 6)
  cluster   faiss k-means over an encoder's catalog embeddings: --model_dir/clusters.npz and each
            item's cluster id (paper 002 App. B); ctr --image_feature_mode=cluster_id fits its own
            unless its model dir already holds clusters.npz
  embed     catalog batch encoding with an exported encoder (--export_dir, from export.encoder):
            embeddings, a faiss index and cluster ids against --centroids into --model_dir
            (default DATA_DIR/catalog_embeddings); sharded by file across --num_workers processes
            (or TF_CONFIG's workers), resumable by chunk

Exports for TF Serving: python -m export.encoder / python -m export.ctr.

Only this module parses flags; the stages call library code with typed configs.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Optional

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from absl import app, flags

FLAGS = flags.FLAGS
STAGES = ("synth", "inspect", "validate", "pretrain", "finetune", "classify", "eval_search",
          "ctr", "debias", "courier", "cluster", "embed")
TRAINING_STAGES = ("pretrain", "finetune", "classify", "ctr", "debias", "courier")
IMAGE_FEATURES = ("none", "resnet_c", "s1", "s2", "s1s2", "courier")
COURIER_ABLATIONS = ("no_ucs", "no_contrast", "self_attention", "no_neg_pv", "projection_head")
flags.DEFINE_enum("stage", None, STAGES, "What to run.")
flags.DEFINE_string("data_dir", None, "Directory of the data set (the synthetic world or yours).")
flags.DEFINE_string("model_dir", None, "Directory for outputs of a stage (default: data_dir).")
flags.DEFINE_string("world", "small", "Synthetic world: tiny, small or medium.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("workers", os.cpu_count() or 1, "Processes rendering images (synth).")
flags.DEFINE_bool("overwrite", False, "Replace an existing world in data_dir (synth).")
flags.DEFINE_bool("inline_images", False,
                  "Write page-view images inline (paper 002's production layout) instead of "
                  "joining them from the catalog by item id (synth).")
flags.DEFINE_bool("skip_bad_records", False,
                  "Skip bad input records (counted and logged) instead of stopping at the first.")
flags.DEFINE_integer("image_size", None, "Image side for decoding (default: the world's).")
flags.DEFINE_string("kind", None, "Record kind (validate): one of the schema's kinds.")
flags.DEFINE_string("file_pattern", None, "Files to validate (with --kind).")
flags.DEFINE_integer("batch_size", None, "Global batch size over all replicas (default: the "
                     "stage's; inspect 64).")
flags.DEFINE_integer("per_replica_batch_size", None, "Batch size per replica (GPU); the global "
                     "batch is this times the strategy's replicas. Exclusive with --batch_size.")
# Training stages; unset flags keep the stage's defaults (STAGE_DEFAULTS).
flags.DEFINE_enum("strategy", "one_device", ["one_device", "mirrored", "multi_worker_mirrored"],
                  "Distribution strategy.")
flags.DEFINE_integer("logical_cpus", None, "Split the CPU into this many logical devices, so "
                     "--strategy=mirrored runs that many replicas without GPUs (tests, trials).")
flags.DEFINE_integer("train_steps", None, "Optimizer steps.")
flags.DEFINE_string("optimizer", None, "adam, adamw, sgd, lars or adagrad.")
flags.DEFINE_float("learning_rate", None, "Peak learning rate (linear warmup, cosine decay).")
flags.DEFINE_integer("warmup_steps", None, "Warmup steps.")
flags.DEFINE_integer("checkpoint_interval", None, "Steps between checkpoints.")
flags.DEFINE_integer("log_interval", None, "Steps between progress lines / TensorBoard scalars.")
flags.DEFINE_bool("deterministic", False, "Deterministic input order and ops (slower): the same "
                  "global batches on any number of workers; a resumed run ends as an "
                  "uninterrupted one.")
flags.DEFINE_list("profile_steps", None, "START,END: trace global steps START+1..END with the "
                  "TensorBoard profiler into MODEL_DIR/train.")
flags.DEFINE_integer("depth", None, "ResNet depth (10, 18, 34, 50, ...).")
flags.DEFINE_float("width_multiplier", None, "ResNet channel multiplier (0.5 for CPU demos).")
flags.DEFINE_integer("feature_dim", None, "D, the visual feature size (paper: 512).")
flags.DEFINE_enum("mixed_precision", "none", ["none", "float16", "bfloat16"],
                  "Compute dtype of the backbone.")
flags.DEFINE_bool("gradient_checkpointing", False, "Recompute the backbone's activations in the "
                  "backward pass, block group by block group, instead of keeping them (paper "
                  "002 App. E: memory for batch size).")
flags.DEFINE_string("init_checkpoint", None,
                    "Backbone warm start: a model dir or checkpoint (e.g. S1's for S1+S2).")
flags.DEFINE_float("temperature", None,
                   "Contrastive temperature tau (pretrain, finetune, courier, debias's L_D).")
flags.DEFINE_list("courier_ablation", [], "courier: Table 6 / App. D variants, any of "
                  f"{', '.join(COURIER_ABLATIONS)}.")
flags.DEFINE_integer("courier_heads", None, "courier: attention heads of the reconstruction "
                     "(paper: 1).")
flags.DEFINE_integer("pool_size", None, "Category negative pool per global batch (finetune).")
# CTR stages.
flags.DEFINE_enum("image_features", "none", IMAGE_FEATURES,
                  "ctr/debias: whose catalog embeddings are the image features: the encoder in "
                  "--encoders_dir/<name> (or --image_model_dir); none for no image features.")
flags.DEFINE_string("encoders_dir", None,
                    "Directory holding the encoder model dirs resnet_c/, s1/, s2/, s1s2/ (as "
                    "make repro-visual writes them), courier/.")
flags.DEFINE_enum("image_feature_mode", "vector", ["vector", "simscore", "cluster_id"],
                  "ctr: how image features enter the model (paper 002 App. B).")
flags.DEFINE_integer("num_clusters", None, "cluster, ctr with cluster_id: k of k-means "
                     "(default: one cluster per 500 catalog items, as paper 002 §5's 600).")
flags.DEFINE_string("image_model_dir", None, "The encoder of the image features (overrides "
                    "--encoders_dir/<image_features>).")
flags.DEFINE_string("s1_model_dir", None, "debias: the S1 encoder that mines D's positives "
                    "(default --encoders_dir/s1).")
flags.DEFINE_integer("embedding_dim", None, "ctr/debias: id embedding size (default 16).")
flags.DEFINE_enum("history_pooling", None, ["mean", "target"],
                  "ctr/debias: pool the attended click history by its mean (paper 002 App. A) or "
                  "by the displayed item's attention over it (DIN).")
flags.DEFINE_integer("cross_layers", None, "ctr/debias: DCN cross layers before the tower.")
flags.DEFINE_list("hash_bins", [], "ctr/debias: FEATURE:BINS pairs hashed instead of looked up "
                  "in a vocabulary, e.g. user_id:1000000.")
flags.DEFINE_integer("num_similar", None, "debias: K, similar low-impression items per anchor.")
flags.DEFINE_float("debias_weight", None, "debias: weight of L_D in Eq. 4 (default 1).")
flags.DEFINE_bool("random_init", False,
                  "eval_search: evaluate an untrained encoder (architecture from the flags).")
flags.DEFINE_string("export_dir", None, "embed: the encoder export (base path: latest version; "
                    "or a version dir) from python -m export.encoder.")
flags.DEFINE_string("centroids", None, "embed: clusters.npz to assign cluster ids with (from "
                    "--stage=cluster or a cluster_id CTR model dir).")
flags.DEFINE_enum("index_type", "flat", ["flat", "ivf"], "embed: faiss index of the catalog.")
flags.DEFINE_integer("num_workers", None, "embed: processes sharing the catalog (default: from "
                     "TF_CONFIG, else 1).")
flags.DEFINE_integer("worker_index", None, "embed: this process's index (default: from "
                     "TF_CONFIG, else 0).")
flags.mark_flag_as_required("stage")


def _require(name: str) -> str:
    value = getattr(FLAGS, name)
    if not value:
        raise app.UsageError(f"--{name} is required for --stage={FLAGS.stage}")
    return value


def run_synth() -> None:
    from trainer.synth import config, marketplace
    data_dir = _require("data_dir")
    world = config.get_world(FLAGS.world)
    t0 = time.time()
    manifest = marketplace.generate(world, data_dir, FLAGS.seed, workers=FLAGS.workers,
                                    inline_images=FLAGS.inline_images, overwrite=FLAGS.overwrite)
    print(f"\nSynthetic world '{world.name}' (seed {FLAGS.seed}) written to {data_dir} "
          f"in {time.time() - t0:.1f}s")
    print(_files_table(manifest))
    print(_stats_table(manifest["stats"]))


def _files_table(manifest: dict) -> str:
    rows = ["| record kind | split | files | records |", "| --- | --- | ---: | ---: |"]
    for kind, splits in manifest["files"].items():
        for split, entry in splits.items():
            rows.append(f"| {kind} | {split} | {len(entry['files'])} | {entry['records']} |")
    return "\n".join(rows)


def _stats_table(stats: dict) -> str:
    rows = ["| statistic (observable in the logs) | value |", "| --- | ---: |"]
    for k, v in stats.items():
        rows.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(rows)


def _image_size(data_dir: str) -> int:
    from trainer.synth import marketplace
    return FLAGS.image_size or marketplace.image_size(data_dir)


def _present_kinds(data_dir: str) -> list[tuple[str, str]]:
    """(kind, file pattern) of every record kind with files in the standard layout."""
    import tensorflow as tf
    from trainer.data import records, schema
    out = []
    for kind in schema.KINDS:
        pattern = records.default_pattern(data_dir, kind)
        if tf.io.gfile.glob(pattern):
            out.append((kind, pattern))
    if not out:
        raise FileNotFoundError(f"no records in the standard layout under {data_dir} "
                                f"(<data_dir>/<kind>/<split>-*.tfrecord)")
    return out


def run_inspect() -> None:
    from trainer.data import augment, pipeline, records
    from trainer.synth import marketplace
    data_dir = _require("data_dir")
    out_dir = FLAGS.model_dir or data_dir
    size = _image_size(data_dir)
    catalog = records.default_pattern(data_dir, "catalog")
    kinds = _present_kinds(data_dir)
    has_catalog = any(k == "catalog" for k, _ in kinds)
    image_store = pipeline.load_image_store(catalog) if has_catalog else None
    manifest = marketplace.load_manifest(data_dir)
    if manifest:
        print(_stats_table(manifest["stats"]))
    batch_size = FLAGS.batch_size or 64
    print(f"\nInput pipeline smoke run over {data_dir} (batch {batch_size}, images "
          f"{size}x{size}):")
    print("| record kind | files | batch tensors | batches/s |\n| --- | ---: | --- | ---: |")
    for kind, pattern in kinds:
        transform = augment.s1_views_transform() if kind == "catalog" else None
        cfg = pipeline.InputConfig(pattern, kind, global_batch_size=batch_size,
                                   image_size=size, skip_bad_records=FLAGS.skip_bad_records)
        pipe = pipeline.InputPipeline(cfg, image_store=image_store, transform=transform)
        with pipe.errors_named():
            it = iter(pipe.dataset())
            batch = next(it)
            t0 = time.time()
            for _ in range(5):
                next(it)
            rate = 5 / (time.time() - t0)
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in batch.items() if not k.endswith("_mask"))
        print(f"| {kind} | {len(pipe.files)} | {shapes} | {rate:.1f} |")
        if pipe.skipped:
            print(f"(skipped {pipe.skipped} bad {kind} records)")
        if kind == "catalog":
            _write_preview(batch, os.path.join(out_dir, "preview.png"))
    print(f"\nWrote {os.path.join(out_dir, 'preview.png')}: rows are catalog images' two S1 views "
          "(paper 000 §3.1 augmentations).")


def _write_preview(batch: dict, path: str) -> None:
    import numpy as np
    from PIL import Image
    n = min(16, batch["view_1"].shape[0])
    rows = [np.concatenate(list(batch[k][:n].numpy()), axis=1) for k in ("view_1", "view_2")]
    grid = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(grid).save(path)


def run_validate() -> None:
    from trainer.data import parse, pipeline, schema, validate
    if FLAGS.file_pattern:
        targets = [(_require("kind"), FLAGS.file_pattern)]
        size = FLAGS.image_size or 64
        data_dir = None
    else:
        data_dir = _require("data_dir")
        targets = _present_kinds(data_dir)
        size = _image_size(data_dir)
    store, catalog_broken = None, False
    if data_dir and any(k == "catalog" for k, _ in targets):
        from trainer.data import records
        try:
            store = pipeline.load_image_store(records.default_pattern(data_dir, "catalog"))
        except validate.BadRecordError as e:
            catalog_broken = True
            print(f"catalog images cannot be joined ({e}); records that join them are checked "
                  "without images")
    total_bad = 0
    for kind, pattern in targets:
        files = pipeline.list_files(pattern)
        record_kind = schema.get(kind)
        # A broken catalog should not make every compact record look bad; no catalog at all
        # does make them unreadable, which is reported.
        decode = not (catalog_broken and record_kind.joinable_images)
        parser = parse.RecordParser(record_kind, size, store, decode=decode)
        t0 = time.time()
        report = validate.scan(files, parser)
        for bad in report.bad:
            print(f"BAD {bad}")
        print(f"{kind}: {report.records} records in {len(files)} files, {report.skipped} bad "
              f"({time.time() - t0:.1f}s)")
        total_bad += report.skipped
    if total_bad:
        sys.exit(1)


# Per-stage defaults: sized for the `small` world on a 2-core CPU (make repro-visual); the paper's
# scale is --depth=50 --width_multiplier=1 --feature_dim=512 --image_size=224 on GPUs.
STAGE_DEFAULTS = {
    "pretrain": dict(steps=600, global_batch_size=128, optimizer="adam", learning_rate=2e-3,
                     warmup_steps=50),
    "finetune": dict(steps=800, global_batch_size=64, optimizer="adam", learning_rate=5e-4,
                     warmup_steps=20),
    "classify": dict(steps=300, global_batch_size=128, optimizer="adam", learning_rate=2e-3,
                     warmup_steps=20),
    # Two epochs of `small`. Paper 000 §4 uses Adagrad at 0.05 on a billion samples; at this
    # scale that leaves the model far from converged (README, Table 2), so Adam is the default.
    "ctr": dict(steps=940, global_batch_size=512, optimizer="adam", learning_rate=1e-3,
                lr_schedule="constant", warmup_steps=0),
}
STAGE_DEFAULTS["debias"] = STAGE_DEFAULTS["ctr"]
# Pages of 5 PV + 5 click images: 64 pages are 640 images a step; 200 steps are an epoch of
# `small` (12,360 pages). Paper 002 App. E: Adam at 1e-4 from ImageNet weights; here from S1
# (--init_checkpoint), which plays ImageNet's part.
STAGE_DEFAULTS["courier"] = dict(steps=200, global_batch_size=64, optimizer="adam",
                                 learning_rate=5e-4, warmup_steps=20)
ENCODER_DEFAULTS = dict(depth=10, width_multiplier=0.5, feature_dim=512)


def _encoder_config(data_dir: str):
    from trainer.models import encoder
    given = {k: getattr(FLAGS, k) for k in ENCODER_DEFAULTS if getattr(FLAGS, k) is not None}
    return encoder.EncoderConfig(**{**ENCODER_DEFAULTS, **given},
                                 image_size=_image_size(data_dir),
                                 mixed_precision=FLAGS.mixed_precision,
                                 sync_batch_norm=FLAGS.strategy != "one_device",
                                 gradient_checkpointing=FLAGS.gradient_checkpointing,
                                 init_checkpoint=FLAGS.init_checkpoint)


def _train_config():
    from trainer.train import loop
    d = dict(STAGE_DEFAULTS[FLAGS.stage])
    for flag, key in (("train_steps", "steps"), ("batch_size", "global_batch_size"),
                      ("optimizer", "optimizer"), ("learning_rate", "learning_rate"),
                      ("warmup_steps", "warmup_steps"),
                      ("checkpoint_interval", "checkpoint_interval"),
                      ("log_interval", "log_interval")):
        if getattr(FLAGS, flag) is not None:
            d[key] = getattr(FLAGS, flag)
    strategy = loop.make_strategy(FLAGS.strategy)
    if FLAGS.per_replica_batch_size:
        if FLAGS.batch_size:
            raise app.UsageError("pass --batch_size (global) or --per_replica_batch_size, not both")
        d["global_batch_size"] = FLAGS.per_replica_batch_size * strategy.num_replicas_in_sync
    profile = None
    if FLAGS.profile_steps:
        if len(FLAGS.profile_steps) != 2 or not all(x.isdigit() for x in FLAGS.profile_steps):
            raise app.UsageError(f"--profile_steps must be START,END, got {FLAGS.profile_steps}")
        profile = tuple(int(x) for x in FLAGS.profile_steps)
    return loop.TrainConfig(**d, strategy=FLAGS.strategy, seed=FLAGS.seed,
                            deterministic=FLAGS.deterministic, profile_steps=profile), strategy


def run_training() -> None:
    """pretrain (S1), finetune (S2), classify (ResNet-C) or courier into --model_dir."""
    import dataclasses
    from trainer.data import records
    from trainer.models import classify, courier, encoder, finetune, pretrain
    from trainer.train import loop
    data_dir, model_dir = _require("data_dir"), _require("model_dir")
    # First: a multi-worker strategy must exist before other TensorFlow ops run.
    train_cfg, strategy = _train_config()
    enc_cfg = _encoder_config(data_dir)
    encoder.set_precision_policy(enc_cfg.mixed_precision)
    catalog = records.default_pattern(data_dir, "catalog")
    overrides = {k: getattr(FLAGS, k) for k in ("temperature", "pool_size")
                 if getattr(FLAGS, k) is not None and FLAGS.stage != "courier"}
    if FLAGS.stage == "pretrain":
        cfg = pretrain.PretrainConfig(catalog_pattern=catalog, **overrides)
        task = pretrain.PretrainTask(cfg, enc_cfg, train_cfg, FLAGS.skip_bad_records)
    elif FLAGS.stage == "courier":
        unknown = set(FLAGS.courier_ablation) - set(COURIER_ABLATIONS)
        if unknown:
            raise app.UsageError(f"--courier_ablation: unknown {sorted(unknown)}; known: "
                                 f"{COURIER_ABLATIONS}")
        cfg = courier.CourierConfig(
            pageviews_pattern=records.default_pattern(data_dir, "pageviews", "train"),
            catalog_pattern=catalog, **{k: True for k in FLAGS.courier_ablation},
            **{k: v for k, v in (("temperature", FLAGS.temperature),
                                 ("heads", FLAGS.courier_heads)) if v is not None})
        task = courier.CourierTask(cfg, enc_cfg, train_cfg, FLAGS.skip_bad_records)
    elif FLAGS.stage == "finetune":
        cfg = finetune.FinetuneConfig(
            sessions_pattern=records.default_pattern(data_dir, "search_sessions", "train"),
            catalog_pattern=catalog, **overrides)
        task = finetune.FinetuneTask(cfg, enc_cfg, train_cfg, FLAGS.skip_bad_records)
    else:
        cfg = classify.ClassifyConfig(catalog_pattern=catalog)
        task = classify.ClassifyTask(cfg, enc_cfg, train_cfg, FLAGS.skip_bad_records)
    config = {"stage": FLAGS.stage, "data_dir": data_dir, "encoder": dataclasses.asdict(enc_cfg),
              FLAGS.stage: dataclasses.asdict(cfg)}
    if FLAGS.stage == "classify":
        config["categories"] = task.categories.tolist()
    t0 = time.time()
    last = loop.run(task, train_cfg, model_dir, config, strategy)
    print(f"{FLAGS.stage}: trained to step {train_cfg.steps} in {model_dir} "
          f"({time.time() - t0:.0f}s); last: " + ", ".join(f"{k}={v:.4g}" for k, v in last.items()))


def run_eval_search() -> None:
    """Visual-search metrics of the encoder in --model_dir (or a random one, --random_init)."""
    import json
    import numpy as np
    import tensorflow as tf
    from trainer.data import pipeline, records
    from trainer.eval import projector, visual_search
    from trainer.features import embeddings
    from trainer.models import encoder
    data_dir, model_dir = _require("data_dir"), _require("model_dir")
    catalog = records.default_pattern(data_dir, "catalog")
    if FLAGS.random_init:
        tf.keras.utils.set_random_seed(FLAGS.seed)
        enc = encoder.Encoder(_encoder_config(data_dir))
        table = embeddings.compute(enc, catalog, None)
    else:  # cached beside the checkpoint for the CTR stages
        table = embeddings.for_encoder(model_dir, catalog,
                                       records.default_pattern(data_dir, "queries"))
    cfg = visual_search.SearchEvalConfig(
        catalog_pattern=catalog, judgments_pattern=records.default_pattern(data_dir, "judgments"))
    embedded = table.catalog()
    metrics = visual_search.evaluate(embedded, cfg)
    visual_search.write_metrics(model_dir, metrics)
    with tf.summary.create_file_writer(os.path.join(model_dir, "eval")).as_default():
        for k, v in metrics.items():
            tf.summary.scalar(f"visual_search/{k}", v, step=0)
    images = pipeline.read_columns(catalog, "catalog", ("item_id", "image"))
    if not np.array_equal(images["item_id"], embedded["item_id"]):
        raise RuntimeError("catalog order changed between two reads")
    log_dir = projector.write(os.path.join(model_dir, "projector"), embedded, images["image"],
                              projector.style_labels(data_dir, embedded["item_id"]),
                              seed=FLAGS.seed)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    print(f"wrote {os.path.join(model_dir, 'metrics.json')} and a projector in {log_dir} "
          f"(tensorboard --logdir {log_dir})")


def _encoder_dir(name: str, override: Optional[str]) -> str:
    if override:
        return override
    if not FLAGS.encoders_dir:
        raise app.UsageError(f"--stage={FLAGS.stage} needs the {name} encoder: pass "
                             f"--encoders_dir (holding {name}/) or its model dir")
    return os.path.join(FLAGS.encoders_dir, name)


def run_ctr() -> None:
    """ctr / debias: train the CTR predictor on the train days, evaluate on the test day."""
    import dataclasses
    import json
    import numpy as np
    import tensorflow as tf
    from trainer.data import pipeline, records
    from trainer.features import clusters, embeddings
    from trainer.models import ctr, debias
    from trainer.train import loop
    data_dir, model_dir = _require("data_dir"), _require("model_dir")
    train_cfg, strategy = _train_config()  # first, as in run_training
    catalog = records.default_pattern(data_dir, "catalog")
    queries = records.default_pattern(data_dir, "queries")
    debias_cfg = None
    if FLAGS.stage == "debias":
        if FLAGS.image_features == "none":
            raise app.UsageError("--stage=debias needs --image_features (e.g. s1s2)")
        overrides = {k: v for k, v in (("num_similar", FLAGS.num_similar),
                                       ("loss_weight", FLAGS.debias_weight),
                                       ("temperature", FLAGS.temperature)) if v is not None}
        debias_cfg = debias.DebiasConfig(**overrides)
    hash_bins = {}
    for pair in FLAGS.hash_bins:
        name, _, bins = pair.partition(":")
        if name not in ctr.ID_FEATURES or not bins.isdigit():
            raise app.UsageError(f"--hash_bins: '{pair}' is not FEATURE:BINS with FEATURE one of "
                                 f"{ctr.ID_FEATURES}")
        hash_bins[name] = int(bins)
    cfg = ctr.CtrConfig(train_pattern=records.default_pattern(data_dir, "ctr", "train"),
                        test_pattern=records.default_pattern(data_dir, "ctr", "test"),
                        hash_bins=hash_bins, debias=debias_cfg,
                        image_feature_mode=FLAGS.image_feature_mode,
                        **{k: getattr(FLAGS, k) for k in ("embedding_dim", "history_pooling",
                                                          "cross_layers")
                           if getattr(FLAGS, k) is not None})
    images = positives = None
    encoder_dirs = {}
    if FLAGS.image_features != "none":
        encoder_dirs["image"] = _encoder_dir(FLAGS.image_features, FLAGS.image_model_dir)
        images = embeddings.for_encoder(encoder_dirs["image"], catalog, queries)
        item_id, impressions = images.item_id, images.impressions_30d
    else:
        cols = pipeline.read_columns(catalog, "catalog", ("item_id", "impressions_30d"))
        item_id, impressions = cols["item_id"], cols["impressions_30d"]
    if debias_cfg is not None:
        encoder_dirs["s1"] = _encoder_dir("s1", FLAGS.s1_model_dir)
        s1 = embeddings.for_encoder(encoder_dirs["s1"], catalog, queries)  # shares the cache
        if not np.array_equal(s1.item_id, images.item_id):
            raise RuntimeError("the S1 and image-feature tables list the catalog differently")
        positives = debias.mine_positives(s1.item_vector, s1.category_id, s1.impressions_30d,
                                          debias_cfg.num_similar, debias_cfg.low_impressions)
        print(f"debias: {int((positives[1] > 0).any(axis=1).sum())} of {len(s1.item_id)} catalog "
              f"items have positives (K={debias_cfg.num_similar} low-impression items of their "
              "category by S1 cosine)")
    centroids = None
    if images is not None and cfg.image_feature_mode == "cluster_id":
        centroids = clusters.load_or_fit(os.path.join(model_dir, "clusters.npz"),
                                         images.item_vector, _cluster_config())
    config = {"stage": FLAGS.stage, "data_dir": data_dir, "image_features": FLAGS.image_features,
              "encoder_dirs": encoder_dirs, "ctr": dataclasses.asdict(cfg)}
    metrics = ctr.train_and_evaluate(cfg, train_cfg, model_dir, item_id, impressions, images,
                                     positives, centroids, FLAGS.skip_bad_records, config,
                                     strategy)
    if not loop.is_chief(strategy):
        return
    metrics.update(image_features=FLAGS.image_features, debias=debias_cfg is not None,
                   image_feature_mode=cfg.image_feature_mode)
    with open(os.path.join(model_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with tf.summary.create_file_writer(os.path.join(model_dir, "eval")).as_default():
        for k, v in metrics.items():
            if isinstance(v, float):
                tf.summary.scalar(f"ctr/{k}", v, step=train_cfg.steps)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))


def _cluster_config():
    from trainer.features import clusters
    return clusters.ClusterConfig(seed=FLAGS.seed, **(
        {"num_clusters": FLAGS.num_clusters} if FLAGS.num_clusters else {}))


def run_cluster() -> None:
    """k-means over an encoder's catalog embeddings into --model_dir/clusters.npz, with each
    catalog item's cluster id (cluster_ids.npz)."""
    import numpy as np
    from trainer.data import records
    from trainer.features import clusters, embeddings
    data_dir = _require("data_dir")
    encoder_dir = _encoder_dir(FLAGS.image_features, FLAGS.image_model_dir)
    model_dir = FLAGS.model_dir or encoder_dir
    table = embeddings.for_encoder(encoder_dir, records.default_pattern(data_dir, "catalog"),
                                   records.default_pattern(data_dir, "queries"))
    t0 = time.time()
    path = os.path.join(model_dir, "clusters.npz")
    if os.path.exists(path):
        os.remove(path)  # this stage refits
    centroids = clusters.load_or_fit(path, table.item_vector, _cluster_config())
    ids = centroids.assign(table.item_vector)
    np.savez(os.path.join(model_dir, "cluster_ids.npz"), item_id=table.item_id, cluster_id=ids)
    sizes = np.bincount(ids, minlength=centroids.num_clusters)
    # Category purity: share of items whose cluster's majority category is their own.
    majority = {c: np.bincount(table.category_id[ids == c]).argmax() for c in np.unique(ids)}
    purity = float(np.mean([majority[c] == k for c, k in zip(ids, table.category_id)]))
    print(f"cluster: {centroids.num_clusters} clusters of {len(ids)} items from {encoder_dir} in "
          f"{time.time() - t0:.1f}s; sizes min {sizes.min()} median {int(np.median(sizes))} max "
          f"{sizes.max()}, {int((sizes == 0).sum())} empty; category purity {purity:.3f}")
    print(f"wrote {path} and {os.path.join(model_dir, 'cluster_ids.npz')}")


def _worker() -> tuple[int, int]:
    """(num_workers, worker_index) from the flags, else TF_CONFIG's worker list, else (1, 0)."""
    import tensorflow as tf
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    cluster = resolver.cluster_spec().as_dict()
    chiefs = len(cluster.get("chief", []))
    num = FLAGS.num_workers or (chiefs + len(cluster.get("worker", []))) or 1
    index = FLAGS.worker_index
    if index is None:  # the chief is worker 0, TF_CONFIG's workers follow it
        index = (resolver.task_id or 0) + (chiefs if resolver.task_type == "worker" else 0)
    return num, index


def run_embed() -> None:
    """Catalog batch encoding with the exported encoder: embeddings, faiss index, cluster ids."""
    from trainer.data import records
    from trainer.features import catalog_embed
    data_dir = _require("data_dir")
    num_workers, worker_index = _worker()
    cfg = catalog_embed.CatalogEmbedConfig(
        catalog_pattern=records.default_pattern(data_dir, "catalog"),
        encoder_export=_require("export_dir"),
        out_dir=FLAGS.model_dir or os.path.join(data_dir, "catalog_embeddings"),
        num_workers=num_workers, worker_index=worker_index, centroids=FLAGS.centroids,
        index=FLAGS.index_type, **({"batch_size": FLAGS.batch_size} if FLAGS.batch_size else {}))
    result = catalog_embed.run(cfg)
    print(json.dumps(result, indent=1))
    if worker_index == 0:
        print(f"embed: {result['items']} catalog items -> {cfg.out_dir}/embeddings.npz, "
              f"{cfg.out_dir}/catalog.faiss ({cfg.index})")


def main(argv) -> None:
    del argv
    # Orbit prints its own progress lines; its INFO logs would repeat them.
    logging.getLogger().setLevel(logging.WARNING if FLAGS.stage in TRAINING_STAGES
                                 else logging.INFO)
    runners = {"synth": run_synth, "inspect": run_inspect, "validate": run_validate,
               "eval_search": run_eval_search}
    runners.update({s: run_training for s in ("pretrain", "finetune", "classify")})
    runners.update(ctr=run_ctr, debias=run_ctr, courier=run_training, cluster=run_cluster,
                   embed=run_embed)
    if FLAGS.logical_cpus:
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * FLAGS.logical_cpus)
    runners[FLAGS.stage]()


if __name__ == "__main__":
    app.run(main)

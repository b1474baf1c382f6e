"""Command-line entry point: `python -m trainer.task --stage=NAME [flags]`.

Stages:
  synth     generate a synthetic marketplace into --data_dir (--world, --seed)
  inspect   pipeline smoke run over every record kind in --data_dir; prints batch shapes, the
            world's statistics and throughput, and writes preview.png (catalog and S1 views)
  validate  scan the records of --data_dir (or --file_pattern of --kind) and report bad records

Only this module parses flags; the stages call library code with typed configs.
"""
from __future__ import annotations

import logging
import os
import sys
import time

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from absl import app, flags

FLAGS = flags.FLAGS
STAGES = ("synth", "inspect", "validate")
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
flags.DEFINE_integer("batch_size", 64, "Batch size (inspect).")
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
    print(f"\nInput pipeline smoke run over {data_dir} (batch {FLAGS.batch_size}, images "
          f"{size}x{size}):")
    print("| record kind | files | batch tensors | batches/s |\n| --- | ---: | --- | ---: |")
    for kind, pattern in kinds:
        transform = augment.s1_views_transform() if kind == "catalog" else None
        cfg = pipeline.InputConfig(pattern, kind, global_batch_size=FLAGS.batch_size,
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


def main(argv) -> None:
    del argv
    logging.getLogger().setLevel(logging.INFO)
    {"synth": run_synth, "inspect": run_inspect, "validate": run_validate}[FLAGS.stage]()


if __name__ == "__main__":
    app.run(main)

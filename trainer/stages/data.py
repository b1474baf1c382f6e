"""The data stages: `synth` (a synthetic marketplace), `inspect` (an input-pipeline smoke run) and
`validate` (find and name bad records)."""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import tensorflow as tf

from trainer import configs
from trainer.ctr import spec as ctr_spec
from trainer.data import augment, parse, pipeline, records, schema, validate
from trainer.stages import common
from trainer.synth import config as worlds
from trainer.synth import marketplace


def run_synth(cfg: configs.SynthStage) -> None:
    common.require(cfg, "data_dir")
    world = worlds.get_world(cfg.world)
    if cfg.dose:
        world = worlds.dosed(world, cfg.dose, cfg.strength)
    spec = ctr_spec.load(cfg.ctr_spec)
    t0 = time.time()
    manifest = marketplace.generate(world, cfg.data_dir, cfg.seed,
                                    workers=cfg.workers or os.cpu_count() or 1,
                                    inline_images=cfg.inline_images, overwrite=cfg.overwrite,
                                    ctr_kind=spec.record_kind())
    print(f"\nSynthetic world '{world.name}' (seed {cfg.seed}) written to {cfg.data_dir} "
          f"in {time.time() - t0:.1f}s; `ctr` records hold the columns of the feature spec "
          f"'{spec.name}'")
    if world.movement.days:
        print(days_table(manifest["days"]))
    else:
        print(files_table(manifest["files"]))
    print(stats_table(manifest["stats"]))


def days_table(days: dict) -> str:
    """A moving world's days: each day dir's samples, click rate and newcomers."""
    rows = ["| day | catalog | new items | new users | ctr samples (train + holdout) | "
            "click rate |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, day in days.items():
        s = day["stats"]
        rows.append(f"| {name} | {s['catalog']} | {s['new_items']} | {s['new_users']} | "
                    f"{s['samples']} | {s['click_rate']:.4f} |")
    return "\n".join(rows)


def files_table(files: dict) -> str:
    rows = ["| record kind | split | files | records |", "| --- | --- | ---: | ---: |"]
    for kind, splits in files.items():
        for split, entry in splits.items():
            rows.append(f"| {kind} | {split} | {len(entry['files'])} | {entry['records']} |")
    return "\n".join(rows)


def stats_table(stats: dict) -> str:
    rows = ["| statistic (observable in the logs) | value |", "| --- | ---: |"]
    for k, v in stats.items():
        rows.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(rows)


def present_kinds(data_dir: str, spec_name: str) -> list[tuple[schema.RecordKind, str]]:
    """(kind, file pattern) of every record kind with files in the standard layout; `ctr` as the
    feature spec `spec_name` declares it."""
    out = []
    for name in schema.KIND_NAMES:
        file_pattern = records.default_pattern(data_dir, name)
        if common.has_files(file_pattern):
            out.append((ctr_spec.record_kind(name, spec_name), file_pattern))
    if not out:
        raise FileNotFoundError(f"no records in the standard layout under {data_dir} "
                                f"(<data_dir>/<kind>/<split>-*.tfrecord)")
    return out


def run_inspect(cfg: configs.InspectStage) -> None:
    common.require(cfg, "data_dir")
    data_dir = cfg.data_dir
    out_dir = cfg.model_dir or data_dir
    size = common.image_size(cfg.image_size, data_dir)
    kinds = present_kinds(data_dir, cfg.ctr_spec)
    has_catalog = any(k.name == "catalog" for k, _ in kinds)
    image_store = (pipeline.load_image_store(records.default_pattern(data_dir, "catalog"))
                   if has_catalog else None)
    manifest = marketplace.load_manifest(data_dir)
    if manifest:
        print(stats_table(manifest["stats"]))
    print(f"\nInput pipeline smoke run over {data_dir} (batch {cfg.batch_size}, images "
          f"{size}x{size}):")
    print("| record kind | files | batch tensors | batches/s |\n| --- | ---: | --- | ---: |")
    for kind, file_pattern in kinds:
        transform = augment.s1_views_transform() if kind.name == "catalog" else None
        input_cfg = pipeline.InputConfig(file_pattern, kind, global_batch_size=cfg.batch_size,
                                         image_size=size, skip_bad_records=cfg.skip_bad_records)
        pipe = pipeline.InputPipeline(input_cfg, image_store=image_store, transform=transform)
        with pipe.errors_named():
            it = iter(pipe.dataset())
            batch = next(it)
            t0 = time.time()
            for _ in range(5):
                next(it)
            rate = 5 / (time.time() - t0)
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in batch.items()
                           if not k.endswith("_mask"))
        print(f"| {kind.name} | {len(pipe.files)} | {shapes} | {rate:.1f} |")
        if pipe.skipped:
            print(f"(skipped {pipe.skipped} bad {kind.name} records)")
        if kind.name == "catalog":
            _write_preview(batch, os.path.join(out_dir, "preview.png"))
    print(f"\nWrote {os.path.join(out_dir, 'preview.png')}: rows are catalog images' two S1 views "
          "(paper 000 §3.1 augmentations).")


def _write_preview(batch: dict, path: str) -> None:
    from PIL import Image
    n = min(16, batch["view_1"].shape[0])
    rows = [np.concatenate(list(batch[k][:n].numpy()), axis=1) for k in ("view_1", "view_2")]
    grid = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).astype(np.uint8)
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    Image.fromarray(grid).save(path)


def run_validate(cfg: configs.ValidateStage) -> None:
    if cfg.file_pattern:
        if not cfg.kind:
            raise common.UsageError("--file_pattern needs --kind")
        kind = ctr_spec.record_kind(cfg.kind, cfg.ctr_spec)
        targets = [(kind, cfg.file_pattern)]
        size = cfg.image_size or 64
        data_dir = ""
    else:
        common.require(cfg, "data_dir")
        data_dir = cfg.data_dir
        targets = present_kinds(data_dir, cfg.ctr_spec)
        size = common.image_size(cfg.image_size, data_dir)
    store, catalog_broken, total_bad = None, False, 0
    if data_dir and any(k.name == "catalog" for k, _ in targets):
        try:
            store = pipeline.load_image_store(records.default_pattern(data_dir, "catalog"))
        except validate.DuplicateIdError as e:  # the catalog scan below does not see these
            print(f"BAD {e.bad}")
            total_bad += 1
            catalog_broken = True
        except validate.BadRecordError as e:
            catalog_broken = True
            print(f"catalog images cannot be joined ({e}); records that join them are checked "
                  "without images")
    for kind, file_pattern in targets:
        files = pipeline.list_files(file_pattern)
        # A broken catalog should not make every compact record look bad; no catalog at all
        # does make them unreadable, which is reported.
        decode = not (catalog_broken and kind.joinable_images)
        parser = parse.RecordParser(kind, size, store, decode=decode)
        t0 = time.time()
        report = validate.scan(files, parser)
        for bad in report.bad:
            print(f"BAD {bad}")
        print(f"{kind.name}: {report.summary(len(files))} ({time.time() - t0:.1f}s)")
        total_bad += report.skipped
    if total_bad:
        sys.exit(1)

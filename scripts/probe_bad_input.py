"""Bad input against every stage that reads records: each kind of bad record, planted in a copy of
the tiny world, then `validate` and a short run of every training stage, without and with
--skip_bad_records. Prints stage x bad kind -> the outcome of each run:

  error  the run stopped with an error naming the planted record (file and record index);
  skip   the run completed, and every pass that met the planted record logged it and the exact
         count (bad records, and records unreadable after a corrupt frame, as planted);
  n/a    the stage reads nothing the bad kind breaks (pretrain and classify read no ids, so a
         repeated catalog id is not bad input for them).

Anything else (a run that completes silently, an unnamed error, a wrong count) is a FAIL, and the
script exits 1.

  python scripts/probe_bad_input.py [--stages=ctr,courier] [--kinds=bad_image] [--work_dir=D]
  make probe
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import tensorflow as tf
from tensorflow.core.example import example_pb2

from trainer import configs, console, registry
from trainer.ctr import spec as ctr_spec
from trainer.data import records
from trainer.stages import ctr as ctr_stage
from trainer.stages import data as data_stage
from trainer.synth import config as world_config
from trainer.synth import marketplace

STAGES = ("validate", "pretrain", "classify", "finetune", "courier", "ctr", "debias")
KINDS = ("flipped_bytes", "truncated", "not_an_example", "bad_image", "rule_violation",
         "missing_feature", "duplicate_id", "gzip_without_suffix")
# The record kind each stage trains on (validate: any; the catalog).
MAIN = {"validate": "catalog", "pretrain": "catalog", "classify": "catalog",
        "finetune": "search_sessions", "courier": "pageviews", "ctr": "ctr", "debias": "ctr"}
SPLIT = {"catalog": "all", "search_sessions": "train", "pageviews": "train", "ctr": "train"}
# Per record kind: (feature, bad value) breaking a rule, and a required feature to delete.
RULE: dict[str, tuple[str, list]] = {
    "catalog": ("price", [-1.0]), "search_sessions": ("clicked_category_id", [-1]),
    "pageviews": ("pv_labels", [2]), "ctr": ("label", [2])}
MISSING = {"catalog": "shop_id", "search_sessions": "query_id", "pageviews": "user_id",
           "ctr": "label"}
INLINE_IMAGE = {"catalog": "image", "search_sessions": "query_image"}
BAD = 3  # the planted record's index in its file
NOT_AN_EXAMPLE = b"\x0a\xff\xff not an Example"
UNDECODABLE_PNG = b"\x89PNG\r\n\x1a\n" + bytes(40)
# validate's summaries, and a skipping pass's ('skip_bad_records: <summary>: skipped').
SUMMARY_ANY = re.compile(r"(\d+) records in (\d+) files, (\d+) bad"
                         r"(?:, (\d+) unreadable after a corrupt frame)?")
SUMMARY = re.compile(f"skip_bad_records: {SUMMARY_ANY.pattern}: skipped")
DUPLICATES = re.compile(r"skip_bad_records: (\d+) records with a duplicate \w+ in \d+ files: "
                        r"skipped")


@dataclasses.dataclass
class Planted:
    """What was planted, and what a run must report: the records an error may name (any of
    `places`, as (file, index)) and, skipping, each pass's count of bad and lost records."""

    kind: str
    target: str  # the record kind planted in
    places: list
    bad: int
    lost: int = 0
    applies: bool = True


def _read(path: str) -> list[bytes]:
    return [r.numpy() for r in tf.data.TFRecordDataset(path)]


def _write(path: str, recs: Sequence[bytes], gzip_: bool = False) -> None:
    with tf.io.TFRecordWriter(path, options="GZIP" if gzip_ else None) as w:
        for r in recs:
            w.write(r)


def _edit(rec: bytes, fn: Callable) -> bytes:
    e = example_pb2.Example.FromString(rec)
    fn(e.features.feature)
    return e.SerializeToString()


def _set(feature: str, values: list) -> Callable:
    def fn(fmap):
        del fmap[feature]
        field = fmap[feature].float_list if isinstance(values[0], float) else (
            fmap[feature].bytes_list if isinstance(values[0], bytes) else fmap[feature].int64_list)
        field.value.extend(values)
    return fn


def _ints(rec: bytes, feature: str) -> list[int]:
    return list(example_pb2.Example.FromString(rec).features.feature[feature].int64_list.value)


def _referencing(world: str, kind: str, item: int) -> list:
    """(file, index) of the records of `kind` that join `item`'s catalog image."""
    k = ctr_spec.record_kind(kind)
    out = []
    for path in sorted(glob.glob(records.default_pattern(world, kind, SPLIT[kind]))):
        for i, rec in enumerate(_read(path)):
            for ids in k.joinable_images.values():
                f = k.feature(ids)
                values = _ints(rec, ids)
                keep = f.max_len or len(values)
                values = values[-keep:] if f.keep == "tail" else values[:keep]
                if item in values:
                    out.append((path, i))
                    break
    return out


def plant(world: str, stage: str, kind: str) -> Planted:
    """Plants one bad record of `kind` in `world` (a copy) for `stage`."""
    target = MAIN[stage]
    if kind == "duplicate_id":
        target = "catalog"
        if stage in ("pretrain", "classify"):
            return Planted(kind, target, [], 0, applies=False)
    if kind == "bad_image" and target not in INLINE_IMAGE:
        target = "catalog"  # the stage joins its images from the catalog (or embeds it)
    files = sorted(glob.glob(records.default_pattern(world, target, SPLIT[target])))
    path = files[0]
    recs = _read(path)
    n = len(recs)
    if kind == "flipped_bytes":  # one byte of record BAD's payload: its frame's CRC fails
        raw = open(path, "rb").read()
        offset = sum(len(r) + 16 for r in recs[:BAD]) + 12 + len(recs[BAD]) // 2
        with open(path, "wb") as f:
            f.write(raw[:offset] + bytes([raw[offset] ^ 0xFF]) + raw[offset + 1:])
        return Planted(kind, target, [(path, BAD)], 1, n - BAD - 1)
    if kind == "truncated":  # the file ends inside record BAD
        raw = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(raw[:sum(len(r) + 16 for r in recs[:BAD]) + 12 + len(recs[BAD]) // 2])
        return Planted(kind, target, [(path, BAD)], 1)
    if kind == "gzip_without_suffix":
        _write(path, recs, gzip_=True)
        return Planted(kind, target, [(path, 0)], 1, n - 1)
    if kind == "duplicate_id":  # record 2 of the first file again, at the end of the last
        last = files[-1]
        again = _read(last) + [recs[2]]
        _write(last, again)
        return Planted(kind, target, [(last, len(again) - 1)], 1)
    if kind == "not_an_example":
        recs[BAD] = NOT_AN_EXAMPLE
    elif kind == "rule_violation":
        recs[BAD] = _edit(recs[BAD], _set(*RULE[target]))
    elif kind == "missing_feature":
        recs[BAD] = _edit(recs[BAD], lambda fmap: fmap.__delitem__(MISSING[target]))
    elif kind == "bad_image":
        recs[BAD] = _edit(recs[BAD], _set(INLINE_IMAGE[target], [UNDECODABLE_PNG]))
    _write(path, recs)
    if kind == "bad_image" and target == "catalog" and stage not in ("pretrain", "classify",
                                                                      "ctr", "debias"):
        # Records that join the image decode it: each is bad (validate scans every kind).
        item = _ints(recs[BAD], "item_id")[0]
        joining = ("search_sessions", "pageviews") if stage == "validate" else (MAIN[stage],)
        places = [p for k in joining for p in _referencing(world, k, item)]
        if stage == "validate":
            places.insert(0, (path, BAD))
        return Planted(kind, target, places, len(places))
    return Planted(kind, target, [(path, BAD)], 1)


def _records(pattern: str) -> int:
    return sum(1 for f in glob.glob(pattern) for _ in tf.data.TFRecordDataset(f))


def _config(stage: str, world: str, model_dir: str, s1_dir: str, skip: bool, n: int = 0):
    """A run that reads all of its training input (a lazy reader meets a bad record only when it
    reads it): steps for 1.5 epochs of the stage's `n` main records."""
    tree: dict = {"data_dir": world, "model_dir": model_dir, "skip_bad_records": skip}
    if stage != "validate":
        batch = 512 if MAIN[stage] == "ctr" else 64
        steps = max(2, -(-3 * n // (2 * batch)))
        tree["train"] = {"steps": steps, "global_batch_size": batch, "warmup_steps": 0,
                         "log_interval": steps, "checkpoint_interval": steps}
    if stage in ("pretrain", "classify", "finetune", "courier"):
        tree["encoder"] = {"depth": 10, "width_multiplier": 0.25, "feature_dim": 16}
    if stage in ("ctr", "debias"):
        tree["ctr"] = {"tower_units": [16]}
        tree["images"] = {"encoder": "s1", "model_dir": s1_dir, "s1_model_dir": s1_dir}
    return configs.check(configs.apply(configs.for_stage(stage), tree))


def run_stage(cfg) -> None:
    if cfg.stage == "validate":
        data_stage.run_validate(cfg)
    elif cfg.stage in ("ctr", "debias"):
        ctr_stage.run_ctr(cfg)
    else:
        registry.run(cfg)


def _counts(text: str) -> list[tuple[int, int]]:
    """(bad, lost) of every pass that met bad records, from the skip summaries logged."""
    counts = [(int(m.group(3)), int(m.group(4) or 0)) for m in SUMMARY.finditer(text)]
    counts = [c for c in counts if c != (0, 0)]  # passes over clean files
    return counts + [(int(m.group(1)), 0) for m in DUPLICATES.finditer(text)]


def _named(planted: Planted, message: str) -> list:
    return [p for p in planted.places if f"{p[0]}: record {p[1]}: feature '" in message]


def outcome(planted: Planted, skip: bool, error: BaseException | None, text: str) -> str:
    """A training stage's cell: without the flag an error naming a planted record, with it a
    completed run whose every counting pass counted exactly what was planted; else FAIL."""
    if error is not None:
        named = _named(planted, str(error))
        if named and not skip:
            return f"error: record {named[0][1]}"
        return (f"FAIL: {type(error).__name__}: {' '.join(str(error).split())[:160]}"
                + (" (with the flag)" if skip else ""))
    if not skip:
        return "FAIL: completed without an error"
    counts = _counts(text)
    if not counts:
        return "FAIL: completed, nothing counted"
    wrong = [c for c in counts if c != (planted.bad, planted.lost)]
    if wrong:
        return (f"FAIL: counted {wrong[0][0]} bad + {wrong[0][1]} lost, planted "
                f"{planted.bad} + {planted.lost}")
    lost = f" + {planted.lost} lost" if planted.lost else ""
    return f"skip: {planted.bad} bad{lost} ({len(counts)} passes)"


def _validate_cell(planted: Planted, error: BaseException | None, text: str) -> str:
    """validate reports whatever the flag: a BAD line naming each planted record, the planted
    counts in its summaries, and exit status 1."""
    if not (isinstance(error, SystemExit) and error.code == 1):
        return f"FAIL: {type(error).__name__ if error else 'exit 0'}: {str(error)[:160]}"
    bad_lines = [line for line in text.splitlines() if line.startswith("BAD ")]
    named = [p for p in planted.places if any(f"{p[0]}: record {p[1]}: " in b
                                              for b in bad_lines)]
    if len(named) != len(planted.places) or len(bad_lines) != planted.bad:
        return f"FAIL: {len(bad_lines)} BAD lines, planted {planted.bad}"
    lost = sum(int(m.group(4) or 0) for m in SUMMARY_ANY.finditer(text))
    if lost != planted.lost:
        return f"FAIL: {lost} lost counted, planted {planted.lost}"
    return f"error: record {named[0][1]}" + (f" + {lost} lost" if lost else "")


def probe_one(base: str, work: str, stage: str, kind: str, s1_dir: str) -> tuple[str, str, str]:
    """(target kind, without the flag, with the flag) for one stage and bad kind."""
    world = os.path.join(work, f"{stage}-{kind}")
    shutil.copytree(base, world)
    try:
        main_kind = MAIN[stage]
        n = _records(records.default_pattern(world, main_kind, SPLIT[main_kind]))
        planted = plant(world, stage, kind)
        if not planted.applies:
            return planted.target, "n/a", "n/a"
        cells = []
        for skip in (False, True):
            cfg = _config(stage, world, os.path.join(world, f"model-{int(skip)}"), s1_dir, skip,
                          n)
            stream = io.StringIO()
            handler = logging.StreamHandler(stream)
            logging.getLogger().addHandler(handler)
            error: BaseException | None = None
            try:
                with contextlib.redirect_stdout(stream):
                    run_stage(cfg)
            except (Exception, SystemExit) as e:  # noqa: BLE001  (every failure is a cell)
                error = e
            finally:
                logging.getLogger().removeHandler(handler)
            text = stream.getvalue()
            cells.append(_validate_cell(planted, error, text) if stage == "validate"
                         else outcome(planted, skip, error, text))
        return planted.target, cells[0], cells[1]
    finally:
        shutil.rmtree(world, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = console.CommandLine(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--work_dir", default="", help="Scratch dir (default: a temporary one).")
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    kinds = [k for k in args.kinds.split(",") if k]
    for name in stages + kinds:
        if name not in STAGES + KINDS:
            p.error(f"unknown stage or kind '{name}' (stages {STAGES}, kinds {KINDS})")
    logging.getLogger().setLevel(logging.WARNING)
    work = args.work_dir or tempfile.mkdtemp(prefix="probe_bad_input-")
    base = os.path.join(work, "world")
    if not marketplace.load_manifest(base):
        marketplace.generate(world_config.get_world("tiny"), base, seed=0,
                             ctr_kind=ctr_spec.record_kind("ctr"))
    s1_dir = os.path.join(work, "s1")
    if {"ctr", "debias"} & set(stages):
        cfg = _config("pretrain", base, s1_dir, "", False)
        registry.run(dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, steps=2, log_interval=2, checkpoint_interval=2)))
    rows = []
    t0 = time.time()
    for stage in stages:
        for kind in kinds:
            target, without, with_ = probe_one(base, work, stage, kind, s1_dir)
            rows.append((stage, kind, target, without, with_))
            print(f"  {stage:9s} {kind:20s} {without:32s} {with_}  ({time.time() - t0:.0f}s)",
                  file=sys.stderr, flush=True)
    print(format_table(rows))
    failed = [r for r in rows if r[3].startswith("FAIL") or r[4].startswith("FAIL")]
    print(f"\n{len(rows)} stage x bad kind pairs, {2 * len(rows)} runs in "
          f"{time.time() - t0:.0f}s: {len(failed)} failed")
    return 1 if failed else 0


def format_table(rows: Sequence[tuple]) -> str:
    head = ("stage", "bad kind", "planted in", "without --skip_bad_records",
            "with --skip_bad_records")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))
             for r in [head, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

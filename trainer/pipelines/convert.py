"""Beam convert: Parquet tables plus images -> validated, sharded TFRecords of any record kind.

The distributed form of `scripts/convert_parquet.py`, with the same column mapping
(`trainer.data.parquet`, docs/data_format.md), so a row gives the same record byte for byte:
1. Beam's Parquet IO reads the tables row group by row group (list columns included), spread
   over the workers; images are read by path or URI with TensorFlow's file systems.
2. Each row becomes a `tf.train.Example` (`parquet.Columns.record`), then batches of records are
   checked by the input pipeline's own parser (`parse.RecordParser`: required features, types,
   value bounds, list lengths, image headers; images are not decoded here).
3. Good records go to `<output_dir>/<kind>/<split>-SSSSS-of-NNNNN.tfrecord`, replacing the kind's
   files of that split only once the whole job has succeeded. Rows that cannot be converted (a
   missing or unreadable image, a value of the wrong type, a null in a required column, a column
   the file lacks) and records that break a rule go to the dead-letter output, JSON lines
   `<dead_letter_dir>/<kind>-<split>-*.jsonl` of {"file", "row", "reason", "stage"}; the job
   completes and counts them (Beam counters `convert:*`). Nothing is dropped silently.

  python -m trainer.pipelines.convert --kind=catalog --parquet='items/*.parquet' \\
      --image_dir=images --output_dir=DATA --num_shards=64 [Beam options: --runner=...]
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import apache_beam as beam
import tensorflow as tf
from apache_beam.io import parquetio
from apache_beam.metrics.metric import Metrics
from tensorflow.core.example import example_pb2

from trainer.ctr import spec as ctr_spec
from trainer.data import parquet, parse, records, schema
from trainer.pipelines import common

NAMESPACE = "convert"
VALIDATE_BATCH = 512
DEAD = "dead_letter"


def _json_value(v: Any) -> Any:
    """A row value as JSON shows it: bytes (an encoded image) as their size."""
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, float) and v != v:
        return "NaN"
    return v


def dead_letter(path: str, row: dict, reason: str, stage: str) -> str:
    return json.dumps({"file": path, "row": {k: _json_value(v) for k, v in row.items()},
                       "reason": reason, "stage": stage}, default=str)


def _example_values(kind: schema.RecordKind, serialized: bytes) -> dict:
    """A record's features as the row held them (for a dead letter): lists, and the one value
    of a scalar."""
    out = {}
    for name, feature in example_pb2.Example.FromString(serialized).features.feature.items():
        which = feature.WhichOneof("kind")
        values = list(getattr(feature, which).value) if which else []
        scalar = name in kind.names and not kind.feature(name).is_list and len(values) == 1
        out[name] = values[0] if scalar else values
    return out


class _ToRecords(beam.DoFn):
    """(file, row group) -> (file, serialized record), or a dead letter for a row that cannot be
    converted."""

    def __init__(self, kind: schema.RecordKind, image_dir: str | None, allow_absolute: bool):
        self.kind, self.image_dir, self.allow_absolute = kind, image_dir, allow_absolute
        self.rows = Metrics.counter(NAMESPACE, "rows")
        self.failed = Metrics.counter(NAMESPACE, "dead_letter_conversion")

    def setup(self) -> None:
        self.columns: dict = {}

    def process(self, element) -> Iterator[Any]:
        path, table = element
        if path not in self.columns:
            try:
                self.columns[path] = parquet.Columns(self.kind, table.schema.names, table.schema,
                                                     path, self.image_dir, self.allow_absolute)
            except ValueError as e:  # the file lacks a column or holds one of the wrong type
                self.columns[path] = e
        columns = self.columns[path]
        data = {c: table.column(c).to_pylist() for c in table.schema.names}
        for i in range(table.num_rows):
            row = {c: v[i] for c, v in data.items()}
            self.rows.inc()
            try:
                if isinstance(columns, ValueError):
                    raise columns
                yield path, columns.record(row, path)
            except ValueError as e:
                self.failed.inc()
                reason = str(e).removeprefix(f"{path}: ")
                yield beam.pvalue.TaggedOutput(DEAD, dead_letter(path, row, reason, "convert"))


class _Validate(beam.DoFn):
    """Batches of (file, record) -> the records that pass the parser's checks; the rest as dead
    letters naming the feature and the broken rule."""

    def __init__(self, kind: schema.RecordKind):
        self.kind = kind
        self.good = Metrics.counter(NAMESPACE, "records")
        self.bad = Metrics.counter(NAMESPACE, "dead_letter_validation")

    def setup(self) -> None:
        self.parser = common.BatchParser(parse.RecordParser(self.kind, decode=False), skip=True)

    def process(self, batch: Sequence[tuple[str, bytes]]) -> Iterator[Any]:
        # Names <file>:<position in this batch>: a Parquet row's index is not known here.
        names = [f"{path}:{i}" for i, (path, _) in enumerate(batch)]
        _, keep, bad = self.parser(names, [r for _, r in batch])
        for i in keep:
            self.good.inc()
            yield batch[i][1]
        for b in bad:
            self.bad.inc()
            path, serialized = batch[b.index]
            yield beam.pvalue.TaggedOutput(DEAD, dead_letter(
                path, _example_values(self.kind, serialized), f"feature '{b.feature}': {b.reason}",
                "validate"))


def convert(kind: str | schema.RecordKind, parquet_pattern: str, output_dir: str, split: str,
            num_shards: int, image_dir: str | None = None, allow_absolute_image_paths: bool = False,
            dead_letter_dir: str | None = None, beam_args: Sequence[str] = ()) -> dict:
    """Runs the pipeline; returns {'paths': the new record files, 'dead_letter': the dead-letter
    files, 'counters': Beam's counters}."""
    record_kind = schema.get(kind)
    files = parquet.parquet_files(parquet_pattern)
    kind_dir = os.path.join(output_dir, record_kind.name)
    scratch = os.path.join(kind_dir, f".converting-{split}-{os.getpid()}")
    dead_dir = dead_letter_dir or os.path.join(output_dir, DEAD)
    dead_prefix = os.path.join(dead_dir, f"{record_kind.name}-{split}")
    for old in tf.io.gfile.glob(dead_prefix + "-*.jsonl"):
        tf.io.gfile.remove(old)
    if tf.io.gfile.exists(scratch):
        tf.io.gfile.rmtree(scratch)

    def build(p: beam.Pipeline) -> None:
        rows = (p | "Files" >> beam.Create(files)
                | "ReadParquet" >> parquetio.ReadAllFromParquetBatched(with_filename=True)
                | "ToRecords" >> beam.ParDo(_ToRecords(record_kind, image_dir,
                                                       allow_absolute_image_paths)
                                            ).with_outputs(DEAD, main="records"))
        checked = (rows.records
                   | "Progress" >> beam.ParDo(common.Progress(NAMESPACE, "rows converted"))
                   | beam.BatchElements(min_batch_size=VALIDATE_BATCH,
                                        max_batch_size=VALIDATE_BATCH)
                   | "Validate" >> beam.ParDo(_Validate(record_kind)).with_outputs(
                       DEAD, main="records"))
        _ = (checked.records | "WriteRecords" >> beam.io.WriteToTFRecord(
            os.path.join(scratch, split), file_name_suffix=".tfrecord",
            num_shards=num_shards, shard_name_template="-SSSSS-of-NNNNN"))
        _ = ((rows[DEAD], checked[DEAD]) | "DeadLetters" >> beam.Flatten()
             | "WriteDeadLetters" >> beam.io.WriteToText(
                 dead_prefix, file_name_suffix=".jsonl", shard_name_template="-SSSSS-of-NNNNN"))

    try:
        counters = common.run(NAMESPACE, build, beam_args)
        new = sorted(tf.io.gfile.glob(os.path.join(scratch, f"{split}-*.tfrecord")))
        paths = records.replace_split(output_dir, record_kind.name, split, new)
    finally:
        if tf.io.gfile.exists(scratch):
            tf.io.gfile.rmtree(scratch)
    dead = sorted(tf.io.gfile.glob(dead_prefix + "-*.jsonl"))
    failed = sum(v for k, v in counters.items() if k.startswith(DEAD))
    if failed:
        print(f"{NAMESPACE}: {failed} of {counters.get('rows', 0)} rows went to the dead-letter "
              f"output {dead_prefix}-*.jsonl", flush=True)
    return {"paths": paths, "dead_letter": dead, "counters": counters}


def read_dead_letters(paths: Sequence[str]) -> list[dict]:
    return [json.loads(line) for p in paths for line in tf.io.gfile.GFile(p) if line.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    p = common.command_line(__doc__)
    parquet.add_flags(p)
    p.add_argument("--num_shards", type=int, default=0, help=common.NUM_SHARDS_HELP)
    p.add_argument("--dead_letter_dir", default=None,
                   help="Where rows that fail go (default: OUTPUT_DIR/dead_letter).")
    args, beam_args = p.parse_known_args(argv)
    try:
        out = convert(ctr_spec.record_kind(args.kind, args.ctr_spec), args.parquet,
                      args.output_dir, parquet.split_of(args), args.num_shards,
                      args.image_dir, args.allow_absolute_image_paths, args.dead_letter_dir,
                      beam_args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {len(out['paths'])} files of '{args.kind}' records under "
          f"{os.path.join(args.output_dir, args.kind)}")


if __name__ == "__main__":
    main()

"""Converts Parquet tables plus a folder of images into TFRecords of one record kind.

Parquet is read with pyarrow, record batch by record batch, so memory holds one batch whatever the
size of the table; the records go to `--num_shards` files of contiguous rows (the row count comes
from the files' metadata). Columns are named after the features of the kind (docs/data_format.md;
for `ctr`, the feature spec's columns, `--ctr_spec`):

- scalars: integer columns for ids and labels, floating-point columns for values;
- lists: `list<int64>` / `list<double>` columns, or strings of space-separated values
  ("123 456 789");
- images: a binary column of encoded bytes named after the feature; or a `<feature>_path` column
  (paths relative to --image_dir; a `list<string>` or space-separated for image lists); or, for
  `catalog` / `queries`, `<image_dir>/<id>.{jpg,jpeg,png}`. A path that leaves --image_dir
  (`../x`, `/etc/x`) is refused; `--allow_absolute_image_paths` admits absolute paths and URIs
  (gs://..., anything TensorFlow's file system reads) for tables that hold them.

Columns the kind does not know are left out (a warning lists them); a required feature missing
from the table fails naming the file, the column and the record kind; a bad value or a null in a
required column (write `[]` for an empty list) fails naming the file, the row and the column.

The shards are written into a scratch dir and replace the kind's files of that split only when
the whole table converted, so a failed run leaves the old files, and a re-run with another
--num_shards leaves no old shard beside the new ones.

  python scripts/convert_parquet.py --kind=catalog --parquet=items.parquet --image_dir=images \\
      --output_dir=DATA --split=all --num_shards=8
  python scripts/convert_parquet.py --kind=ctr --ctr_spec=my_spec.yaml \\
      --parquet='logs/day=*/part-*.parquet' --output_dir=DATA --split=train

Then check the result: python -m trainer.task --stage=validate --data_dir=DATA
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from trainer import console

# isort: split
import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf

from trainer.data import parquet as parquet_lib
from trainer.data import records, schema

log = logging.getLogger("convert_parquet")
BATCH_ROWS = 8192


def convert(kind: str | schema.RecordKind, parquet: str, output_dir: str, split: str,
            num_shards: int, image_dir: str | None = None,
            batch_rows: int = BATCH_ROWS, allow_absolute_image_paths: bool = False) -> list[str]:
    """Converts the Parquet files of `parquet` (a file, a directory or globs) into `num_shards`
    TFRecord files of contiguous rows, replacing the kind's files of `split`; returns their
    paths."""
    record_kind = schema.get(kind)
    files = parquet_lib.parquet_files(parquet)
    readers = [pq.ParquetFile(f) for f in files]
    total = sum(r.metadata.num_rows for r in readers)
    num_shards = max(1, min(num_shards, total))
    scratch = os.path.join(output_dir, record_kind.name, f".converting-{split}-{os.getpid()}")
    if tf.io.gfile.exists(scratch):
        tf.io.gfile.rmtree(scratch)
    try:
        written = _write(record_kind, files, readers, total, scratch, split, num_shards,
                         image_dir, batch_rows, allow_absolute_image_paths, parquet)
        return records.replace_split(output_dir, record_kind.name, split, written)
    finally:
        if tf.io.gfile.exists(scratch):
            tf.io.gfile.rmtree(scratch)


def _write(record_kind: schema.RecordKind, files: list[str], readers: list, total: int,
           out_dir: str, split: str, num_shards: int, image_dir: str | None, batch_rows: int,
           allow_absolute: bool, parquet: str) -> list[str]:
    """Writes the tables' records as `num_shards` files of `split` into `out_dir`."""
    paths = [os.path.join(out_dir, os.path.basename(p))
             for p in records.shard_paths(out_dir, record_kind.name, split, num_shards)]
    tf.io.gfile.makedirs(out_dir)
    bounds = np.linspace(0, total, num_shards + 1).round().astype(int)
    shard, written, writer = 0, 0, tf.io.TFRecordWriter(paths[0])
    unknown: set = set()
    try:
        for path, reader in zip(files, readers, strict=True):
            columns = parquet_lib.Columns(record_kind, reader.schema_arrow.names,
                                          reader.schema_arrow, path, image_dir, allow_absolute)
            unknown |= set(columns.unknown)
            needed = columns.needed
            row = 0
            for batch in reader.iter_batches(batch_size=batch_rows, columns=needed):
                for record in columns.rows(batch, row):
                    while written >= bounds[shard + 1]:
                        writer.close()
                        shard += 1
                        writer = tf.io.TFRecordWriter(paths[shard])
                    writer.write(record)
                    written += 1
                row += batch.num_rows
    finally:
        writer.close()
    for rest in paths[shard + 1:]:  # only for an empty table
        tf.io.TFRecordWriter(rest).close()
    if unknown:
        log.warning("%s: column(s) %s are not features of the record kind '%s' and were left "
                    "out", parquet, sorted(unknown), record_kind.name)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = console.CommandLine(description=__doc__.split("\n\n")[0])
    parquet_lib.add_flags(p)
    p.add_argument("--num_shards", type=int, default=4)
    args = p.parse_args(argv)
    try:
        kind, split = parquet_lib.kind_and_split(args)
        paths = convert(kind, args.parquet, args.output_dir, split, args.num_shards,
                        args.image_dir,
                        allow_absolute_image_paths=args.allow_absolute_image_paths)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {len(paths)} files of '{args.kind}' records under "
          f"{os.path.join(args.output_dir, args.kind)}")


if __name__ == "__main__":
    main()

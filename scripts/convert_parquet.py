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
  `catalog` / `queries`, `<image_dir>/<id>.{jpg,jpeg,png}`.

Columns the kind does not know are left out (a warning lists them); a required feature missing
from the table fails naming the file, the column and the record kind; a bad value fails naming the
file, the row and the column.

  python scripts/convert_parquet.py --kind=catalog --parquet=items.parquet --image_dir=images \\
      --output_dir=DATA --split=all --num_shards=8
  python scripts/convert_parquet.py --kind=ctr --ctr_spec=my_spec.yaml \\
      --parquet='logs/day=*/part-*.parquet' --output_dir=DATA --split=train

Then check the result: python -m trainer.task --stage=validate --data_dir=DATA
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf

from trainer.data import ctr_spec, records, schema

log = logging.getLogger("convert_parquet")
_ID_OF_IMAGE = {"catalog": "item_id", "queries": "query_id"}
_EXTENSIONS = (".jpg", ".jpeg", ".png")
BATCH_ROWS = 8192


def parquet_files(pattern: str) -> list[str]:
    """Files of a path, a directory (its *.parquet, recursively) or globs (comma-separated)."""
    files: list[str] = []
    for p in (x.strip() for x in pattern.split(",") if x.strip()):
        if os.path.isdir(p):
            files += sorted(glob.glob(os.path.join(p, "**", "*.parquet"), recursive=True))
        else:
            files += sorted(glob.glob(p)) or ([p] if os.path.exists(p) else [])
    if not files:
        raise FileNotFoundError(f"no Parquet files match '{pattern}'")
    return files


def _read_image(path: str, where: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{where}: cannot read image {path}: {e.strerror}") from None


def _image_by_id(image_dir: str, id_: int, where: str) -> bytes:
    for ext in _EXTENSIONS:
        path = os.path.join(image_dir, f"{id_}{ext}")
        if os.path.exists(path):
            return _read_image(path, where)
    raise ValueError(f"{where}: no image file for id {id_} in {image_dir} "
                     f"(tried {', '.join(str(id_) + e for e in _EXTENSIONS)})")


class _Columns:
    """How the columns of one Parquet schema map to a kind's features, checked once per file."""

    def __init__(self, kind: schema.RecordKind, names: Sequence[str], arrow: pa.Schema,
                 path: str, image_dir: str | None):
        self.kind, self.path, self.image_dir = kind, path, image_dir
        present = set(names)
        self.sources: dict[str, tuple[str, str]] = {}  # feature -> (how, column)
        for f in kind.features:
            path_col = f.name + "_path"
            if f.image and path_col in present:
                self.sources[f.name] = ("paths", path_col)
            elif f.name in present:
                self.sources[f.name] = ("value", f.name)
                self._check_type(f, arrow.field(f.name).type)
            elif f.image and f.name == "image" and kind.name in _ID_OF_IMAGE:
                self.sources[f.name] = ("by_id", _ID_OF_IMAGE[kind.name])
            elif f.required:
                raise ValueError(f"{path}: column '{f.name}' (a required feature of the record "
                                 f"kind '{kind.name}') is missing; its columns: {sorted(names)}")
        needs_dir = [c for how, c in self.sources.values() if how in ("paths", "by_id")]
        if needs_dir and image_dir is None:
            raise ValueError(f"{path}: images from {needs_dir} need --image_dir")
        used = {c for _, c in self.sources.values()}
        self.unknown = sorted(present - used)

    def _check_type(self, f: schema.FeatureSpec, t: pa.DataType) -> None:
        where = f"{self.path}: column '{f.name}'"
        if f.is_list:
            if pa.types.is_string(t) or pa.types.is_large_string(t):
                return  # space-separated values
            if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
                raise ValueError(f"{where} is a list feature; it must be a list column or "
                                 f"space-separated strings, not {t}")
            t = t.value_type
            if f.image and (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
                return
        want = {schema.INT64: pa.types.is_integer,
                schema.FLOAT: lambda x: pa.types.is_floating(x) or pa.types.is_integer(x),
                schema.BYTES: lambda x: pa.types.is_binary(x) or pa.types.is_large_binary(x)}
        if not want[f.dtype](t):
            kind = {schema.INT64: "integer", schema.FLOAT: "numeric",
                    schema.BYTES: "binary (encoded image)"}[f.dtype]
            raise ValueError(f"{where} must hold {kind} values, not {t}")

    def rows(self, batch: pa.RecordBatch, first_row: int) -> Iterator[bytes]:
        data = {c: batch.column(batch.schema.get_field_index(c)).to_pylist()
                for c in {c for _, c in self.sources.values()}}
        for i in range(batch.num_rows):
            where = f"{self.path}: row {first_row + i}"
            values: dict[str, Any] = {}
            for f in self.kind.features:
                if f.name not in self.sources:
                    continue
                how, column = self.sources[f.name]
                v = data[column][i]
                if how == "by_id":
                    values[f.name] = _image_by_id(self.image_dir or "", int(v), where)
                elif how == "paths":
                    paths = v.split() if isinstance(v, str) else list(v or [])
                    images = [_read_image(os.path.join(self.image_dir or "", p), where)
                              for p in paths]
                    values[f.name] = images if f.is_list else (images[0] if images else None)
                else:
                    values[f.name] = self._value(f, v, where)
            try:
                yield records.to_example(self.kind, values)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: {e}") from None

    @staticmethod
    def _value(f: schema.FeatureSpec, v: Any, where: str) -> Any:
        if v is None:
            if f.required and not f.is_list:
                raise ValueError(f"{where}: column '{f.name}' is null (a required feature)")
            return [] if f.is_list else None
        if not f.is_list:
            return float(v) if f.dtype == schema.FLOAT else v
        cast = int if f.dtype == schema.INT64 else float
        if isinstance(v, (str, bytes)):
            text = v.decode() if isinstance(v, bytes) else v
            try:
                return [cast(tok) for tok in text.split()]
            except ValueError:
                raise ValueError(f"{where}: column '{f.name}': cannot parse {text!r} as "
                                 f"space-separated {f.dtype} values") from None
        if any(x is None for x in v):
            raise ValueError(f"{where}: column '{f.name}' holds a null inside its list")
        return [cast(x) for x in v] if f.dtype == schema.FLOAT else list(v)


def convert(kind: str | schema.RecordKind, parquet: str, output_dir: str, split: str,
            num_shards: int, image_dir: str | None = None,
            batch_rows: int = BATCH_ROWS) -> list[str]:
    """Converts the Parquet files of `parquet` (a file, a directory or globs) into `num_shards`
    TFRecord files of contiguous rows; returns their paths."""
    record_kind = schema.get(kind)
    files = parquet_files(parquet)
    readers = [pq.ParquetFile(f) for f in files]
    total = sum(r.metadata.num_rows for r in readers)
    num_shards = max(1, min(num_shards, total))
    paths = records.shard_paths(output_dir, record_kind.name, split, num_shards)
    tf.io.gfile.makedirs(os.path.dirname(paths[0]))
    bounds = np.linspace(0, total, num_shards + 1).round().astype(int)
    shard, written, writer = 0, 0, tf.io.TFRecordWriter(paths[0])
    unknown: set = set()
    try:
        for path, reader in zip(files, readers, strict=True):
            columns = _Columns(record_kind, reader.schema_arrow.names, reader.schema_arrow, path,
                               image_dir)
            unknown |= set(columns.unknown)
            needed = sorted({c for _, c in columns.sources.values()})
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", required=True, choices=schema.KIND_NAMES)
    p.add_argument("--parquet", required=True,
                   help="Parquet file, directory or glob(s) (comma-separated) to convert.")
    p.add_argument("--ctr_spec", default=ctr_spec.DEFAULT,
                   help="kind=ctr: the feature spec whose columns the records hold (a built-in "
                        "name or a YAML/JSON file).")
    p.add_argument("--image_dir", default=None, help="Folder the image paths are relative to.")
    p.add_argument("--output_dir", required=True, help="Data directory to write into.")
    p.add_argument("--split", default=None,
                   help="Split name of the files (default: 'all' for catalog, queries and "
                        "judgments, else 'train').")
    p.add_argument("--num_shards", type=int, default=4)
    args = p.parse_args(argv)
    split = args.split or ("all" if args.kind in ("catalog", "queries", "judgments") else "train")
    try:
        kind = (ctr_spec.load(args.ctr_spec).record_kind() if args.kind == "ctr"
                else schema.get(args.kind))
        paths = convert(kind, args.parquet, args.output_dir, split, args.num_shards,
                        args.image_dir)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {len(paths)} files of '{args.kind}' records under "
          f"{os.path.join(args.output_dir, args.kind)}")


if __name__ == "__main__":
    main()

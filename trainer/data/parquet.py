"""Parquet tables as records of a kind: how the columns of a table map to a record kind's features
(docs/data_format.md), shared by `scripts/convert_parquet.py` (one process, pyarrow batch by batch)
and the Beam convert pipeline (`trainer.pipelines.convert`).

Columns are named after the features of the kind (for `ctr`, the feature spec's columns):
- scalars: integer columns for ids and labels, floating-point columns for values;
- lists: `list<int64>` / `list<double>` columns, or strings of space-separated values
  ("123 456 789");
- images: a binary column of encoded bytes named after the feature; or a `<feature>_path` column
  (paths relative to the image dir; a `list<string>` or space-separated for image lists); or, for
  `catalog` / `queries`, `<image_dir>/<id>.{jpg,jpeg,png}`. A path that leaves the image dir
  (`../x`, `/etc/x`) is refused unless absolute paths and URIs (gs://..., anything TensorFlow's
  file system reads) are allowed;
- text (the catalog's `title`): a string (UTF-8) or binary column.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf

from trainer.data import records, schema

log = logging.getLogger(__name__)
BATCH_ROWS = 8192  # rows read at a time by the single-process conversion (`convert`)

_EXTENSIONS = (".jpg", ".jpeg", ".png")


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


def read_image(path: str, where: str) -> bytes:
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except tf.errors.OpError as e:
        raise ValueError(f"{where}: cannot read image {path}: {e.message}") from None


def image_path(image_dir: str, path: str, where: str, allow_absolute: bool = False) -> str:
    """Where to read an image path from the table: inside `image_dir`, or (allowed) absolute."""
    if "://" in path or os.path.isabs(path):
        if not allow_absolute:
            raise ValueError(f"{where}: image path {path!r} is absolute; paths are read relative "
                             "to --image_dir (pass --allow_absolute_image_paths to read absolute "
                             "paths and URIs)")
        return path
    norm = os.path.normpath(path)
    if norm == ".." or norm.startswith(".." + os.sep):
        raise ValueError(f"{where}: image path {path!r} leaves --image_dir {image_dir}")
    return os.path.join(image_dir, norm)


def _image_by_id(image_dir: str, id_: int, where: str) -> bytes:
    for ext in _EXTENSIONS:
        path = os.path.join(image_dir, f"{id_}{ext}")
        if os.path.exists(path):
            return read_image(path, where)
    raise ValueError(f"{where}: no image file for id {id_} in {image_dir} "
                     f"(tried {', '.join(str(id_) + e for e in _EXTENSIONS)})")


class Columns:
    """How the columns of one Parquet schema map to a kind's features, checked once per file."""

    def __init__(self, kind: schema.RecordKind, names: Sequence[str], arrow: pa.Schema,
                 path: str, image_dir: str | None, allow_absolute: bool = False):
        self.kind, self.path, self.image_dir = kind, path, image_dir
        self.allow_absolute = allow_absolute
        present = set(names)
        self.sources: dict[str, tuple[str, str]] = {}  # feature -> (how, column)
        for f in kind.features:
            path_col = f.name + "_path"
            if f.image and path_col in present:
                self.sources[f.name] = ("paths", path_col)
            elif f.name in present:
                self.sources[f.name] = ("value", f.name)
                self._check_type(f, arrow.field(f.name).type)
            elif f.image and f.name == "image" and kind.name in schema.IMAGE_ID:
                self.sources[f.name] = ("by_id", schema.IMAGE_ID[kind.name])
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
        if f.dtype == schema.BYTES and not f.image and (pa.types.is_string(t)
                                                        or pa.types.is_large_string(t)):
            return  # text, written as UTF-8
        want = {schema.INT64: pa.types.is_integer,
                schema.FLOAT: lambda x: pa.types.is_floating(x) or pa.types.is_integer(x),
                schema.BYTES: lambda x: pa.types.is_binary(x) or pa.types.is_large_binary(x)}
        if not want[f.dtype](t):
            kind = {schema.INT64: "integer", schema.FLOAT: "numeric",
                    schema.BYTES: "binary (encoded image)"}[f.dtype]
            if f.dtype == schema.BYTES and not f.image:
                kind = "string or binary"
            raise ValueError(f"{where} must hold {kind} values, not {t}")

    @property
    def needed(self) -> list[str]:
        """The columns the records are made from."""
        return sorted({c for _, c in self.sources.values()})

    def rows(self, batch: pa.RecordBatch | pa.Table, first_row: int) -> Iterator[bytes]:
        """The serialized records of `batch`'s rows (the first is row `first_row` of the file);
        raises on the first bad row, naming it."""
        data = {c: batch.column(c).to_pylist() for c in self.needed}
        for i in range(batch.num_rows):
            yield self.record({c: v[i] for c, v in data.items()},
                              f"{self.path}: row {first_row + i}")

    def record(self, row: dict[str, Any], where: str) -> bytes:
        """The serialized record of one row ({column: value}); a bad value, a null in a required
        column or an image that cannot be read raises a ValueError naming `where` and the
        column."""
        values: dict[str, Any] = {}
        for f in self.kind.features:
            if f.name not in self.sources:
                continue
            how, column = self.sources[f.name]
            v = row[column]
            if how == "by_id":
                values[f.name] = _image_by_id(self.image_dir or "", int(v), where)
            elif how == "paths":
                if v is None and f.required:
                    raise ValueError(f"{where}: column '{column}' is null (a required feature)")
                paths = v.split() if isinstance(v, str) else list(v or [])
                images = [read_image(image_path(self.image_dir or "", p, where,
                                                self.allow_absolute), where) for p in paths]
                values[f.name] = images if f.is_list else (images[0] if images else None)
            else:
                values[f.name] = self._value(f, v, where)
        try:
            return records.to_example(self.kind, values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    @staticmethod
    def _value(f: schema.FeatureSpec, v: Any, where: str) -> Any:
        if v is None:
            if f.required:
                raise ValueError(f"{where}: column '{f.name}' is null (a required feature"
                                 + ("; write [] for an empty list)" if f.is_list else ")"))
            return [] if f.is_list else None
        if not f.is_list:
            if isinstance(v, str) and f.dtype == schema.BYTES:
                return v.encode()
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
            batch_rows: int = BATCH_ROWS, allow_absolute_image_paths: bool = False) -> list[str]:
    """Converts the Parquet files of `parquet` (a file, a directory or globs) into `num_shards`
    TFRecord files of contiguous rows, replacing the kind's files of `split`; returns their
    paths."""
    record_kind = schema.get(kind)
    files = parquet_files(parquet)
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
            columns = Columns(record_kind, reader.schema_arrow.names,
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


def add_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a converter (`scripts/convert_parquet.py`, `trainer.pipelines.convert`)."""
    p.add_argument("--kind", required=True, choices=schema.KIND_NAMES)
    p.add_argument("--parquet", required=True,
                   help="Parquet file, directory or glob(s) (comma-separated) to convert.")
    p.add_argument("--ctr_spec", default=None,
                   help="kind=ctr: the feature spec whose columns the records hold (a built-in "
                        "name or a YAML/JSON file; default: synthetic).")
    p.add_argument("--image_dir", default=None, help="Folder the image paths are relative to.")
    p.add_argument("--allow_absolute_image_paths", action="store_true",
                   help="Read image paths that are absolute or URIs (gs://...) as they are; "
                        "without it they are refused, as are relative paths leaving --image_dir.")
    p.add_argument("--output_dir", required=True, help="Data directory to write into.")
    p.add_argument("--split", default=None,
                   help="Split name of the files (default: 'all' for catalog, queries and "
                        "judgments, else 'train').")


def split_of(args: argparse.Namespace) -> str:
    """The split the flags name (default: 'all' for catalog, queries and judgments, else
    'train')."""
    return args.split or ("all" if args.kind in ("catalog", "queries", "judgments") else "train")

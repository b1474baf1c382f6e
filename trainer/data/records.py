"""Writing records of the schema: `tf.train.Example` building and sharded TFRecord files.

Layout of a data directory (the generator and `scripts/convert_parquet.py` both write it):
  <data_dir>/<kind>/<split>-<shard:05d>-of-<num_shards:05d>.tfrecord
where split is `train` / `test` for `ctr`, `train` for `search_sessions` and `pageviews`, and `all`
for `catalog`, `queries` and `judgments`. Readers take any file pattern, so other layouts work too.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.core.example import example_pb2

from trainer.data import schema

log = logging.getLogger(__name__)


def to_example(kind: schema.RecordKind, values: Mapping[str, Any]) -> bytes:
    """Serialized `tf.train.Example` of one record; raises on a missing or mistyped feature.

    Map entries are serialized in sorted key order (`deterministic=True`): same values, same bytes.
    """
    example = example_pb2.Example()
    fmap = example.features.feature
    for spec in kind.features:
        value = values.get(spec.name)
        if value is None:
            if spec.required:
                raise ValueError(f"{kind.name}: required feature '{spec.name}' is missing")
            continue
        vals = value if spec.is_list else (value,)
        try:
            if spec.dtype == schema.INT64:
                fmap[spec.name].int64_list.value.extend(vals)
            elif spec.dtype == schema.FLOAT:
                fmap[spec.name].float_list.value.extend(vals)
            else:
                fmap[spec.name].bytes_list.value.extend(vals)
        except TypeError as e:
            raise TypeError(f"{kind.name}: feature '{spec.name}' ({spec.dtype}): {e}") from None
    return example.SerializeToString(deterministic=True)


def columns_to_examples(kind: schema.RecordKind, columns: Mapping[str, Sequence]) -> Iterable[bytes]:
    """Serializes records given as columns (equal-length sequences, one per feature)."""
    names = [n for n in kind.names if n in columns]
    lengths = {n: len(columns[n]) for n in names}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{kind.name}: columns differ in length: {lengths}")

    def plain(name):  # numpy -> Python once per column: per-value conversion dominates otherwise
        col = columns[name]
        if isinstance(col, np.ndarray):
            return col.tolist()
        return [v.tolist() if isinstance(v, np.ndarray) else v for v in col]

    cols = [plain(n) for n in names]
    for row in zip(*cols):
        yield to_example(kind, dict(zip(names, row)))


def shard_paths(data_dir: str, kind: str, split: str, num_shards: int) -> list[str]:
    return [os.path.join(data_dir, kind, f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord")
            for i in range(num_shards)]


def write_shards(records: Sequence[bytes], data_dir: str, kind: str, split: str,
                 num_shards: int) -> list[str]:
    """Writes records into `num_shards` files of contiguous, nearly equal runs; returns the paths."""
    num_shards = max(1, min(num_shards, len(records))) if records else 1
    paths = shard_paths(data_dir, kind, split, num_shards)
    os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
    bounds = np.linspace(0, len(records), num_shards + 1).round().astype(int)
    for path, lo, hi in zip(paths, bounds[:-1], bounds[1:]):
        with tf.io.TFRecordWriter(path) as w:
            for r in records[lo:hi]:
                w.write(r)
    return paths


def default_pattern(data_dir: str, kind: str, split: str = "*") -> str:
    """File pattern of one record kind and split in the standard layout."""
    return os.path.join(data_dir, kind, f"{split}-*.tfrecord*")


def replace_split(output_dir: str, kind: str, split: str, new: list[str]) -> list[str]:
    """Moves the shards `new` in place of the kind's files of `split` (any shard count)."""
    old = tf.io.gfile.glob(default_pattern(output_dir, kind, split))
    paths = [os.path.join(output_dir, kind, os.path.basename(p)) for p in new]
    for path in old:
        if path not in paths:
            tf.io.gfile.remove(path)
    for src, dst in zip(new, paths, strict=True):
        tf.io.gfile.rename(src, dst, overwrite=True)
    if old:
        log.info("replaced %d file(s) of %s/%s-* with %d", len(old), kind, split, len(paths))
    return paths

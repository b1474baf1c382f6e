"""Beam join: `ctr` records that carry their image features' table entries, so a CTR trainer no
longer holds the catalog's image table in memory.

For every image feature of the spec (the displayed item's, the query photo's, the click
history's), each record gains the column `ctr_spec.joined_column(feature, mode)`: exactly what the
in-model table (`trainer.ctr.tables`) would look up for the record's ids, padding and unknown ids
included:
- `vector`: unit(v - c), c the mean of the item table's vectors (`ImageTable` with a centre);
- `simscore`: the encoder's vector v as it is;
- `cluster_id`: the nearest centroid's id + 1 (`ClusterTable`);
zeros (vector) or 0 (cluster id) for an id the table lacks and for a sequence's padding. A
sequence's entries follow its kept values (`order`, `max_length`), max_length of them.

By default the join is a shuffle: the records' lookups are keyed by (table, id) and grouped with
the table's entries (`CoGroupByKey`), then the entries are grouped back by record, so neither side
has to fit in a worker's memory (on a cluster runner, whose shuffles spill to disk; the
DirectRunner holds them in memory). With `--table_in_memory` the tables are a side input that
every worker holds, and the records stream past it: for tables that fit, much faster and lighter
(docs/beam.md: 21 s and 0.8 GB against 101 s and 9.1 GB on the DirectRunner). The tables are the
embed pipeline's TFRecords (`<embed out>/table/embeddings-*.tfrecord`) or, for tables that fit in
memory, an embeddings.npz (an encoder's `EmbeddingTable` or `--stage=embed`'s).

  python -m trainer.pipelines.join --records='DATA/ctr/train-*' --ctr_spec=synthetic \\
      --item_embeddings='catalog/table/*.tfrecord' --query_embeddings='queries/table/*' \\
      --mode=vector --output_dir=JOINED --split=train BEAM_OPTIONS...
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.metrics.metric import Metrics

from trainer.ctr import spec as ctr_spec
from trainer.data import npz, parse, pipeline, records
from trainer.pipelines import common

NAMESPACE = "join"
BATCH = 1024
MODES = ("vector", "simscore", "cluster_id")
_ID = {"items": "item_id", "queries": "query_id"}
_NPZ_VECTORS = {"items": ("item_vector", "embedding"), "queries": ("query_vector", "embedding")}


def table_dim(path: str, table: str) -> int:
    """The vector dimension of an embedding table (npz, or the embed pipeline's TFRecords)."""
    if path.endswith(".npz"):
        return int(_npz_table(path, table)[1].shape[1])
    first = next(iter(tf.data.TFRecordDataset(pipeline.list_files(path)[:1]).take(1)))
    return len(tf.train.Example.FromString(first.numpy()).features.feature[
        "embedding"].float_list.value)


def _npz_table(path: str, table: str) -> tuple[np.ndarray, np.ndarray]:
    data = npz.read(path)
    id_key = _ID[table]
    vector_key = next((k for k in _NPZ_VECTORS[table] if k in data), None)
    if id_key not in data or vector_key is None:
        raise ValueError(f"{path}: no '{id_key}' and {' or '.join(_NPZ_VECTORS[table])} arrays "
                         f"(the {table} table of an embeddings.npz)")
    return data[id_key], np.asarray(data[vector_key], np.float32)


class _ParseTable(beam.DoFn):
    """(name, embed pipeline table record) -> (id, vector)."""

    def __init__(self, table: str):
        self.id_name = _ID[table]

    def process(self, element) -> Iterator[tuple[int, np.ndarray]]:
        name, serialized = element
        f = tf.train.Example.FromString(serialized).features.feature
        if self.id_name not in f:
            raise ValueError(f"{name}: a table record without '{self.id_name}'")
        yield (int(f[self.id_name].int64_list.value[0]),
               np.asarray(f["embedding"].float_list.value, np.float32))


def read_table(p: beam.Pipeline, path: str, table: str):
    """PCollection of (id, vector) of an embedding table."""
    if path.endswith(".npz"):
        ids, vectors = _npz_table(path, table)
        return p | f"{table}Table" >> beam.Create(list(zip(ids.tolist(), vectors, strict=True)))
    return (p | f"Read{table}" >> common.ReadNamedRecords(path)
            | f"Parse{table}" >> beam.ParDo(_ParseTable(table)))


class _MeanVector(beam.CombineFn):
    """The mean of vectors, summed in float64."""

    def create_accumulator(self):
        return 0.0, 0

    def add_input(self, acc, v):
        return acc[0] + np.asarray(v, np.float64), acc[1] + 1

    def merge_accumulators(self, accs):
        accs = list(accs)
        return sum(a[0] for a in accs), sum(a[1] for a in accs)

    def extract_output(self, acc):
        return (np.asarray(acc[0]) / max(acc[1], 1)).astype(np.float32)


def _centred(kv, center: np.ndarray):
    """`ImageTable`'s entry: unit(v - center)."""
    key, v = kv
    x = v - center
    return key, x / np.maximum(np.linalg.norm(x), 1e-12)


def _as_bytes(kv):
    """A vector entry as little-endian float32 bytes: what crosses the shuffles (Beam encodes
    bytes directly, numpy arrays by pickling)."""
    return kv[0], np.asarray(kv[1], "<f4").tobytes()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def float_feature(raw: bytes) -> bytes:
    """A serialized `tf.train.Feature` whose float_list holds the little-endian float32s `raw`:
    built as bytes, since filling a proto float by float is the join's slowest step."""
    packed = b"\x0a" + _varint(len(raw)) + raw  # FloatList.value (field 1, packed)
    return b"\x12" + _varint(len(packed)) + packed  # Feature.float_list (field 2)


class _Records(beam.DoFn):
    """Parses batches of named `ctr` records for the ids of the spec's image features."""

    def __init__(self, spec: ctr_spec.CtrSpec):
        self.spec = spec
        self.images = spec.of_kind("image")
        self.records = Metrics.counter(NAMESPACE, "records")

    def setup(self) -> None:
        columns = tuple(dict.fromkeys(f.ids for f in self.images))
        self.parser = (common.BatchParser(parse.RecordParser(
            self.spec.record_kind(), features=columns, decode=False)) if columns else None)

    def lookups(self, batch: Sequence[tuple[str, bytes]]) -> Iterator[tuple[str, bytes, list]]:
        """(name, record, [((table, id), image feature, position)]) of every record, for every
        id that is not padding (padding is looked up as an unknown id: nothing to join)."""
        names = [n for n, _ in batch]
        parsed = (self.parser(names, [r for _, r in batch])[0] if self.parser else {})
        for i, (name, serialized) in enumerate(batch):
            self.records.inc()
            wants = [((f.table, id_), f.name, pos) for f in self.images
                     for pos, id_ in enumerate(np.atleast_1d(parsed[f.ids][i]).tolist())
                     if id_ != -1]
            yield name, serialized, wants


class _Lookups(_Records):
    """Shuffle join, step 1: the records (main) and their lookups ("wants"):
    ((table, id), (record name, image feature, position))."""

    def process(self, batch: Sequence[tuple[str, bytes]]) -> Iterator:
        for name, serialized, wants in self.lookups(batch):
            yield name, serialized
            for key, feature, pos in wants:
                yield beam.pvalue.TaggedOutput("wants", (key, (name, feature, pos)))


def _answer(kv) -> Iterator[tuple[str, tuple[str, int, object]]]:
    """Shuffle join, step 2: (table key, {entry, wants}) -> (record name, (image feature,
    position, entry))."""
    (table, id_), grouped = kv
    entries = list(grouped["entry"])
    if len(entries) > 1:
        raise ValueError(f"the {table} embedding table holds id {id_} {len(entries)} times")
    if not entries:
        Metrics.counter(NAMESPACE, f"unknown_{table}_ids").inc()
        return
    for name, feature, pos in grouped["wants"]:
        yield name, (feature, pos, entries[0])


class Assembler:
    """A record plus its entries {(image feature, position): entry} -> the joined record."""

    def __init__(self, spec: ctr_spec.CtrSpec, mode: str, dim: int):
        self.mode, self.dim = mode, dim
        self.images = [(f.name, ctr_spec.joined_column(f.name, mode),
                        spec.feature(f.ids).max_length if spec.is_sequence(f.ids) else 1)
                       for f in spec.of_kind("image")]

    def __call__(self, serialized: bytes, entries: dict) -> bytes:
        example = tf.train.Example.FromString(serialized)
        for feature, column, length in self.images:
            out = example.features.feature[column]
            if self.mode == "cluster_id":
                out.int64_list.value.extend(
                    [int(entries.get((feature, p), 0)) for p in range(length)])
            else:
                zeros = bytes(4 * self.dim)
                out.MergeFromString(float_feature(
                    b"".join(entries.get((feature, p), zeros) for p in range(length))))
        return example.SerializeToString(deterministic=True)


class _Assemble(beam.DoFn):
    """Shuffle join, step 3: (record name, {record, entries}) -> the joined record."""

    def __init__(self, assemble: Assembler):
        self.assemble = assemble

    def process(self, kv) -> Iterator[bytes]:
        _, grouped = kv
        (serialized,) = grouped["record"]
        yield self.assemble(serialized, {(feature, pos): value
                                         for feature, pos, value in grouped["entries"]})


class _JoinInMemory(_Records):
    """The join with the table as a side input ({(table, id): entry} in every worker's memory):
    no shuffle, for tables that fit."""

    def __init__(self, spec: ctr_spec.CtrSpec, assemble: Assembler):
        super().__init__(spec)
        self.assemble = assemble

    def process(self, batch: Sequence[tuple[str, bytes]], table: dict) -> Iterator[bytes]:
        for _, serialized, wants in self.lookups(batch):
            entries = {}
            for key, feature, pos in wants:
                if key in table:
                    entries[(feature, pos)] = table[key]
                else:
                    Metrics.counter(NAMESPACE, f"unknown_{key[0]}_ids").inc()
            yield self.assemble(serialized, entries)


def run(records_pattern: str, spec: ctr_spec.CtrSpec, mode: str, item_embeddings: str,
        output_dir: str, split: str, query_embeddings: str = "", centroids: str = "",
        num_shards: int = 0, table_in_memory: bool = False, beam_args: Sequence[str] = ()
        ) -> dict:
    """Runs the pipeline; returns {'paths': the joined record files, 'counters': ...}. With
    `table_in_memory`, the tables are a side input held by every worker (no shuffle: fast and
    memory bounded by the tables); else a shuffle join (bounded by neither side)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got '{mode}'")
    if mode == "cluster_id" and not centroids:
        raise ValueError("mode cluster_id needs the centroids (a clusters.npz)")
    sources = {"items": item_embeddings, "queries": query_embeddings}
    tables = sorted({f.table for f in spec.of_kind("image")})
    for t in tables:
        if not sources[t]:
            raise ValueError(f"the spec's image features need the {t} table: "
                             f"--{t[:-1] if t == 'items' else 'query'}_embeddings")
    dim = table_dim(item_embeddings, "items")
    scratch = os.path.join(output_dir, "ctr", f".joining-{split}-{os.getpid()}")
    if tf.io.gfile.exists(scratch):
        tf.io.gfile.rmtree(scratch)

    def build(p: beam.Pipeline) -> None:
        batches = (p | "ReadRecords" >> common.ReadNamedRecords(records_pattern)
                   | "Progress" >> beam.ParDo(common.Progress(NAMESPACE, "records read"))
                   | "Batch" >> beam.BatchElements(min_batch_size=BATCH, max_batch_size=BATCH))
        item_vectors = read_table(p, item_embeddings, "items")
        center = None
        if mode == "vector":  # the model centres both tables on the item table's mean
            center = beam.pvalue.AsSingleton(
                item_vectors | "Vectors" >> beam.Values()
                | "Centre" >> beam.CombineGlobally(_MeanVector()))
        entries = []
        for t in tables:
            vectors = item_vectors if t == "items" else read_table(p, sources[t], t)
            keyed = vectors | f"Key{t}" >> beam.Map(lambda kv, t=t: ((t, int(kv[0])), kv[1]))
            if mode == "vector":
                keyed = keyed | f"Centre{t}" >> beam.Map(_centred, center)
            if mode != "cluster_id":
                keyed = keyed | f"Bytes{t}" >> beam.Map(_as_bytes)
            else:
                keyed = (keyed | f"Clusters{t}" >> common.NearestCentroids(centroids, BATCH)
                         | f"PlusOne{t}" >> beam.Map(lambda kv: (kv[0], kv[1] + 1)))
            entries.append(keyed)
        entry = (entries | "Entries" >> beam.Flatten()) if entries else (
            p | "NoEntries" >> beam.Create([]))
        assemble = Assembler(spec, mode, dim)
        if table_in_memory:
            joined = batches | "JoinInMemory" >> beam.ParDo(
                _JoinInMemory(spec, assemble), beam.pvalue.AsDict(entry))
        else:
            looked = batches | "Lookups" >> beam.ParDo(_Lookups(spec)).with_outputs(
                "wants", main="records")
            answers = ({"entry": entry, "wants": looked.wants}
                       | "JoinIds" >> beam.CoGroupByKey() | "Answer" >> beam.FlatMap(_answer))
            joined = ({"record": looked.records, "entries": answers}
                      | "ByRecord" >> beam.CoGroupByKey()
                      | "Assemble" >> beam.ParDo(_Assemble(assemble)))
        _ = joined | "Write" >> beam.io.WriteToTFRecord(
            os.path.join(scratch, split), file_name_suffix=".tfrecord",
            num_shards=num_shards, shard_name_template="-SSSSS-of-NNNNN")

    try:
        counters = common.run(NAMESPACE, build, beam_args)
        new = sorted(tf.io.gfile.glob(os.path.join(scratch, f"{split}-*.tfrecord")))
        paths = records.replace_split(output_dir, "ctr", split, new)
    finally:
        if tf.io.gfile.exists(scratch):
            tf.io.gfile.rmtree(scratch)
    joined = {"mode": mode, "dim": dim, "records": records_pattern,
              "item_embeddings": item_embeddings, "query_embeddings": query_embeddings,
              "centroids": centroids, "spec": spec.name, "table_in_memory": table_in_memory,
              "columns": {f.name: ctr_spec.joined_column(f.name, mode)
                          for f in spec.of_kind("image")}, "counters": counters}
    with tf.io.gfile.GFile(os.path.join(output_dir, "ctr", f"join-{split}.json"), "w") as f:
        json.dump(joined, f, indent=1)
    return {"paths": paths, "counters": counters}


def main(argv: Sequence[str] | None = None) -> None:
    p = common.command_line(__doc__)
    p.add_argument("--records", required=True, help="The `ctr` records (globs).")
    p.add_argument("--ctr_spec", default=ctr_spec.DEFAULT)
    p.add_argument("--mode", default="vector", choices=MODES,
                   help="The CTR model's image_feature_mode the entries are for.")
    p.add_argument("--item_embeddings", required=True,
                   help="The item table: the embed pipeline's table TFRecords or an npz.")
    p.add_argument("--query_embeddings", default="", help="The query photos' table.")
    p.add_argument("--centroids", default="", help="mode cluster_id: the clusters.npz.")
    p.add_argument("--output_dir", required=True,
                   help="Data dir to write the joined records into (ctr/<split>-*).")
    p.add_argument("--split", default="train")
    p.add_argument("--num_shards", type=int, default=0, help=common.NUM_SHARDS_HELP)
    p.add_argument("--table_in_memory", action="store_true",
                   help="Hold the tables in every worker's memory (a side input) instead of a "
                        "shuffle join: for tables that fit, much faster and lighter.")
    args, beam_args = p.parse_known_args(argv)
    try:
        out = run(args.records, ctr_spec.load(args.ctr_spec), args.mode, args.item_embeddings,
                  args.output_dir, args.split, args.query_embeddings, args.centroids,
                  args.num_shards, args.table_in_memory, beam_args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"join: {len(out['paths'])} files of joined 'ctr' records under "
          f"{os.path.join(args.output_dir, 'ctr')}")


if __name__ == "__main__":
    main()

"""What the CTR model looks its inputs up in: vocabularies and statistics of the training data, and
the frozen image-feature tables (paper 002 App. B: vectors for Vector and SimScore, nearest
centroids for Cluster-ID).

Lookups read their ids from text files (`id_lookup`), which a SavedModel carries as assets: the
graph and `saved_model.pb` do not grow with the vocabularies (a proto over 2 GB cannot be saved),
and under the parameter-server strategy each worker loads its copy of the table from the file.

`Vocabularies.from_training_data` makes one streaming pass over the training records, reading only
the columns the feature spec needs: memory holds the distinct ids seen (not the records), a
bounded sample of each bucketized numeric feature for its quantiles, and running sums for
normalised ones. They are saved in the model dir (`vocabularies.npz`), so a resumed or exported
model looks ids up exactly as it was trained.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import uuid

import numpy as np
import tensorflow as tf
import tf_keras

from trainer.ctr import spec as ctr_spec
from trainer.data import npz, pipeline
from trainer.features import clusters as clusters_lib

log = logging.getLogger(__name__)
QUANTILE_SAMPLE = 1_000_000  # values kept per bucketized feature for its quantiles


class _Counter:
    """Distinct int64 values with their counts, merged in amortised O(n log n)."""

    def __init__(self) -> None:
        self.values = np.zeros([0], np.int64)
        self.counts = np.zeros([0], np.int64)
        self._pending: list = []
        self._pending_size = 0

    def add(self, values: np.ndarray) -> None:
        v, c = np.unique(values, return_counts=True)
        self._pending.append((v, c))
        self._pending_size += len(v)
        if self._pending_size > max(len(self.values), 1 << 16):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        v = np.concatenate([self.values] + [p[0] for p in self._pending])
        c = np.concatenate([self.counts] + [p[1] for p in self._pending])
        self.values, inverse = np.unique(v, return_inverse=True)
        self.counts = np.bincount(inverse, weights=c).astype(np.int64)
        self._pending, self._pending_size = [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._merge()
        return self.values, self.counts


class _Reservoir:
    """A uniform sample of at most `size` values of a stream (all of them while they fit)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seen = size, 0
        self.values = np.zeros([0], np.float64)
        self.rng = np.random.default_rng(seed)

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64)
        room = max(self.size - len(self.values), 0)
        self.values = np.concatenate([self.values, values[:room]])
        rest = values[room:]
        if len(rest):  # Algorithm R: the i-th value replaces a random slot with p = size / i
            slots = self.rng.integers(0, self.seen + room + np.arange(1, len(rest) + 1))
            keep = slots < self.size
            self.values[slots[keep]] = rest[keep]
        self.seen += len(values)


@dataclasses.dataclass
class Vocabularies:
    """Per lookup table (named after the id feature that owns it) the sorted vocabulary and each
    id's count in the training data; per bucketized numeric feature its bucket boundaries; per
    normalised one its [mean, std] over each of its values ([2, length]).

    Built here in one process (`from_training_data`) or by the Beam vocab pipeline
    (`trainer.pipelines.vocab`) for data of any size; both go through `batch_values` and
    `from_statistics`, so they agree."""

    ids: dict
    boundaries: dict
    moments: dict
    counts: dict = dataclasses.field(default_factory=dict)
    # The day each id was last seen (the daily cycle's, `trainer.ctr.daily`); empty otherwise.
    last_seen: dict = dataclasses.field(default_factory=dict)
    # Where the lookups' id files go (`id_lookup`); None: the ids are constants of the graph.
    files_dir: str | None = None

    @staticmethod
    def columns(spec: ctr_spec.CtrSpec) -> tuple[str, ...]:
        """The record columns the vocabularies are made from."""
        tables = [t.name for t in spec.tables if not t.hash_bins]
        return tuple(dict.fromkeys([f.name for t in tables for f in spec.sharing(t)]
                                   + [f.name for f in spec.of_kind("numeric")]))

    @staticmethod
    def batch_values(spec: ctr_spec.CtrSpec, b: dict) -> tuple[dict, dict, dict]:
        """What a parsed batch (`columns`, numpy) adds: ({table: ids}, {bucketized feature:
        values}, {normalised feature: [3, length] float64 count, sum and sum of squares})."""
        ids = {}
        for t in spec.tables:
            if not t.hash_bins:
                ids[t.name] = np.concatenate([
                    b[f.name][b[f.name + "_mask"]] if f.kind == "sequence" else b[f.name]
                    for f in spec.sharing(t.name)])
        samples, sums = {}, {}
        for f in spec.of_kind("numeric"):
            x = b[f.name]
            if f.length > 1:
                x = x[b[f.name + "_mask"].all(axis=1)]  # rows that hold the vector
            x = np.log1p(np.maximum(x, 0)) if f.log else x
            if f.transform == "bucketize":
                samples[f.name] = np.asarray(x, np.float64).reshape(-1)
            else:
                x = np.asarray(x, np.float64).reshape(len(x), f.length)
                sums[f.name] = np.stack([np.full(f.length, float(len(x))), x.sum(0),
                                         (x ** 2).sum(0)])
        return ids, samples, sums

    @classmethod
    def from_statistics(cls, spec: ctr_spec.CtrSpec, counts: dict, samples: dict, sums: dict,
                        min_count: int = 1, source: str = "") -> Vocabularies:
        """From {table: (sorted ids, counts)}, {bucketized feature: sample of values} and
        {normalised feature: [3, length] sums}."""
        ids, kept = {}, {}
        for t in spec.tables:
            if t.hash_bins:
                continue
            values, n = counts.get(t.name, (np.zeros([0], np.int64), np.zeros([0], np.int64)))
            if not len(values):
                raise ValueError(f"{source}: feature(s) {[f.name for f in spec.sharing(t.name)]}"
                                 " hold no value in any training record")
            keep = np.asarray(n) >= min_count
            ids[t.name] = np.asarray(values, np.int64)[keep]
            kept[t.name] = np.asarray(n, np.int64)[keep]
        boundaries = {}
        for f in spec.of_kind("numeric"):
            if f.transform == "bucketize":
                qs = np.linspace(0, 1, f.buckets + 1)[1:-1]
                sample = np.asarray(samples.get(f.name, []), np.float64)
                boundaries[f.name] = np.unique(np.quantile(sample, qs)).astype(np.float32)
        moments = {}
        for f in spec.of_kind("numeric"):
            if f.transform == "normalize":
                n, s, ss = sums.get(f.name, np.zeros([3, f.length]))
                mean = s / np.maximum(n, 1)
                std = np.sqrt(np.maximum(ss / np.maximum(n, 1) - mean ** 2, 0.0))
                moments[f.name] = np.stack([mean, np.maximum(std, 1e-6)]).astype(np.float32)
        return cls(ids, boundaries, moments, kept)

    @classmethod
    def from_training_data(cls, pattern: str, spec: ctr_spec.CtrSpec, min_count: int = 1,
                           skip_bad_records: bool = False, seed: int = 0) -> Vocabularies:
        counters = {t.name: _Counter() for t in spec.tables if not t.hash_bins}
        samples: dict = {}
        sums: dict = {}
        pipe = pipeline.InputPipeline(pipeline.InputConfig(
            pattern, spec.record_kind(), global_batch_size=4096, decode_images=False,
            shuffle=False, repeat=False, drop_remainder=False, deterministic=True,
            skip_bad_records=skip_bad_records, features=cls.columns(spec)))
        records = 0
        with pipe.errors_named():
            for batch in pipe.dataset():
                b = {k: v.numpy() for k, v in batch.items()}
                records += len(next(iter(b.values()))) if b else 0
                ids, values, moments = cls.batch_values(spec, b)
                for t, v in ids.items():
                    counters[t].add(v)
                for name, x in values.items():
                    samples.setdefault(name, _Reservoir(QUANTILE_SAMPLE, seed)).add(x)
                for name, m in moments.items():
                    sums[name] = sums.get(name, 0) + m
        vocabularies = cls.from_statistics(
            spec, {t: c.result() for t, c in counters.items()},
            {name: r.values for name, r in samples.items()}, sums, min_count, pattern)
        log.info("vocabularies from %d training records: %s", records,
                 {t: len(v) for t, v in vocabularies.ids.items()})
        return vocabularies

    def save(self, path: str) -> None:
        npz.write(path, **{f"ids/{k}": v for k, v in self.ids.items()},
                  **{f"counts/{k}": v for k, v in self.counts.items()},
                  **{f"last_seen/{k}": v for k, v in self.last_seen.items()},
                  **{f"boundaries/{k}": v for k, v in self.boundaries.items()},
                  **{f"moments/{k}": v for k, v in self.moments.items()})

    @classmethod
    def load(cls, path: str, files_dir: str | None = None) -> Vocabularies:
        data = npz.read(path)
        parts: dict = {"ids": {}, "boundaries": {}, "moments": {}, "counts": {}, "last_seen": {}}
        for key, value in data.items():
            group, _, name = key.partition("/")
            parts[group][name] = value
        return cls(**parts, files_dir=files_dir)


def id_lookup(ids: np.ndarray, name: str, files_dir: str | None = None
              ) -> tf_keras.layers.IntegerLookup:
    """id -> row: i + 1 for ids[i], 0 for any other id. With `files_dir`, the ids are written to
    `files_dir/<name>.txt` (one per line; left as it is when it holds them already) and the
    lookup table is initialised from that file, an asset of a SavedModel, instead of a constant
    of the graph."""
    ids = np.asarray(ids, np.int64)
    if not files_dir:
        return tf_keras.layers.IntegerLookup(vocabulary=ids, num_oov_indices=1, mask_token=None,
                                             name=name)
    path = os.path.join(files_dir, f"{name}.txt")
    text = "".join(f"{i}\n" for i in ids.tolist())
    if not tf.io.gfile.exists(path) or tf.io.gfile.GFile(path).read() != text:
        tf.io.gfile.makedirs(files_dir)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with tf.io.gfile.GFile(tmp, "w") as f:
            f.write(text)
        tf.io.gfile.rename(tmp, path, overwrite=True)
    return tf_keras.layers.IntegerLookup(vocabulary=path, num_oov_indices=1, mask_token=None,
                                         name=name)


def gather_rows(params, ids: tf.Tensor) -> tf.Tensor:
    """Rows of `params` for `ids` of any shape: a variable, or one sharded over parameter servers
    (a `ShardedVariable`, whose lookups take 1-D ids only)."""
    return _by_flat_ids(lambda flat: tf.nn.embedding_lookup(params, flat), ids)


def _by_flat_ids(lookup, ids: tf.Tensor) -> tf.Tensor:
    """`lookup` ([n] ids -> [n, ...] rows) applied to `ids` of any shape -> [*ids.shape, ...]."""
    flat = lookup(tf.reshape(ids, [-1]))
    out = tf.reshape(flat, tf.concat([tf.shape(ids), tf.shape(flat)[1:]], 0))
    return tf.ensure_shape(out, ids.shape.concatenate(flat.shape[1:]))


class Embedding(tf_keras.layers.Embedding):
    """Keras' embedding layer, for ids of any shape also when its table is sharded over parameter
    servers (`gather_rows`)."""

    def call(self, inputs):
        return _by_flat_ids(super().call, inputs)


class ImageTable(tf_keras.layers.Layer):
    """Frozen id -> image vector lookup: row 0 (ids missing from the table) is zeros. With
    `center`, the vectors are stored as unit(v - center)."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, center: np.ndarray | None = None,
                 files_dir: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.lookup = id_lookup(ids, f"{self.name}_ids", files_dir)
        vectors = np.asarray(vectors, np.float32)
        self.center = None if center is None else np.asarray(center, np.float32)
        if center is not None:
            vectors = vectors - center
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        table = np.concatenate([np.zeros([1, vectors.shape[1]], np.float32), vectors])
        self.table = self.add_weight(
            "vectors", shape=table.shape, trainable=False,
            initializer=tf_keras.initializers.Constant(table))
        self.dim = int(vectors.shape[1])

    def rows(self, ids: tf.Tensor) -> tf.Tensor:
        """Table rows of `ids` (0 for unknown ids)."""
        return self.lookup(ids)

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        return gather_rows(self.table, self.rows(ids))

    def from_vectors(self, vectors: tf.Tensor) -> tf.Tensor:
        """What the table would hold for these encoder vectors [N, D] (a new photo or item)."""
        if self.center is None:
            return vectors
        x = vectors - self.center
        return x / tf.maximum(tf.norm(x, axis=-1, keepdims=True), 1e-12)


class ClusterTable(tf_keras.layers.Layer):
    """Frozen id -> cluster id + 1 lookup (0 for ids missing from the table), from the nearest
    centroid of each id's vector; the centroids are kept as a weight, saved with the model."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, centroids: np.ndarray,
                 files_dir: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.lookup = id_lookup(ids, f"{self.name}_ids", files_dir)
        assigned = clusters_lib.Clusters(centroids).assign(vectors) + 1
        self.table = self.add_weight(
            "cluster_ids", shape=[len(ids) + 1], dtype=tf.int64, trainable=False,
            initializer=tf_keras.initializers.Constant(np.concatenate([[0], assigned])))
        self.centroids = self.add_weight(
            "centroids", shape=centroids.shape, trainable=False,
            initializer=tf_keras.initializers.Constant(centroids))

    def rows(self, ids: tf.Tensor) -> tf.Tensor:
        return self.lookup(ids)

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        return gather_rows(self.table, self.lookup(ids))

    def from_vectors(self, vectors: tf.Tensor) -> tf.Tensor:
        """Nearest centroid + 1 of encoder vectors [N, D] (normalised first), in the graph: the
        assignment `Clusters.assign` makes with faiss, for a new photo or item."""
        x = vectors / tf.maximum(tf.norm(vectors, axis=-1, keepdims=True), 1e-12)
        c = tf.convert_to_tensor(self.centroids)
        distance = tf.reduce_sum(c * c, axis=1)[None] - 2.0 * tf.matmul(x, c, transpose_b=True)
        return tf.argmin(distance, axis=1, output_type=tf.int64) + 1

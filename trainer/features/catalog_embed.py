"""Catalog batch encoding (`--stage=embed`): what follows the Beam embed pipeline
(`trainer.pipelines.embed`, which runs the exported encoder over the catalog) in one process.

From the pipeline's sharded embedding table, `finish` writes in `out_dir`:

  embeddings.npz   <id> (item_id or query_id), category_id, embedding [N, D] sorted by id and,
                   with centroids, cluster_id: each item's nearest k-means centroid (paper 002
                   App. B's Cluster-ID for items the clustering never saw)
  catalog.faiss    a faiss inner-product index over the embeddings (row i = the i-th id) for
                   visual search: 'exact' or inverted lists ('ivf', trained on the
                   pipeline's sample, for large catalogs)
  manifest.json    what was encoded with what, and how fast
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import faiss
import numpy as np
import tensorflow as tf

from trainer.configs import CatalogEmbedConfig
from trainer.data import jsonfile, npz, pipeline, schema, validate
from trainer.features import index as index_lib

log = logging.getLogger(__name__)
# What the embed pipeline (`trainer.pipelines.embed`) leaves in out_dir for `finish`.
TABLE_DIR = "table"  # the embedding table: embeddings-*.tfrecord
MANIFEST = "manifest.json"  # what was encoded with what, and how fast
SAMPLE = "index_sample.npz"  # 'sample': the vectors an 'ivf' index trains on


def export_fingerprint(version_dir: str) -> str:
    """The SavedModel's fingerprint (its saved_model.pb and variables), as hex."""
    try:
        fp = tf.saved_model.experimental.read_fingerprint(version_dir)
        return f"{fp.saved_model_checksum:016x}{fp.checkpoint_hash:016x}"
    except (FileNotFoundError, tf.errors.NotFoundError, ValueError):  # exported without one
        digest = hashlib.sha256()
        for name in ("saved_model.pb", "variables/variables.index"):
            path = os.path.join(version_dir, name)
            if tf.io.gfile.exists(path):
                digest.update(tf.io.gfile.GFile(path, "rb").read())
        return digest.hexdigest()[:32]


def load_index(path: str) -> faiss.Index:
    with tf.io.gfile.GFile(path, "rb") as f:
        return faiss.deserialize_index(np.frombuffer(f.read(), np.uint8))


def read_table(pattern: str) -> dict:
    """The embedding table's TFRecords (`trainer.pipelines.embed`) as columns, in file order."""
    files = pipeline.list_files(pattern)
    first = next(iter(tf.data.TFRecordDataset(files[:1]).take(1)), None)
    keys = [] if first is None else list(
        tf.train.Example.FromString(first.numpy()).features.feature)
    spec = {k: tf.io.FixedLenFeature([], tf.int64) for k in keys if k != "embedding"}
    spec["embedding"] = tf.io.RaggedFeature(tf.float32)
    columns: dict = {k: [] for k in spec}
    for batch in tf.data.TFRecordDataset(files).batch(8192).map(
            lambda s: tf.io.parse_example(s, spec)):
        for k, v in batch.items():
            columns[k].append(v.to_tensor().numpy() if k == "embedding" else v.numpy())
    return {k: np.concatenate(v) for k, v in columns.items() if v}


def finish(cfg: CatalogEmbedConfig, version_dir: str, kind: str, stats: dict) -> dict:
    """embeddings.npz, catalog.faiss and manifest.json from the pipeline's table in `out_dir`;
    returns the manifest."""
    id_name = schema.IMAGE_ID[kind]
    table = read_table(os.path.join(cfg.out_dir, TABLE_DIR, "embeddings-*.tfrecord"))
    order = np.argsort(table[id_name], kind="stable")
    table = {k: v[order] for k, v in table.items()}
    files = pipeline.list_files(cfg.catalog_pattern)
    validate.unique_ids(table[id_name], files, id_name)
    t0 = time.time()
    sample = npz.read(os.path.join(cfg.out_dir, SAMPLE))["sample"] if cfg.index == "ivf" else None
    index = index_lib.build(table["embedding"], cfg.index, nprobe=cfg.nprobe, sample=sample)
    index_seconds = time.time() - t0
    npz.write(os.path.join(cfg.out_dir, "embeddings.npz"), **table)
    with tf.io.gfile.GFile(os.path.join(cfg.out_dir, "catalog.faiss"), "wb") as f:
        f.write(faiss.serialize_index(index).tobytes())
    seconds = stats.get("seconds", 0.0)
    manifest = {"items": int(len(table[id_name])), "dim": int(table["embedding"].shape[1]),
                "kind": kind, "export": version_dir,
                "export_fingerprint": export_fingerprint(version_dir), "catalog": files,
                "index": cfg.index, "index_seconds": round(index_seconds, 2),
                "centroids": cfg.centroids,
                "clusters": int(table["cluster_id"].max() + 1) if cfg.centroids else None,
                "pipeline_seconds": round(seconds, 2),
                "images_per_second": round(len(table[id_name]) / max(seconds, 1e-9), 1),
                "counters": stats.get("counters", {})}
    with tf.io.gfile.GFile(os.path.join(cfg.out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def load_manifest(out_dir: str) -> dict | None:
    """The manifest of a catalog embedding in `out_dir`, or None if there is none."""
    return jsonfile.read(os.path.join(out_dir, MANIFEST))

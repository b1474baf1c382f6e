"""Catalog batch encoding (`--stage=embed`): the exported encoder over the whole catalog.

Runs the encoder SavedModel's `encode_images` signature (what TF Serving runs, so offline and
online vectors agree) over every catalog record in batches and writes, in `out_dir`:

  embeddings.npz   item_id, category_id, embedding [N, D] (file order) and, with centroids,
                   cluster_id: each item's nearest k-means centroid (paper 002 App. B's Cluster-ID
                   for items the clustering never saw)
  catalog.faiss    a faiss inner-product index over the embeddings (row i = item_id[i]) for
                   visual search: exact ('flat') or inverted lists ('ivf', for large catalogs)
  manifest.json    what was encoded with what, and how fast

Work is split by catalog file across `num_workers` processes (`worker_index`), and within a file
into chunks of `chunk_records` records written as parts/; a rerun skips finished chunks, so a
killed job resumes. Worker 0 waits for every file's parts, then merges and indexes.
"""
from __future__ import annotations

import json
import logging
import os
import time

import faiss
import numpy as np
import tensorflow as tf

from trainer.configs import CatalogEmbedConfig
from trainer.data import npz, parse, pipeline, schema, validate
from trainer.features import clusters as clusters_lib
from trainer.features import versions

log = logging.getLogger(__name__)


def _part(out_dir: str, file_index: int, chunk: int) -> str:
    return os.path.join(out_dir, "parts", f"file-{file_index:05d}-chunk-{chunk:05d}.npz")


def _done(out_dir: str, file_index: int) -> str:
    return os.path.join(out_dir, "parts", f"file-{file_index:05d}.done")


def encode_shard(cfg: CatalogEmbedConfig) -> dict:
    """Encodes this worker's catalog files into parts/; returns {'encoded', 'skipped',
    'seconds'} (records encoded now, records of chunks already done)."""
    files = pipeline.list_files(cfg.catalog_pattern)
    if not 0 <= cfg.worker_index < cfg.num_workers:
        raise ValueError(f"worker_index {cfg.worker_index} is not in [0, {cfg.num_workers})")
    mine = [(i, f) for i, f in enumerate(files) if i % cfg.num_workers == cfg.worker_index]
    version_dir = versions.version_dir(cfg.encoder_export)
    encode = tf.saved_model.load(version_dir).signatures["encode_images"]
    parser = parse.RecordParser(schema.CATALOG, features=("item_id", "category_id", "image"),
                                decode=False)
    tf.io.gfile.makedirs(os.path.join(cfg.out_dir, "parts"))
    encoded = skipped = 0
    t0 = time.time()
    for n, (file_index, path) in enumerate(mine):
        if tf.io.gfile.exists(_done(cfg.out_dir, file_index)):
            with tf.io.gfile.GFile(_done(cfg.out_dir, file_index)) as f:
                skipped += json.loads(f.read())["records"]
            continue
        ds = tf.data.TFRecordDataset(path, validate.compression_of(path)).enumerate().batch(
            cfg.chunk_records)
        records = 0
        for chunk, (index, serialized) in enumerate(ds):
            records += int(index.shape[0])
            part = _part(cfg.out_dir, file_index, chunk)
            if tf.io.gfile.exists(part):
                skipped += int(index.shape[0])
                continue
            names = parse.record_names(tf.constant(path), index)
            try:
                rows = parser(names, serialized)
            except tf.errors.InvalidArgumentError as e:
                raise ValueError(_bad_record(e.message, path)) from e
            emb = [encode(images=rows["image"][s:s + cfg.batch_size])["embedding"].numpy()
                   for s in range(0, int(index.shape[0]), cfg.batch_size)]
            npz.write(part, item_id=rows["item_id"].numpy(),
                       category_id=rows["category_id"].numpy(), embedding=np.concatenate(emb))
            encoded += int(index.shape[0])
            rate = encoded / max(time.time() - t0, 1e-9)
            print(f"embed: worker {cfg.worker_index}/{cfg.num_workers} file {n + 1}/{len(mine)} "
                  f"chunk {chunk}: {encoded} images encoded ({rate:.0f}/s), {skipped} resumed",
                  flush=True)
        with tf.io.gfile.GFile(_done(cfg.out_dir, file_index), "w") as f:
            f.write(json.dumps({"file": path, "records": records,
                                "chunks": -(-records // cfg.chunk_records)}))
    return {"encoded": encoded, "skipped": skipped, "seconds": time.time() - t0,
            "export": version_dir, "files": len(mine)}


def _bad_record(message: str, path: str) -> str:
    bad = parse.bad_record_message(message)
    if bad:
        return f"{bad[0]}: feature '{bad[1]}': {bad[2]}"
    return f"{path}: {message.splitlines()[0]}"


def merge(cfg: CatalogEmbedConfig, shard_stats: dict | None = None) -> dict:
    """Worker 0: waits for every file's parts, then writes embeddings.npz, catalog.faiss and
    manifest.json; returns the manifest."""
    files = pipeline.list_files(cfg.catalog_pattern)
    deadline = time.time() + cfg.merge_timeout_seconds
    while True:
        missing = [i for i in range(len(files)) if not tf.io.gfile.exists(_done(cfg.out_dir, i))]
        if not missing:
            break
        if time.time() > deadline:
            raise TimeoutError(f"{cfg.out_dir}: files {missing[:5]} of the catalog were not "
                               f"encoded within {cfg.merge_timeout_seconds:.0f}s (did every "
                               "worker run?)")
        time.sleep(2.0)
    parts = []
    for i in range(len(files)):
        done = json.loads(tf.io.gfile.GFile(_done(cfg.out_dir, i)).read())
        parts += [npz.read(_part(cfg.out_dir, i, c)) for c in range(done["chunks"])]
    table = {k: np.concatenate([p[k] for p in parts]) for k in ("item_id", "category_id",
                                                                  "embedding")}
    ids, counts = np.unique(table["item_id"], return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{cfg.catalog_pattern}: item_id {ids[counts > 1][:5].tolist()} occurs "
                         "in more than one record")
    if cfg.centroids:
        centroids = clusters_lib.Clusters.load(cfg.centroids)
        table["cluster_id"] = centroids.assign(table["embedding"])
    t0 = time.time()
    index = build_index(table["embedding"], cfg.index, cfg.nprobe)
    index_seconds = time.time() - t0
    npz.write(os.path.join(cfg.out_dir, "embeddings.npz"), **table)
    with tf.io.gfile.GFile(os.path.join(cfg.out_dir, "catalog.faiss"), "wb") as f:
        f.write(faiss.serialize_index(index).tobytes())
    manifest = {"items": int(len(ids)), "dim": int(table["embedding"].shape[1]),
                "export": versions.version_dir(cfg.encoder_export), "catalog": files,
                "index": cfg.index, "index_seconds": round(index_seconds, 2),
                "centroids": cfg.centroids,
                "clusters": int(table["cluster_id"].max() + 1) if cfg.centroids else None,
                "worker_0": shard_stats or {}}
    with tf.io.gfile.GFile(os.path.join(cfg.out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def build_index(embeddings: np.ndarray, kind: str = "flat", nprobe: int = 16) -> faiss.Index:
    """An inner-product (cosine, on unit vectors) faiss index over `embeddings`."""
    x = np.ascontiguousarray(embeddings, np.float32)
    d = x.shape[1]
    index: faiss.Index
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = max(1, min(len(x) // 39, int(4 * np.sqrt(len(x)))))  # faiss wants >= 39 per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = min(nprobe, nlist)
    else:
        raise ValueError(f"index must be 'flat' or 'ivf', got '{kind}'")
    index.add(x)
    return index


def load_index(path: str) -> faiss.Index:
    with tf.io.gfile.GFile(path, "rb") as f:
        return faiss.deserialize_index(np.frombuffer(f.read(), np.uint8))


def run(cfg: CatalogEmbedConfig) -> dict:
    """This worker's share, then (worker 0) the merge. Returns the manifest (worker 0) or this
    worker's statistics."""
    if cfg.centroids and not tf.io.gfile.exists(cfg.centroids):
        raise FileNotFoundError(f"centroids {cfg.centroids} do not exist (a clusters.npz from "
                                "--stage=cluster or a cluster_id CTR model dir)")
    stats = encode_shard(cfg)
    if cfg.worker_index != 0:
        return stats
    return merge(cfg, stats)

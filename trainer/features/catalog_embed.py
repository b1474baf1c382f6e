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
into chunks of `chunk_records` records written as parts/KEY/; a rerun skips finished chunks, so a
killed job resumes. KEY names what the parts were made from (the export's version and
fingerprint, the chunk size, the catalog files and their sizes): a new encoder version or a changed
catalog starts over instead of merging stale vectors. Worker 0 waits for every file's parts, then
merges, indexes and removes the parts of other keys.
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
from trainer.data import npz, parse, pipeline, schema, validate
from trainer.features import clusters as clusters_lib
from trainer.features import versions

log = logging.getLogger(__name__)


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


def parts_key(cfg: CatalogEmbedConfig, version_dir: str, files: list[str]) -> str:
    """The parts' subdirectory: `v<version>-<hash>` of the export, chunking and catalog files."""
    digest = hashlib.sha256(json.dumps([
        export_fingerprint(version_dir), cfg.chunk_records,
        [(f, tf.io.gfile.stat(f).length) for f in files]]).encode()).hexdigest()[:12]
    return f"v{os.path.basename(version_dir.rstrip('/'))}-{digest}"


def _part(parts: str, file_index: int, chunk: int) -> str:
    return os.path.join(parts, f"file-{file_index:05d}-chunk-{chunk:05d}.npz")


def _done(parts: str, file_index: int) -> str:
    return os.path.join(parts, f"file-{file_index:05d}.done")


def _parts_dir(cfg: CatalogEmbedConfig, version_dir: str, files: list[str]) -> str:
    return os.path.join(cfg.out_dir, "parts", parts_key(cfg, version_dir, files))


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
    parts = _parts_dir(cfg, version_dir, files)
    stale = [d for d in _listdir(os.path.dirname(parts)) if d != os.path.basename(parts)]
    if stale:
        print(f"embed: {cfg.out_dir}/parts holds parts of another encoder export or catalog "
              f"({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}); they are not used, "
              f"{os.path.basename(parts)} starts over (worker 0 removes them after the merge)")
    tf.io.gfile.makedirs(parts)
    encoded = skipped = 0
    t0 = time.time()
    for n, (file_index, path) in enumerate(mine):
        if tf.io.gfile.exists(_done(parts, file_index)):
            with tf.io.gfile.GFile(_done(parts, file_index)) as f:
                skipped += json.loads(f.read())["records"]
            continue
        ds = tf.data.TFRecordDataset(path, validate.compression_of(path)).enumerate().batch(
            cfg.chunk_records)
        records = 0
        for chunk, (index, serialized) in enumerate(ds):
            records += int(index.shape[0])
            part = _part(parts, file_index, chunk)
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
        with tf.io.gfile.GFile(_done(parts, file_index), "w") as f:
            f.write(json.dumps({"file": path, "records": records,
                                "chunks": -(-records // cfg.chunk_records)}))
    return {"encoded": encoded, "skipped": skipped, "seconds": time.time() - t0,
            "export": version_dir, "files": len(mine)}


def _listdir(path: str) -> list[str]:
    return [d.rstrip("/") for d in tf.io.gfile.listdir(path)] if tf.io.gfile.isdir(path) else []


def _bad_record(message: str, path: str) -> str:
    bad = parse.bad_record_message(message)
    if bad:
        return f"{bad[0]}: feature '{bad[1]}': {bad[2]}"
    return f"{path}: {message.splitlines()[0]}"


def merge(cfg: CatalogEmbedConfig, shard_stats: dict | None = None) -> dict:
    """Worker 0: waits for every file's parts, then writes embeddings.npz, catalog.faiss and
    manifest.json; returns the manifest."""
    files = pipeline.list_files(cfg.catalog_pattern)
    # The version this worker encoded with, not one exported since.
    version_dir = (shard_stats or {}).get("export") or versions.version_dir(cfg.encoder_export)
    parts_dir = _parts_dir(cfg, version_dir, files)
    deadline = time.time() + cfg.merge_timeout_seconds
    while True:
        missing = [i for i in range(len(files)) if not tf.io.gfile.exists(_done(parts_dir, i))]
        if not missing:
            break
        if time.time() > deadline:
            raise TimeoutError(f"{cfg.out_dir}: files {missing[:5]} of the catalog were not "
                               f"encoded within {cfg.merge_timeout_seconds:.0f}s (did every "
                               f"worker run, with export {version_dir}?)")
        time.sleep(2.0)
    parts = []
    for i in range(len(files)):
        done = json.loads(tf.io.gfile.GFile(_done(parts_dir, i)).read())
        parts += [npz.read(_part(parts_dir, i, c)) for c in range(done["chunks"])]
    table = {k: np.concatenate([p[k] for p in parts]) for k in ("item_id", "category_id",
                                                                  "embedding")}
    validate.unique_ids(table["item_id"], files, "item_id")
    if cfg.centroids:
        centroids = clusters_lib.Clusters.load(cfg.centroids)
        table["cluster_id"] = centroids.assign(table["embedding"])
    t0 = time.time()
    index = build_index(table["embedding"], cfg.index, cfg.nprobe)
    index_seconds = time.time() - t0
    npz.write(os.path.join(cfg.out_dir, "embeddings.npz"), **table)
    with tf.io.gfile.GFile(os.path.join(cfg.out_dir, "catalog.faiss"), "wb") as f:
        f.write(faiss.serialize_index(index).tobytes())
    manifest = {"items": int(len(table["item_id"])), "dim": int(table["embedding"].shape[1]),
                "export": version_dir, "export_fingerprint": export_fingerprint(version_dir),
                "parts": os.path.basename(parts_dir), "catalog": files,
                "index": cfg.index, "index_seconds": round(index_seconds, 2),
                "centroids": cfg.centroids,
                "clusters": int(table["cluster_id"].max() + 1) if cfg.centroids else None,
                "worker_0": shard_stats or {}}
    with tf.io.gfile.GFile(os.path.join(cfg.out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    for name in _listdir(os.path.dirname(parts_dir)):  # another export's or catalog's
        if name != os.path.basename(parts_dir):
            path = os.path.join(os.path.dirname(parts_dir), name)
            (tf.io.gfile.rmtree if tf.io.gfile.isdir(path) else tf.io.gfile.remove)(path)
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

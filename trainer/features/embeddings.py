"""Image embedding tables: every catalog item's and query photo's vector from one encoder, the
hand-off from an encoder stage to the CTR stages (data -> encoder -> embeddings -> features).

A table is computed once per trained encoder and cached beside its checkpoint as
`<encoder model_dir>/embeddings.npz`, stamped with the checkpoint and the input files so that a
retrained encoder or other data is never served from a stale cache.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from trainer.data import npz, pipeline
from trainer.models import encoder as encoder_lib

log = logging.getLogger(__name__)
FILE = "embeddings.npz"


@dataclasses.dataclass
class EmbeddingTable:
    """L2-normalised encoder vectors of the catalog and of the query photos, in file order.

    Attributes:
      item_id, category_id, impressions_30d: [N] catalog columns.
      item_vector: [N, D] float32.
      query_id: [Q] query photo ids; query_vector: [Q, D] float32.
      source: What the table was computed from (checkpoint and files), for cache checks.
    """

    item_id: np.ndarray
    category_id: np.ndarray
    impressions_30d: np.ndarray
    item_vector: np.ndarray
    query_id: np.ndarray
    query_vector: np.ndarray
    source: str = ""

    @property
    def dim(self) -> int:
        return int(self.item_vector.shape[1])

    @property
    def items(self) -> int:
        return len(self.item_id)

    def item_vectors(self, rows: int = 0) -> Iterator[np.ndarray]:
        """The item vectors as `TableFile.item_vectors` gives them (here: one chunk)."""
        yield self.item_vector

    def catalog(self) -> dict:
        """The catalog part in the layout `visual_search` takes."""
        return {"item_id": self.item_id, "category_id": self.category_id,
                "impressions_30d": self.impressions_30d, "embedding": self.item_vector}


def embed_records(encoder: encoder_lib.Encoder, pattern: str, kind: str, columns: Sequence[str],
                  batch_size: int = 256, skip_bad_records: bool = False) -> dict:
    """One ordered pass over the records of `kind` (whose image feature is `image`): the given
    columns and 'embedding' [N, D], in file order (bad records skipped with `skip_bad_records`:
    their ids get no vector)."""
    cfg = pipeline.InputConfig(pattern, kind, global_batch_size=batch_size,
                               image_size=encoder.cfg.image_size, shuffle=False, repeat=False,
                               drop_remainder=False, deterministic=True,
                               skip_bad_records=skip_bad_records)
    pipe = pipeline.InputPipeline(cfg)
    meta: dict = {k: [] for k in columns}

    def images(ds):
        for batch in ds:
            for k in meta:
                meta[k].append(batch[k].numpy())
            yield batch["image"]

    with pipe.errors_named():
        emb = encoder_lib.embed(encoder, images(pipe.dataset()))
    return {**{k: np.concatenate(v) for k, v in meta.items()}, "embedding": emb}


def compute(encoder: encoder_lib.Encoder, catalog_pattern: str, queries_pattern: str | None,
            batch_size: int = 256, source: str = "", skip_bad_records: bool = False
            ) -> EmbeddingTable:
    """Embeds the catalog and (if given) the query photos."""
    t0 = time.time()
    cat = embed_records(encoder, catalog_pattern, "catalog",
                        ("item_id", "category_id", "impressions_30d"), batch_size,
                        skip_bad_records)
    if queries_pattern:
        q = embed_records(encoder, queries_pattern, "queries", ("query_id",), batch_size,
                          skip_bad_records)
    else:
        q = {"query_id": np.zeros([0], np.int64),
             "embedding": np.zeros([0, cat["embedding"].shape[1]], np.float32)}
    cat = pipeline.unique_rows(cat, catalog_pattern, "item_id", skip_bad_records)
    if queries_pattern:
        q = pipeline.unique_rows(q, queries_pattern, "query_id", skip_bad_records)
    log.info("embedded %d catalog images and %d queries in %.0fs", len(cat["item_id"]),
             len(q["query_id"]), time.time() - t0)
    return EmbeddingTable(cat["item_id"], cat["category_id"], cat["impressions_30d"],
                          cat["embedding"], q["query_id"], q["embedding"], source)


@dataclasses.dataclass(frozen=True)
class TableFile:
    """A saved embedding table known by its file's headers alone: what a process needs that only
    sizes a model by the table or normalises vectors by it (a CTR model whose image features all
    arrive joined with the records, `layout: joined`), without holding its [N, D] vectors.
    `load` reads the rows, for whoever looks ids up in them; `item_vectors` streams them."""

    path: str
    items: int
    dim: int
    source: str

    def load(self) -> EmbeddingTable:
        return load(self.path)

    def item_vectors(self, rows: int = 65536) -> Iterator[np.ndarray]:
        return npz.chunks(self.path, "item_vector", rows)


def take_rows(chunks: Iterable[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """The given rows (any order, repeats allowed) of an array streamed in chunks."""
    out: np.ndarray | None = None
    start = 0
    for chunk in chunks:
        if out is None:
            out = np.zeros((len(rows), *chunk.shape[1:]), chunk.dtype)
        here = (rows >= start) & (rows < start + len(chunk))
        out[here] = chunk[rows[here] - start]
        start += len(chunk)
    if out is None or len(rows) and rows.max() >= start:
        raise IndexError(f"rows up to {rows.max() if len(rows) else 0} of {start}")
    return out


def describe(path: str) -> TableFile:
    """The `TableFile` of a saved table (reads its headers and `source`, not its vectors)."""
    items, dim = npz.shape(path, "item_vector")
    return TableFile(path, int(items), int(dim), str(npz.read(path, ["source"])["source"]))


def save(table: EmbeddingTable, path: str) -> None:
    npz.write(path, **{f.name: np.array(getattr(table, f.name))
                       for f in dataclasses.fields(table)})


def load(path: str) -> EmbeddingTable:
    values = npz.read(path)
    values["source"] = str(values["source"])
    return EmbeddingTable(**values)


def _source(model_dir: str, catalog_pattern: str, queries_pattern: str | None) -> str:
    files = {p: pipeline.list_files(p) for p in (catalog_pattern, queries_pattern) if p}
    prefix = encoder_lib.resolve_checkpoint(model_dir)
    written = tf.io.gfile.stat(prefix + ".index").mtime_nsec  # a retrained encoder, same step
    return json.dumps({"checkpoint": os.path.basename(prefix), "written": written,
                       "files": files}, sort_keys=True)


def file_for_encoder(model_dir: str, catalog_pattern: str, queries_pattern: str | None,
                     batch_size: int = 256, skip_bad_records: bool = False) -> TableFile:
    """The saved embedding table of the trained encoder in `model_dir`, unread: its cache when
    that was computed from the same checkpoint and files, else computed and cached first."""
    path = os.path.join(model_dir, FILE)
    source = _source(model_dir, catalog_pattern, queries_pattern)
    if tf.io.gfile.exists(path):
        cached = describe(path)
        if cached.source == source:
            return cached
        log.info("%s is stale (other checkpoint or files); recomputing", path)
    table = compute(encoder_lib.restore(model_dir), catalog_pattern, queries_pattern, batch_size,
                    source, skip_bad_records)
    save(table, path)
    print(f"embedded {len(table.item_id)} catalog images and {len(table.query_id)} queries with "
          f"the encoder of {model_dir} -> {path}")
    return describe(path)


def for_encoder(model_dir: str, catalog_pattern: str, queries_pattern: str | None,
                batch_size: int = 256, skip_bad_records: bool = False) -> EmbeddingTable:
    """The embedding table of the trained encoder in `model_dir` (`file_for_encoder`), read."""
    return file_for_encoder(model_dir, catalog_pattern, queries_pattern, batch_size,
                            skip_bad_records).load()

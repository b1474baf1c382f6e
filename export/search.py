"""Visual search advertising served whole: `python -m export.search --model_dir=M --export_dir=E`.

Paper 000 §1: a user takes a photo; the system finds visually similar catalog items within the
photo's category, the CTR model ranks them, and ads are placed by predicted CTR x bid (eCPM). This
export holds the whole request in one SavedModel: the image encoder, the catalog's vectors, the
items' features and bids, and (M a CTR model dir) the CTR model. Exported as version N+1 of E.

Signatures (B requests; an empty request returns empty results):
  search (= serving_default): images [B] string (encoded JPEG/PNG/GIF/BMP), category [B] int64
      (-1: the whole catalog), k [B] int32 -> item_id [B, K] int64, similarity [B, K] float32
      (cosine), best first, K the largest k of the batch. Exact: the photo's vector against every
      catalog vector of the category (a matrix product and `top_k`, the computation of TFRS's
      BruteForce layer, with the category filter); when every row of a batch asks for the same
      category only that category's rows are multiplied (the catalog is stored sorted by
      category). Places beyond a row's own k, or beyond its category's items, hold item_id -1
      and similarity 0.
  request (M a CTR model): photo [B] string, category [B], k [B] int32 (items retrieved), n [B]
      int32 (ads returned, n <= k) and the model's request features (the spec's
      `scope: request` columns other than the photo's key: the user, the page) as in `rank`
      -> item_id, similarity, ctr, bid, ecpm [B, N]: the k retrieved items ranked by the CTR
      model with their features from the item table inside (the catalog's columns of the
      spec's candidate features; the others, e.g. `position`, take the export's
      `candidate_values`), the top n by ecpm = ctr x bid, best first; padding as in `search`.
      The photo is encoded once, for retrieval and as the CTR model's query photo.
A malformed request fails naming its row ('request:<i>') and input: an undecodable or oversized
photo, k outside [1, max_k], n outside [1, k], a category below -1, and the CTR model's own checks.

The catalog table: the vectors of `--item_embeddings` (`--stage=embed`'s embeddings.npz, or the
daily cycle's grown table), else the model's own table (a CTR model's image table; an encoder's
catalog embedding, computed and cached as `eval_search` does). Refresh it daily by exporting the
next version with the day's embedding (`make export`, the daily cycle). float32, or float16 with
`--table_dtype=float16`: half the memory, the same top 100 on the demo's catalog, but 2-3x the
latency on a CPU, which has no float16 matrix unit (docs/serving.md).

Sharding: `--categories=1,2,...` exports a shard holding only those categories' items (paper
000's search runs within a category, so one shard answers a filtered request);
`export.client.ShardedSearch` routes a category's request to its shard and merges the shards'
top k for category -1.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from export import common
from export import ctr as export_ctr
from export import encoder as export_encoder
from export.encoder import request_names
from trainer import configs, tracing
from trainer.ctr import spec as ctr_spec
from trainer.ctr import task as ctr_task
from trainer.data import npz, parse, pipeline, records, schema
from trainer.features import embeddings as embeddings_lib
from trainer.models import encoder as encoder_lib
from trainer.stages.common import has_files

MAX_K = 1000  # items retrieved per request at most: the CTR model ranks them all
ITEM_FEATURES = "item_features.npz"  # the daily cycle's grown catalog columns, in its model dir
# The catalog columns an item feature table can take (the numeric ones).
CATALOG_COLUMNS = ("item_id", "category_id", "shop_id", "brand_id", "price", "impressions_30d",
                   "bid")
WARMUP_BATCH_SIZES = (1, 8)
TABLE_DTYPES = ("float32", "float16")
BID = "bid"  # the catalog column of an item's bid per click (schema.CATALOG)


class CatalogIndex(tf.Module):
    """Exact top-k inner-product search over unit vectors, filtered by category.

    Rows are stored sorted by (category, item id), so a category is a contiguous slice: a batch
    whose rows all ask for one category multiplies only that slice. Ties keep the lower row."""

    def __init__(self, item_id: np.ndarray, category_id: np.ndarray, vectors: np.ndarray,
                 dtype: str = "float32"):
        """`item_id`, `category_id` [N] and unit `vectors` [N, D], sorted by (category, item id)
        (`catalog_order`)."""
        super().__init__(name="catalog_index")
        if dtype not in TABLE_DTYPES:
            raise ValueError(f"table_dtype must be one of {TABLE_DTYPES}, got '{dtype}'")
        if len(item_id) > 1 and not np.all(np.diff(catalog_order(item_id, category_id)) > 0):
            raise ValueError("the catalog rows must be sorted by (category, item id)")
        self.size = len(item_id)
        self.dim = int(vectors.shape[1])
        self.item_id = tf.Variable(np.asarray(item_id, np.int64), trainable=False,
                                   name="item_id")
        self.category_id = tf.Variable(np.asarray(category_id, np.int64), trainable=False,
                                       name="category_id")
        self.vectors = tf.Variable(np.asarray(vectors, np.float32).astype(dtype),
                                   trainable=False, name="vectors")

    def _scores(self, queries: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        if vectors.dtype != tf.float32:  # multiplied in the table's precision
            return tf.cast(tf.matmul(tf.cast(queries, vectors.dtype), vectors, transpose_b=True),
                           tf.float32)
        return tf.matmul(queries, vectors, transpose_b=True)

    def top_k(self, queries: tf.Tensor, category: tf.Tensor, k: tf.Tensor
              ) -> tuple[tf.Tensor, tf.Tensor]:
        """([B, k] index rows, -1 past the results; [B, k] similarities, 0 there) of unit
        `queries` [B, D] among the rows of `category` [B] (-1: all); `k` a scalar <= size."""
        b = tf.shape(queries)[0]
        first = tf.concat([category, [-1]], 0)[0]
        one_category = tf.logical_and(first >= 0, tf.reduce_all(tf.equal(category, first)))

        def within_one() -> tuple[tf.Tensor, tf.Tensor]:
            start = tf.searchsorted(self.category_id, first[None], side="left")[0]
            end = tf.searchsorted(self.category_id, first[None], side="right")[0]
            scores = self._scores(queries, self.vectors[start:end])
            sims, rows = tf.math.top_k(scores, tf.minimum(k, end - start))
            pad = [[0, 0], [0, k - tf.shape(rows)[1]]]
            return (tf.pad(tf.cast(rows, tf.int64) + tf.cast(start, tf.int64), pad,
                           constant_values=-1), tf.pad(sims, pad))

        def filtered() -> tuple[tf.Tensor, tf.Tensor]:
            scores = self._scores(queries, self.vectors)
            allowed = tf.logical_or(category[:, None] < 0,
                                    tf.equal(self.category_id[None, :], category[:, None]))
            sims, rows = tf.math.top_k(tf.where(allowed, scores, -np.inf), k)
            found = sims > -np.inf
            return (tf.where(found, tf.cast(rows, tf.int64), -1),
                    tf.where(found, sims, tf.zeros_like(sims)))

        rows, sims = tf.cond(one_category, within_one, filtered)
        return tf.reshape(rows, [b, k]), tf.reshape(sims, [b, k])


def catalog_order(item_id: np.ndarray, category_id: np.ndarray) -> np.ndarray:
    """The order of catalog rows by (category, item id): `CatalogIndex`'s."""
    return np.lexsort((np.asarray(item_id), np.asarray(category_id)))


def _gather(table: tf.Variable, rows: tf.Tensor, fill) -> tf.Tensor:
    """`table`'s values at index `rows` (-1: `fill`)."""
    return tf.where(rows >= 0, tf.gather(table, tf.maximum(rows, 0)),
                    tf.cast(fill, table.dtype))


class SearchServing(tf.Module):
    """The encoder, the catalog index and, with a CTR model, the item feature table and the
    ranking, behind `search` and `request`."""

    def __init__(self, encoder: encoder_lib.Encoder, index: CatalogIndex,
                 ctr: export_ctr.CtrServing | None = None, item_features: dict | None = None,
                 max_k: int = MAX_K,
                 max_image_pixels: int = export_encoder.MAX_IMAGE_PIXELS):
        super().__init__(name="search_serving")
        if max_k < 1:
            raise ValueError(f"max_k must be at least 1, got {max_k}")
        self.images = export_encoder.EncoderServing(encoder, max_image_pixels)
        self.index = index
        self.max_k = max_k
        self.search = tracing.function(self._search, input_signature=[
            tf.TensorSpec([None], tf.string, name="images"),
            tf.TensorSpec([None], tf.int64, name="category"),
            tf.TensorSpec([None], tf.int32, name="k")])
        self.ctr = ctr
        if ctr is not None:
            spec = ctr.model.spec
            if len(spec.photos) > 1:
                raise ValueError(f"feature spec '{spec.name}' has {len(spec.photos)} query "
                                 "photos; a search request carries one")
            # Aligned with the index's rows: the spec's candidate columns and the bid.
            self.item_features = {name: tf.Variable(values, trainable=False, name=name)
                                  for name, values in (item_features or {}).items()}
            self.request = tracing.function(self._request)

    def _checked(self, images: tf.Tensor, category: tf.Tensor, k: tf.Tensor,
                 photo: str) -> tuple:
        """(unit vectors [B, D], k of the batch, request names, category, k) once the inputs are
        valid."""
        inputs = export_ctr.same_size({photo: images, "category": category, "k": k}, 0, "rows")
        images, category, k = inputs[photo], inputs["category"], inputs["k"]
        names = request_names(tf.shape(images)[0])
        bad_category, bad_k = category < -1, (k < 1) | (k > self.max_k)
        checks = [parse.fail_if(bad_category, names, "category",
                                "must be -1 (any) or a category id",
                                tf.boolean_mask(category, bad_category)[:1]),
                  parse.fail_if(bad_k, names, "k", f"must be in [1, max_k = {self.max_k}]",
                                tf.boolean_mask(k, bad_k)[:1])]
        with tf.control_dependencies(checks):
            vectors = self.images.embed_images(images, names, photo)
        batch_k = tf.minimum(tf.reduce_max(tf.concat([k, [0]], 0)), self.index.size)
        return vectors, batch_k, names, category, k

    def _top(self, vectors, category, k, batch_k) -> tuple[tf.Tensor, tf.Tensor]:
        rows, sims = self.index.top_k(vectors, category, batch_k)
        own = tf.range(batch_k)[None, :] < k[:, None]  # a row's own k
        return tf.where(own, rows, -1), tf.where(own, sims, tf.zeros_like(sims))

    def _search(self, images, category, k):
        vectors, batch_k, _, category, k = self._checked(images, category, k, "images")
        rows, sims = self._top(vectors, category, k, batch_k)
        return {"item_id": _gather(self.index.item_id, rows, -1), "similarity": sims}

    def _request(self, photo, category, k, n, **features):
        assert self.ctr is not None
        spec = self.ctr.model.spec
        n = export_ctr.same_size({"photo": photo, "n": n}, 0, "rows")["n"]
        vectors, batch_k, names, category, k = self._checked(photo, category, k, "photo")
        bad_n = (n < 1) | (n > k)
        with tf.control_dependencies([parse.fail_if(bad_n, names, "n", "must be in [1, k]",
                                                    tf.boolean_mask(n, bad_n)[:1])]):
            rows, sims = self._top(vectors, category, k, batch_k)
        item = _gather(self.index.item_id, rows, -1)
        pages = {spec.item: item, **features}
        for name, table in self.item_features.items():
            if name != BID and name != spec.item:
                pages[name] = _gather(table, rows, 0)
        ctr = self.ctr.score_pages(pages, {f.name: vectors for f in spec.photos})
        bid = _gather(self.item_features[BID], rows, 0)
        ecpm = ctr * bid
        batch_n = tf.minimum(tf.reduce_max(tf.concat([n, [0]], 0)), batch_k)
        _, best = tf.math.top_k(tf.where(rows >= 0, ecpm, -np.inf), batch_n)
        own = tf.range(batch_n)[None, :] < n[:, None]
        best_rows = tf.gather(rows, best, batch_dims=1)
        keep = own & (best_rows >= 0)

        def top(x, fill):
            return tf.where(keep, tf.gather(x, best, batch_dims=1), tf.cast(fill, x.dtype))

        return {"item_id": top(item, -1), "similarity": top(sims, 0), "ctr": top(ctr, 0),
                "bid": top(bid, 0), "ecpm": top(ecpm, 0)}

    def signatures(self) -> dict:
        search = self.search.get_concrete_function()
        out = {"serving_default": search, "search": search}
        if self.ctr is not None:
            out["request"] = self.request.get_concrete_function(**request_input_specs(
                self.ctr.model.spec))
        return out


def request_input_specs(spec: ctr_spec.CtrSpec) -> dict:
    """`request`'s inputs: the photo, category, k, n, and the spec's request features [B, ...]
    (not the photo's key: the photo stands in for it)."""
    ranked = export_ctr.rank_input_specs(spec, images=True)
    out = {"photo": tf.TensorSpec([None], tf.string, name="photo"),
           "category": tf.TensorSpec([None], tf.int64, name="category"),
           "k": tf.TensorSpec([None], tf.int32, name="k"),
           "n": tf.TensorSpec([None], tf.int32, name="n")}
    photo_names = {f.name for f in spec.photos}
    for name, s in ranked.items():
        if spec.scope(name) == "request" and name not in photo_names and name != spec.item:
            out[name] = s
    return out


def candidate_columns(spec: ctr_spec.CtrSpec) -> list[str]:
    """The spec's candidate-scoped input columns other than the item id (what the item feature
    table holds for each item)."""
    kind = spec.record_kind(serving=True)
    return [f.name for f in kind.features if spec.scope(f.name) == "candidate"
            and f.name != spec.item and f.name not in spec.photo_keys]


def parse_values(text: str | None) -> dict[str, float]:
    """'position=0,x=1.5' -> {'position': 0.0, 'x': 1.5}."""
    out = {}
    for part in filter(None, (text or "").split(",")):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"candidate_values: '{part}' is not name=value")
        out[name.strip()] = float(value)
    return out


def item_feature_table(spec: ctr_spec.CtrSpec, catalog_pattern: str, item_id: np.ndarray,
                       values: dict[str, float], skip_bad_records: bool = False,
                       columns: dict | None = None) -> dict:
    """{column: [N] values aligned with `item_id`}: the spec's candidate columns that the catalog
    holds, read from its records (or given as `columns`: item_id and those columns), the others
    from `values` (a column in neither raises, naming it), and the catalog's bid (1.0 where a
    catalog has none). A table item missing from the catalog raises, naming it."""
    kind = spec.record_kind(serving=True)
    wanted = candidate_columns(spec)
    from_catalog = [c for c in wanted if c in CATALOG_COLUMNS and c not in values]
    missing = [c for c in wanted if c not in from_catalog and c not in values]
    if missing:
        raise ValueError(f"the feature spec '{spec.name}' has candidate features {missing} that "
                         "are no catalog column: give the value to serve them with, e.g. "
                         f"--candidate_values={missing[0]}=0")
    cols = (columns if columns is not None
            else read_item_features(catalog_pattern, skip_bad_records))
    item_id = np.asarray(item_id, np.int64)
    known = np.asarray(cols["item_id"], np.int64)
    order = np.argsort(known, kind="stable")
    pos = np.clip(np.searchsorted(known, item_id, sorter=order), 0, max(len(known) - 1, 0))
    rows = order[pos] if len(known) else pos
    absent = item_id[known[rows] != item_id] if len(known) else item_id
    if len(absent):
        raise ValueError(f"{catalog_pattern}: {len(absent)} items of the search table are not in "
                         f"the catalog (first {absent[:5].tolist()}): their features and bids "
                         "are unknown")
    out = {}
    for c in wanted:
        dtype = np.float32 if kind.feature(c).dtype == schema.FLOAT else np.int64
        out[c] = (cols[c][rows] if c in from_catalog else np.full(len(rows), values[c])
                  ).astype(dtype)
    out[BID] = cols[BID][rows].astype(np.float32)
    return out


def read_item_features(catalog_pattern: str, skip_bad_records: bool = False) -> dict:
    """The catalog's `CATALOG_COLUMNS` ({column: [M]}, one row per item id)."""
    return pipeline.unique_rows(pipeline.read_columns(
        catalog_pattern, "catalog", CATALOG_COLUMNS, skip_bad_records), catalog_pattern,
        "item_id", skip_bad_records)


def merge_item_features(old: dict, new: dict) -> dict:
    """`old`'s items and `new`'s, `new`'s values where both hold an item (today's price and
    bid), sorted by item id."""
    keep = ~np.isin(old["item_id"], new["item_id"])
    merged = {c: np.concatenate([np.asarray(old[c])[keep], np.asarray(new[c])])
              for c in CATALOG_COLUMNS}
    order = np.argsort(merged["item_id"], kind="stable")
    return {c: v[order] for c, v in merged.items()}


def _catalog_vectors(path: str, data: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item_id, category_id, vectors) of an embeddings.npz (`path`, read as `data`):
    `--stage=embed`'s or an `EmbeddingTable`'s (the CTR stages' and the daily cycle's)."""
    if "embedding" in data:
        keys = ("item_id", "category_id", "embedding")
    elif "item_vector" in data:
        keys = ("item_id", "category_id", "item_vector")
    else:
        raise ValueError(f"{path}: neither --stage=embed's embeddings.npz nor an embedding table")
    if "category_id" not in data:
        raise ValueError(f"{path}: no 'category_id' array (the category filter needs it)")
    ids, cats, vectors = (np.asarray(data[k]) for k in keys)
    return ids.astype(np.int64), cats.astype(np.int64), vectors.astype(np.float32)


def sample_requests(spec: ctr_spec.CtrSpec | None, rows: dict, n: int,
                    image_size: int, seed: int = 0) -> dict:
    """`n` rows of `request` inputs (`search`'s without a spec), with sample photos and the
    request features of `rows` (`export.ctr.sample_requests`)."""
    photos = np.array(export_encoder.sample_images(n, image_size, seed=seed), dtype=object)
    out = {"category": np.full([n], -1, np.int64), "k": np.full([n], 10, np.int32)}
    if spec is None:
        return {"images": photos, **out}
    out.update(photo=photos, n=np.full([n], 3, np.int32))
    for name in request_input_specs(spec):
        if name in rows:
            out[name] = rows[name][:n]
    return out


def export(model_dir: str, export_dir: str, version: int | None = None,
           model_name: str = "search", item_embeddings: str | None = None,
           catalog: str | None = None, categories: str | None = None,
           table_dtype: str = "float32", max_k: int = MAX_K,
           candidate_values: str | None = "position=0",
           max_image_pixels: int = export_encoder.MAX_IMAGE_PIXELS,
           skip_bad_records: bool = False, extra_info: dict | None = None,
           item_features: dict | None = None) -> str:
    """Exports the search of `model_dir` (a CTR model dir: `search` and `request`; an encoder's:
    `search`) over `item_embeddings` or the model's own table; `catalog` (a catalog file
    pattern, default the model's data dir's) gives a CTR model's item features and bids, or
    `item_features` ({item_id, column: [M]}, e.g. a benchmark's synthetic catalog). Returns the
    version directory."""
    config = configs.load(model_dir)
    is_ctr = isinstance(config, configs.CtrStage)
    data_dir = getattr(config, "data_dir", "") or ""
    catalog = catalog or (records.default_pattern(data_dir, "catalog") if data_dir else None)
    model = refreshed = None
    given = npz.read(item_embeddings) if item_embeddings else None  # read once: it can be GBs
    if is_ctr:
        model = ctr_task.load_trained(model_dir)
        encoder_from = ctr_task.encoder_dir(model_dir)
        if item_embeddings:
            refreshed = ctr_task.refresh_items(model, model_dir, item_embeddings, given)
    else:
        encoder_from = model_dir
    if given is not None:
        ids, cats, vectors = _catalog_vectors(str(item_embeddings), given)
    elif is_ctr:
        table = ctr_task.image_table_of(model_dir)
        ids, cats, vectors = table.item_id, table.category_id, table.item_vector
    else:
        if not catalog:
            raise ValueError(f"{model_dir} names no data dir: give --catalog or "
                             "--item_embeddings")
        queries = records.default_pattern(data_dir, "queries") if data_dir else ""
        table = embeddings_lib.for_encoder(model_dir, catalog,
                                           queries if queries and has_files(queries) else None,
                                           skip_bad_records=skip_bad_records)
        ids, cats, vectors = table.item_id, table.category_id, table.item_vector
    shard = None
    if categories:
        shard = sorted({int(c) for c in categories.split(",") if c.strip()})
        keep = np.isin(cats, shard)
        ids, cats, vectors = ids[keep], cats[keep], vectors[keep]
    if not len(ids):
        raise ValueError(f"no catalog items to search (categories {shard})")
    encoder = encoder_lib.restore(encoder_from)
    if encoder.cfg.feature_dim != vectors.shape[1]:
        raise ValueError(f"the catalog vectors have dimension {vectors.shape[1]}; the encoder "
                         f"of {encoder_from} gives {encoder.cfg.feature_dim}")
    order = catalog_order(ids, cats)
    ids, cats, vectors = ids[order], cats[order], vectors[order]
    # Unit vectors (the encoders' already are): the product is the cosine.
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    index = CatalogIndex(ids, cats, vectors, table_dtype)
    ctr = features = None
    if model is not None:
        if not catalog and item_features is None:
            raise ValueError(f"{model_dir} names no data dir: give --catalog (the item features "
                             "and bids)")
        ctr = export_ctr.CtrServing(model, encoder if model.image_features else None,
                                    max_candidates=max_k, max_image_pixels=max_image_pixels)
        features = item_feature_table(model.spec, catalog or "item_features", ids,
                                      parse_values(candidate_values), skip_bad_records,
                                      item_features)
    module = SearchServing(encoder, index, ctr, features, max_k, max_image_pixels)
    size = encoder.cfg.image_size
    warmup = []
    for b in WARMUP_BATCH_SIZES:
        if model is not None:
            rows = export_ctr.sample_requests(model.spec, model.vocabularies, b, seed=b)
            warmup.append(common.predict_request(model_name, "request", sample_requests(
                model.spec, rows, b, size, seed=b)))
        warmup.append(common.predict_request(model_name, "search", sample_requests(
            None, {}, b, size, seed=b)))
    info = {"model": "search", "model_dir": os.path.abspath(model_dir),
            "encoder": encoder_from, "items": int(len(ids)),
            "categories": shard, "table_dtype": table_dtype,
            "table_bytes": int(vectors.size * np.dtype(table_dtype).itemsize),
            "item_embeddings": item_embeddings, "refreshed": refreshed, "catalog": catalog,
            "candidate_values": parse_values(candidate_values) if model is not None else None,
            "max_k": max_k, "max_image_pixels": max_image_pixels,
            "signatures": sorted(module.signatures()), **(extra_info or {})}
    extra = {ctr_spec.FILE: model.spec.dump()} if model is not None else None
    return common.save(module, module.signatures(), export_dir, common.warmup_logs(warmup),
                       info, version, extra_files=extra)


if __name__ == "__main__":
    common.main(export, "the visual search", "search", "Trained CTR model dir (search and "
                "request) or encoder model dir (search only).", "search (= serving_default), "
                "request (a CTR model)", {
                    "item_embeddings": (None, "An embeddings.npz of --stage=embed (or of the "
                                        "daily cycle): the catalog to search, so items added "
                                        "since training are found (the daily refresh)."),
                    "catalog": (None, "Catalog file pattern: the items' features and bids "
                                "(default: the model's data dir's)."),
                    "categories": (None, "Comma-separated category ids: export a shard of "
                                   "these categories only."),
                    "table_dtype": ("float32", "float32, or float16 (half the memory)."),
                    "max_k": (MAX_K, "Items retrieved per request at most."),
                    "candidate_values": ("position=0", "Values of the spec's candidate features "
                                         "that are no catalog column, name=value,..."),
                    "max_image_pixels": (export_encoder.MAX_IMAGE_PIXELS, "Largest photo "
                                         "(height x width, from its header).")})

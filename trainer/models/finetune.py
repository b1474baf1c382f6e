"""S2: click-supervised contrastive fine-tuning with category negative pools (paper 000 §3.1,
Eq. 2).

For each query image q with a clicked item i of category c_i, and N_{c_i} a pool of catalog images
of category c_i,

    L_S2 = - sum_{q in Q} log  exp(g(v_q, v_i) / tau)
                               / sum_{j in N_{c_i} u {i}} exp(g(v_q, v_j) / tau)

Batches are drawn one category per global step: the input groups the shuffled click stream by the
clicked item's category into global batches, and each global batch brings `pool_size` catalog
images of that category, sampled without replacement with the step's seed. N_{c_i} is that pool
plus the other clicked images of the batch, which are of c_i too. Under a distribution strategy
every replica takes its rows and its 1/R share of the same pool, and the loss gathers clicks and
pool from all replicas, so a global batch has the same negatives, and the same loss, on 1 or R
replicas. Candidates the query was clicked on anywhere in the training sessions (the row's own
clicked item and every other click of the same query) are not negatives: lack of a click is not
irrelevance, but a click is relevance. Temperature: as S1 (`pretrain.py`), 0.1; Eq. 2 as printed
has none.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from trainer.configs import EncoderConfig, FinetuneConfig, TrainConfig
from trainer.data import parse, pipeline
from trainer.models import contrastive
from trainer.models import encoder as encoder_lib
from trainer.train import loop


class CategoryNegativePool:
    """Samples catalog images of one category (N_{c_i} of Eq. 2) from the catalog's item ids
    grouped by category; images come from the `ImageStore`."""

    def __init__(self, item_ids: np.ndarray, category_ids: np.ndarray,
                 image_store: parse.ImageStore, image_size: int):
        order = np.argsort(category_ids, kind="stable")
        cats, starts, counts = np.unique(category_ids[order], return_index=True,
                                         return_counts=True)
        self.categories = cats
        self.item_ids = tf.constant(item_ids[order].astype(np.int64))
        self.starts = tf.constant(starts.astype(np.int64))
        self.counts = tf.constant(counts.astype(np.int64))
        self.row = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(cats.astype(np.int64)), tf.range(len(cats), dtype=tf.int64)), -1)
        self.store, self.image_size = image_store, image_size

    def sample(self, category: tf.Tensor, size: int, seed: tf.Tensor,
               part: tf.Tensor | None = None) -> dict:
        """`size` distinct items of `category` (all of them if it has fewer, then repeated), or
        with `part` = (k, R) the k-th of R equal slices of them (decoded alone): {'pool_item_id',
        'pool_category_id' [n], 'pool_image' [n, S, S, 3]}, n = size or size / R."""
        row = self.row.lookup(category)
        tf.debugging.assert_non_negative(row, message="clicked category has no catalog items")
        start, count = self.starts[row], self.counts[row]
        scores = tf.random.stateless_uniform([count], seed)
        take = tf.math.top_k(scores, tf.minimum(count, size)).indices
        take = tf.tile(take, [size // tf.shape(take)[0] + 1])[:size]  # small categories repeat
        if part is not None:
            n = size // tf.cast(part[1], tf.int32)
            take = take[tf.cast(part[0], tf.int32) * n:][:n]
        ids = tf.gather(self.item_ids, start + tf.cast(take, tf.int64))
        images = parse.decode_images(self.store.lookup(ids), self.image_size)
        return {"pool_item_id": ids, "pool_category_id": tf.fill(tf.shape(ids), category),
                "pool_image": images}


class QueryClicks:
    """Every item each query was clicked on in the sessions: `lookup(query_ids)` gives them as
    [b, M] int64 padded with -1 (M: the most clicks of one query, which sets the width of every
    batch's mask). Held as sorted arrays, 8 bytes a distinct (query, item) pair plus 16 a query;
    S2's click logs are query photos with a few clicks each (7.5 on `small`)."""

    def __init__(self, query_ids: np.ndarray, item_ids: np.ndarray):
        pairs = np.unique(np.stack([query_ids, item_ids], 1).astype(np.int64), axis=0)
        queries, starts, counts = np.unique(pairs[:, 0], return_index=True, return_counts=True)
        self.width = int(counts.max()) if len(counts) else 1
        self.items = tf.constant(np.append(pairs[:, 1], -1))  # [-1]: the padding
        self.starts, self.counts = tf.constant(starts), tf.constant(counts)
        self.row = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(queries), tf.range(len(queries), dtype=tf.int64)), -1)

    def lookup(self, query_ids: tf.Tensor) -> tf.Tensor:
        row = self.row.lookup(query_ids)
        known = row >= 0
        row = tf.maximum(row, 0)
        offset = tf.range(self.width, dtype=tf.int64)[None, :]
        inside = known[:, None] & (offset < tf.gather(self.counts, row)[:, None])
        index = tf.where(inside, tf.gather(self.starts, row)[:, None] + offset,
                         tf.shape(self.items, out_type=tf.int64)[0] - 1)
        return tf.gather(self.items, index)


def s2_loss(query: tf.Tensor, clicked: tf.Tensor, pool: tf.Tensor, meta: dict,
            temperature: float, in_batch_negatives: bool = True) -> tf.Tensor:
    """This replica's shares of the global mean of Eq. 2 and of the negatives per query.

    query, clicked: [b, D], pool: [p, D], L2-normalised. meta: int64 'query_id',
    'clicked_item_id', 'clicked_category_id' [b], 'pool_item_id', 'pool_category_id' [p] and,
    optionally, 'query_clicks' [b, M] (`QueryClicks`): items that are not the row's negatives.
    """
    b = tf.shape(query)[0]
    keys = ("query_id", "clicked_item_id", "clicked_category_id", "pool_item_id",
            "pool_category_id")
    all_clicked, all_pool, m = contrastive.gather((clicked, pool, {k: meta[k] for k in keys}))
    n_clicked = tf.shape(all_clicked)[0]
    candidates = tf.concat([all_clicked, all_pool], axis=0)
    cand_item = tf.concat([m["clicked_item_id"], m["pool_item_id"]], 0)
    cand_cat = tf.concat([m["clicked_category_id"], m["pool_category_id"]], 0)
    cand_query = tf.concat([m["query_id"], -tf.ones_like(m["pool_item_id"])], 0)
    positive = contrastive.replica_offset(b) + tf.range(b)
    same_category = meta["clicked_category_id"][:, None] == cand_cat[None, :]
    not_positive_item = meta["clicked_item_id"][:, None] != cand_item[None, :]
    other_query = meta["query_id"][:, None] != cand_query[None, :]
    valid = same_category & not_positive_item & other_query
    if "query_clicks" in meta:  # the query's clicks outside this batch too
        valid &= ~tf.reduce_any(cand_item[None, :, None] == meta["query_clicks"][:, None, :], 2)
    if not in_batch_negatives:
        valid &= (tf.range(tf.shape(candidates)[0]) >= n_clicked)[None, :]
    per_query = contrastive.info_nce(query, candidates, positive, valid, temperature)
    negatives = tf.reduce_sum(tf.cast(valid, tf.float32), axis=1)
    return contrastive.global_mean(per_query), contrastive.global_mean(negatives)


class FinetuneTask(loop.Task):
    """S2 as a training-loop task."""

    name = "finetune"
    metric_names = ("negatives_per_query",)

    def __init__(self, cfg: FinetuneConfig, encoder_cfg: EncoderConfig, train_cfg: TrainConfig,
                 skip_bad_records: bool = False):
        self.cfg, self.encoder_cfg, self.train_cfg = cfg, encoder_cfg, train_cfg
        size = encoder_cfg.image_size
        catalog = pipeline.unique_rows(pipeline.read_columns(
            cfg.catalog_pattern, "catalog", ("item_id", "category_id", "image"),
            skip_bad_records), cfg.catalog_pattern, "item_id", skip_bad_records)
        self.store = parse.ImageStore(catalog["item_id"], catalog["image"].tolist())
        self.pool = CategoryNegativePool(catalog["item_id"], catalog["category_id"], self.store,
                                         size)
        input_cfg = pipeline.InputConfig(
            cfg.sessions_pattern, "search_sessions",
            global_batch_size=train_cfg.global_batch_size, image_size=size,
            deterministic=train_cfg.deterministic, skip_bad_records=skip_bad_records,
            group_by="clicked_category_id")
        self.pipe = pipeline.InputPipeline(input_cfg, image_store=self.store)
        clicks = pipeline.read_columns(cfg.sessions_pattern, "search_sessions",
                                       ("query_id", "clicked_item_id"), skip_bad_records)
        self.query_clicks = QueryClicks(clicks["query_id"], clicks["clicked_item_id"])
        self.encoder: encoder_lib.Encoder | None = None

    def build_model(self):
        self.encoder = encoder_lib.build(self.encoder_cfg)
        return self.encoder

    def build_inputs(self, input_context=None):
        replicas = input_context.num_replicas_in_sync if input_context else 1
        if self.cfg.pool_size % replicas:
            raise ValueError(f"finetune.pool_size {self.cfg.pool_size} must split evenly over "
                             f"the {replicas} replicas (each encodes its share of the pool)")

        def add_pool(seed, batch, part):
            # The global batch's seed and category: every replica draws the same pool.
            pool = self.pool.sample(batch["clicked_category_id"][0], self.cfg.pool_size, seed,
                                    part)
            return {**batch, **pool, "query_clicks": self.query_clicks.lookup(batch["query_id"])}

        assert self.pipe is not None
        self.pipe.transform = add_pool
        return self.seeded_dataset(input_context)

    def compute_loss(self, batch, training=True):
        assert self.encoder is not None
        b, p = tf.shape(batch["query_image"])[0], tf.shape(batch["pool_image"])[0]
        images = tf.concat([batch["query_image"], batch["clicked_image"], batch["pool_image"]], 0)
        v = self.encoder(images, training=training)
        loss, negatives = s2_loss(v[:b], v[b:2 * b], v[2 * b:2 * b + p], batch,
                                  self.cfg.temperature, self.cfg.in_batch_negatives)
        return loss, {"negatives_per_query": negatives}

"""COURIER: contrastive user-intention reconstruction pretraining (paper 002 §3, Eq. 1-7).

The image encoder embeds a page's l_pv PV images, E_pv, and the user's l_click latest clicks,
E_click (the pre-normalisation features; Eq. 4 normalises explicitly). Each PV item j is
reconstructed from the click history (Eq. 2-3):

    R_pv^j = softmax(E_pv^j E_click^T / sqrt(d)) E_click            (padded clicks masked)

and the PV contrastive loss (Eq. 4-6) pulls each clicked PV item's embedding towards its own
reconstruction, against every other PV item of the global batch (§3.3, batched negatives):

    Sim(j0, j1) = cos(E_pv^j0, R_pv^j1)
    L_pv = mean over clicked j1 of  -log exp(Sim(j1, j1)/tau) / sum_j0 exp(Sim(j0, j1)/tau)

The softmax runs over j0 (column-wise), over the batch_size * l_pv PV items gathered from every
replica; other clicked items of the same page are negatives too, as in Eq. 6. The user click-
sequence loss (§3.4) has the same form with the latest click as the target reconstructed from the
earlier ones, and the latest clicks of the global batch as candidates. L = L_pv + L_ucs (Eq. 7).

Choices where the paper is open (the authors' code differs in places; we follow the equations):
- tau divides both losses (default 0.05, §4.3.1).
- The target of L_ucs is the latest click (the last of the history, which is oldest first).
- Eq. 6 sums over positives; we take the mean over the global batch's positives (a scale).
- Copies of an anchor's item elsewhere in the batch are not negatives (they would be their own
  positive); pages without a click history have no anchors (§4.2.1 drops them).

Ablations (Table 6, Appendix D): `no_ucs` (L_pv only), `no_contrast` (the reconstruction
distance 1 - Sim(j, j) only), `self_attention` (w/o reconstruction: the page's reconstruction
is the masked mean of self-attention over the click history, without the PV item as query),
`no_neg_pv` (only clicked PV items are candidates), `projection_head` (an MLP on the embeddings
for the loss, dropped afterwards).
"""
from __future__ import annotations

import math

import tensorflow as tf
import tf_keras

from trainer.configs import CourierConfig, EncoderConfig, TrainConfig
from trainer.data import pipeline
from trainer.models import clip, contrastive, text
from trainer.models import encoder as encoder_lib
from trainer.train import loop

# Reconstruction logits of padded clicks: finite, so an all-padded history stays NaN-free.
_MASKED = -1e9


def reconstruct(queries: tf.Tensor, keys: tf.Tensor, key_mask: tf.Tensor,
                heads: int = 1) -> tf.Tensor:
    """Eq. 1-3: softmax(Q K^T / sqrt(d_head)) K per head, keys as values.

    queries [b, P, d], keys [b, K, d], key_mask [b, K] bool -> [b, P, d].
    """
    d = queries.shape[-1]
    if d % heads:
        raise ValueError(f"embedding size {d} is not divisible by {heads} heads")

    def split(x):  # [b, n, d] -> [b, h, n, d/h]
        return tf.transpose(tf.reshape(x, [tf.shape(x)[0], tf.shape(x)[1], heads, d // heads]),
                            [0, 2, 1, 3])

    q, k = split(queries), split(keys)
    logits = tf.matmul(q, k, transpose_b=True) / math.sqrt(d // heads)
    logits = tf.where(key_mask[:, None, None, :], logits, _MASKED)
    out = tf.matmul(tf.nn.softmax(logits, axis=-1), k)  # [b, h, P, d/h]
    return tf.reshape(tf.transpose(out, [0, 2, 1, 3]), tf.shape(queries))


def _self_attention_pool(keys: tf.Tensor, key_mask: tf.Tensor, heads: int) -> tf.Tensor:
    """W/o reconstruction: masked mean of self-attention over the history [b, K, d] -> [b, d]."""
    att = reconstruct(keys, keys, key_mask, heads)
    m = tf.cast(key_mask, att.dtype)[..., None]
    return tf.reduce_sum(att * m, axis=1) / tf.maximum(tf.reduce_sum(m, axis=1), 1.0)


def _contrast(anchors: tf.Tensor, anchor_ok: tf.Tensor, anchor_item: tf.Tensor, own: tf.Tensor,
              candidates: tf.Tensor, cand_ok: tf.Tensor, cand_item: tf.Tensor,
              global_anchors: tf.Tensor, cfg: CourierConfig) -> tf.Tensor:
    """This replica's share of the mean over the global batch's anchors of Eq. 6's term.

    anchors [a, d]: reconstructions (L2-normalised); own [a]: each anchor's own column among the
    gathered candidates [C, d] (L2-normalised); *_ok: which anchors/candidates are real;
    *_item: item ids (copies of an anchor's item are not its negatives)."""
    if cfg.no_contrast:
        positives = tf.gather(candidates, own)
        per_anchor = 1.0 - tf.reduce_sum(anchors * positives, axis=-1)
    else:
        valid = cand_ok[None, :] & (anchor_item[:, None] != cand_item[None, :])
        per_anchor = contrastive.info_nce(anchors, candidates, own, valid, cfg.temperature)
    per_anchor = tf.where(anchor_ok, per_anchor, 0.0)
    return tf.reduce_sum(per_anchor) / tf.maximum(global_anchors, 1.0)


def courier_losses(e_pv: tf.Tensor, e_click: tf.Tensor, batch: dict,
                   cfg: CourierConfig) -> dict:
    """This replica's shares of L_pv, L_ucs and their global-batch anchor counts.

    e_pv [b, P, d], e_click [b, K, d]: embeddings (not normalised). batch: int64 `pv_item_ids`,
    `pv_labels`, `click_item_ids` with their bool `_mask`s, [b, P] / [b, K].
    """
    b, P, K = tf.shape(e_pv)[0], tf.shape(e_pv)[1], tf.shape(e_click)[1]
    pv_mask, click_mask = batch["pv_item_ids_mask"], batch["click_item_ids_mask"]
    n_clicks = tf.reduce_sum(tf.cast(click_mask, tf.int32), axis=1)
    clicked = pv_mask & (batch["pv_labels"] > 0)

    # L_pv anchors: clicked page items of pages with a history.
    if cfg.self_attention:
        r_pv = tf.tile(_self_attention_pool(e_click, click_mask, cfg.heads)[:, None], [1, P, 1])
    else:
        r_pv = reconstruct(e_pv, e_click, click_mask, cfg.heads)
    pv_anchor = tf.reshape(clicked & (n_clicks > 0)[:, None], [-1])
    pv_cand = tf.reshape(clicked if cfg.no_neg_pv else pv_mask, [-1])

    # L_ucs: the latest click, reconstructed from the earlier ones.
    last = tf.maximum(n_clicks - 1, 0)
    target = tf.gather(e_click, last, batch_dims=1)  # [b, d]
    target_item = tf.gather(batch["click_item_ids"], last, batch_dims=1)
    earlier = click_mask & (tf.range(K)[None, :] < last[:, None])
    if cfg.self_attention:
        r_ucs = _self_attention_pool(e_click, earlier, cfg.heads)
    else:
        r_ucs = reconstruct(target[:, None], e_click, earlier, cfg.heads)[:, 0]
    ucs_anchor, ucs_cand = n_clicks > 1, n_clicks > 0

    pv_norm = tf.math.l2_normalize(tf.reshape(e_pv, [b * P, -1]), axis=-1)
    target_norm = tf.math.l2_normalize(target, axis=-1)
    pv_item = tf.reshape(batch["pv_item_ids"], [-1])
    g_pv, g_target, m = contrastive.gather((pv_norm, target_norm, {
        "pv_item": pv_item, "pv_cand": tf.cast(pv_cand, tf.int64),
        "pv_anchor": tf.cast(pv_anchor, tf.int64), "target_item": target_item,
        "ucs_cand": tf.cast(ucs_cand, tf.int64), "ucs_anchor": tf.cast(ucs_anchor, tf.int64)}))

    def count(x):
        return tf.cast(tf.reduce_sum(x), tf.float32)

    out = {"pv_anchors": count(m["pv_anchor"]), "ucs_anchors": count(m["ucs_anchor"])}
    own_pv = contrastive.replica_offset(b * P) + tf.range(b * P)
    out["pv_loss"] = _contrast(
        tf.math.l2_normalize(tf.reshape(r_pv, [b * P, -1]), axis=-1), pv_anchor, pv_item, own_pv,
        g_pv, m["pv_cand"] > 0, m["pv_item"], out["pv_anchors"], cfg)
    own_ucs = contrastive.replica_offset(b) + tf.range(b)
    out["ucs_loss"] = _contrast(
        tf.math.l2_normalize(r_ucs, axis=-1), ucs_anchor, target_item, own_ucs, g_target,
        m["ucs_cand"] > 0, m["target_item"], out["ucs_anchors"], cfg)
    # Counts are global; a replica's share is 1/R of them so that summing shares gives them.
    r = tf.cast(contrastive.num_replicas(), tf.float32)
    out["pv_anchors"] /= r
    out["ucs_anchors"] /= r
    return out


class CourierTask(loop.Task):
    """COURIER as a training-loop task; the checkpointed `model` is the encoder. With
    `clip_weight` (paper 002 Table 8, COURIER + CLIP) a CLIP loss (`trainer.models.clip`) between
    the page items' image vectors and their catalog titles joins L, with its text tower and tau
    checkpointed beside the encoder."""

    name = "courier"
    metric_names: tuple[str, ...] = ("pv_loss", "ucs_loss", "pv_anchors")

    def __init__(self, cfg: CourierConfig, encoder_cfg: EncoderConfig, train_cfg: TrainConfig,
                 skip_bad_records: bool = False):
        self.cfg, self.encoder_cfg, self.train_cfg = cfg, encoder_cfg, train_cfg
        store = None
        if cfg.catalog_pattern:
            store = pipeline.load_image_store(cfg.catalog_pattern, skip_bad_records)
        transform = None
        if cfg.clip_weight:
            if not cfg.catalog_pattern:
                raise ValueError("courier.clip_weight needs the catalog's titles: set "
                                 "courier.catalog_pattern")
            titles = clip.title_lookup(cfg.catalog_pattern, skip_bad_records)
            self.metric_names = (*self.metric_names, "clip_loss")

            def transform(seed, batch):
                ids = batch["pv_item_ids"]
                words = text.tokenize(titles.lookup(tf.reshape(ids, [-1])), cfg.text)
                return {**batch, "pv_title_ids": tf.reshape(
                    words, tf.concat([tf.shape(ids), [cfg.text.max_words]], 0))}
        # No augmentation: a recommender's images are shown as they are (§3.5).
        self.pipe = pipeline.InputPipeline(pipeline.InputConfig(
            cfg.pageviews_pattern, "pageviews", global_batch_size=train_cfg.global_batch_size,
            image_size=encoder_cfg.image_size, deterministic=train_cfg.deterministic,
            skip_bad_records=skip_bad_records), image_store=store, transform=transform)
        self.encoder: encoder_lib.Encoder | None = None
        self.head: tf_keras.Sequential | None = None
        self.text: text.TextEncoder | None = None
        self.scale: clip.LogitScale | None = None

    def build_model(self):
        self.encoder = encoder_lib.build(self.encoder_cfg)
        if self.cfg.projection_head:
            d = self.encoder_cfg.feature_dim
            self.head = tf_keras.Sequential(
                [tf_keras.layers.Dense(d, activation="relu", dtype="float32"),
                 tf_keras.layers.Dense(d, dtype="float32")], name="projection_head")
            self.head.build([None, d])
        if self.cfg.clip_weight:
            self.text = text.TextEncoder(self.cfg.text, self.encoder_cfg.feature_dim)
            self.scale = clip.LogitScale(self.cfg.clip_temperature, False)
        return self.encoder

    def extra_checkpoint_objects(self):
        extra = {"head": self.head, "text": self.text, "logit_scale": self.scale}
        return {k: v for k, v in extra.items() if v is not None}

    def build_inputs(self, input_context=None):
        return self.seeded_dataset(input_context)

    def compute_loss(self, batch, training=True):
        pv, click = batch["pv_images"], batch["click_images"]
        b, P, K = tf.shape(pv)[0], tf.shape(pv)[1], tf.shape(click)[1]
        # One pass over both image sets: batch norm sees one set of statistics.
        images = tf.concat([tf.reshape(pv, tf.concat([[b * P], tf.shape(pv)[2:]], 0)),
                            tf.reshape(click, tf.concat([[b * K], tf.shape(click)[2:]], 0))], 0)
        assert self.encoder is not None
        features = tf.cast(self.encoder.features(images, training=training), tf.float32)
        e = self.head(features, training=training) if self.head is not None else features
        e_pv, e_click = tf.reshape(e[:b * P], [b, P, -1]), tf.reshape(e[b * P:], [b, K, -1])
        out = courier_losses(e_pv, e_click, batch, self.cfg)
        loss = out["pv_loss"] if self.cfg.no_ucs else out["pv_loss"] + out["ucs_loss"]
        if self.text is not None:
            assert self.scale is not None
            words = tf.reshape(batch["pv_title_ids"], [b * P, self.cfg.text.max_words])
            out["clip_loss"] = clip.clip_loss(
                tf.math.l2_normalize(features[:b * P], axis=-1), self.text(words, training),
                self.scale.temperature(), tf.reshape(batch["pv_item_ids"], [-1]),
                tf.reshape(batch["pv_item_ids_mask"], [-1]) & tf.reduce_any(words > 0, -1))
            loss += self.cfg.clip_weight * out["clip_loss"]
        return loss, {k: out[k] for k in self.metric_names}

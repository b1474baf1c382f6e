"""D: the debiasing network inside the CTR predictor (paper 000 §3.2, Eq. 3, the gate, Eq. 4).

Positives. For every catalog item p, P~_p is the K most similar items, by the cosine of their S1
vectors (S1 saw no clicks, so it is not biased against long-tail items), among the candidate
items of p's category (p itself left out): the paper's non-displayed items (no impression in the
training logs, `displayed_items`) or the low-impression ones (`DebiasConfig.positives`); the
positive p' is drawn from P~_p with Pr(p') = sim(p, p') / sum_{P~_p} sim. `mine_positives`
precomputes P~ with faiss, one inner-product index per category (exact, or IVF for catalogs of
millions, whose recall is measured against exact search); `sample_positives` draws p' inside the
training step. Under the parameter-server strategy P~ is a sharded variable, as the item table
it indexes.

Loss (Eq. 3). With v^D = MLP(v^S2) and the CTR mini-batch N (gathered over replicas),

    L_D = - sum_{p in N} log  exp(g(v^D_p, v^D_p')) / sum_{o in N u {p'}} exp(g(v^D_p, v^D_o))

g is the cosine, as paper 000 defines it, over a temperature tau (this project's choice,
`DebiasConfig.temperature`). The anchor itself, other samples of the same item, and samples of
the positive's item are not in the denominator's N: a copy of the anchor or of its positive is no
negative. As everywhere in this project the sum is taken as a
global mean; L_CTR = L_pred + weight * L_D (Eq. 4).

Gate. alpha = sigmoid(W^T [v^S2, v^D]) with one weight column per feature dimension (W a matrix),
and v_p = alpha * v^S2 + (1 - alpha) * v^D: per dimension a convex combination. v^D is taken
L2-normalised, as v^S2 is (the paper leaves its scale open).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras

from trainer.configs import DebiasConfig
from trainer.data import pipeline
from trainer.features import index as index_lib
from trainer.models import contrastive


def displayed_items(item_id: np.ndarray, logs_pattern: str, kind: Any, item_column: str,
                    skip_bad_records: bool = False) -> np.ndarray:
    """[N] bool: which catalog items (`item_id`) the logs (`logs_pattern` of record kind `kind`)
    display at least once; one streaming pass over their item ids, memory of the catalog's."""
    order = np.argsort(item_id)
    ids = np.asarray(item_id)[order]
    shown = np.zeros(len(ids), bool)
    for batch in pipeline.iter_columns(logs_pattern, kind, (item_column,), skip_bad_records,
                                       batch_size=65536):
        pos = np.minimum(np.searchsorted(ids, batch[item_column]), len(ids) - 1)
        if len(ids):
            shown[pos[ids[pos] == batch[item_column]]] = True
    out = np.zeros(len(ids), bool)
    out[order] = shown
    return out


def candidates(cfg: DebiasConfig, impressions_30d: np.ndarray,
               displayed: np.ndarray | None = None) -> np.ndarray:
    """[N] bool: the catalog items P~ is mined from, as `cfg.positives` says."""
    if cfg.positives == "not_displayed":
        if displayed is None:
            raise ValueError("positives='not_displayed' needs the items the training logs "
                             "display (`displayed_items`)")
        return ~displayed
    return np.asarray(impressions_30d) < cfg.low_impressions


def mine_positives(s1_vectors: np.ndarray, category_id: np.ndarray, candidate: np.ndarray,
                   num_similar: int = 15, index: str = "exact", nprobe: int = 32,
                   anchors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """P~ of every catalog row among the `candidate` [N] bool rows: (neighbour rows [N, K] int64,
    -1 where there are fewer than K candidates; weights [N, K] float32, the cosine clipped at a
    small positive floor, 0 where there is no neighbour). Rows of `s1_vectors` must be
    L2-normalised.

    index: 'exact' (flat inner product) or 'ivf' (faiss IVF with about sqrt(candidates) lists
    per category, `nprobe` searched; a category too small to train one exactly). anchors: mine
    only these rows (the others are left empty), e.g. to measure `recall`."""
    n = len(category_id)
    rows = np.full([n, num_similar], -1, np.int64)
    weights = np.zeros([n, num_similar], np.float32)
    is_candidate = np.asarray(candidate, bool)
    vectors = np.ascontiguousarray(s1_vectors, np.float32)
    wanted = np.ones(n, bool) if anchors is None else np.isin(np.arange(n), anchors)
    for cat in np.unique(category_id):
        members = np.flatnonzero(category_id == cat)
        candidates = members[is_candidate[members]]
        members = members[wanted[members]]
        if len(candidates) == 0 or len(members) == 0:
            continue
        search = index_lib.build(vectors[candidates], index,
                                 lists=int(np.sqrt(len(candidates))), nprobe=nprobe)
        k = min(num_similar + 1, len(candidates))  # one more: the anchor may be a candidate
        for lo in range(0, len(members), 65536):  # batched: bounded memory per category
            batch = members[lo:lo + 65536]
            sims, found = search.search(vectors[batch], k)
            found = np.where(found >= 0, candidates[np.maximum(found, 0)], -1)
            keep = (found >= 0) & (found != batch[:, None])
            # The first K kept of each row, in the search's order (most similar first).
            order = np.argsort(~keep, axis=1, kind="stable")[:, :num_similar]
            kept = np.take_along_axis(keep, order, 1)
            rows[batch, :order.shape[1]] = np.where(kept, np.take_along_axis(found, order, 1), -1)
            # Pr(p') is proportional to the cosine; one at or below 0 keeps a tiny weight.
            weights[batch, :order.shape[1]] = np.where(
                kept, np.maximum(np.take_along_axis(sims, order, 1), 1e-6), 0)
    return rows, weights


def mine(s1_vectors: np.ndarray, category_id: np.ndarray, candidate: np.ndarray,
         cfg: DebiasConfig, seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """`mine_positives` as `cfg` says among the `candidate` rows (`candidates`), with a report:
    seconds, candidates, anchors with positives, and for 'ivf' its recall@K against exact search
    over `cfg.recall_sample` random anchors."""
    t0 = time.time()
    positives = mine_positives(s1_vectors, category_id, candidate, cfg.num_similar, cfg.index,
                               cfg.nprobe)
    report = {"index": cfg.index, "seconds": round(time.time() - t0, 2),
              "with_positives": int((positives[1] > 0).any(axis=1).sum()),
              "items": len(category_id), "candidates": int(np.sum(candidate)),
              "pool": cfg.positives}
    if cfg.index != "exact" and cfg.recall_sample:
        anchors = np.random.default_rng(seed).choice(
            len(category_id), min(cfg.recall_sample, len(category_id)), replace=False)
        t0 = time.time()
        exact, _ = mine_positives(s1_vectors, category_id, candidate, cfg.num_similar,
                                  "exact", anchors=anchors)
        report.update(recall=round(recall(positives[0][anchors], exact[anchors]), 4),
                      recall_anchors=len(anchors),
                      exact_seconds_on_anchors=round(time.time() - t0, 2))
    return positives, report


def recall(approximate: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact neighbours [A, K] (-1: none) that the approximate search [A, K] found."""
    hits = sum(len(np.intersect1d(a[a >= 0], e[e >= 0])) for a, e in
               zip(approximate, exact, strict=True))
    return hits / max(int((exact >= 0).sum()), 1)


def sample_positives(neighbours: tf.Tensor, weights: tf.Tensor, seed=None
                     ) -> tuple[tf.Tensor, tf.Tensor]:
    """One draw per anchor: (neighbour [B] from `neighbours` [B, K] with probability proportional
    to `weights` [B, K], has_positive [B] bool). Anchors without candidates get -1 and False."""
    has = tf.reduce_any(weights > 0, axis=1)
    logits = tf.where(weights > 0, tf.math.log(tf.maximum(weights, 1e-30)), -1e9)
    if seed is None:
        pick = tf.random.categorical(logits, 1, dtype=tf.int32)[:, 0]
    else:
        pick = tf.random.stateless_categorical(logits, 1, seed, dtype=tf.int32)[:, 0]
    chosen = tf.gather(neighbours, pick, axis=1, batch_dims=1)
    return tf.where(has, chosen, tf.cast(-1, chosen.dtype)), has


def debias_loss(anchor_vectors: tf.Tensor, positive_vectors: tf.Tensor, anchor_items: tf.Tensor,
                positive_items: tf.Tensor, has_positive: tf.Tensor,
                temperature: float) -> tf.Tensor:
    """This replica's share of L_D (Eq. 3) as a global mean over anchors with a positive.

    anchor_vectors, positive_vectors: [B, D] v^D of the local anchors and of their positives;
    anchor_items, positive_items: [B] their item ids (which copies to leave out); has_positive:
    [B] bool.
    """
    a = tf.math.l2_normalize(anchor_vectors, axis=1)
    p = tf.math.l2_normalize(positive_vectors, axis=1)
    weight = tf.cast(has_positive, tf.float32)
    all_a, all_items, all_weight = contrastive.gather((a, anchor_items, weight))
    n, local = tf.shape(all_a)[0], tf.shape(a)[0]
    # Candidates: every anchor of the global batch, then the local anchors' positives, of which
    # each anchor sees only its own (Eq. 3's N u {p'}).
    candidates = tf.concat([all_a, p], axis=0)
    not_copy = ((anchor_items[:, None] != all_items[None, :])
                & (positive_items[:, None] != all_items[None, :]))
    valid = tf.concat([not_copy, tf.zeros([local, local], tf.bool)], axis=1)
    per_anchor = contrastive.info_nce(a, candidates, n + tf.range(local), valid, temperature)
    return tf.reduce_sum(per_anchor * weight) / tf.maximum(tf.reduce_sum(all_weight), 1.0)


class DebiasNetwork(tf_keras.layers.Layer):
    """v^D = MLP(v^S2) (L2-normalised) and the gate: call(v_s2) -> (v_p, v_d, alpha)."""

    def __init__(self, cfg: DebiasConfig, output_dim: int, **kwargs):
        super().__init__(**kwargs)
        if len(cfg.hidden_units) != len(cfg.activations):
            raise ValueError(f"hidden_units {cfg.hidden_units} and activations "
                             f"{cfg.activations} differ in length")
        self.cfg = cfg
        self.mlp = tf_keras.Sequential(
            [tf_keras.layers.Dense(u, activation=a) for u, a in
             zip(cfg.hidden_units, cfg.activations, strict=True)]
            + [tf_keras.layers.Dense(output_dim)],
            name="mlp")
        self.gate = tf_keras.layers.Dense(output_dim, activation="sigmoid", name="gate")

    def call(self, v_s2: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        # L2-normalised like v^S2: L_D's cosine leaves the MLP's output scale free, and an
        # arbitrary scale would make the gate mix vectors of unrelated sizes.
        v_d = tf.math.l2_normalize(self.mlp(v_s2), axis=-1)
        alpha = self.gate(tf.concat([v_s2, v_d], axis=-1))
        return alpha * v_s2 + (1.0 - alpha) * v_d, v_d, alpha

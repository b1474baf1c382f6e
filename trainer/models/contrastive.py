"""The InfoNCE form shared by every contrastive loss of the papers (paper 000 Eq. 1-3, paper 002
Eq. 4-6), and the cross-replica gather that makes a global batch's negatives visible to every
replica.

Each loss computes, for its local anchors a,

    -log( exp(g(a, p_a)/tau) / sum_{c in C_a} exp(g(a, c)/tau) )

over candidates C_a gathered from all replicas, where g is cosine similarity (the inputs are
L2-normalised) and C_a contains the positive p_a. Losses are summed over the local anchors and
divided by the global number of anchors, so that summing gradients over replicas (what
`apply_gradients` does under a strategy) gives the gradient of the global mean.
"""
from __future__ import annotations

import tensorflow as tf

# Logit of excluded candidates; finite so that a row with no valid candidate stays NaN-free.
_EXCLUDED = -1e9


def gather(x):
    """Concatenates every tensor of the nest `x` over replicas along axis 0 (replica 0 first);
    differentiable for floating-point tensors. The identity outside a strategy.

    Collectives issued separately may run in different orders on different replicas and pair up
    the wrong tensors (and the gradient of `all_gather` issues more of them). So the tensors are
    packed into one vector per kind, floating point (differentiable) then integer, and gathered by
    at most two `all_gather`s, the second ordered after the first. Every replica must pass tensors
    of the same shapes.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x
    flat = tf.nest.flatten(x)
    out = [None] * len(flat)
    after: list = []
    for is_float in (True, False):
        idx = [i for i, t in enumerate(flat) if t.dtype.is_floating == is_float]
        if not idx:
            continue
        dtype = tf.float32 if is_float else tf.int64
        parts = [tf.reshape(tf.cast(flat[i], dtype), [-1]) for i in idx]
        with tf.control_dependencies(after):
            packed = ctx.all_gather(tf.concat(parts, 0), axis=0)
        after = [packed]
        rows = tf.reshape(packed, [ctx.num_replicas_in_sync, -1])
        sizes = [tf.size(p) for p in parts]
        for i, piece in zip(idx, tf.split(rows, sizes, axis=1), strict=True):
            shape = tf.concat([[-1], tf.shape(flat[i])[1:]], 0)
            out[i] = tf.cast(tf.reshape(piece, shape), flat[i].dtype)
    return tf.nest.pack_sequence_as(x, out)


def replica_offset(local_size: tf.Tensor | int) -> tf.Tensor:
    """Global index of this replica's first row once rows are gathered (equal local sizes)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return tf.constant(0, tf.int32)
    return tf.cast(ctx.replica_id_in_sync_group, tf.int32) * tf.cast(local_size, tf.int32)


def num_replicas() -> int:
    ctx = tf.distribute.get_replica_context()
    return 1 if ctx is None else ctx.num_replicas_in_sync


def info_nce(anchors: tf.Tensor, candidates: tf.Tensor, positive: tf.Tensor,
             valid: tf.Tensor, temperature: float) -> tf.Tensor:
    """Per-anchor InfoNCE loss [A].

    anchors: [A, D], candidates: [C, D], both L2-normalised; positive: [A] int, the column of each
    anchor's positive; valid: [A, C] bool, the candidates of each anchor's denominator (the
    positive is always included).
    """
    logits = tf.matmul(anchors, candidates, transpose_b=True) / temperature
    onehot = tf.one_hot(positive, tf.shape(candidates)[0], on_value=True, off_value=False)
    logits = tf.where(valid | onehot, logits, _EXCLUDED)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positive, logits=logits)


def global_mean(per_anchor: tf.Tensor) -> tf.Tensor:
    """This replica's share of the global mean: sum of local values / global count."""
    n = tf.cast(tf.shape(per_anchor)[0] * num_replicas(), per_anchor.dtype)
    return tf.reduce_sum(per_anchor) / n

"""Paper 002 Table 5's SimSiam and CLIP losses against direct NumPy computations on fixed
embeddings, and on 1 vs 2 replicas at the same global batch."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from tests.test_contrastive_losses import _on_strategy, _unit
from trainer.models import clip, simsiam


def numpy_simsiam(p1, p2, z1, z2):
    def d(p, z):
        return -np.sum(p / np.linalg.norm(p, axis=1, keepdims=True)
                       * z / np.linalg.norm(z, axis=1, keepdims=True), axis=1)
    return float(np.mean(0.5 * d(p1, z2) + 0.5 * d(p2, z1)))


def numpy_clip(v, t, ids, tau, valid=None):
    """Both directions, each row's positive its own pair, other copies of its item and rows that
    are not pairs (`valid`) left out."""
    n, losses = len(v), []
    valid = np.ones(n, bool) if valid is None else valid
    for a, b in ((v, t), (t, v)):
        for i in np.flatnonzero(valid):
            cols = [j for j in range(n) if j == i or (ids[j] != ids[i] and valid[j])]
            logits = np.array([a[i] @ b[j] / tau for j in cols])
            losses.append(-(logits[cols.index(i)] - np.log(np.sum(np.exp(logits)))))
    return float(np.mean(losses))


def test_simsiam_loss_matches_numpy_and_stops_the_target_gradient():
    rng = np.random.default_rng(0)
    p1, p2, z1, z2 = (rng.normal(size=[6, 8]).astype(np.float32) for _ in range(4))
    got = float(simsiam.simsiam_loss(p1, p2, z1, z2))
    assert abs(got - numpy_simsiam(p1, p2, z1, z2)) < 1e-6
    assert -1 <= got <= 1
    z = tf.Variable(z1)
    p = tf.Variable(p1)
    with tf.GradientTape() as tape:
        loss = simsiam.simsiam_loss(p, p2, z, z2)
    grad_p, grad_z = tape.gradient(loss, [p, z])
    assert grad_z is None and np.abs(grad_p.numpy()).sum() > 0


def test_clip_loss_matches_numpy_with_repeated_items():
    rng = np.random.default_rng(1)
    v, t = _unit(rng, 6), _unit(rng, 6)
    ids = np.array([3, 4, 3, 5, 6, 7], np.int64)  # item 3 twice: not its own negative
    got = float(clip.clip_loss(v, t, 0.1, ids))
    assert abs(got - numpy_clip(v, t, ids, 0.1)) < 1e-5
    distinct = float(clip.clip_loss(v, t, 0.1))
    assert abs(distinct - numpy_clip(v, t, np.arange(6), 0.1)) < 1e-5


def test_simsiam_and_clip_losses_same_on_one_and_two_replicas(mirrored):
    rng = np.random.default_rng(2)
    p1, p2, z1, z2 = (rng.normal(size=[8, 8]).astype(np.float32) for _ in range(4))
    v, t = _unit(rng, 8), _unit(rng, 8)
    ids = np.array([1, 2, 3, 1, 5, 6, 7, 3], np.int64)  # copies across the two replicas' halves
    strategies = (tf.distribute.OneDeviceStrategy("/cpu:0"), mirrored)
    one, two = (_on_strategy(s, simsiam.simsiam_loss, p1, p2, z1, z2) for s in strategies)
    assert abs(one - two) < 1e-6 and abs(one - numpy_simsiam(p1, p2, z1, z2)) < 1e-6
    one, two = (_on_strategy(s, lambda a, b, c: clip.clip_loss(a, b, 0.1, c), v, t, ids)
                for s in strategies)
    assert abs(one - two) < 1e-5 and abs(one - numpy_clip(v, t, ids, 0.1)) < 1e-5
    one, two = (_on_strategy(s, lambda a, b: clip.clip_loss(a, b, 0.1), v, t)
                for s in strategies)
    assert abs(one - two) < 1e-5 and abs(one - numpy_clip(v, t, np.arange(8), 0.1)) < 1e-5
    # Rows that are not pairs (COURIER + CLIP: padded page items, items without a title).
    valid = np.array([1, 1, 0, 1, 1, 0, 1, 1], bool)
    one, two = (_on_strategy(s, lambda a, b, c, d: clip.clip_loss(a, b, 0.1, c, d), v, t, ids,
                             valid) for s in strategies)
    want = numpy_clip(v, t, ids, 0.1, valid)
    assert abs(one - two) < 1e-5 and abs(one - want) < 1e-5

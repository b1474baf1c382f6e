"""S1 (Eq. 1) and S2 (Eq. 2) losses against direct NumPy sums, and on 1 vs 2 replicas."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from trainer.models import finetune, pretrain


def _unit(rng, n, d=8):
    x = rng.normal(size=[n, d]).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_s1(v1, v2, tau):
    """Eq. 1 symmetrised: each of the 2N views is an anchor, its other view the positive, every
    other view a negative; mean over anchors."""
    views = np.concatenate([v1, v2])
    n = len(v1)
    losses = []
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        num = np.exp(views[a] @ views[pos] / tau)
        den = sum(np.exp(views[a] @ views[j] / tau) for j in range(2 * n) if j != a)
        losses.append(-np.log(num / den))
    return float(np.mean(losses))


def s2_example(rng, b=6, p=8):
    meta = {
        "query_id": np.array([10, 11, 12, 10, 13, 14], np.int64)[:b],
        "clicked_item_id": np.array([100, 101, 102, 103, 104, 105], np.int64)[:b],
        "clicked_category_id": np.array([1, 1, 1, 1, 2, 2], np.int64)[:b],
        # 100 duplicates query 0's positive; 104 query 4's; categories mixed.
        "pool_item_id": np.array([100, 200, 201, 202, 104, 203, 204, 205], np.int64)[:p],
        "pool_category_id": np.array([1, 1, 1, 2, 2, 2, 1, 2], np.int64)[:p],
    }
    return _unit(rng, b), _unit(rng, b), _unit(rng, p), meta


def numpy_s2(q, clicked, pool, meta, tau, in_batch=True):
    """Eq. 2: positive = own click; N_{c_i} = pool images and (in_batch) other clicks of the
    clicked item's category, minus copies of the positive item and other clicks on the same
    query."""
    losses = []
    for i in range(len(q)):
        cat, item, query = (meta["clicked_category_id"][i], meta["clicked_item_id"][i],
                            meta["query_id"][i])
        den = np.exp(q[i] @ clicked[i] / tau)
        num = den
        for j in range(len(pool)):
            if meta["pool_category_id"][j] == cat and meta["pool_item_id"][j] != item:
                den += np.exp(q[i] @ pool[j] / tau)
        if in_batch:
            for j in range(len(q)):
                if (j != i and meta["clicked_category_id"][j] == cat
                        and meta["clicked_item_id"][j] != item and meta["query_id"][j] != query):
                    den += np.exp(q[i] @ clicked[j] / tau)
        losses.append(-np.log(num / den))
    return float(np.mean(losses))


@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_s1_loss_matches_numpy(tau):
    rng = np.random.default_rng(0)
    v1, v2 = _unit(rng, 5), _unit(rng, 5)
    got = float(pretrain.s1_loss(tf.constant(v1), tf.constant(v2), tau))
    np.testing.assert_allclose(got, numpy_s1(v1, v2, tau), rtol=1e-5)


@pytest.mark.parametrize("in_batch", [True, False])
def test_s2_loss_matches_numpy(in_batch):
    rng = np.random.default_rng(1)
    q, clicked, pool, meta = s2_example(rng)
    loss, negatives = finetune.s2_loss(tf.constant(q), tf.constant(clicked), tf.constant(pool),
                                       {k: tf.constant(v) for k, v in meta.items()}, 0.2, in_batch)
    np.testing.assert_allclose(float(loss), numpy_s2(q, clicked, pool, meta, 0.2, in_batch),
                               rtol=1e-5)
    # Query 0 (category 1): pool 200, 201, 204 (100 is its own item); in batch 101, 102 (103 is
    # another click on the same query).
    assert float(negatives) > 0


def _on_strategy(strategy, fn, *global_inputs):
    """Runs fn in replica context on the global inputs split across replicas; returns the sum
    of the replicas' values (each is its share of the global loss)."""
    ds = tf.data.Dataset.from_tensors(global_inputs)
    dist = strategy.experimental_distribute_dataset(ds)

    @tf.function  # eager collectives can pair up mismatched ops across replicas
    def step(inputs):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(fn, args=inputs), None)

    return float(step(next(iter(dist))))


def test_s1_loss_same_on_one_and_two_replicas(mirrored):
    rng = np.random.default_rng(2)
    v1, v2 = _unit(rng, 8), _unit(rng, 8)
    one, two = (_on_strategy(s, lambda a, b: pretrain.s1_loss(a, b, 0.1), v1, v2)
                for s in (tf.distribute.OneDeviceStrategy("/cpu:0"), mirrored))
    assert abs(one - two) < 1e-5
    assert abs(one - numpy_s1(v1, v2, 0.1)) < 1e-5


def test_s2_loss_same_on_one_and_two_replicas(mirrored):
    rng = np.random.default_rng(3)
    q, clicked, pool, meta = s2_example(rng)
    q, clicked = q[:6], clicked[:6]
    keys = sorted(meta)

    def fn(q_, c_, p_, *m):
        return finetune.s2_loss(q_, c_, p_, dict(zip(keys, m, strict=True)), 0.2)[0]

    one, two = (_on_strategy(s, fn, q, clicked, pool, *[meta[k] for k in keys])
                for s in (tf.distribute.OneDeviceStrategy("/cpu:0"), mirrored))
    assert abs(one - two) < 1e-5
    assert abs(one - numpy_s2(q, clicked, pool, meta, 0.2)) < 1e-5

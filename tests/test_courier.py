"""COURIER (paper 002 Eq. 1-7): L_pv and L_ucs against NumPy, on one and two replicas, and a
training step of the stage on the tiny world."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tests.test_contrastive_losses import _on_strategy
from tests.test_visual_stages import ENC
from trainer import configs
from trainer.data import records
from trainer.models import courier
from trainer.train import loop

TAU = 0.1


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _cos(a, b):
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def _reconstruct(q, keys):
    """Eq. 2-3 for one query over the (unpadded) keys."""
    return _softmax(keys @ q / np.sqrt(len(q))) @ keys


def _contrast(anchor_recon, own, cand_vectors, cand_items, tau):
    """Eq. 6's term of one anchor: softmax over the candidates (columns j0) of cos / tau; copies
    of the anchor's item other than itself are left out."""
    logits = {j: _cos(v, anchor_recon) / tau for j, v in enumerate(cand_vectors)
              if j == own or cand_items[j] != cand_items[own]}
    return -(logits[own] - np.log(sum(np.exp(v) for v in logits.values())))


def numpy_courier(e_pv, e_click, ids, labels, pv_mask, clicks, click_mask, tau):
    """Eq. 4-7 written out over the global batch: (L_pv, L_ucs), each a mean over its anchors."""
    b, P, _ = e_pv.shape
    flat = [(i, j) for i in range(b) for j in range(P) if pv_mask[i, j]]
    cand = [e_pv[i, j] for i, j in flat]
    cand_items = [ids[i, j] for i, j in flat]
    pv = []
    for n, (i, j) in enumerate(flat):
        hist = e_click[i][click_mask[i]]
        if labels[i, j] and len(hist):
            pv.append(_contrast(_reconstruct(e_pv[i, j], hist), n, cand, cand_items, tau))
    rows = [i for i in range(b) if click_mask[i].any()]
    targets = [e_click[i][click_mask[i]][-1] for i in rows]
    target_items = [clicks[i][click_mask[i]][-1] for i in rows]
    ucs = []
    for n, i in enumerate(rows):
        hist = e_click[i][click_mask[i]][:-1]
        if len(hist):
            ucs.append(_contrast(_reconstruct(targets[n], hist), n, targets, target_items, tau))
    return float(np.mean(pv)), float(np.mean(ucs))


def example(rng, b=6, P=4, K=4, d=8):
    """Pages with several clicks, padded pages and histories, a page without a history, one with
    a single click, and an item on two pages."""
    e_pv = rng.normal(size=[b, P, d]).astype(np.float32)
    e_click = rng.normal(size=[b, K, d]).astype(np.float32)
    ids = np.arange(b * P, dtype=np.int64).reshape(b, P) + 100
    ids[3, 1] = ids[0, 0]  # the same item shown on two pages
    labels = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 1, 1], [1, 1, 0, 0], [0, 0, 1, 0],
                       [1, 0, 0, 0]], np.int64)
    pv_mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1],
                        [1, 1, 1, 1]], bool)
    click_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0],
                           [1, 1, 1, 1]], bool)
    clicks = np.arange(b * K, dtype=np.int64).reshape(b, K) + 500
    clicks[5, 3] = clicks[0, 3]  # two users whose latest click is the same item
    return e_pv, e_click, ids, labels, pv_mask, clicks, click_mask


def _losses(cfg, e_pv, e_click, ids, labels, pv_mask, clicks, click_mask):
    return courier.courier_losses(e_pv, e_click, {
        "pv_item_ids": ids, "pv_labels": labels, "pv_item_ids_mask": pv_mask,
        "click_item_ids": clicks, "click_item_ids_mask": click_mask}, cfg)


def test_pv_and_ucs_losses_match_numpy():
    ex = example(np.random.default_rng(0))
    out = _losses(configs.CourierConfig(temperature=TAU), *map(tf.constant, ex))
    pv, ucs = numpy_courier(*ex, TAU)
    np.testing.assert_allclose(float(out["pv_loss"]), pv, rtol=1e-5)
    np.testing.assert_allclose(float(out["ucs_loss"]), ucs, rtol=1e-5)
    assert float(out["pv_anchors"]) == 7 and float(out["ucs_anchors"]) == 4


@pytest.mark.parametrize("variant", [None, "no_contrast", "self_attention", "no_neg_pv"])
def test_losses_same_on_one_and_two_replicas(variant, mirrored):
    ex = example(np.random.default_rng(1))
    cfg = configs.CourierConfig(temperature=TAU, **({variant: True} if variant else {}))
    for key in ("pv_loss", "ucs_loss"):
        one, two = (_on_strategy(s, lambda *x, k=key: _losses(cfg, *x)[k], *ex)
                    for s in (tf.distribute.OneDeviceStrategy("/cpu:0"), mirrored))
        assert np.isfinite(one) and abs(one - two) < 1e-5, (key, one, two)


def test_ablations_change_the_loss_as_described():
    ex = example(np.random.default_rng(2))
    t = list(map(tf.constant, ex))
    full = _losses(configs.CourierConfig(temperature=TAU), *t)
    # Without negative PV items the denominator holds only clicked items: a smaller loss.
    no_neg = _losses(configs.CourierConfig(temperature=TAU, no_neg_pv=True), *t)
    assert float(no_neg["pv_loss"]) < float(full["pv_loss"])
    # Without contrast: 1 - cos(E_pv^j, R^j), in [0, 2].
    dist = float(_losses(configs.CourierConfig(no_contrast=True), *t)["pv_loss"])
    assert 0 <= dist <= 2
    # Multi-head reconstruction splits d into heads; one head is Eq. 2.
    r1 = courier.reconstruct(t[0], t[1], t[6], heads=1)
    r2 = courier.reconstruct(t[0], t[1], t[6], heads=2)
    assert r1.shape == r2.shape and not np.allclose(r1.numpy(), r2.numpy())


def test_courier_step_trains_the_encoder_on_the_tiny_world(tiny_world, tmp_path):
    train = configs.TrainConfig(steps=2, global_batch_size=4, log_interval=1, warmup_steps=0)
    cfg = configs.CourierConfig(
        pageviews_pattern=records.default_pattern(tiny_world, "pageviews", "train"),
        catalog_pattern=records.default_pattern(tiny_world, "catalog"), projection_head=True)
    task = courier.CourierTask(cfg, ENC, train)
    last = loop.run(task, train, str(tmp_path / "c"))
    assert np.isfinite(last["loss"]) and last["pv_anchors"] > 0
    # The projection head is trained beside the encoder but is not part of it.
    assert task.head is not None and not any("projection_head" in v.name
                                             for v in task.encoder.variables)

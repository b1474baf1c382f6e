"""D (paper 000 Eq. 3, gate): L_D against NumPy, the positive sampler, and the gate."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from tests.test_contrastive_losses import _on_strategy, _unit
from trainer import configs
from trainer.ctr import debias


def numpy_debias(a, p, items, pos_items, has, tau):
    """Eq. 3 written out: candidates are the batch's anchors that are neither a copy of the
    anchor's item nor of its positive's item, and the anchor's own positive; cosine / tau; mean
    over anchors that have a positive."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    losses = []
    for i in range(len(a)):
        if not has[i]:
            continue
        num = np.exp(a[i] @ p[i] / tau)
        den = num + sum(np.exp(a[i] @ a[j] / tau) for j in range(len(a))
                        if items[j] != items[i] and items[j] != pos_items[i])
        losses.append(-np.log(num / den))
    return float(np.mean(losses))


def debias_example(rng, n=8):
    a = rng.normal(size=[n, 6]).astype(np.float32) * 3  # not normalised: MLP outputs
    p = rng.normal(size=[n, 6]).astype(np.float32)
    items = np.array([5, 6, 5, 7, 8, 9, 10, 11], np.int64)[:n]  # item 5 twice
    pos_items = np.array([20, 7, 21, 22, 23, 24, 25, -1], np.int64)[:n]  # 6's positive is in batch
    has = np.array([1, 1, 1, 1, 1, 1, 1, 0], bool)[:n]
    return a, p, items, pos_items, has


def test_debias_loss_matches_numpy():
    a, p, items, pos_items, has = debias_example(np.random.default_rng(0))
    got = float(debias.debias_loss(tf.constant(a), tf.constant(p), tf.constant(items),
                                   tf.constant(pos_items), tf.constant(has), 0.2))
    np.testing.assert_allclose(got, numpy_debias(a, p, items, pos_items, has, 0.2), rtol=1e-5)


def test_debias_loss_same_on_one_and_two_replicas(mirrored):
    a, p, items, pos_items, has = debias_example(np.random.default_rng(1))
    fn = lambda *x: debias.debias_loss(*x, 0.1)  # noqa: E731
    one, two = (_on_strategy(s, fn, a, p, items, pos_items, has)
                for s in (tf.distribute.OneDeviceStrategy("/cpu:0"), mirrored))
    assert abs(one - two) < 1e-5
    assert abs(one - numpy_debias(a, p, items, pos_items, has, 0.1)) < 1e-5


def _catalog(rng, n=300, categories=3):
    vectors = _unit(rng, n, 16)
    category = rng.integers(0, categories, n)
    impressions = rng.choice([0, 2, 4, 7, 50, 900], n)
    return vectors, category, impressions


def test_mined_positives_are_same_category_low_impression_nearest():
    rng = np.random.default_rng(2)
    vectors, category, impressions = _catalog(rng)
    rows, weights = debias.mine_positives(vectors, category, impressions < 5, num_similar=15)
    for anchor in range(len(vectors)):
        cand = np.flatnonzero((category == category[anchor]) & (impressions < 5))
        cand = cand[cand != anchor]
        sims = vectors[cand] @ vectors[anchor]
        expected = cand[np.argsort(-sims, kind="stable")][:15]
        got = rows[anchor][rows[anchor] >= 0]
        assert set(got) == set(expected)
        np.testing.assert_allclose(weights[anchor][:len(got)],
                                   np.maximum(vectors[got] @ vectors[anchor], 1e-6), rtol=1e-5)
        assert np.all(weights[anchor][len(got):] == 0)


def test_ivf_mining_is_approximate_search_with_its_recall_measured():
    # Clustered vectors (as catalog images are), 2 categories of 6,000 items: IVF per category.
    rng = np.random.default_rng(3)
    centres = _unit(rng, 60, 16)
    vectors = centres[rng.integers(0, 60, 12000)] + 0.3 * rng.normal(size=[12000, 16])
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    category = rng.integers(0, 2, 12000)
    impressions = rng.choice([0, 2, 50], 12000)
    exact = debias.mine_positives(vectors, category, impressions < 5, 15)
    cfg = configs.DebiasConfig(index="ivf", nprobe=4, recall_sample=500)
    (rows, weights), report = debias.mine(vectors, category, impressions < 5, cfg)
    true_recall = debias.recall(rows, exact[0])
    assert 0.6 < true_recall < 1.0  # approximate, and close
    assert abs(report["recall"] - true_recall) < 0.05  # the sampled estimate
    assert report["recall_anchors"] == 500 and report["with_positives"] == 12000
    # Found neighbours are real candidates with their true cosine as weight.
    found = rows >= 0
    assert (category[rows[found]] == np.repeat(category, 15).reshape(-1, 15)[found]).all()
    assert (impressions[rows[found]] < 5).all()
    cos = np.einsum("nd,nkd->nk", vectors, vectors[np.maximum(rows, 0)])
    np.testing.assert_allclose(weights[found], np.maximum(cos[found], 1e-6), rtol=1e-4)
    # More lists probed: higher recall.
    more = debias.mine_positives(vectors, category, impressions < 5, 15, "ivf", nprobe=32)
    assert debias.recall(more[0], exact[0]) > true_recall


def test_sampler_returns_only_candidates_in_proportion_to_similarity():
    rng = np.random.default_rng(3)
    vectors, category, impressions = _catalog(rng)
    rows, weights = debias.mine_positives(vectors, category, impressions < 5, 15)
    anchor = int(np.flatnonzero(impressions > 100)[0])  # a head item
    draws = 20000
    picked, has = debias.sample_positives(
        tf.constant(np.repeat(rows[anchor:anchor + 1], draws, 0)),
        tf.constant(np.repeat(weights[anchor:anchor + 1], draws, 0)), seed=[1, 2])
    picked = picked.numpy()
    assert has.numpy().all()
    assert np.all(category[picked] == category[anchor])
    assert np.all(impressions[picked] < 5)
    assert anchor not in picked
    # Frequencies proportional to similarity: chi-square goodness of fit.
    cands = rows[anchor][rows[anchor] >= 0]
    expected = weights[anchor][:len(cands)] / weights[anchor][:len(cands)].sum() * draws
    observed = np.array([(picked == c).sum() for c in cands])
    assert observed.sum() == draws
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    # A uniform draw would be rejected: the test has power.
    uniform = np.full(len(cands), draws / len(cands))
    assert stats.chisquare(observed, uniform).pvalue < 1e-6


def test_sampler_without_candidates():
    picked, has = debias.sample_positives(tf.constant([[3, -1], [-1, -1]], tf.int64),
                                          tf.constant([[0.5, 0.0], [0.0, 0.0]]), seed=[0, 0])
    assert picked.numpy().tolist() == [3, -1]
    assert has.numpy().tolist() == [True, False]


def test_gate_is_a_convex_combination():
    net = debias.DebiasNetwork(configs.DebiasConfig(), output_dim=32)
    v_s2 = tf.constant(_unit(np.random.default_rng(4), 64, 32))
    v_p, v_d, alpha = net(v_s2)
    assert v_d.shape == (64, 32) and alpha.shape == (64, 32)
    a = alpha.numpy()
    assert np.all((a > 0) & (a < 1))
    np.testing.assert_allclose(v_p.numpy(), a * v_s2.numpy() + (1 - a) * v_d.numpy(), rtol=1e-5,
                               atol=1e-6)
    lo, hi = np.minimum(v_s2.numpy(), v_d.numpy()), np.maximum(v_s2.numpy(), v_d.numpy())
    assert np.all(v_p.numpy() >= lo - 1e-6) and np.all(v_p.numpy() <= hi + 1e-6)
    # Paper 000 §4 sizes: 128, 16, 128 hidden units (ReLU, tanh, ReLU), D outputs.
    dense = list(net.mlp.layers)
    assert [layer.units for layer in dense] == [128, 16, 128, 32]
    assert [layer.activation.__name__ for layer in dense] == ["relu", "tanh", "relu", "linear"]


def test_mismatched_mlp_config_is_refused():
    with pytest.raises(ValueError, match="activations"):
        debias.DebiasNetwork(configs.DebiasConfig(hidden_units=(8, 8), activations=("relu",)), 4)


def test_not_displayed_pool_is_the_items_without_an_impression_in_the_logs(tiny_world):
    from conftest import read_all
    from trainer.ctr import spec as ctr_spec
    from trainer.data import records
    spec = ctr_spec.load("synthetic")
    catalog = read_all(tiny_world, "catalog")["item_id"]
    ids = np.concatenate([catalog, [10 ** 12]])  # an item the logs never show
    shown = debias.displayed_items(ids, records.default_pattern(tiny_world, "ctr", "train"),
                                   spec.record_kind(), spec.item)
    logged = read_all(tiny_world, spec.record_kind(), "train")[spec.item]
    np.testing.assert_array_equal(shown, np.isin(ids, logged))
    assert not shown[-1] and shown.any()
    cfg = configs.DebiasConfig(positives="not_displayed")
    np.testing.assert_array_equal(debias.candidates(cfg, np.zeros(len(ids)), shown), ~shown)
    with pytest.raises(ValueError, match="not_displayed"):
        debias.candidates(cfg, np.zeros(len(ids)))
    low = debias.candidates(configs.DebiasConfig(), np.array([0, 4, 5, 9]))
    np.testing.assert_array_equal(low, [True, True, False, False])


def test_d_without_a_long_tail_says_its_loss_is_zero(trained, tiny_world, tmp_path, capsys):
    """With no item under `low_impressions` impressions D has no positives: L_D is 0 and only
    its gated branch trains, which the stage says rather than train on silently."""
    from export_helpers import ctr_config
    from trainer import registry
    registry.run(ctr_config(tiny_world, str(tmp_path / "d"), "debias", images__encoder="s1",
                            images__model_dir=trained["encoder"],
                            images__s1_model_dir=trained["encoder"],
                            ctr__debias__low_impressions=0, train__steps=2))
    out = capsys.readouterr().out
    assert "debias: 0 of 480 catalog items have positives" in out
    assert "WARNING: no item has a positive, so D's loss is zero" in out

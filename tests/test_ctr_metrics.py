"""AUC, GAUC and the impression slices of Table 2 against scikit-learn and direct definitions."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from trainer.eval import ctr_metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(5000) < 0.08
    s = rng.normal(size=5000) + y * 0.7
    s[::7] = np.round(s[::7], 1)  # ties
    assert ctr_metrics.auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_single_class_is_nan():
    assert np.isnan(ctr_metrics.auc(np.zeros(5), np.arange(5.0)))


def test_gauc_matches_sklearn_per_group():
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 300, 4000)
    y = rng.random(4000) < 0.1
    s = rng.normal(size=4000) + y
    total = weight = used = 0
    for g in np.unique(groups):
        m = groups == g
        if y[m].all() or not y[m].any():
            continue
        total += roc_auc_score(y[m], s[m]) * m.sum()
        weight += m.sum()
        used += 1
    got, got_used = ctr_metrics.gauc(y, s, groups)
    assert got_used == used and used < 300  # some one-class groups were skipped
    assert got == pytest.approx(total / weight, abs=1e-12)


def test_impression_slices_take_whole_items_from_each_end():
    items = np.array([1, 1, 2, 3, 3, 3, 4, 5, 6, 7] * 10)
    imp_of = {1: 0, 2: 3, 3: 10, 4: 10, 5: 500, 6: 80, 7: 999}
    imps = np.array([imp_of[i] for i in items])
    bottom, top = ctr_metrics.impression_slices(items, imps, 0.1)
    # 10% = 10 samples: item 1 (20 samples) alone reaches it; the top is item 7 (10 samples).
    assert set(items[bottom]) == {1} and set(items[top]) == {7}
    bottom, top = ctr_metrics.impression_slices(items, imps, 0.25)  # 25 samples
    assert set(items[bottom]) == {1, 2} and set(items[top]) == {7, 5, 6}


def test_ctr_metrics_fields():
    rng = np.random.default_rng(4)
    n = 2000
    items = rng.integers(0, 100, n)
    imps = (items * 7) % 31
    y = rng.random(n) < 0.2
    s = rng.random(n)
    m = ctr_metrics.ctr_metrics(y, s, rng.integers(0, 200, n), items, imps)
    bottom, top = ctr_metrics.impression_slices(items, imps)
    assert m["AUC_bottom10"] == pytest.approx(roc_auc_score(y[bottom], s[bottom]))
    assert m["AUC_top10"] == pytest.approx(roc_auc_score(y[top], s[top]))
    assert m["bottom10_samples"] >= 0.1 * n and m["top10_samples"] >= 0.1 * n
    assert m["bottom10_max_impressions"] <= m["top10_min_impressions"]


def test_auc_by_impression_decile_splits_samples_by_their_items_popularity():
    rng = np.random.default_rng(4)
    items = rng.integers(0, 500, 6000)
    impressions = items * 3  # popularity grows with the id here
    y = rng.random(6000) < 0.1
    # Scores informative only on the least displayed half.
    s = rng.normal(size=6000) + y * (impressions < np.median(impressions)) * 2.0
    bins = ctr_metrics.auc_by_impression_decile(y, s, items, impressions)
    assert len(bins) == 10 and sum(b["samples"] for b in bins) == 6000
    bounds = [b["max_impressions"] for b in bins]
    assert bounds == sorted(bounds)
    first = np.argsort(impressions, kind="stable")[:600]
    assert bins[0]["AUC"] == pytest.approx(roc_auc_score(y[first], s[first]), abs=1e-12)
    assert min(b["AUC"] for b in bins[:4]) > 0.75 and max(b["AUC"] for b in bins[6:]) < 0.65


@pytest.mark.parametrize("seed", range(3))
def test_histogram_auc_is_within_its_bound_of_the_exact_auc(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(5000) < 0.1
    # CTR-like scores over decades, some tied exactly, one at 1.0 and one at 0.
    scores = np.clip(np.exp(rng.normal(-4, 1.5, 5000) + labels * 0.5), 0, 1).astype(np.float32)
    scores[:50], scores[50], scores[51] = scores[100], 1.0, 0.0
    exact = ctr_metrics.auc(labels, scores)
    for bits in (4, 8, 12):
        b = ctr_metrics.score_bins(scores, bits)
        assert np.all(np.diff(b[np.argsort(scores)]) >= 0)  # the grid keeps the order
        bins = ctr_metrics.num_score_bins(bits)
        pos = np.bincount(b[labels], minlength=bins)
        neg = np.bincount(b[~labels], minlength=bins)
        value, bound = ctr_metrics.histogram_auc(pos, neg)
        assert abs(value - exact) <= bound + 1e-12
    assert bound < 1e-3  # 12 bits: the bound is small against any difference worth reporting
    with pytest.raises(ValueError, match="probabilities"):
        ctr_metrics.score_bins(np.array([0.5, np.nan], np.float32))


@pytest.mark.parametrize("seed", range(4))
def test_slices_from_level_counts_equal_impression_slices(seed):
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 300, 4000)
    item_impressions = rng.integers(0, 12, 300)  # few levels: many ties at the cut
    impressions = item_impressions[items]
    bottom, top = ctr_metrics.impression_slices(items, impressions)
    levels, samples = np.unique(impressions, return_counts=True)
    for most, want in ((False, bottom), (True, top)):
        level, wanted = ctr_metrics.slice_cutoff(levels, samples, 0.1, most=most)
        at = impressions == level
        ids, n = np.unique(items[at], return_counts=True)
        taken = ctr_metrics.take_items(ids, n, wanted)
        beyond = impressions > level if most else impressions < level
        np.testing.assert_array_equal(beyond | (at & np.isin(items, taken)), want)

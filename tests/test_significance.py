"""The paired bootstrap that judges the papers' orderings (`trainer.eval.significance`), on cases
with a known answer."""
from __future__ import annotations

import numpy as np
import pytest

from trainer.eval import ctr_metrics, significance


def _pages(rng, pages=300, per=8, rate=0.2):
    unit_of = np.repeat(np.arange(pages), per)
    labels = (rng.random(len(unit_of)) < rate).astype(np.int64)
    return labels, unit_of


def test_weighted_auc_is_the_auc_with_ties_and_follows_the_weights():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.random(500) + 0.3 * labels, 1)  # many ties
    ones = np.ones([1, 500])
    np.testing.assert_allclose(significance.weighted_auc(labels, scores)(ones)[0],
                               ctr_metrics.auc(labels, scores), atol=1e-12)
    counts = rng.integers(0, 3, [4, 500]).astype(np.float64)  # integer weights = repeated rows
    for row in counts:
        rows = np.repeat(np.arange(500), row.astype(int))
        np.testing.assert_allclose(significance.weighted_auc(labels, scores)(row[None])[0],
                                   ctr_metrics.auc(labels[rows], scores[rows]), atol=1e-12)


def test_identical_models_are_within_noise_and_a_perfect_one_beats_a_random_one():
    rng = np.random.default_rng(1)
    labels, unit_of = _pages(rng)
    units = int(unit_of.max()) + 1
    random_scores = rng.random(len(labels))
    perfect = labels + 0.1 * rng.random(len(labels))
    other_random = rng.random(len(labels))  # as good (AUC 0.5), different predictions
    for metric in (significance.auc_metric(labels, unit_of),
                   significance.gauc_metric(labels, unit_of)):
        same = significance.compare(metric, random_scores, random_scores, units, 300)
        assert same.difference.low <= 0 <= same.difference.high
        assert same.verdict == "within noise"
        better = significance.compare(metric, perfect, random_scores, units, 300)
        assert better.verdict == "holds" and better.difference.low > 0.3
        assert significance.compare(metric, random_scores, perfect, units, 300).verdict == "fails"
        assert significance.compare(metric, other_random, random_scores, units, 300
                                    ).verdict == "within noise"
    whole = significance.compare(significance.auc_metric(labels, unit_of), perfect,
                                 random_scores, units, 300)
    assert whole.a.value == ctr_metrics.auc(labels, perfect) == whole.a.low == 1
    assert whole.b.value == ctr_metrics.auc(labels, random_scores)
    assert whole.b.low < 0.5 < whole.b.high and whole.b.high - whole.b.low < 0.1


def test_gauc_under_unit_counts_is_ctr_metrics_gauc_and_slices_follow_the_mask():
    rng = np.random.default_rng(2)
    labels, unit_of = _pages(rng, pages=100)
    scores = rng.random(len(labels)) + 0.5 * labels
    got = significance.gauc_metric(labels, unit_of)(scores)(np.ones([1, 100]))[0]
    np.testing.assert_allclose(got, ctr_metrics.gauc(labels, scores, unit_of)[0], atol=1e-12)
    mask = unit_of < 30
    got = significance.auc_metric(labels, unit_of, mask)(scores)(np.ones([1, 100]))[0]
    np.testing.assert_allclose(got, ctr_metrics.auc(labels[mask], scores[mask]), atol=1e-12)


def test_ratio_metrics_over_queries():
    hits_a, hits_b, relevant = np.array([3, 2, 4, 5]), np.array([0, 1, 0, 1]), np.array([5] * 4)
    c = significance.compare(significance.ratio_metric, (hits_a, relevant), (hits_b, relevant),
                             4, 200)
    assert c.a.value == 14 / 20 and c.b.value == 2 / 20 and c.verdict == "holds"


def test_compare_ctr_reads_predictions_of_the_same_test_set():
    rng = np.random.default_rng(3)
    labels, unit_of = _pages(rng, pages=200)
    item = rng.integers(0, 50, len(labels))
    base = {"label": labels, "group": unit_of * 7 + 3, "item": item,
            "impressions_30d": item * 10}
    good = dict(base, score=labels + rng.random(len(labels)))
    poor = dict(base, score=rng.random(len(labels)))
    for metric in significance.CTR_METRICS:
        c = significance.compare_ctr(good, poor, metric, resamples=200)
        assert c.verdict == "holds", metric
    bottom, _ = ctr_metrics.impression_slices(item, item * 10)
    c = significance.compare_ctr(good, poor, "AUC_bottom10", resamples=10)
    assert c.a.value == ctr_metrics.auc(labels[bottom], good["score"][bottom])
    with pytest.raises(ValueError, match="same test samples"):
        significance.compare_ctr(good, dict(poor, label=1 - labels), "AUC")
    with pytest.raises(ValueError, match="not one of"):
        significance.compare_ctr(good, poor, "LogLoss")


def test_one_models_interval_is_that_of_the_paired_comparison():
    rng = np.random.default_rng(4)
    labels, unit_of = _pages(rng, pages=200)
    item = rng.integers(0, 50, len(labels))
    pred = {"label": labels, "group": unit_of, "item": item, "impressions_30d": item,
            "score": labels * 0.3 + rng.random(len(labels))}
    for metric in significance.CTR_METRICS:
        alone = significance.interval_ctr(pred, metric, resamples=200)
        paired = significance.compare_ctr(pred, pred, metric, resamples=200).a
        assert alone == paired, metric  # the same draws
        assert alone.low < alone.value < alone.high
    hits = {"query_item_id": np.arange(4), "HR:num": np.array([3, 2, 4, 5]),
            "HR:den": np.array([5] * 4)}
    iv = significance.interval_search(hits, "HR", resamples=200)
    assert iv.value == 14 / 20 and iv.low <= iv.value <= iv.high
    assert significance.over_seeds(["holds", "holds"]) == "holds"
    assert significance.over_seeds(["holds", "within noise"]) == "mixed"
    assert significance.over_seeds(["within noise"] * 2) == "within noise"


def _comparison(low: float, high: float) -> significance.Comparison:
    point = significance.Interval(0.5, 0.5, 0.5)
    return significance.Comparison(point, point, significance.Interval((low + high) / 2, low, high))


def test_a_not_below_claim_fails_only_when_the_interval_lies_below_zero():
    above, level = _comparison(0.01, 0.03), _comparison(-0.01, 0.01)
    below = _comparison(-0.03, -0.01)
    assert [c.judged() for c in (above, level, below)] == ["holds", "within noise", "fails"]
    assert [c.judged(not_below=True) for c in (above, level, below)] == ["holds", "holds", "fails"]
    assert significance.judged_over_seeds({0: level, 1: above}, not_below=True).startswith(
        "**holds**")
    assert significance.judged_over_seeds({0: level, 1: above}).startswith("**mixed**")
    assert below.describe("AUC", not_below=True).startswith("**fails** (AUC 0.5000 vs 0.5000")


def test_the_papers_claims_compare_two_different_runs_the_demo_or_repros_make():
    from trainer import experiments
    claims = (*experiments.VISUAL_CLAIMS, *experiments.CTR_CLAIMS, *experiments.COURIER_CLAIMS,
              *experiments.TABLE_5_CLAIMS, experiments.TABLE_8_CLAIM)
    ctr_runs = {e.name for e in (*experiments.DEMO_CTR, *experiments.DEMO_TABLE_5)} | {
        experiments.ctr_experiment(e).name for e in ("vgg_c", "vit_c")} | {
        experiments.ctr_experiment("courier_clip", experiments.TABLE_5_MODE).name}
    for c in claims:
        assert c.a != c.b, c
        for run in (c.a, c.b):
            assert run in experiments.ENCODERS or run in ctr_runs, (c, run)

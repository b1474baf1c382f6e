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


def _comparison(low: float, high: float) -> significance.Comparison:
    point = significance.Interval(0.5, 0.5, 0.5)
    return significance.Comparison(point, point, significance.Interval((low + high) / 2, low, high))


def test_a_not_below_claim_is_judged_against_its_stated_margin():
    above, level = _comparison(0.01, 0.03), _comparison(-0.01, 0.01)
    below, far_below = _comparison(-0.03, -0.01), _comparison(-0.09, -0.06)
    cases = (above, level, below, far_below)
    assert [c.judged() for c in cases] == ["holds", "within noise", "fails", "fails"]
    # "not below by more than 0.02": holds above -0.02, fails below it, else cannot tell
    assert [c.judged(not_below=True, margin=0.02) for c in cases] == [
        "holds", "holds", "within noise", "fails"]
    assert [c.judged(not_below=True, margin=0.05) for c in cases] == [
        "holds", "holds", "holds", "fails"]
    assert below.describe("AUC", not_below=True, margin=0.005).startswith(
        "**fails** (AUC 0.5000 vs 0.5000")
    with pytest.raises(ValueError, match="margin"):
        level.judged(not_below=True)
    from trainer import experiments
    with pytest.raises(ValueError, match="margin"):
        experiments.Claim("keeps it", "a", "b", "AUC", not_below=True)


def _hits(rng, rates, queries=3000):
    """Per-query HR parts of one model per rate, on the same queries: 10 relevant items a
    query, hits ~ Binomial(10, rate)."""
    ids = np.arange(queries)
    return [{"query_item_id": ids, "HR:num": rng.binomial(10, r, queries).astype(float),
             "HR:den": np.full(queries, 10.0)} for r in rates]


def test_a_difference_that_is_pure_seed_noise_is_within_noise_across_seeds():
    """Model a's training seeds land at HR 0.53, 0.47, 0.51 and b's at 0.50 on every seed: a
    and b are the same method, the gaps are training noise. On 3,000 queries each seed's own
    bootstrap over queries calls its gap significant (it measures only the test set's noise);
    the bootstrap over seeds and queries together does not."""
    rng = np.random.default_rng(7)
    a0, a1, a2, b = _hits(rng, (0.53, 0.47, 0.51, 0.50))
    runs = {0: (a0, b), 1: (a1, b), 2: (a2, b)}
    judged = significance.compare_search_seeds(runs, "HR", resamples=2000)
    alone = {s: c.verdict for s, c in judged.by_seed.items()}
    assert alone[0] == "holds" and alone[1] == "fails"  # each seed alone: "significant"
    assert judged.judged() == "within noise", judged.describe("HR")
    assert judged.difference.low < 0 < judged.difference.high
    assert 0.02 < judged.seed_sd < 0.04  # the spread of +0.03, -0.03, +0.01
    # the same seeds judged one at a time agree with the single-seed comparison
    single = significance.compare_search(a0, b, "HR", resamples=2000)
    assert judged.by_seed[0].difference == single.difference


def test_a_difference_larger_than_the_seed_spread_holds_across_seeds():
    rng = np.random.default_rng(8)
    a0, a1, a2, b0, b1, b2 = _hits(rng, (0.61, 0.60, 0.62, 0.50, 0.51, 0.49))
    judged = significance.compare_search_seeds({0: (a0, b0), 1: (a1, b1), 2: (a2, b2)}, "HR",
                                               resamples=2000)
    assert judged.judged() == "holds", judged.describe("HR")
    assert judged.difference.low > 0.05
    reverse = significance.compare_search_seeds({0: (b0, a0), 1: (b1, a1), 2: (b2, a2)}, "HR",
                                                resamples=2000)
    assert reverse.judged() == "fails"
    # one seed: the seed term is absent, the interval is the page bootstrap's
    one = significance.compare_search_seeds({0: (a0, b0)}, "HR", resamples=2000)
    assert one.difference == one.by_seed[0].difference and np.isnan(one.seed_sd)


def test_ctr_claims_across_seeds_use_one_draw_of_pages_for_every_seed():
    """CTR predictions of two methods on 3 seeds: b's scores are a's plus seed noise that
    shifts its AUC both ways; a real gap (c far better) holds, and predictions of another test
    set are refused."""
    rng = np.random.default_rng(9)
    labels, unit_of = _pages(rng, pages=400)
    item = rng.integers(0, 50, len(labels))
    base = {"label": labels, "group": unit_of, "item": item, "impressions_30d": item}
    signal = labels + rng.normal(0, 1.5, len(labels))
    runs, strong = {}, {}
    for s in range(3):
        noise = np.random.default_rng(100 + s).normal(0, 1.0, len(labels))
        a = {**base, "score": signal + 0.3 * noise}
        b = {**base, "score": signal + 0.3 * np.random.default_rng(200 + s).normal(
            0, 1.0, len(labels))}
        c = {**base, "score": labels + rng.normal(0, 0.5, len(labels))}
        runs[s], strong[s] = (a, b), (c, b)
    same = significance.compare_ctr_seeds(runs, "AUC", resamples=500)
    assert same.judged() == "within noise", same.describe("AUC")
    assert significance.compare_ctr_seeds(strong, "GAUC", resamples=500).judged() == "holds"
    other = {**runs, 2: ({**runs[2][0], "group": unit_of[::-1]}, runs[2][1])}
    with pytest.raises(ValueError, match="seed 2"):
        significance.compare_ctr_seeds(other, "AUC")


def test_claims_are_judged_and_recorded_for_the_demo_to_read(tmp_path):
    from trainer import experiments
    rng = np.random.default_rng(10)
    a0, a1, b0, b1 = _hits(rng, (0.6, 0.61, 0.5, 0.5))
    claim = experiments.Claim("a beats b", "a", "b", "HR", paper="the paper says so")
    missing = experiments.Claim("c beats b", "c", "b", "HR")
    lines, records = experiments.judge_claims(
        (claim, missing), {0: {"a": a0, "b": b0}, 1: {"a": a1, "b": b1}},
        significance.compare_search_seeds)
    assert len(lines) == 1 and lines[0].startswith("- a beats b: **holds** (HR ")
    assert "the paper says so" in lines[0]
    experiments.write_claims(records, str(tmp_path))
    read = experiments.read_claims([str(tmp_path / experiments.CLAIMS_FILE),
                                    str(tmp_path / "absent.json")])
    assert set(read) == {"a > b: HR"} and read["a > b: HR"]["verdict"] == "holds"
    assert set(read["a > b: HR"]["by_seed"]) == {"0", "1"}


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

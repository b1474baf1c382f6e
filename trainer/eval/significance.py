"""Orderings judged against noise: the paired bootstrap over test pages or queries.

The papers' claims are orderings (paper 000 Table 2: S1+S2+D above the competitors; D raises the
bottom-10% AUC; Table 1: S1+S2 above S1 and S2). Two runs of one commit can order two close
models either way, so a claim is judged by the distribution of its difference: the test set's
independent units (pages for the CTR metrics, whose impressions share a user and a moment;
queries for visual search) are drawn with replacement R times, both models are scored on the same
draw (paired: the draw's noise cancels in the difference), and the 95% percentile interval of
m(a) - m(b) says

    holds         the interval lies above 0 (a > b),
    fails         it lies below 0 (a < b),
    within noise  it holds 0.

A draw is a count per unit (multinomial), so every metric is a weighted sum over the original
samples: AUC from one sort per model (`weighted_auc`), GAUC from the per-page AUCs (a page is
drawn whole, its AUC does not change), HR / LR / CR as ratios of per-query sums.

That interval is the test set's noise only: two trainings of one method differ too (the
initialisation, the order of the data, thread scheduling), and on this project's worlds by as much
as the test set's interval. A claim about a method is judged across training seeds
(`compare_seeds`): each draw takes S of the S seeds with replacement and one draw of the test
units shared by every seed (the test set is the same for every seed), and averages the drawn
seeds' differences on it; the interval of that average holds both noises. With S = 3 a plain
bootstrap of seeds understates their spread (its variance is (S-1)/S of the unbiased one), so each
draw's seed deviations from their mean are scaled by sqrt(S / (S - 1)) first.

A claim that a is not below b ("D keeps the overall AUC") carries a margin m it states: it holds
when the interval's low end is above -m, fails when its high end is below -m, and is within noise
otherwise.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from trainer.eval import ctr_metrics

CHUNK = 64  # draws scored at a time: [CHUNK, samples] temporaries


@dataclasses.dataclass(frozen=True)
class Interval:
    """A statistic, its bootstrap percentile interval, and the draws' values."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


@dataclasses.dataclass(frozen=True)
class Comparison:
    """m(a) - m(b) with its interval, and the verdict on the claim m(a) > m(b)."""

    a: Interval
    b: Interval
    difference: Interval

    @property
    def verdict(self) -> str:
        return judge(self.difference)

    def judged(self, not_below: bool = False, margin: float = 0.0) -> str:
        """The verdict on the claim a > b, or with `not_below` on the claim that a is not below
        b by more than `margin` (`judge`)."""
        return judge(self.difference, not_below, margin)

    def __str__(self) -> str:
        d = self.difference
        return f"{d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}]: {self.verdict}"

    def describe(self, metric: str, not_below: bool = False, margin: float = 0.0) -> str:
        """'**verdict** (metric a vs b, difference d [95% interval])', as reports print it."""
        d = self.difference
        return (f"**{self.judged(not_below, margin)}** ({metric} {self.a.value:.4f} vs "
                f"{self.b.value:.4f}, "
                f"difference {d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}])")


def judge(difference: Interval, not_below: bool = False, margin: float = 0.0) -> str:
    """holds / fails / within noise for the claim a > b from the interval of m(a) - m(b); with
    `not_below`, for the claim that a is not below b by more than `margin` (> 0): holds when
    the interval lies above -margin, fails when it lies below."""
    if not_below and margin <= 0:
        raise ValueError("a claim that a is not below b needs a margin > 0 (how far below "
                         "still counts as 'not below')")
    edge = -margin if not_below else 0.0
    if difference.low > edge:
        return "holds"
    if difference.high < edge:
        return "fails"
    return "within noise"


@dataclasses.dataclass(frozen=True)
class SeedComparison:
    """m(a) - m(b) judged across training seeds and test units together (`compare_seeds`).

    Attributes:
      a, b: Each model's metric, mean over seeds, with its interval over seeds x units.
      difference: The mean over seeds of m(a) - m(b), with its interval over seeds x units.
      by_seed: {seed: Comparison}, each seed's own bootstrap over the test units.
    """

    a: Interval
    b: Interval
    difference: Interval
    by_seed: dict[int, Comparison]

    @property
    def seeds(self) -> list[int]:
        return sorted(self.by_seed)

    @property
    def seed_sd(self) -> float:
        """The standard deviation of m(a) - m(b) over the seeds (on the whole test set): the
        training runs' own spread, NaN for one seed."""
        d = [c.difference.value for c in self.by_seed.values()]
        return float(np.std(d, ddof=1)) if len(d) > 1 else float("nan")

    def judged(self, not_below: bool = False, margin: float = 0.0) -> str:
        return judge(self.difference, not_below, margin)

    def describe(self, metric: str, not_below: bool = False, margin: float = 0.0) -> str:
        """'**verdict** (metric a vs b over N seeds, difference d [95% interval over seeds x
        units]; seed sd; per seed: difference, its own verdict)', as the repro tables print it."""
        d = self.difference
        per = "; ".join(f"seed {s}: {c.difference.value:+.4f} ({c.judged(not_below, margin)} "
                        "on its own)" for s, c in sorted(self.by_seed.items()))
        sd = f", seed sd {self.seed_sd:.4f}" if len(self.by_seed) > 1 else ""
        return (f"**{self.judged(not_below, margin)}** ({metric} {self.a.value:.4f} vs "
                f"{self.b.value:.4f} over {len(self.by_seed)} seed(s), difference "
                f"{d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}]{sd}; {per})")

    def record(self) -> dict:
        """The comparison as JSON-ready numbers (a repro's claims.json)."""
        d = self.difference
        return {"a": self.a.value, "b": self.b.value, "difference": d.value, "low": d.low,
                "high": d.high, "seed_sd": self.seed_sd,
                "by_seed": {str(s): c.difference.value for s, c in sorted(self.by_seed.items())}}


def draws(units: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """[resamples, units] counts: each row draws `units` units with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(units, np.full(units, 1.0 / units), size=resamples).astype(np.float64)


Scorer = Callable[[np.ndarray], np.ndarray]  # unit counts [R, units] -> the metric [R]


def weighted_auc(labels: np.ndarray, scores: np.ndarray) -> Scorer:
    """AUC of `scores` [n] for `labels` [n] under rows of sample weights [R, n] -> [R]: the
    weighted Mann-Whitney statistic, ties counting 1/2 (with unit weights, `ctr_metrics.auc`),
    from one sort. NaN for a row whose weighted samples hold a single class."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(scores, kind="stable")
    s = np.asarray(scores, np.float64)[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # blocks of tied scores
    is_pos = labels[order]

    def score(weights: np.ndarray) -> np.ndarray:
        w = np.atleast_2d(weights)[:, order]
        # Each block of tied scores is a histogram bin: the histogram AUC is then exact.
        return ctr_metrics.histogram_aucs(np.add.reduceat(w * is_pos, starts, axis=1),
                                          np.add.reduceat(w * ~is_pos, starts, axis=1))[0]

    return score


def _interval(value: float, values: np.ndarray, level: float) -> Interval:
    values = values[np.isfinite(values)]
    if not len(values):
        return Interval(value, float("nan"), float("nan"))
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(value), float(low), float(high))


def compare(metric: Callable[[Any], Scorer], a: Any, b: Any, units: int,
            resamples: int = 1000, seed: int = 0, level: float = 0.95) -> Comparison:
    """Paired bootstrap of metric(a) - metric(b): `metric(model)` prepares a model's outputs
    (its scores, or its per-query hits) into a `Scorer` of unit counts; both models are scored
    under the same `resamples` draws of the `units` units (a row of ones is the test set)."""
    return _paired(metric(a), metric(b), draws(units, resamples, seed), level)[0]


def _paired(fa: Scorer, fb: Scorer, counts: np.ndarray, level: float
            ) -> tuple[Comparison, np.ndarray]:
    """Two models scored under the same rows of unit `counts` [R, units]: their Comparison,
    and the draws' values [2, R] (a's, b's)."""
    ones = np.ones([1, counts.shape[1]])
    va, vb = float(fa(ones)[0]), float(fb(ones)[0])
    drawn = np.empty([2, len(counts)])
    for lo in range(0, len(counts), CHUNK):
        drawn[0, lo:lo + CHUNK] = fa(counts[lo:lo + CHUNK])
        drawn[1, lo:lo + CHUNK] = fb(counts[lo:lo + CHUNK])
    return Comparison(_interval(va, drawn[0], level), _interval(vb, drawn[1], level),
                      _interval(va - vb, drawn[0] - drawn[1], level)), drawn


def compare_seeds(metric: Callable[[Any], Scorer], runs: Mapping[int, tuple[Any, Any]],
                  units: int, resamples: int = 1000, seed: int = 0, level: float = 0.95
                  ) -> SeedComparison:
    """Bootstrap of mean_s [metric(a_s) - metric(b_s)] over training seeds and test units
    together. `runs` {seed: (a's outputs, b's outputs)} are of the same test set (its `units`
    units). Each of the `resamples` draws shares one multinomial draw of the units among every
    seed (paired, as the test set is shared), takes S of the S seeds with replacement and
    averages their differences; the seeds' deviations from each draw's mean are first scaled by
    sqrt(S / (S - 1)) (see the module docstring). Each seed's own page bootstrap, from the same
    unit draws, comes with it."""
    seeds = sorted(runs)
    n = len(seeds)
    if not n:
        raise ValueError("no seeds to compare")
    counts = draws(units, resamples, seed)
    paired = [_paired(metric(runs[s][0]), metric(runs[s][1]), counts, level) for s in seeds]
    by_seed = {s: c for s, (c, _) in zip(seeds, paired, strict=True)}
    drawn = np.stack([d for _, d in paired])  # [S, 2, R]
    pick = np.random.default_rng([seed, 1]).integers(0, n, size=[n, resamples])
    scale = np.sqrt(n / (n - 1)) if n > 1 else 1.0

    def over_seeds(values: np.ndarray) -> np.ndarray:  # [S, R] -> [R]
        centre = values.mean(0)
        scaled = centre + scale * (values - centre)
        return scaled[pick, np.arange(resamples)].mean(0)

    va = float(np.mean([c.a.value for c in by_seed.values()]))
    vb = float(np.mean([c.b.value for c in by_seed.values()]))
    return SeedComparison(_interval(va, over_seeds(drawn[:, 0]), level),
                          _interval(vb, over_seeds(drawn[:, 1]), level),
                          _interval(va - vb, over_seeds(drawn[:, 0] - drawn[:, 1]), level),
                          by_seed)


def bootstrap(metric: Callable[[Any], Scorer], a: Any, units: int, resamples: int = 1000,
              seed: int = 0, level: float = 0.95) -> Interval:
    """One model's metric with its bootstrap percentile interval over the units."""
    fa = metric(a)
    values = np.concatenate([fa(draws(units, resamples, seed)[lo:lo + CHUNK])
                             for lo in range(0, resamples, CHUNK)])
    return _interval(float(fa(np.ones([1, units]))[0]), values, level)


def auc_metric(labels: np.ndarray, unit_of: np.ndarray, mask: np.ndarray | None = None
               ) -> Callable[[np.ndarray], Scorer]:
    """AUC (on the samples of `mask`, e.g. the bottom-10% slice) of a model's scores [n];
    `unit_of` [n] is each sample's unit (page) as 0..units-1."""
    keep = np.ones(len(labels), bool) if mask is None else np.asarray(mask, bool)
    y, u = np.asarray(labels)[keep], np.asarray(unit_of)[keep]

    def metric(scores: np.ndarray) -> Scorer:
        score = weighted_auc(y, np.asarray(scores)[keep])
        return lambda counts: score(counts[:, u])

    return metric


def gauc_metric(labels: np.ndarray, unit_of: np.ndarray) -> Callable[[np.ndarray], Scorer]:
    """GAUC (`ctr_metrics.gauc`) with the units as its groups (pages): a drawn page keeps its
    AUC, so a draw reweights the per-page AUCs by count x impressions."""
    labels, unit_of = np.asarray(labels), np.asarray(unit_of)
    units = int(unit_of.max()) + 1
    size = np.bincount(unit_of, minlength=units).astype(np.float64)
    order = np.argsort(unit_of, kind="stable")
    pages = np.split(order, np.flatnonzero(np.diff(unit_of[order])) + 1)

    def metric(scores: np.ndarray) -> Scorer:
        scores = np.asarray(scores)
        page_auc = np.full(units, np.nan)
        for rows in pages:
            page_auc[unit_of[rows[0]]] = ctr_metrics.auc(labels[rows], scores[rows])
        valid = np.isfinite(page_auc)
        weight, value = size[valid], page_auc[valid]
        return lambda counts: (counts[:, valid] * weight) @ value / (
            counts[:, valid] @ weight)

    return metric


def ratio_metric(outputs: tuple[np.ndarray, np.ndarray]) -> Scorer:
    """sum_q n_q / sum_q d_q over drawn queries, from a model's per-query (numerators,
    denominators): hits and relevant items for HR, low-impression results and results for
    LR@K, same-category results and results for CR@K (`visual_search`)."""
    num, den = (np.asarray(v, np.float64) for v in outputs)
    return lambda counts: (counts @ num) / (counts @ den)


CTR_METRICS = ("AUC", "GAUC", "AUC_bottom10", "AUC_top10")


def compare_ctr(a: dict, b: dict, metric: str, resamples: int = 1000, seed: int = 0
                ) -> Comparison:
    """Paired bootstrap over test pages of one of Table 2's metrics (`CTR_METRICS`) between two
    CTR models' predictions of the same test set (`ctr.task.evaluate`'s predictions.npz: label,
    score, group, item, impressions_30d, in the same order)."""
    for k in ("label", "group", "item"):
        if not np.array_equal(a[k], b[k]):
            raise ValueError(f"the two predictions are not of the same test samples ('{k}' "
                             "differs)")
    prepare, units = _ctr_metric(a, metric)
    return compare(prepare, a["score"], b["score"], units, resamples, seed)


def compare_ctr_seeds(runs: Mapping[int, tuple[dict, dict]], metric: str,
                      resamples: int = 1000, seed: int = 0) -> SeedComparison:
    """`compare_ctr` across training seeds: {seed: (a's predictions, b's predictions)}, every
    seed's of the same test samples (`compare_seeds`)."""
    first = runs[min(runs)][0]
    for s, pair in runs.items():
        for p in pair:
            for k in ("label", "group", "item"):
                if not np.array_equal(first[k], p[k]):
                    raise ValueError(f"seed {s}'s predictions are not of the same test samples "
                                     f"as seed {min(runs)}'s ('{k}' differs)")
    prepare, units = _ctr_metric(first, metric)
    return compare_seeds(prepare, {s: (a["score"], b["score"]) for s, (a, b) in runs.items()},
                         units, resamples, seed)


def interval_ctr(a: dict, metric: str, resamples: int = 1000, seed: int = 0) -> Interval:
    """One CTR model's `metric` (`CTR_METRICS`) with its 95% interval over test pages."""
    prepare, units = _ctr_metric(a, metric)
    return bootstrap(prepare, a["score"], units, resamples, seed)


def _ctr_metric(a: dict, metric: str) -> tuple[Callable[[np.ndarray], Scorer], int]:
    _, unit_of = np.unique(a["group"], return_inverse=True)
    units = int(unit_of.max()) + 1
    if metric == "GAUC":
        return gauc_metric(a["label"], unit_of), units
    if metric in CTR_METRICS:
        bottom, top = ctr_metrics.impression_slices(a["item"], a["impressions_30d"])
        mask = {"AUC": None, "AUC_bottom10": bottom, "AUC_top10": top}[metric]
        return auc_metric(a["label"], unit_of, mask), units
    raise ValueError(f"metric '{metric}' is not one of {CTR_METRICS}")


def compare_search(a: dict, b: dict, metric: str, resamples: int = 1000, seed: int = 0
                   ) -> Comparison:
    """Paired bootstrap over judged queries of a visual-search metric (HR, LR@K, CR@K) between
    two encoders, from their per-query parts (`visual_search.evaluate`'s per_query_path)."""
    if not np.array_equal(a["query_item_id"], b["query_item_id"]):
        raise ValueError("the two evaluations are not of the same queries")
    return compare(ratio_metric, _parts(a, metric), _parts(b, metric),
                   len(a["query_item_id"]), resamples, seed)


def compare_search_seeds(runs: Mapping[int, tuple[dict, dict]], metric: str,
                         resamples: int = 1000, seed: int = 0) -> SeedComparison:
    """`compare_search` across training seeds: {seed: (a's per-query parts, b's)}, every
    seed's of the same judged queries (`compare_seeds`)."""
    first = runs[min(runs)][0]["query_item_id"]
    for s, pair in runs.items():
        if not all(np.array_equal(first, p["query_item_id"]) for p in pair):
            raise ValueError(f"seed {s}'s evaluations are not of the same queries as seed "
                             f"{min(runs)}'s")
    return compare_seeds(ratio_metric, {s: (_parts(a, metric), _parts(b, metric))
                                        for s, (a, b) in runs.items()}, len(first),
                         resamples, seed)


def interval_search(a: dict, metric: str, resamples: int = 1000, seed: int = 0) -> Interval:
    """One encoder's visual-search `metric` with its 95% interval over judged queries."""
    return bootstrap(ratio_metric, _parts(a, metric), len(a["query_item_id"]), resamples, seed)


def _parts(a: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
    num, den = f"{metric}:num", f"{metric}:den"
    if num not in a:
        have = sorted(k.split(":")[0] for k in a if k.endswith(":num"))
        raise ValueError(f"no per-query parts of '{metric}' (have {have})")
    return a[num], a[den]


# --- At any size: the paired bootstrap from the evaluate job's sharded predictions ------------
#
# A multinomial draw of the pages needs them all in one place; the streaming form gives every page
# a weight of its own instead, 0 or 2 with probability 1/2 per draw (the "double or nothing"
# bootstrap, whose weights have the multinomial's mean and variance), from a hash of the page id:
# any shard, any worker, any model sees the same page drawn the same way, so the two models stay
# paired without joining their rows. AUC under weights is then a weighted histogram of the scores
# per label, one per draw [2, bins, R], summed over the shards chunk by chunk; GAUC reweights the
# per-page AUCs the job wrote. Memory is the histograms' (bins x R), not the rows'.

PREDICTIONS, PAGES = "predictions", "pages"  # the evaluate job's directories of Parquet shards
STREAM_MANTISSA_BITS = 7  # the draws' grid: 2^-7 relative bin width, 5,249 bins
STREAM_ROWS = 1 << 16  # rows read at a time
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64s: a well-spread hash of each."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def page_weights(groups: np.ndarray, resamples: int, seed: int = 0) -> np.ndarray:
    """[pages, resamples] weights, each 0 or 2, a function of (page id, draw, seed) only."""
    groups = np.asarray(groups).astype(np.uint64)
    out = np.empty([len(groups), resamples], np.float64)
    shifts = np.arange(64, dtype=np.uint64)
    for word in range(0, resamples, 64):
        with np.errstate(over="ignore"):
            salt = np.uint64(seed * 1_000_003 + word // 64 + 1) * _GOLDEN
        bits = (_mix(groups ^ salt)[:, None] >> shifts) & np.uint64(1)
        out[:, word:word + 64] = 2.0 * bits[:, :min(64, resamples - word)]
    return out


def _read_parquet(directory: str, columns: list[str], rows: int):
    import pyarrow.dataset as ds  # only the streaming path reads Parquet
    dataset = ds.dataset(directory, format="parquet")
    for batch in dataset.to_batches(columns=columns, batch_size=rows):
        yield {c: batch.column(c).to_numpy(zero_copy_only=False) for c in columns}


_STREAM_SLICES = {"AUC": None, "AUC_bottom10": "bottom10", "AUC_top10": "top10"}


def _stream_auc(directory: str, metric: str, resamples: int, seed: int, bits: int,
                rows: int) -> tuple[float, np.ndarray, tuple]:
    """(the AUC on the job's grid, the draws' AUCs [R] on the coarse grid shifted to it, the
    rows' fingerprint)."""
    from scipy import sparse  # sparse x dense: a chunk's pages' histograms times their weights
    mask = _STREAM_SLICES[metric]
    fine_bins = ctr_metrics.num_score_bins()
    bins = ctr_metrics.num_score_bins(bits)
    fine = np.zeros(2 * fine_bins)
    drawn = np.zeros([2 * bins, resamples + 1])  # the last column: unit weights
    fingerprint = np.zeros(3, np.uint64)
    columns = ["group", "item", "label", "score"] + ([mask] if mask else [])
    for chunk in _read_parquet(directory, columns, rows):
        with np.errstate(over="ignore"):
            fingerprint += np.array([len(chunk["group"]),
                                     _mix(chunk["group"].astype(np.uint64)).sum(),
                                     _mix(chunk["item"].astype(np.uint64)).sum()], np.uint64)
        keep = chunk[mask].astype(bool) if mask else slice(None)
        group, label = chunk["group"][keep], chunk["label"][keep].astype(np.int64)
        score = chunk["score"][keep]
        fine += np.bincount(label * fine_bins + ctr_metrics.score_bins(score),
                            minlength=2 * fine_bins)
        pages, page_of = np.unique(group, return_inverse=True)
        counts = sparse.csr_matrix((np.ones(len(group)), (page_of, label * bins
                                                          + ctr_metrics.score_bins(score, bits))),
                                   shape=(len(pages), 2 * bins))
        weights = np.hstack([page_weights(pages, resamples, seed), np.ones([len(pages), 1])])
        drawn += np.asarray(counts.T @ weights)
    value, _ = ctr_metrics.histogram_auc(fine[fine_bins:], fine[:fine_bins])
    values, _ = ctr_metrics.histogram_aucs(drawn[bins:].T, drawn[:bins].T)
    return value, values[:-1] + (value - values[-1]), tuple(fingerprint.tolist())


def _stream_gauc(evaluated: str, resamples: int, seed: int, rows: int
                 ) -> tuple[float, np.ndarray, tuple]:
    num, den = np.zeros(resamples + 1), np.zeros(resamples + 1)
    fingerprint = np.zeros(2, np.uint64)
    for chunk in _read_parquet(os.path.join(evaluated, PAGES), ["group", "samples", "auc"],
                               rows):
        with np.errstate(over="ignore"):
            fingerprint += np.array([chunk["samples"].sum(),
                                     _mix(chunk["group"].astype(np.uint64)).sum()], np.uint64)
        valid = np.isfinite(chunk["auc"])
        weights = np.hstack([page_weights(chunk["group"][valid], resamples, seed),
                             np.ones([int(valid.sum()), 1])])
        size = chunk["samples"][valid].astype(np.float64)
        num += (size * chunk["auc"][valid]) @ weights
        den += size @ weights
    values = num / den
    return float(values[-1]), values[:-1], tuple(fingerprint.tolist())


def stream_interval_ctr(evaluated: str, metric: str, resamples: int = 1000, seed: int = 0,
                        bits: int = STREAM_MANTISSA_BITS, rows: int = STREAM_ROWS
                        ) -> tuple[Interval, np.ndarray, tuple]:
    """One model's `metric` (AUC, GAUC, AUC_bottom10, AUC_top10) with its 95% interval over
    pages, from the evaluate job's output dir `evaluated` in bounded memory; also its draws [R]
    and the test rows' fingerprint (to check that two models saw the same rows)."""
    if metric == "GAUC":
        value, values, fingerprint = _stream_gauc(evaluated, resamples, seed, rows)
    elif metric in _STREAM_SLICES:
        value, values, fingerprint = _stream_auc(os.path.join(evaluated, PREDICTIONS), metric,
                                                 resamples, seed, bits, rows)
    else:
        raise ValueError(f"metric '{metric}' is not one of {CTR_METRICS}")
    return _interval(value, values, 0.95), values, fingerprint


def stream_compare_ctr(a: str, b: str, metric: str, resamples: int = 1000, seed: int = 0,
                       bits: int = STREAM_MANTISSA_BITS, rows: int = STREAM_ROWS,
                       level: float = 0.95) -> Comparison:
    """`compare_ctr` from two evaluate-job output dirs of the same test records, streaming their
    sharded predictions (any size; `page_weights` pairs the draws)."""
    ia, va, fa = stream_interval_ctr(a, metric, resamples, seed, bits, rows)
    ib, vb, fb = stream_interval_ctr(b, metric, resamples, seed, bits, rows)
    if fa != fb:
        raise ValueError(f"{a} and {b} are not predictions of the same test rows (their rows, "
                         "pages or items differ)")
    return Comparison(_interval(ia.value, va, level), _interval(ib.value, vb, level),
                      _interval(ia.value - ib.value, va - vb, level))

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
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
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
        if self.difference.low > 0:
            return "holds"
        if self.difference.high < 0:
            return "fails"
        return "within noise"

    def judged(self, not_below: bool = False) -> str:
        """The verdict; `not_below`: on the claim that a is not below b ("keeps the AUC"), which
        holds unless the interval lies below 0."""
        if not_below:
            return "fails" if self.verdict == "fails" else "holds"
        return self.verdict

    def __str__(self) -> str:
        d = self.difference
        return f"{d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}]: {self.verdict}"

    def describe(self, metric: str, not_below: bool = False) -> str:
        """'**verdict** (metric a vs b, difference d [95% interval])', as reports print it."""
        d = self.difference
        return (f"**{self.judged(not_below)}** ({metric} {self.a.value:.4f} vs "
                f"{self.b.value:.4f}, "
                f"difference {d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}])")


def over_seeds(verdicts: list[str]) -> str:
    """One verdict for a claim judged on several seeds: 'holds' or 'fails' when every seed
    agrees, 'within noise' when every seed says so, else 'mixed'."""
    kinds = set(verdicts)
    return verdicts[0] if len(kinds) == 1 else "mixed"


def judged_over_seeds(by_seed: dict, not_below: bool = False) -> str:
    """'**verdict** (seed s: verdict, difference [95% interval]; ...)' for one claim from its
    comparison on each seed {seed: Comparison}. `not_below`: the claim is that a is not below b
    ("keeps the AUC"), which holds unless the interval lies below 0."""
    verdicts, parts = [], []
    for s, c in sorted(by_seed.items()):
        v = c.judged(not_below)
        verdicts.append(v)
        d = c.difference
        parts.append(f"seed {s}: {v}, {d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}]")
    return f"**{over_seeds(verdicts)}** ({'; '.join(parts)})"


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
        pos = np.add.reduceat(w * is_pos, starts, axis=1)
        neg = np.add.reduceat(w * ~is_pos, starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg
        wins = (pos * (below + 0.5 * neg)).sum(1)
        total = pos.sum(1) * neg.sum(1)
        return np.where(total > 0, wins / np.where(total > 0, total, 1), np.nan)

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
    fa, fb = metric(a), metric(b)
    counts = draws(units, resamples, seed)
    ones = np.ones([1, units])
    va, vb = float(fa(ones)[0]), float(fb(ones)[0])
    da, db = np.empty(resamples), np.empty(resamples)
    for lo in range(0, resamples, CHUNK):
        da[lo:lo + CHUNK] = fa(counts[lo:lo + CHUNK])
        db[lo:lo + CHUNK] = fb(counts[lo:lo + CHUNK])
    return Comparison(_interval(va, da, level), _interval(vb, db, level),
                      _interval(va - vb, da - db, level))


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


def interval_search(a: dict, metric: str, resamples: int = 1000, seed: int = 0) -> Interval:
    """One encoder's visual-search `metric` with its 95% interval over judged queries."""
    return bootstrap(ratio_metric, _parts(a, metric), len(a["query_item_id"]), resamples, seed)


def _parts(a: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
    num, den = f"{metric}:num", f"{metric}:den"
    if num not in a:
        have = sorted(k.split(":")[0] for k in a if k.endswith(":num"))
        raise ValueError(f"no per-query parts of '{metric}' (have {have})")
    return a[num], a[den]

"""Offline CTR metrics (paper 000 §4.2, Table 2; paper 002 §4.3).

    AUC          P(score of a random click > score of a random non-click), ties counting 1/2
                 (the Mann-Whitney statistic from average ranks).
    GAUC         sum_g n_g AUC_g / sum_g n_g over groups g (pages / sessions) that hold both a
                 click and a non-click; n_g is the group's number of impressions (DIN's GAUC).
    AUC bottom / top 10%   AUC on the test impressions of the least / most displayed items: items
                 ordered by 30-day impressions (ties by item id) are taken whole from the bottom
                 (top) until they hold at least 10% of the test impressions.

At a scale no process holds (`trainer.pipelines.evaluate`), the same metrics come from sufficient
statistics: AUC from per-label histograms of the scores on a log-linear grid (`score_bins`),
whose error is bounded by the pairs that share a bin (`histogram_auc`); the impression slices
from the samples per impression level and, at the one level that straddles 10%, per item
(`slice_cutoff`, `take_items`); GAUC from each page's own AUC.
"""
from __future__ import annotations

import numpy as np
from scipy import stats


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN when labels hold a single class."""
    labels = np.asarray(labels).astype(bool)
    pos = int(labels.sum())
    neg = labels.size - pos
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = stats.rankdata(np.asarray(scores, np.float64))
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """(impression-weighted mean AUC over groups with both classes, number of such groups)."""
    labels, scores, groups = np.asarray(labels), np.asarray(scores), np.asarray(groups)
    order = np.argsort(groups, kind="stable")
    _, starts = np.unique(groups[order], return_index=True)
    total = weight = 0.0
    used = 0
    for rows in np.split(order, starts[1:]):
        value = auc(labels[rows], scores[rows])
        if np.isnan(value):  # one class only: no ranking to judge
            continue
        total += value * len(rows)
        weight += len(rows)
        used += 1
    return (total / weight if weight else float("nan")), used


def impression_slices(item_ids: np.ndarray, impressions: np.ndarray,
                      fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks over samples (bottom, top): the samples of whole items, least (most) displayed
    first, until at least `fraction` of the samples. `impressions` is per sample (its item's)."""
    item_ids, impressions = np.asarray(item_ids), np.asarray(impressions)
    items, first, counts = np.unique(item_ids, return_index=True, return_counts=True)
    item_impressions = impressions[first]
    need = fraction * len(item_ids)
    masks = []
    for sign in (1, -1):
        order = np.lexsort((items, sign * item_impressions))
        # Whole items until the running count reaches `need` (the item that crosses it included).
        taken = np.searchsorted(np.cumsum(counts[order]), need) + 1
        masks.append(np.isin(item_ids, items[order[:taken]]))
    return masks[0], masks[1]


def impression_deciles(item_ids: np.ndarray, impressions: np.ndarray, bins: int = 10
                       ) -> np.ndarray:
    """Each sample's tenth (0 = least displayed) of the samples ranked by their item's
    impressions (ties by item id, so an item straddles two bins at most)."""
    order = np.lexsort((item_ids, impressions))
    out = np.empty(len(order), np.int64)
    for b, part in enumerate(np.array_split(order, bins)):
        out[part] = b
    return out


def auc_by_impression_decile(labels: np.ndarray, scores: np.ndarray, item_ids: np.ndarray,
                             impressions: np.ndarray, bins: int = 10) -> list[dict]:
    """AUC within each tenth of the samples ranked by their item's impressions
    (`impression_deciles`): Table 2's bottom/top-10% columns extended to the whole range.
    [{"max_impressions", "samples", "clicks", "AUC"}]."""
    decile = impression_deciles(item_ids, impressions, bins)
    out = []
    for b in range(bins):
        part = decile == b
        out.append({"max_impressions": int(impressions[part].max()), "samples": int(part.sum()),
                    "clicks": int(labels[part].sum()), "AUC": auc(labels[part], scores[part])})
    return out


def ctr_metrics(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray,
                item_ids: np.ndarray, impressions: np.ndarray,
                fraction: float = 0.1, low_impressions: int | None = 5) -> dict:
    """AUC, GAUC and the impression-slice AUCs of Table 2, plus slice sizes."""
    bottom, top = impression_slices(item_ids, impressions, fraction)
    g, used = gauc(labels, scores, groups)
    out = {"AUC": auc(labels, scores), "GAUC": g,
           "AUC_bottom10": auc(labels[bottom], scores[bottom]),
           "AUC_top10": auc(labels[top], scores[top]),
           "samples": int(len(labels)), "clicks": int(np.sum(labels)), "gauc_groups": used,
           "bottom10_samples": int(bottom.sum()), "bottom10_clicks": int(labels[bottom].sum()),
           "bottom10_max_impressions": int(impressions[bottom].max()),
           "top10_samples": int(top.sum()), "top10_min_impressions": int(impressions[top].min())}
    if low_impressions is not None:
        low = impressions < low_impressions
        out["AUC_low_impression"] = auc(labels[low], scores[low])
        out["low_impression_samples"] = int(low.sum())
    return out


# The score grid: the top `mantissa_bits` of the float32 mantissa within each power of two from
# 2^-SCORE_OCTAVES to 1 (a relative bin width of 2^-mantissa_bits at every scale, as CTR scores
# span decades), bin 0 below it; the float32 bit pattern of a non-negative number orders as the
# number does.
SCORE_OCTAVES = 40
SCORE_MANTISSA_BITS = 12


def num_score_bins(mantissa_bits: int = SCORE_MANTISSA_BITS) -> int:
    return ((SCORE_OCTAVES + 1) << mantissa_bits) + 1


def score_bins(scores: np.ndarray, mantissa_bits: int = SCORE_MANTISSA_BITS) -> np.ndarray:
    """Each score's bin on the log-linear grid (int64); scores are probabilities in [0, 1]."""
    scores = np.asarray(scores, np.float32)
    if scores.size and not (np.all(scores >= 0) and np.all(scores <= 1)):  # NaN fails too
        raise ValueError("scores must be probabilities in [0, 1]")
    key = (scores.view(np.uint32) >> np.uint32(23 - mantissa_bits)).astype(np.int64)
    lowest = (127 - SCORE_OCTAVES) << mantissa_bits
    return np.clip(key - lowest + 1, 0, num_score_bins(mantissa_bits) - 1)


def histogram_auc(positives: np.ndarray, negatives: np.ndarray) -> tuple[float, float]:
    """(AUC, bound) from the click and non-click counts per score bin (ordered by score): pairs
    in one bin count 1/2, as ties do, so the exact AUC lies within `bound` = 1/2 x the share of
    click / non-click pairs that share a bin (NaN, NaN with one class only)."""
    value, bound = histogram_aucs(positives, negatives)
    return float(value), float(bound)


def histogram_aucs(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`histogram_auc` of each row of counts [..., bins] -> (AUCs [...], bounds [...])."""
    pos, neg = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
    total = pos.sum(-1) * neg.sum(-1)
    below = np.cumsum(neg, -1) - neg
    wins = (pos * (below + 0.5 * neg)).sum(-1)
    tied = 0.5 * (pos * neg).sum(-1)
    safe = np.where(total > 0, total, 1.0)
    return np.where(total > 0, wins / safe, np.nan), np.where(total > 0, tied / safe, np.nan)


def slice_cutoff(levels: np.ndarray, samples: np.ndarray, fraction: float,
                 most: bool = False) -> tuple[int, float]:
    """`impression_slices` from the samples per impression level: (the level whose items cross
    `fraction` of the samples, the samples still wanted from that level's items), counting from
    the least displayed (`most`: the most)."""
    levels, samples = np.asarray(levels), np.asarray(samples)
    order = np.argsort(-levels if most else levels, kind="stable")
    need = fraction * samples.sum()
    cum = np.cumsum(samples[order])
    at = int(np.searchsorted(cum, need))  # the first level whose running count reaches `need`
    before = float(cum[at - 1]) if at else 0.0
    return int(levels[order][at]), need - before


def take_items(item_ids: np.ndarray, samples: np.ndarray, wanted: float) -> np.ndarray:
    """The items of one impression level taken into a slice: by id, until their samples reach
    `wanted` (the one that crosses it included), as `impression_slices` orders ties."""
    order = np.argsort(item_ids, kind="stable")
    taken = int(np.searchsorted(np.cumsum(np.asarray(samples)[order]), wanted)) + 1
    return np.asarray(item_ids)[order][:taken]

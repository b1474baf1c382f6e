"""Offline CTR metrics (paper 000 §4.2, Table 2; paper 002 §4.3).

    AUC          P(score of a random click > score of a random non-click), ties counting 1/2
                 (the Mann-Whitney statistic from average ranks).
    GAUC         sum_g n_g AUC_g / sum_g n_g over groups g (pages / sessions) that hold both a
                 click and a non-click; n_g is the group's number of impressions (DIN's GAUC).
    AUC bottom / top 10%   AUC on the test impressions of the least / most displayed items: items
                 ordered by 30-day impressions (ties by item id) are taken whole from the bottom
                 (top) until they hold at least 10% of the test impressions.
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

"""HR, LR@K and CR@K (paper 000 §4.1) against hand-computed examples, and the faiss retrieval."""
from __future__ import annotations

import numpy as np
import pytest

from trainer.eval import significance, visual_search


def test_metrics_by_hand():
    # Catalog rows 0..7; categories and low-impression flags:
    category = np.array([1, 1, 1, 1, 2, 2, 2, 2])
    low = np.array([1, 0, 1, 0, 1, 1, 0, 0], bool)
    queries = np.array([0, 4])
    relevant = [np.array([1, 2]), np.array([5, 6, 7])]
    neighbours = np.array([[2, 4, 1, 3],    # n_q = 2: top-2 {2, 4} holds 1 of {1, 2}
                           [5, 6, 0, 7]])   # n_q = 3: top-3 {5, 6, 0} holds 2 of {5, 6, 7}
    m = visual_search.search_metrics(neighbours, queries, relevant, low, category, ks=(2, 4))
    assert m["HR"] == pytest.approx((1 + 2) / (2 + 3))
    # LR@2: low of {2, 4} = 2, of {5, 6} = 1 -> 3 / 4. LR@4: {2,4,1,3} -> 2; {5,6,0,7} -> 2 -> 4/8.
    assert m["LR@2"] == pytest.approx(3 / 4)
    assert m["LR@4"] == pytest.approx(4 / 8)
    # CR@2: query 0 (cat 1): {2: 1, 4: 2} -> 1; query 4 (cat 2): {5, 6} -> 2 -> 3/4.
    # CR@4: {2,4,1,3} -> 3; {5,6,0,7} -> 3 -> 6/8.
    assert m["CR@2"] == pytest.approx(3 / 4)
    assert m["CR@4"] == pytest.approx(6 / 8)


def test_metrics_reject_too_few_results():
    with pytest.raises(ValueError, match="relevant items"):
        visual_search.search_metrics(np.array([[1]]), np.array([0]), [np.array([1, 2])],
                                     np.zeros(3, bool), np.zeros(3), ks=(1,))


def test_nearest_neighbours_rank_by_cosine_without_the_query():
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.6, 0.8], [-1, 0]], np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    got = visual_search.nearest_neighbours(emb, np.array([0, 2]), k=3)
    assert got.tolist() == [[1, 3, 2], [3, 1, 0]]
    whole = visual_search.nearest_neighbours(emb, np.array([0, 2]), k=10)  # k > the catalog
    assert whole[0].tolist() == [1, 3, 2, 4]  # all the others, no -1 fill
    assert whole[1, :2].tolist() == [3, 1] and sorted(whole[1, 2:]) == [0, 4]  # 0, 4 tie


def test_per_query_parts_sum_to_the_metrics_and_feed_a_paired_bootstrap(tmp_path):
    rng = np.random.default_rng(0)
    n, q = 60, 40
    emb = rng.normal(size=[n, 8]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    queries = rng.choice(n, q, replace=False)
    relevant = [rng.choice(np.setdiff1d(np.arange(n), [x]), 3, replace=False) for x in queries]
    low, category = rng.random(n) < 0.3, rng.integers(0, 4, n)
    neighbours = visual_search.nearest_neighbours(emb, queries, 10)
    parts = visual_search.per_query(neighbours, queries, relevant, low, category, ks=(5, 10))
    assert visual_search.ratios(parts) == visual_search.search_metrics(
        neighbours, queries, relevant, low, category, ks=(5, 10))
    # An oracle that ranks the relevant items first against the embedding's ranking.
    oracle = np.stack([np.r_[r, [x for x in row if x not in r]][:10]
                       for r, row in zip(relevant, neighbours, strict=True)])
    both = [{"query_item_id": queries, **{f"{k}:{p}": v for k, pair in visual_search.per_query(
        nb, queries, relevant, low, category, ks=(5,)).items()
        for p, v in zip(("num", "den"), pair, strict=True)}} for nb in (oracle, neighbours)]
    c = significance.compare_search(both[0], both[1], "HR", resamples=200)
    assert c.a.value == 1.0 and c.verdict == "holds"
    assert significance.compare_search(both[1], both[1], "LR@5", resamples=50
                                       ).verdict == "within noise"
    with pytest.raises(ValueError, match="no per-query parts of 'CR@100'"):
        significance.compare_search(both[0], both[1], "CR@100")

"""Offline visual-search evaluation of an encoder (paper 000 §4.1, Table 1).

Every catalog image is embedded (`trainer.features.embeddings`); for each judged query item q (a
catalog image) the catalog is ranked by cosine similarity to q (faiss inner product on
L2-normalised vectors), q itself left out, giving M_q. With Q_q the n_q items judged relevant to q:

    HR     = sum_q |Q_q n M_q^{n_q}| / sum_q n_q         (hits in the first n_q results)
    LR@K   = sum_q |L n M_q^K| / sum_q |M_q^K|           (L: items with < 5 impressions in 30 days)
    CR@K   = sum_q |C_q n M_q^K| / sum_q |M_q^K|         (C_q: items of q's category)
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from trainer.configs import SearchEvalConfig
from trainer.data import npz, pipeline
from trainer.features import index

log = logging.getLogger(__name__)

PER_QUERY = "search_per_query.npz"  # the eval_search stage's per-query metric parts


def load_judgments(pattern: str, skip_bad_records: bool = False) -> tuple[np.ndarray, list]:
    """(query item ids [Q], relevant item ids per query)."""
    cols = pipeline.read_columns(pattern, "judgments",
                                 ("query_item_id", "relevant_item_ids", "relevant_item_ids_mask"),
                                 skip_bad_records)
    relevant = [row[mask] for row, mask in zip(
        cols["relevant_item_ids"], cols["relevant_item_ids_mask"].astype(bool), strict=True)]
    return cols["query_item_id"], relevant


def search(embeddings: np.ndarray, query_vectors: np.ndarray, k: int) -> np.ndarray:
    """[Q, k] catalog rows by descending cosine: faiss exact inner-product search."""
    return index.search(embeddings, query_vectors, k)


def nearest_neighbours(embeddings: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """[Q, min(k, N - 1)] catalog rows by descending cosine, each query's own row (queries[i] is
    a catalog row) left out: a catalog of N <= k images is ranked whole (faiss would fill the
    missing places with -1)."""
    n = len(embeddings)
    if k >= n:
        log.warning("%d neighbours asked from a catalog of %d images: each query gets the "
                    "other %d", k, n, n - 1)
        k = n - 1
    found = search(embeddings, embeddings[queries], k + 1)
    out = np.empty([len(queries), k], np.int64)
    for i, (q, row) in enumerate(zip(queries, found, strict=True)):
        out[i] = row[row != q][:k]
    return out


def hit_ratio(neighbours: np.ndarray, relevant: Sequence[np.ndarray]) -> float:
    """HR = sum_q |Q_q n M_q^{n_q}| / sum_q n_q, with neighbours [Q, >= n_q] in rank order."""
    hits, total = _hits(neighbours, relevant)
    return float(hits.sum() / max(total.sum(), 1))


def _hits(neighbours: np.ndarray, relevant: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per query: (|Q_q n M_q^{n_q}|, n_q)."""
    hits, total = np.zeros(len(relevant)), np.zeros(len(relevant))
    for i, (row, rel) in enumerate(zip(neighbours, relevant, strict=True)):
        n_q = len(rel)
        if n_q > len(row):
            raise ValueError(f"a query has {n_q} relevant items but only {len(row)} results")
        hits[i], total[i] = len(np.intersect1d(row[:n_q], rel)), n_q
    return hits, total


def per_query(neighbours: np.ndarray, queries: np.ndarray, relevant: Sequence[np.ndarray],
              low_impression: np.ndarray, category: np.ndarray,
              ks: Sequence[int] = (10, 100)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each metric of `search_metrics` as per-query (numerators [Q], denominators [Q]), whose
    sums' ratio is the metric: what a bootstrap over queries draws
    (`trainer.eval.significance.ratio_metric`)."""
    out = {"HR": _hits(neighbours, relevant)}
    for k in ks:
        top = neighbours[:, :k]
        results = np.full(len(queries), float(top.shape[1]))
        out[f"LR@{k}"] = (low_impression[top].sum(1).astype(np.float64), results)
        out[f"CR@{k}"] = ((category[top] == category[queries][:, None]).sum(1).astype(
            np.float64), results)
    return out


def search_metrics(neighbours: np.ndarray, queries: np.ndarray, relevant: Sequence[np.ndarray],
                   low_impression: np.ndarray, category: np.ndarray,
                   ks: Sequence[int] = (10, 100)) -> dict:
    """HR, LR@K, CR@K of §4.1 from ranked results.

    neighbours: [Q, >= max(ks, n_q)] catalog rows in rank order (query excluded); queries: [Q]
    catalog rows of the query items; relevant: per query, catalog rows judged relevant;
    low_impression: [N] bool; category: [N].
    """
    return ratios(per_query(neighbours, queries, relevant, low_impression, category, ks))


def ratios(parts: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """{metric: sum of numerators / sum of denominators} of `per_query`'s parts."""
    return {name: float(num.sum() / max(den.sum(), 1)) for name, (num, den) in parts.items()}


def evaluate(catalog: dict, cfg: SearchEvalConfig, skip_bad_records: bool = False,
             per_query_path: str | None = None) -> dict:
    """Metrics of an embedded catalog ({'item_id', 'category_id', 'impressions_30d',
    'embedding' [N, D]}, e.g. `EmbeddingTable.catalog()`) on the judged visual-search queries.
    With `skip_bad_records`, bad judgment records are skipped, and so are judged items missing
    from the catalog (its own bad records were skipped): counted and logged. With
    `per_query_path`, each metric's per-query numerators and denominators (`per_query`) and the
    query ids are written there, for a paired bootstrap against another encoder."""
    query_ids, relevant_ids = load_judgments(cfg.judgments_pattern, skip_bad_records)
    row_of = {int(i): r for r, i in enumerate(catalog["item_id"])}
    if skip_bad_records:
        known = np.array([int(q) in row_of for q in query_ids], bool)
        kept = [np.array([i for i in r if int(i) in row_of], np.int64) for r in relevant_ids]
        dropped = int((~known).sum()) + sum(len(r) - len(k) for r, k in zip(
            relevant_ids, kept, strict=True))
        if dropped:
            log.warning("skip_bad_records: %d judged item ids are not in the catalog %s "
                        "(skipped)", dropped, cfg.catalog_pattern)
        query_ids = query_ids[known]
        relevant_ids = [k for k, ok in zip(kept, known, strict=True) if ok]

    def rows(ids, what):
        missing = [int(i) for i in ids if int(i) not in row_of]
        if missing:
            raise ValueError(f"{cfg.judgments_pattern}: {what} {missing[:5]} not in the catalog "
                             f"{cfg.catalog_pattern}")
        return np.array([row_of[int(i)] for i in ids], np.int64)

    queries = rows(query_ids, "query_item_id")
    # A query is never its own result, so it cannot count as its own relevant item.
    relevant = [np.setdiff1d(rows(r, "relevant_item_ids"), [q])
                for q, r in zip(queries, relevant_ids, strict=True)]
    k = max(max(cfg.ks), max(len(r) for r in relevant))
    neighbours = nearest_neighbours(catalog["embedding"], queries, k)
    parts = per_query(neighbours, queries, relevant,
                      catalog["impressions_30d"] < cfg.low_impressions, catalog["category_id"],
                      cfg.ks)
    if per_query_path:
        npz.write(per_query_path, query_item_id=np.asarray(query_ids, np.int64),
                  **{f"{name}:{part}": v for name, pair in parts.items()
                     for part, v in zip(("num", "den"), pair, strict=True)})
    metrics: dict = ratios(parts)
    metrics.update(queries=int(len(queries)), catalog_items=int(len(row_of)))
    return metrics

"""What the reproductions print beside their tables: what the data and each encoder's vectors
carry, measured without the CTR model, and (on a synthetic world, evaluation only: the planted
truth is read here and nowhere in training) how far the learned features are from what the
world planted.

- `search_on_photos`: how often an S2 click pair shares the query's style, and HR when the
  queries are the users' photos (paper 000 Table 1's diagnostics).
- `planted_click_scores`: the AUC of the planted click logit's parts (how much there is to
  learn, and how much of it is visual; Table 2).
- `query_similarity_and_popularity`: cos(query photo, item) as a click score, and a ridge probe
  of item popularity from the vectors (S2's selection bias; Table 2).
- `user_intent`: the displayed item's similarity to the click history and to the query photo
  as click scores, 10-NN category / pattern / palette shares, Cluster-ID purity (Tables 5, B1).
- `perfect_style_encoder`: the CTR model fed the one-hot of the planted style (Table B1).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from trainer import configs, experiments
from trainer.ctr import spec as ctr_spec
from trainer.ctr import task as ctr_task
from trainer.data import pipeline, records
from trainer.eval import ctr_metrics, visual_search
from trainer.features import clusters, embeddings
from trainer.synth import marketplace, truth

CTR = ctr_spec.record_kind("ctr")  # the synthetic world's `ctr` records


def search_on_photos(data_dir: str, seed_dirs: dict) -> str:
    """What the planted truth says about the data and the encoders (evaluation only): how often an
    S2 click pair shares the query's style, and HR when the queries are the users' photos (S2's
    own task) with relevance = same category and planted style."""
    if not truth.exists(data_dir):
        return ""
    t = truth.load(data_dir)
    items, queries = t["items"], t["queries"]
    pairs = pipeline.read_columns(records.default_pattern(data_dir, "search_sessions", "train"),
                                  "search_sessions", ("query_id", "clicked_item_id"))
    clicked = items["style"][truth.index_of(pairs["clicked_item_id"], items["item_id"])]
    asked = queries["style"][truth.index_of(pairs["query_id"], queries["query_id"])]
    sim = t["style_similarity"][clicked, asked]
    queries_pattern = records.default_pattern(data_dir, "queries")
    catalog_pattern = records.default_pattern(data_dir, "catalog")
    lines = [f"S2 click pairs: {len(sim)}; the clicked item has the query's style in "
             f"{np.mean(sim == 1):.1%}, a shared pattern or palette in {np.mean(sim == 0.3):.1%}, "
             f"neither in {np.mean(sim == 0):.1%}.", "",
             "HR with the users' query photos as queries (S2's own task; relevant = catalog items "
             "of the photo's category and planted style):", "",
             "| Method | " + " | ".join(f"seed {s}" for s in seed_dirs) + " |",
             "| --- |" + " ---: |" * len(seed_dirs)]
    for method, sub in (("ResNet-C", "resnet_c"), ("S1", "s1"), ("S2", "s2"), ("S1+S2", "s1s2")):
        cells = []
        for out in seed_dirs.values():
            table = embeddings.for_encoder(os.path.join(out, sub), catalog_pattern,
                                           queries_pattern)
            qi = truth.index_of(table.query_id, queries["query_id"])
            ci = truth.index_of(table.item_id, items["item_id"])
            key_items = items["category"][ci] * 1000 + items["style"][ci]
            key_q = queries["category"][qi] * 1000 + queries["style"][qi]
            relevant = [np.flatnonzero(key_items == k) for k in key_q]
            found = visual_search.search(table.item_vector, table.query_vector,
                                         max(len(r) for r in relevant))
            cells.append(f"{visual_search.hit_ratio(found, relevant):.4f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def planted_click_scores(data_dir: str) -> str:
    """The AUC of the planted click logit's observable-in-principle parts on the test day
    (evaluation only): how much there is to learn, and how much of it is visual."""
    if not truth.exists(data_dir):
        return ""
    t = truth.load(data_dir)
    manifest = marketplace.load_manifest(data_dir)
    if manifest is None:
        return ""
    cm = manifest["world"]["click"]  # the world's own parameters
    test = pipeline.read_columns(records.default_pattern(data_dir, "ctr", "test"), CTR,
                                 ("label", "user_id", "item_id", "query_id", "position",
                                  "page_id"))
    cat = pipeline.read_columns(records.default_pattern(data_dir, "catalog"), "catalog",
                                ("item_id", "impressions_30d"))
    items, users, queries = t["items"], t["users"], t["queries"]
    it = truth.index_of(test["item_id"], items["item_id"])
    us = truth.index_of(test["user_id"], users["user_id"])
    qs = truth.index_of(test["query_id"], queries["query_id"])
    sim = t["style_similarity"]
    style, interests = items["style"][it], users["interests"][us]
    user_sim = np.where(interests >= 0, sim[style[:, None], np.maximum(interests, 0)], 0).max(1)
    visual = np.where(users["visual"][us], 1.0, cm["non_visual_factor"])
    style_part = visual * (cm["query_style"] * sim[style, queries["style"][qs]]
                           + cm["user_style"] * user_sim)
    rest = cm["quality"] * items["quality"][it] - cm["position_decay"] * test["position"]
    imps = cat["impressions_30d"][truth.index_of(test["item_id"], cat["item_id"])]
    lines = ["| planted score | Bottom10% | Top10% | Overall | GAUC |",
             "| --- | ---: | ---: | ---: | ---: |"]
    jitter = np.random.default_rng(0).random(len(it)) * 1e-9  # break exact ties at random
    for name, score in (("style terms + item quality + position", style_part + rest),
                        ("style terms only (what images can carry)", style_part),
                        ("item quality + position only", rest)):
        m = ctr_metrics.ctr_metrics(test["label"], score + jitter, test["page_id"],
                                    test["item_id"], imps)
        lines.append(f"| {name} | {m['AUC_bottom10']:.4f} | {m['AUC_top10']:.4f} | "
                     f"{m['AUC']:.4f} | {m['GAUC']:.4f} |")
    return "\n".join(lines)


def query_similarity_and_popularity(data_dir: str, encoder_dirs: dict,
                                    names: Sequence[str]) -> str:
    """What each encoder's vectors carry, measured without the CTR model (no planted truth): the
    test-day AUC and GAUC of cos(v_q, v_p) alone (how well query-item similarity ranks clicks),
    and the R^2 of a ridge probe of log(1 + 30-day impressions) from the item vector (popularity
    baked into the features: S2's selection bias)."""
    test = pipeline.read_columns(records.default_pattern(data_dir, "ctr", "test"), CTR,
                                 ("label", "item_id", "query_id", "page_id"))
    catalog = records.default_pattern(data_dir, "catalog")
    queries = records.default_pattern(data_dir, "queries")
    lines = ["| encoder | seed | cos(v_q, v_p) AUC | cos(v_q, v_p) GAUC | popularity probe R^2 |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in names:
        for seed, root in encoder_dirs.items():
            t = embeddings.for_encoder(os.path.join(root, name), catalog, queries)
            item_row = {int(i): r for r, i in enumerate(t.item_id)}
            query_row = {int(i): r for r, i in enumerate(t.query_id)}
            vp = t.item_vector[[item_row[int(i)] for i in test["item_id"]]]
            vq = t.query_vector[[query_row[int(i)] for i in test["query_id"]]]
            cos = np.sum(vp * vq, axis=1)
            g, _ = ctr_metrics.gauc(test["label"], cos, test["page_id"])
            y = np.log1p(t.impressions_30d.astype(np.float64))
            x = np.concatenate([t.item_vector, np.ones([len(y), 1])], axis=1)
            half = len(y) // 2  # fit on one half of the catalog, score on the other
            w = np.linalg.solve(x[:half].T @ x[:half] + 1e-2 * np.eye(x.shape[1]),
                                x[:half].T @ y[:half])
            resid = y[half:] - x[half:] @ w
            r2 = 1 - resid.var() / y[half:].var()
            lines.append(f"| {name} | {seed} | {ctr_metrics.auc(test['label'], cos):.4f} | "
                         f"{g:.4f} | {r2:.3f} |")
    return "\n".join(lines)


def user_intent(data_dir: str, encoders: dict, clusters_files: dict) -> str:
    """What each encoder's vectors carry about user intent, without the CTR model: the test-day
    AUC and GAUC of the displayed item's largest cosine to the user's click history (the
    strongest SimScore feature), and of its cosine to the query photo. On a synthetic world
    (evaluation only: the planted truth), what they separate: the share of each catalog item's
    10 nearest catalog neighbours that share its category, its pattern and its palette, and the
    purity of its Cluster-ID clusters (`clusters_files`, by encoder name; the share of items in
    their cluster's most common category, style) that the CTR model was given."""
    test = pipeline.read_columns(records.default_pattern(data_dir, "ctr", "test"), CTR,
                                 ("label", "item_id", "query_id", "page_id",
                                  "click_history_item_ids", "click_history_item_ids_mask"))
    catalog = records.default_pattern(data_dir, "catalog")
    queries = records.default_pattern(data_dir, "queries")
    planted = None
    if truth.exists(data_dir):
        planted = truth.load(data_dir)["items"]
    lines = ["| encoder | max cos(item, history) AUC | GAUC | cos(item, query) AUC | GAUC |"
             + (" 10-NN category | pattern | palette | clusters: category | style |"
                if planted else ""),
             "| --- | ---: | ---: | ---: | ---: |" + (" ---: |" * 5 if planted else "")]
    for name, model_dir in encoders.items():
        t = embeddings.for_encoder(model_dir, catalog, queries)
        row = {int(i): r for r, i in enumerate(t.item_id)}
        qrow = {int(i): r for r, i in enumerate(t.query_id)}
        vp = t.item_vector[[row[int(i)] for i in test["item_id"]]]
        vq = t.query_vector[[qrow[int(i)] for i in test["query_id"]]]
        hist = test["click_history_item_ids"]
        mask = test["click_history_item_ids_mask"] & np.isin(hist, t.item_id)
        vh = t.item_vector[np.vectorize(lambda i, rows=row: rows.get(int(i), 0))(hist)]
        sim = np.where(mask, np.einsum("nd,nkd->nk", vp, vh), -2.0).max(axis=1)
        sim = np.where(mask.any(axis=1), sim, 0.0)
        cells = []
        for score in (sim, np.sum(vp * vq, axis=1)):
            g, _ = ctr_metrics.gauc(test["label"], score, test["page_id"])
            cells += [f"{ctr_metrics.auc(test['label'], score):.4f}", f"{g:.4f}"]
        if planted is not None:
            nn = visual_search.nearest_neighbours(t.item_vector, np.arange(len(t.item_id)), 10)
            at = truth.index_of(t.item_id, planted["item_id"])
            cells += [f"{np.mean(v[nn] == v[:, None]):.1%}" for v in
                      (planted[k][at] for k in ("category", "pattern", "palette"))]
            if os.path.exists(clusters_files.get(name, "")):
                ids = clusters.Clusters.load(clusters_files[name]).assign(t.item_vector)
                cells += [f"{_purity(ids, planted[k][at]):.1%}" for k in ("category", "style")]
            else:
                cells += ["", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _purity(cluster_ids: np.ndarray, labels: np.ndarray) -> float:
    """The share of items whose label is their cluster's most common one."""
    return sum(np.bincount(labels[cluster_ids == c]).max()
               for c in np.unique(cluster_ids)) / len(labels)


def perfect_style_encoder(data_dir: str, out: str, seed: int, ctr_steps: int) -> dict:
    """The CTR model in each mode fed a perfect style encoder (evaluation only: reads the planted
    truth): every item's and query photo's vector is the one-hot of its planted style, and the
    Cluster-ID clusters are the styles. What each mode can make of this world's image signal.
    Returns {mode: metrics}, cached in <out>/perfect_encoder.json."""
    path = os.path.join(out, "perfect_encoder.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    t = truth.load(data_dir)
    cat = pipeline.read_columns(records.default_pattern(data_dir, "catalog"), "catalog",
                                ("item_id", "category_id", "impressions_30d"))
    q = pipeline.read_columns(records.default_pattern(data_dir, "queries"), "queries",
                              ("query_id",))
    one_hot = np.eye(t["num_styles"], dtype=np.float32)
    table = embeddings.EmbeddingTable(
        cat["item_id"], cat["category_id"], cat["impressions_30d"],
        one_hot[t["items"]["style"][truth.index_of(cat["item_id"], t["items"]["item_id"])]],
        q["query_id"],
        one_hot[t["queries"]["style"][truth.index_of(q["query_id"], t["queries"]["query_id"])]])
    stage = configs.override(configs.CtrStage(), "train.steps", ctr_steps)
    results = {}
    for mode in experiments.MODES:
        cfg = dataclasses.replace(
            stage.ctr, train_pattern=records.default_pattern(data_dir, "ctr", "train"),
            test_pattern=records.default_pattern(data_dir, "ctr", "test"),
            image_feature_mode=mode)
        results[mode] = ctr_task.train_and_evaluate(
            cfg, ctr_spec.load(cfg.spec), stage.train,
            os.path.join(out, "ctr", f"perfect_encoder_{mode}"), cat["item_id"],
            cat["impressions_30d"], table,
            clusters=clusters.Clusters(one_hot) if mode == "cluster_id" else None, seed=seed)
        print(f"  seed {seed}: perfect style encoder/{mode}: AUC {results[mode]['AUC']:.4f}",
              flush=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    return results

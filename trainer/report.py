"""The demo's report: index.md with the Table 1, 2, 5 and B1 analogues, each of the papers'
orderings judged by a paired bootstrap (`trainer.eval.significance`), and PNG plots (AUC by
impression decile per method, a 2-D projection of catalog embeddings coloured by category and by
style, loss curves), from the runs of `scripts/demo.py` and `make export` (`scripts/report.py`).
"""
from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trainer import experiments  # noqa: E402
from trainer.data import npz  # noqa: E402
from trainer.eval import ctr_metrics, projector, read_metrics, significance, visual_search  # noqa: E402
from trainer.features import catalog_embed  # noqa: E402
from trainer.synth import marketplace  # noqa: E402
from trainer.train import loop  # noqa: E402

SEARCH = ("HR", "LR@10", "LR@100", "CR@10", "CR@100")
NAMES = {name: experiments.get(name).title for name in experiments.ENCODERS}
BASELINES = {e.name: e.title for e in experiments.BASELINES}  # paper 002 Table 5's others
PAPER_T1, PAPER_T2 = experiments.PAPER_TABLE_1, experiments.PAPER_TABLE_2
# A run's predictions or per-query parts serve several claims: read once.
_read = functools.lru_cache(maxsize=None)(npz.read)


def _json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def table1(demo: str) -> str:
    rows = ["| Encoder | " + " | ".join(SEARCH) + " | paper HR / CR@10 |",
            "| --- |" + " ---: |" * len(SEARCH) + " --- |"]
    for name in ["random"] + list(NAMES):
        m = read_metrics(os.path.join(demo, name))
        if m is None:
            continue
        label = NAMES.get(name, "random (untrained)")
        paper = PAPER_T1.get(label)
        ref = f"{paper[0]:.3f} / {paper[3]:.3f}" if paper else ""
        rows.append(f"| {label} | " + " | ".join(f"{m[k]:.3f}" for k in SEARCH) + f" | {ref} |")
    return "\n".join(rows)


def _ctr(demo: str, run: str, spec: str = "synthetic") -> dict | None:
    prefix = "ctr" if spec == "synthetic" else f"ctr_{spec}"
    return read_metrics(os.path.join(demo, prefix, run))


def table_feed(demo: str) -> str:
    """The feed spec's runs beside the same methods on the synthetic spec."""
    rows = ["| Features | spec | inputs | AUC | GAUC | Bottom10% |", "| --- | --- | ---: | ---: | "
            "---: | ---: |"]
    from trainer.ctr import spec as ctr_spec
    for run, label in (("no_image", "no image"), ("courier_cluster_id", "COURIER Cluster-ID")):
        for spec in ("synthetic", "feed"):
            m = _ctr(demo, run, spec)
            if m:
                n = len(ctr_spec.load(spec).inputs)
                rows.append(f"| {label} | {spec} | {n} | {m['AUC']:.4f} | {m['GAUC']:.4f} | "
                            f"{m['AUC_bottom10']:.4f} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def table2(demo: str) -> str:
    rows = ["| Image features | AUC | + D | Bottom10% | + D | Top10% | + D | GAUC | + D | "
            "paper AUC (+D) |", "| --- |" + " ---: |" * 8 + " --- |"]
    base = _ctr(demo, "no_image")
    if base:
        rows.append(f"| none | {base['AUC']:.4f} | | {base['AUC_bottom10']:.4f} | | "
                    f"{base['AUC_top10']:.4f} | | {base['GAUC']:.4f} | | |")
    for name, label in NAMES.items():
        m, d = _ctr(demo, name), _ctr(demo, f"{name}_d")
        if m is None:
            continue
        cells = []
        for k in ("AUC", "AUC_bottom10", "AUC_top10", "GAUC"):
            cells += [f"{m[k]:.4f}", f"{d[k]:.4f}" if d else ""]
        paper = PAPER_T2.get(label)
        ref = f"{paper[2]:.4f}" if paper else ""
        if label == "S1+S2":
            ref += f" ({PAPER_T2['S1+S2+D'][2]:.4f})"
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {ref} |")
    return "\n".join(rows)


def table5(demo: str) -> str:
    base = _ctr(demo, "no_image")
    if base is None:
        return ""
    rows = ["| Features | vector ΔAUC | ΔGAUC | simscore ΔAUC | ΔGAUC | cluster_id ΔAUC | ΔGAUC |",
            "| --- |" + " ---: |" * 6]
    for name in ("s1", "courier"):
        cells = []
        for mode in ("vector", "simscore", "cluster_id"):
            m = _ctr(demo, name if mode == "vector" else f"{name}_{mode}")
            for k in ("AUC", "GAUC"):
                cells.append(f"{(m[k] - base[k]) * 100:+.2f}" if m else "")
        rows.append(f"| {NAMES[name]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def table5_baselines(demo: str) -> str:
    """Table 5's rows in the paper's order and mode: each pre-training method's features as
    Cluster-IDs, ΔAUC and ΔGAUC against no image features, the paper's figures beside them."""
    base = _ctr(demo, "no_image")
    if base is None:
        return ""
    mode = experiments.TABLE_5_MODE
    rows = ["| Method | ΔAUC | ΔGAUC | paper ΔAUC (women's clothing), ΔAUC, ΔGAUC |",
            "| --- | ---: | ---: | --- |"]
    for name in experiments.TABLE_5:
        m = _ctr(demo, f"{name}_{mode}")
        if m is None:
            continue
        label = experiments.table_5_title(name)
        paper = ", ".join(f"{v:+.2f}%" for v in experiments.PAPER_TABLE_5[name])
        rows.append(f"| {label} | {(m['AUC'] - base['AUC']) * 100:+.2f} | "
                    f"{(m['GAUC'] - base['GAUC']) * 100:+.2f} | {paper} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def findings(demo: str, repro_claims: Sequence[str] = ()) -> str:
    """What this run shows, as sentences computed from its metrics (the papers' claims checked):
    each claim's verdict from this one run's bootstrap over its test set, and beside it what the
    reproductions measured across training seeds (`repro_claims`: their claims.json files)."""
    out = []
    repro = experiments.read_claims(repro_claims)
    search = {n: m for n in ["random"] + list(NAMES) if (m := read_metrics(os.path.join(demo, n)))}
    if search:
        best = max(search, key=lambda n: search[n]["HR"])
        out.append(f"Visual search: {NAMES.get(best, best)} finds the most items of the query's "
                   f"fine-grained style (HR {search[best]['HR']:.3f}; an untrained encoder "
                   f"{search.get('random', {}).get('HR', float('nan')):.3f}).")
        for c in experiments.VISUAL_CLAIMS:
            paths = [os.path.join(demo, run, visual_search.PER_QUERY) for run in (c.a, c.b)]
            if all(os.path.exists(p) for p in paths):
                compared = significance.compare_search(_read(paths[0]), _read(paths[1]),
                                                       c.metric)
                out.append(f"- {c.text}: one run: "
                           f"{compared.describe(c.metric, c.not_below, c.margin)}"
                           + _across_seeds(c, repro))
            elif c.a in search and c.b in search:  # a run from before the per-query parts
                out.append(f"- {c.text}: not judged ({c.metric} {search[c.a][c.metric]:.3f} vs "
                           f"{search[c.b][c.metric]:.3f}; no {visual_search.PER_QUERY})")
    base = _ctr(demo, "no_image")
    ctr = {n: m for n in NAMES if (m := _ctr(demo, n))}
    if base and ctr:
        best = max(ctr, key=lambda n: ctr[n]["AUC"])
        out.append(f"\nCTR: every encoder's image vectors are compared with none (AUC "
                   f"{base['AUC']:.4f}); the best, {NAMES[best]}, adds "
                   f"{(ctr[best]['AUC'] - base['AUC']) * 100:+.2f} points. Each ordering of "
                   "the papers is judged on this one run by a paired bootstrap over the test "
                   "pages (1,000 draws): the difference, its 95% interval, and whether the claim "
                   "holds, fails or is within noise.")
        for c in (*experiments.CTR_CLAIMS, *experiments.COURIER_CLAIMS,
                  *experiments.TABLE_5_CLAIMS, experiments.TABLE_8_CLAIM):
            judged = _judge(demo, c)
            if judged:
                out.append(f"- {c.text}: one run: {judged}" + _across_seeds(c, repro))
    return "\n".join(out)


def _judge(demo: str, claim: experiments.Claim) -> str | None:
    """'**verdict** (metric a vs b, difference [95% interval])' from the two CTR runs'
    predictions, if the demo has both."""
    paths = [os.path.join(demo, run, "predictions.npz") for run in (claim.a, claim.b)]
    if not all(os.path.exists(p) for p in paths):
        return None
    return significance.compare_ctr(_read(paths[0]), _read(paths[1]), claim.metric).describe(
        claim.metric, claim.not_below, claim.margin)


def _not_as_registered(exp: experiments.Experiment, model_dir: str) -> str:
    """' (this run: path=value, ...)' for each of `exp`'s fixed overrides that the run in
    `model_dir` (its config.json) was not trained with: a run made before the experiment
    changed is described as it ran."""
    config = _json(os.path.join(model_dir, "config.json"))
    if config is None:
        return ""
    differs = []
    for path, value in exp.sets:
        if isinstance(value, str) and value.startswith("{"):
            continue  # another run's model dir
        node: Any = config
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node != value:
            differs.append(f"{path}={node}" if node is not None else
                           f"no {path} (the run predates the setting)")
    return f" (this run: {', '.join(differs)})" if differs else ""


def _across_seeds(claim: experiments.Claim, repro: dict) -> str:
    """'; across N seeds (the repros): verdict, difference d, seed sd s' for a claim the
    reproductions judged (a Table 5 claim as they ran it, `experiments.REPRO_EQUIVALENT`, and
    saying so), else a note that none did."""
    r, protocol = repro.get(claim.key), ""
    if r is None and claim.key in experiments.REPRO_EQUIVALENT:
        key, how = experiments.REPRO_EQUIVALENT[claim.key]
        r, protocol = repro.get(key), f", {how}"
    if r is None:
        return "; no reproduction's claims.json (docs/repro/) holds this claim"
    seeds = len(r["by_seed"])
    return (f"; across {seeds} training seeds (longer runs, `make repro-*`{protocol}): "
            f"**{r['verdict']}**, "
            f"difference {r['difference']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}], "
            f"run-to-run sd {r['seed_sd']:.4f}")


def _save(fig: Any, path: str, dpi: int) -> None:
    """Writes a figure as a 256-colour PNG (a third of an RGBA one's bytes; the report is
    committed, docs/demo_report) and closes it."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi)
    plt.close(fig)
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(256).save(path, optimize=True)


def plot_deciles(demo: str, path: str, resamples: int = 200) -> list:
    """AUC per impression decile of every vector-mode run (and no image features), each point
    with its 95% interval over the test pages (`significance`'s page bootstrap)."""
    runs = [("no image", "no_image")] + [(NAMES[n], n) for n in NAMES] + [("S1+S2+D", "s1s2_d")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    table = []
    shown = [r for r in runs if os.path.exists(os.path.join(demo, "ctr", r[1], "predictions.npz"))]
    for i, (label, run) in enumerate(shown):
        p = npz.read(os.path.join(demo, "ctr", run, "predictions.npz"))
        bins = ctr_metrics.auc_by_impression_decile(p["label"], p["score"], p["item"],
                                                    p["impressions_30d"])
        _, unit_of = np.unique(p["group"], return_inverse=True)
        decile = ctr_metrics.impression_deciles(p["item"], p["impressions_30d"])
        lows, highs = [], []
        for d in range(len(bins)):
            iv = significance.bootstrap(significance.auc_metric(p["label"], unit_of,
                                                                decile == d),
                                        p["score"], int(unit_of.max()) + 1, resamples)
            lows.append(iv.value - iv.low)
            highs.append(iv.high - iv.value)
        x = np.arange(1, len(bins) + 1) + (i - (len(shown) - 1) / 2) * 0.06  # side by side
        ax.errorbar(x, [b["AUC"] for b in bins], yerr=[lows, highs], marker="o", markersize=3,
                    capsize=2, elinewidth=0.8, label=label,
                    linestyle="--" if label.endswith("+D") else "-")
        table.append((label, bins))
    ax.set_xlabel("impression decile of the displayed item (1 = least displayed)")
    ax.set_ylabel("test-day AUC")
    ax.set_title("CTR AUC by item popularity (bars: 95% interval over test pages, one run)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    _save(fig, path, dpi=110)
    return table


def plot_projection(demo: str, data_dir: str, path: str) -> str:
    """PCA of S1+S2's and COURIER's catalog vectors, coloured by category and by planted style
    (the style labels are the synthetic world's truth, read for colouring only)."""
    encoders = [n for n in ("s1s2", "courier")
                if os.path.exists(os.path.join(demo, n, "embeddings.npz"))]
    fig, axes = plt.subplots(len(encoders), 2, figsize=(10, 4.6 * len(encoders)), squeeze=False)
    rng = np.random.default_rng(0)
    for row, name in zip(axes, encoders, strict=True):
        t = npz.read(os.path.join(demo, name, "embeddings.npz"))
        idx = rng.choice(len(t["item_id"]), size=min(3000, len(t["item_id"])), replace=False)
        v = t["item_vector"][idx]
        v = v - v.mean(axis=0)
        xy = v @ np.linalg.svd(v, full_matrices=False)[2][:2].T
        styles = projector.style_labels(data_dir, t["item_id"][idx])
        for ax, (what, labels) in zip(row, (("category", t["category_id"][idx]),
                                            ("style", styles)), strict=True):
            if labels is None:
                ax.set_axis_off()
                continue
            labels = np.asarray(labels)
            codes = np.unique(labels, return_inverse=True)[1]
            ax.scatter(xy[:, 0], xy[:, 1], c=codes, s=3, cmap="tab20" if what == "style"
                       else "tab10", alpha=0.7)
            ax.set_title(f"{NAMES[name]} catalog vectors (PCA), by {what}")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    _save(fig, path, dpi=100)
    return ", ".join(NAMES[n] for n in encoders)


def plot_losses(demo: str, path: str) -> None:
    panels = [(label, os.path.join(demo, n), ["loss", "pv_loss", "ucs_loss"] if n == "courier"
               else ["loss"]) for n, label in NAMES.items()]
    panels += [("CTR (S1+S2 vectors)", os.path.join(demo, "ctr", "s1s2"), ["loss"]),
               ("CTR + D (S1+S2)", os.path.join(demo, "ctr", "s1s2_d"),
                ["pred_loss", "debias_loss"])]
    fig, axes = plt.subplots(2, 4, figsize=(14, 6))
    for ax, (title, d, tags) in zip(axes.flat, panels, strict=False):
        for tag in tags:
            logged = loop.logged_scalars(os.path.join(d, "train"), tag)
            if logged:
                ax.plot(list(logged), list(logged.values()), label=tag)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(tags) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    fig.tight_layout()
    _save(fig, path, dpi=100)


def plot_search_rows(demo: str, data_dir: str, path: str, queries: int = 4, k: int = 10
                     ) -> list[str]:
    """For `queries` judged query items (of different categories), each encoder's top `k`
    results as a row of pictures beside the query, the judged-relevant ones framed green: what
    HR counts. Returns the encoders shown."""
    from PIL import Image

    from trainer.data import pipeline, records
    encoders = [n for n in NAMES if os.path.exists(os.path.join(demo, n, "embeddings.npz"))]
    judgments = records.default_pattern(data_dir, "judgments")
    if not encoders or not pipeline.list_files(judgments):
        return []
    query_ids, relevant = visual_search.load_judgments(judgments)
    catalog = pipeline.read_columns(records.default_pattern(data_dir, "catalog"), "catalog",
                                    ("item_id", "image", "category_id"))
    image_of = dict(zip(catalog["item_id"].tolist(), catalog["image"], strict=True))
    category_of = dict(zip(catalog["item_id"].tolist(), catalog["category_id"].tolist(),
                           strict=True))
    picked, seen = [], set()
    for i, q in enumerate(query_ids):
        if category_of[int(q)] not in seen:
            picked.append(i)
            seen.add(category_of[int(q)])
        if len(picked) == queries:
            break
    fig, axes = plt.subplots(len(picked) * len(encoders), k + 1,
                             figsize=(1.05 * (k + 1), 1.15 * len(picked) * len(encoders)),
                             squeeze=False)
    for e, name in enumerate(encoders):
        t = _read(os.path.join(demo, name, "embeddings.npz"))
        row_of = {int(i): r for r, i in enumerate(t["item_id"])}
        rows = np.array([row_of[int(query_ids[i])] for i in picked])
        found = visual_search.nearest_neighbours(t["item_vector"], rows, k)
        for j, i in enumerate(picked):
            line = axes[j * len(encoders) + e]
            hits = np.isin(t["item_id"][found[j]], relevant[i])
            for c, item in enumerate([int(query_ids[i])] + t["item_id"][found[j]].tolist()):
                ax = line[c]
                ax.imshow(Image.open(io.BytesIO(image_of[item])).convert("RGB"))
                ax.set_xticks([])
                ax.set_yticks([])
                colour = "black" if c == 0 else "#2a2" if hits[c - 1] else "#ccc"
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(3 if c == 0 or hits[c - 1] else 1)
            line[0].set_ylabel(f"{NAMES[name]}\n{int(hits.sum())}/{k}", fontsize=8,
                               rotation=0, ha="right", va="center")
            if e == 0:
                line[0].set_title(f"query {j + 1}", fontsize=8)
    fig.tight_layout(h_pad=0.2, w_pad=0.2)
    _save(fig, path, dpi=80)
    return [NAMES[n] for n in encoders]


def _decile_table(bins: list) -> str:
    if not bins:
        return ""
    first = bins[0][1]
    rows = ["| method | " + " | ".join(f"D{i + 1} (≤{b['max_impressions']})"
                                       for i, b in enumerate(first)) + " |",
            "| --- |" + " ---: |" * len(first)]
    for label, b in bins:
        rows.append(f"| {label} | " + " | ".join(f"{x['AUC']:.3f}" for x in b) + " |")
    return "\n".join(rows)


# The reproductions' judged claims across training seeds, as committed (docs/repro/, copied from
# `make repro-*` runs' claims.json) and as a local run of them writes them (which wins).
_DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
REPRO_CLAIMS = tuple(os.path.join(_DOCS, "repro", f"{name}_claims.json")
                     for name in ("visual", "ctr", "courier")) + tuple(
    os.path.join("runs", name, experiments.CLAIMS_FILE) for name in ("visual", "ctr", "courier"))


def write(data_dir: str, demo: str, out: str, models_dir: str | None = None,
          repro_claims: Sequence[str] = REPRO_CLAIMS) -> str:
    """Writes `out`/index.md and its plots from the demo's runs in `demo` (on the world in
    `data_dir`); returns the report's text. `repro_claims`: the reproductions' claims.json files
    whose across-seed verdicts and run-to-run spread are printed beside this run's."""
    os.makedirs(out, exist_ok=True)
    manifest = marketplace.load_manifest(data_dir) or {}
    stats = manifest.get("stats", {})
    timings = _json(os.path.join(demo, "timings.json")) or {}
    deciles = plot_deciles(demo, os.path.join(out, "auc_by_impression_decile.png"))
    projected = plot_projection(demo, data_dir, os.path.join(out, "embeddings_2d.png"))
    plot_losses(demo, os.path.join(out, "loss_curves.png"))
    shown = plot_search_rows(demo, data_dir, os.path.join(out, "search_rows.png"))
    models = models_dir or os.path.join(demo, "models")
    embedded = catalog_embed.load_manifest(os.path.join(demo, "catalog_embeddings"))
    world = manifest.get("world", {})
    secs = timings.get("seconds", {})
    steps = timings.get("steps", {})
    encoder_rows = "\n".join(
        f"| {exp.title} | {exp.doc}{_not_as_registered(exp, os.path.join(demo, exp.name))} | "
        f"{steps.get(exp.stage, '?')} | {secs.get(exp.name, 0):.0f} |"
        for exp in map(experiments.get, (*experiments.ENCODERS, *BASELINES))
        if exp.name in NAMES or exp.name in secs)
    text = f"""# What the demo trained, and what it shows

This report is written by `make demo` from the runs in `{demo}`. Every number below was measured
in that run; the paper's figures are given for orientation only (their data is not public).

## The data

The synthetic marketplace `{world.get('name', '?')}` (seed {manifest.get('seed', '?')}):
{stats.get('items', '?')} catalog items in {world.get('num_categories', '?')} categories, each
with a rendered {world.get('image_size', '?')}px image whose fine-grained style (palette ×
pattern) drives clicks; {stats.get('users', '?')} users; {stats.get('impressions_logged', '?')}
logged impressions over {len(manifest.get('days', {}).get('train', []))} train days and one test
day, click rate {stats.get('click_rate', float('nan')):.3f}. Popularity biases what is shown:
{stats.get('share_impressions_30d_on_top10pct_items', float('nan')):.0%} of impressions go to the
top 10% of items, and {stats.get('share_items_under_5_impressions_30d', float('nan')):.0%} of
items have fewer than 5. That is the setting of both papers: images matter, and the long tail
has little click data.

## What was trained

Every encoder is the same ResNet-10 (width ×0.5, D = 512) image tower, trained five ways, and
(paper 002 Table 5's other pre-training baselines) four more:

| Encoder | How (paper) | Steps | Seconds |
| --- | --- | ---: | ---: |
{encoder_rows}

Then the CTR predictor (TFRS-style id embeddings, click-history attention, MLP tower;
{steps.get('ctr', '?')} steps of batch 512; its vocabularies from one pass of the Beam vocab job
over each data set, shared by the runs) was trained without image features, with each
encoder's catalog vectors, with S1+S2's and COURIER's plus the debiasing network D (000 Eq. 3-4),
with S1 and COURIER features as SimScore and Cluster-ID (002 App. B), with the four baselines
as Cluster-IDs (Table 5; every Cluster-ID run with the centroids of the `cluster` stage), and
from the `feed` feature spec (paper 002's setting). The demo's steps are short; `make repro-visual`,
`make repro-ctr` and `make repro-courier` run the longer, multi-seed versions (docs/results.md).
Total time of training and evaluation: {timings.get('total_seconds', 0) / 60:.1f} min.

## What it shows

Computed from this run's metrics: each of the papers' orderings is judged by a paired bootstrap
(over the judged queries for visual search, over the test pages for CTR) and said to hold, fail
or be within noise, with the difference and its 95% interval. That is **one training run's
verdict**: its interval holds the test set's noise, not the training run's, and two trainings of
one method differ by as much. Beside each, where a reproduction judged the same claim across
training seeds (`make repro-visual`, `repro-ctr`, `repro-courier`; longer runs than the demo's),
its verdict over seeds and test units together and the run-to-run standard deviation of the
difference. docs/results.md discusses where and why this world departs from the papers.

FINDINGS

## Table 1 analogue: visual search

For each judged query item, the catalog ranked by cosine similarity (paper 000 §4.1). HR: the
share of the query's relevant items (same fine-grained style) found in its first n_q results.
LR@K: the share of long-tail items (fewer than 5 impressions in 30 days) among the top K.
CR@K: the share of the query's category among the top K.

{table1(demo)}

SEARCH_ROWS

## Table 2 analogue: CTR prediction with image features, with and without D

Test-day AUC overall, on the 10% of samples whose items have the fewest and the most
impressions, and GAUC (per page view). "+ D" is the same features with the debiasing network.

{table2(demo)}

## Tables 5 and B1 analogue: COURIER and the three feature modes

ΔAUC and ΔGAUC (percentage points) against the CTR model without image features.

{table5(demo)}

Table 5's layout: every pre-training method's features as Cluster-IDs (the paper's mode), ΔAUC
and ΔGAUC (percentage points) against the CTR model without image features. The baselines train
{steps.get('simsiam', '?')} steps here from random weights (S1 {steps.get('pretrain', '?')});
`make repro-courier` runs Table 5 twice, longer: every method from S1's backbone on the same
number of images (paper 002 App. E), and every method from random weights.

{table5_baselines(demo)}

## Paper 002's feed setting, from a declared feature spec

The same world written with the `feed` feature spec's `ctr` columns
(`trainer/ctr/specs/feed.yaml`: no query photo, no demographics, no preferred categories; the
columns are absent from the records), and the CTR model built, trained, evaluated and exported
from that spec alone, beside the same methods on the synthetic spec:

{table_feed(demo)}

## AUC by impression decile

![AUC by impression decile](auc_by_impression_decile.png)

Samples ranked by their item's impressions in the last 30 days, cut into tenths (the column
header is the decile's largest impression count):

{_decile_table(deciles)}

## Embeddings in two dimensions

![catalog embeddings](embeddings_2d.png)

The first two principal components of {projected}'s catalog vectors (3,000 items), coloured by
category (left) and by the planted style (right; read from the world's truth for colouring
only). Category is the coarse structure; style, which drives clicks, is the fine one the
contrastive stages are meant to capture.

## Loss curves

![loss curves](loss_curves.png)

Training losses from each run's TensorBoard logs (`tensorboard --logdir {demo}`).

## Serving

`make export` wrote the S1+S2 encoder, the S1+S2 CTR model and the feed spec's COURIER
Cluster-ID CTR model as TF Serving SavedModels to `{models}` (signatures `encode_images`,
`encode_pixels`; `rank`, which takes the query photo and the candidates' images as bytes and
encodes them in the graph, `serving_default`, `predict_examples`, whose inputs are each model's
feature spec's columns), with warmup requests, then the CTR model's daily refresh as version 2
(the catalog embedding's item table), and the whole visual search ad request (`export.search`:
the photo -> its most similar catalog items -> ranked by the CTR model -> the top ads by
pCTR x bid, in one SavedModel, over that catalog embedding); `serving_config/` serves them, and
`python -m serving.search_page` shows the request on a web page (docs/serving.md).
"""
    text = text.replace("FINDINGS", findings(demo, repro_claims))
    text = text.replace("SEARCH_ROWS", f"""What HR counts, in pictures: for four judged query items
of different categories (the black frame), the top 10 of each encoder ({", ".join(shown)}), best
first. A green frame marks an item judged relevant to the query (same fine-grained style); the
count beside each row is how many of the ten are.

![top 10 per encoder](search_rows.png)""" if shown else "")
    if embedded:
        rate = embedded.get("images_per_second")
        text += (f"The exported encoder embedded the catalog ({embedded.get('items', '?')} items) "
                 f"into `{os.path.join(demo, 'catalog_embeddings')}` with a faiss "
                 f"{embedded.get('index', '')} index"
                 + (f", by the Beam embed pipeline at {rate:.0f} images/s" if rate else "")
                 + ".\n")
    with open(os.path.join(out, "index.md"), "w") as f:
        f.write(text)
    return text



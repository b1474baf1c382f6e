"""Reproduces paper 000's Table 2 (CTR prediction AUC) on a synthetic world.

For each seed: takes the encoders of `repro_visual.py` from <visual_dir>/seed<N> (training any that
are missing with that script) and trains the VGG and ViT competitors there if missing, then trains
and evaluates the CTR predictor with `python -m trainer.task --stage=ctr|debias` (the command
lines a user runs) without image features, with ResNet-C, VGG, ViT, S1, S2 and S1+S2 features,
and S1+S2 with D. Prints the table laid out like Table 2 (plus GAUC), each cell with its 95%
bootstrap interval over test pages, and judges each of the paper's orderings by a paired
bootstrap (`trainer.eval.significance`); writes it as Markdown.

  python scripts/repro_ctr.py --data_dir=data/small --visual_dir=runs/visual --out_dir=runs/ctr \
      --seeds=0,1
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from trainer import console, experiments
from trainer.data import npz
from trainer.eval import significance
from trainer.synth import truth  # evaluation only

ENCODERS = ("resnet_c", "s1", "s2", "s1s2")  # trained by repro_visual.py
COMPETITORS = tuple(e.name for e in experiments.COMPETITORS)  # VGG-C, ViT-C: trained here
# Table 2's rows, in its order (competitors, then the ablation), and the CTR model without image
# features as a reference.
GROUPS = (("Competitors", [experiments.ctr_experiment(e) for e in ("resnet_c", *COMPETITORS)]),
          ("Ablation", [*(experiments.ctr_experiment(e) for e in ("s1", "s2", "s1s2")),
                        experiments.ctr_experiment("s1s2", debias=True)]),
          ("Reference", [experiments.ctr_experiment(None)]))
RUNS = tuple(e for _, runs in GROUPS for e in runs)
METHODS = tuple(e.title for e in RUNS)  # ResNet-C, VGG, ViT, S1, S2, S1+S2, S1+S2+D, no image
COLUMNS = (("Bottom10%", "AUC_bottom10"), ("Top10%", "AUC_top10"), ("Overall", "AUC"),
           ("GAUC", "GAUC"))
PAPER = experiments.PAPER_TABLE_2


def ensure_encoders(data_dir: str, visual_dir: str, seed: int) -> str:
    """<visual_dir>/seed<N> with every encoder trained (repro_visual.py trains what is missing of
    its own; the competitors are trained here)."""
    out = os.path.join(visual_dir, f"seed{seed}")
    missing = [e for e in ENCODERS if not os.path.isdir(os.path.join(out, e, "ckpt"))]
    if missing:
        print(f"  seed {seed}: training encoders {missing} (scripts/repro_visual.py)", flush=True)
        proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__),
                                                            "repro_visual.py"),
                               f"--data_dir={data_dir}", f"--out_dir={visual_dir}",
                               f"--seeds={seed}"])
        if proc.returncode:
            sys.exit("training the encoders failed")
    for name in COMPETITORS:
        t0 = time.time()
        experiments.ensure(experiments.get(name), data_dir, os.path.join(out, name), {}, seed,
                           os.path.join(out, "log.txt"))
        if time.time() - t0 > 60:
            print(f"  seed {seed}: trained {experiments.get(name).title} in "
                  f"{time.time() - t0:.0f}s", flush=True)
    return out


def run_seed(data_dir: str, encoders: str, out: str, seed: int, extra: list) -> dict:
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "log.txt")
    dirs = {e: os.path.join(encoders, e) for e in (*ENCODERS, *COMPETITORS)}
    results = {}
    for exp in RUNS:
        model_dir = os.path.join(out, exp.name)
        if os.path.exists(os.path.join(model_dir, "metrics.json")):  # a rerun only reports
            seconds = 0.0
        else:
            seconds = experiments.run(experiments.command(exp, data_dir, model_dir, dirs, seed,
                                                          flags=extra), log)
        with open(os.path.join(model_dir, "metrics.json")) as f:
            results[exp.title] = json.load(f)
        m = results[exp.title]
        m["seconds"] = seconds or m.get("seconds", 0.0)
        print(f"  seed {seed}: {exp.title}: AUC {m['AUC']:.4f} bottom-10% {m['AUC_bottom10']:.4f} "
              f"top-10% {m['AUC_top10']:.4f} ({seconds:.0f}s)", flush=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def predictions(out_dir: str, seeds: list) -> dict:
    """{seed: {method: predictions.npz}} of every run."""
    return {s: {e.title: npz.read(os.path.join(out_dir, f"seed{s}", e.name, "predictions.npz"))
                for e in RUNS} for s in seeds}


def table(per_seed: dict, preds: dict) -> str:
    seeds = sorted(per_seed)
    lines = [f"CTR prediction AUC on the test day (paper 000 Table 2 layout, plus GAUC), seeds "
             f"{', '.join(map(str, seeds))}: mean ± half-range over seeds, then (±) the half-width "
             "of the 95% bootstrap interval over test pages (mean over seeds); the paper's "
             "figures in brackets.", "",
             "| | Method | " + " | ".join(c for c, _ in COLUMNS) + " |",
             "| --- | --- |" + " ---: |" * len(COLUMNS)]
    for group, runs in GROUPS:
        for n, exp in enumerate(runs):
            method, cells = exp.title, []
            for i, (_, key) in enumerate(COLUMNS):
                vals = np.array([per_seed[s][method][key] for s in seeds])
                half = np.mean([significance.interval_ctr(preds[s][method], key).half_width
                                for s in seeds])
                cell = f"{experiments.spread(vals)} (±{half:.4f})"
                if method in PAPER and i < 3:
                    cell += f" [{PAPER[method][i]:.4f}]"
                cells.append(cell)
            lines.append(f"| {group if n == 0 else ''} | {method} | " + " | ".join(cells) + " |")
    lines += ["", "| seed | " + " | ".join(f"{m} AUC" for m in METHODS) + " |",
              "| ---: |" + " ---: |" * len(METHODS)]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(f"{per_seed[s][m]['AUC']:.4f}"
                                              for m in METHODS) + " |")
    first = per_seed[seeds[0]]["S1+S2"]
    lines += ["", f"Test day: {first['samples']} impressions, {first['clicks']} clicks; the "
              f"bottom-10% slice holds {first['bottom10_samples']} impressions "
              f"({first['bottom10_clicks']} clicks) of items with at most "
              f"{first['bottom10_max_impressions']} impressions in 30 days, the top-10% slice "
              f"items with at least {first['top10_min_impressions']}."]
    return "\n".join(lines)


def checks(preds: dict) -> list[str]:
    """The paper's orderings (§4.2, Table 2: `experiments.CTR_CLAIMS`), each judged by a paired
    bootstrap over test pages on every seed, and over seeds ('holds' or 'fails' when every seed
    agrees, else 'mixed' or 'within noise')."""
    title = {e.name: e.title for e in RUNS}
    return [f"- {c.text}: " + significance.judged_over_seeds(
        {s: significance.compare_ctr(preds[s][title[c.a]], preds[s][title[c.b]], c.metric)
         for s in preds}, not_below=c.not_below) for c in experiments.CTR_CLAIMS]


def reference(data_dir: str) -> str:
    """The AUC of the planted click logit's observable-in-principle parts on the test day
    (evaluation only): how much there is to learn, and how much of it is visual."""
    if not truth.exists(data_dir):
        return ""
    from trainer.data import pipeline, records
    from trainer.eval import ctr_metrics
    from trainer.synth import marketplace
    t = truth.load(data_dir)
    cm = marketplace.load_manifest(data_dir)["world"]["click"]  # the world's own parameters
    test = pipeline.read_columns(records.default_pattern(data_dir, "ctr", "test"), "ctr",
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


def feature_diagnostics(data_dir: str, encoder_dirs: dict) -> str:
    """What each encoder's vectors carry, measured without the CTR model (no planted truth): the
    test-day AUC and GAUC of cos(v_q, v_p) alone (how well query-item similarity ranks clicks),
    and the R^2 of a ridge probe of log(1 + 30-day impressions) from the item vector (popularity
    baked into the features: S2's selection bias)."""
    from trainer.data import pipeline, records
    from trainer.eval import ctr_metrics
    from trainer.features import embeddings
    test = pipeline.read_columns(records.default_pattern(data_dir, "ctr", "test"), "ctr",
                                 ("label", "item_id", "query_id", "page_id"))
    catalog = records.default_pattern(data_dir, "catalog")
    queries = records.default_pattern(data_dir, "queries")
    lines = ["| encoder | seed | cos(v_q, v_p) AUC | cos(v_q, v_p) GAUC | popularity probe R^2 |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in ("resnet_c", *COMPETITORS, "s1", "s2", "s1s2"):
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


def main() -> None:
    p = console.CommandLine(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--visual_dir", default="runs/visual",
                   help="Where repro_visual.py keeps (or will train) the encoders.")
    p.add_argument("--out_dir", default="runs/ctr")
    p.add_argument("--seeds", default="0")
    p.add_argument("--extra", default="", help="Flags passed to every CTR stage, space separated.")
    p.add_argument("--report_only", action="store_true",
                   help="Only print the table from the seeds' results.json (no training).")
    a = p.parse_args()
    t0 = time.time()
    per_seed, t_ctr = {}, 0.0
    seeds = [int(s) for s in a.seeds.split(",")]
    for seed in seeds:
        out = os.path.join(a.out_dir, f"seed{seed}")
        if a.report_only:
            with open(os.path.join(out, "results.json")) as f:
                per_seed[seed] = json.load(f)
            continue
        print(f"seed {seed}:", flush=True)
        encoders = ensure_encoders(a.data_dir, a.visual_dir, seed)
        t1 = time.time()
        per_seed[seed] = run_seed(a.data_dir, encoders, out, seed, a.extra.split())
        t_ctr += time.time() - t1
    preds = predictions(a.out_dir, seeds)
    text = (table(per_seed, preds) + "\n\nThe paper's orderings, each judged by a paired bootstrap "
            "over test pages (difference and its 95% interval per seed):\n"
            + "\n".join(checks(preds)))
    text += ("\n\nWhat the image features carry, without the CTR model:\n\n" + feature_diagnostics(
        a.data_dir, {s: os.path.join(a.visual_dir, f"seed{s}") for s in seeds}))
    ref = reference(a.data_dir)
    if ref:
        text += ("\n\nReference from the planted truth (evaluation only): the AUC of parts of the "
                 "simulator's click logit (user price sensitivity, shop quality, device and the "
                 f"logit noise left out):\n\n{ref}")
    if not a.report_only:
        text += (f"\n\nTotal time: {(time.time() - t0) / 60:.1f} min ({t_ctr / 60:.1f} min of "
                 "CTR training and evaluation).")
    experiments.write_report(text, os.path.join(a.out_dir, "table2.md"))


if __name__ == "__main__":
    main()

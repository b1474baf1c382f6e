"""Reproduces paper 002's Tables 5, 8, B1 and 6 (COURIER, its pre-training baselines and the
downstream image features) on a synthetic world.

For each seed: takes the S1 encoder of `repro_visual.py` from <visual_dir>/seed<N>/s1 (training
it if missing; S1 is Table 5's SimCLR), trains COURIER from it, each Table 6 / Appendix D variant
and COURIER + CLIP (Table 8), and Table 5's other baselines (Supervised, SimSiam, CLIP,
MaskCLIP) from scratch on S1's budget; then trains and evaluates the CTR predictor without image
features (the baseline), with S1 and COURIER features in the vector, simscore and cluster_id
modes, with each Table 6 variant's in `--ablation_mode` (cluster_id), and with Table 5's other
baselines' and COURIER + CLIP's as cluster_id (the paper's mode) and as vectors. Every step
is a `python -m trainer.task` command line. Prints delta AUC and delta GAUC against the baseline
(percentage points, raw values in parentheses), judges the paper's orderings by a paired
bootstrap and writes table5.md. The world needs item titles (CLIP, MaskCLIP, COURIER + CLIP).

  python scripts/repro_courier.py --data_dir=data/small --visual_dir=runs/visual \
      --out_dir=runs/courier --seeds=0,1
"""
from __future__ import annotations

import json
import os

import numpy as np

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from trainer import diagnostics, experiments
from trainer.data import npz
from trainer.eval import read_metrics, significance
from trainer.synth import truth  # evaluation only

MODES = experiments.MODES
ABLATIONS = experiments.COURIER_ABLATIONS  # (Table 6 row, config flag)
BASELINES = tuple(e.name for e in experiments.BASELINES)  # Table 5's, trained from scratch
TABLE_5, TABLE_5_MODE = experiments.TABLE_5, experiments.TABLE_5_MODE
# Table 5's other rows are also run as Vectors: what k-means keeps of a representation depends
# on which axis dominates it (docs/results.md, Table 5's discussion).
TABLE_5_MODES = (TABLE_5_MODE, "vector")
PAPER_5 = experiments.PAPER_TABLE_5
PAPER_B1 = experiments.PAPER_TABLE_B1
PAPER_6 = experiments.PAPER_TABLE_6
title = experiments.table_5_title


def ctr_runs(encoders: list, ablation_mode: str) -> list:
    """(result key, CTR experiment): the baseline, S1 and COURIER in every mode, each trained
    Table 6 variant in `ablation_mode`, and each other trained encoder (Table 5's baselines,
    COURIER + CLIP) in Table 5's mode."""
    runs = [("baseline", experiments.ctr_experiment(None))]
    runs += [(f"{experiments.get(enc).title}/{mode}", experiments.ctr_experiment(enc, mode))
             for enc in ("s1", "courier") for mode in MODES]
    runs += [(f"{row}/{ablation_mode}", experiments.ctr_experiment(f"courier_{flag}",
                                                                   ablation_mode))
             for row, flag in ABLATIONS if f"courier_{flag}" in encoders]
    runs += [(f"{experiments.get(e).title}/{mode}", experiments.ctr_experiment(e, mode))
             for mode in TABLE_5_MODES for e in (*BASELINES, "courier_clip") if e in encoders]
    return runs


def run_seed(data_dir: str, s1: str, out: str, seed: int, a) -> dict:
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "log.txt")
    dirs = {"s1": s1}
    variants = ["courier"] + ([] if a.skip_ablations else
                              [f"courier_{flag}" for _, flag in ABLATIONS])
    variants += [] if a.skip_baselines else ["courier_clip"]
    previous = os.path.join(out, "results.json")
    seconds = {}  # training times, kept from an earlier run of the seed for encoders it trained
    if os.path.exists(previous):
        with open(previous) as f:
            seconds = json.load(f).get("courier_seconds", {})
    for name in variants + ([] if a.skip_baselines else list(BASELINES)):
        exp = experiments.get(name)
        dirs[name] = os.path.join(out, name)
        steps = ([f"--train_steps={a.courier_steps}"] if exp.stage == "courier" else
                 [f"--train_steps={a.encoder_steps}"] if a.encoder_steps else [])
        if os.path.isdir(os.path.join(dirs[name], "ckpt")):  # a rerun keeps trained encoders
            continue
        t = experiments.run(experiments.command(exp, data_dir, dirs[name], dirs, seed,
                                                flags=steps), log)
        seconds[exp.title] = t
        print(f"  seed {seed}: trained {exp.title} ({t:.0f}s)", flush=True)
    results = {}
    for key, exp in ctr_runs([*variants, *BASELINES], a.ablation_mode):
        if exp.needs and not all(os.path.isdir(dirs.get(n, "")) for n in exp.needs):
            continue
        model_dir = os.path.join(out, exp.name)
        t = 0.0
        if not read_metrics(model_dir):  # a rerun only reports
            t = experiments.run(experiments.command(
                exp, data_dir, model_dir, dirs, seed,
                flags=[f"--train_steps={a.ctr_steps}"] + a.extra.split()), log)
        m = results[key] = read_metrics(model_dir) or {}
        print(f"  seed {seed}: {key}: AUC {m['AUC']:.4f} GAUC {m['GAUC']:.4f} ({t:.0f}s)",
              flush=True)
    out_results = {"ctr": results, "courier_seconds": seconds}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(out_results, f, indent=2)
    return out_results


def _delta(per_seed: dict, key: str, metric: str) -> str:
    return experiments.delta_cell([r["ctr"][key][metric] for r in per_seed.values()],
                                  [r["ctr"]["baseline"][metric] for r in per_seed.values()])


def tables(per_seed: dict, ablation_mode: str) -> str:
    seeds = sorted(per_seed)
    base = {m: np.mean([r["ctr"]["baseline"][m] for r in per_seed.values()])
            for m in ("AUC", "GAUC")}
    first = per_seed[seeds[0]]["ctr"]
    lines = [f"Delta AUC and delta GAUC against the CTR model without image features "
             f"(percentage points, mean ± half-range over seeds {', '.join(map(str, seeds))}; "
             f"raw means in parentheses). Baseline AUC {base['AUC']:.4f}, GAUC "
             f"{base['GAUC']:.4f}.", ""]
    rows5 = [e for e in TABLE_5 if f"{experiments.get(e).title}/{TABLE_5_MODE}" in first]
    if len(rows5) > 2:
        lines += [f"Table 5 layout ({TABLE_5_MODE} features); the paper's ΔAUC (women's "
                  "clothing), ΔAUC, ΔGAUC (all categories) in brackets:", "",
                  "| Method | ΔAUC | ΔGAUC | paper |", "| --- | ---: | ---: | --- |"]
        for e in rows5:
            key, label = f"{experiments.get(e).title}/{TABLE_5_MODE}", title(e)
            paper = ", ".join(f"{v:+.2f}%" for v in PAPER_5[e])
            lines.append(f"| {label} | {_delta(per_seed, key, 'AUC')} | "
                         f"{_delta(per_seed, key, 'GAUC')} | [{paper}] |")
        lines.append("")
    if "CLIP/vector" in first:
        lines += ["Table 5's methods with their features as Vectors (not a table of the paper):",
                  "", "| Method | ΔAUC | ΔGAUC |", "| --- | ---: | ---: |"]
        for e in (*TABLE_5, "courier_clip"):
            key = f"{experiments.get(e).title}/vector"
            if key in first:
                lines.append(f"| {title(e)} | {_delta(per_seed, key, 'AUC')} | "
                             f"{_delta(per_seed, key, 'GAUC')} |")
        lines.append("")
    if f"COURIER+CLIP/{TABLE_5_MODE}" in first:
        lines += [f"Table 8 layout ({TABLE_5_MODE} features):", "",
                  "| Method | ΔAUC | ΔGAUC | paper |", "| --- | ---: | ---: | --- |"]
        for label, paper in (("COURIER+CLIP", "+0.26%, +0.04%, -0.09%"),
                             ("COURIER", "+0.46%, +0.16%, +0.19%")):
            key = f"{label}/{TABLE_5_MODE}"
            lines.append(f"| {label} | {_delta(per_seed, key, 'AUC')} | "
                         f"{_delta(per_seed, key, 'GAUC')} | [{paper}] |")
        lines.append("")
    lines += ["Table B1 layout (S1 and COURIER in each mode):", "",
             "| Features | " + " | ".join(f"{m} ΔAUC | {m} ΔGAUC" for m in MODES) + " |",
             "| --- |" + " ---: |" * (2 * len(MODES))]
    for enc, label in (("S1", "SimCLR-style S1"), ("COURIER", "COURIER")):
        cells = [f"{_delta(per_seed, f'{enc}/{m}', 'AUC')} | "
                 f"{_delta(per_seed, f'{enc}/{m}', 'GAUC')}" for m in MODES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Paper (Table B1, COURIER versions {PAPER_B1}; Table 5 with cluster_id: "
              "SimCLR +0.28% women's / +0.05% all AUC, COURIER +0.46% / +0.16%)."]
    rows = [row for row, _ in ABLATIONS if f"{row}/{ablation_mode}" in per_seed[seeds[0]]["ctr"]]
    if rows:
        lines += ["", f"Table 6 layout ({ablation_mode} features); the paper's ΔAUC (women's "
                  "clothing), ΔAUC, ΔGAUC in brackets:", "",
                  "| Variant | ΔAUC | ΔGAUC | paper |", "| --- | ---: | ---: | --- |"]
        for row in rows + ["COURIER"]:
            key = f"{row}/{ablation_mode}"
            paper = ", ".join(f"{v:+.2f}%" for v in PAPER_6[row])
            lines.append(f"| {row} | {_delta(per_seed, key, 'AUC')} | "
                         f"{_delta(per_seed, key, 'GAUC')} | [{paper}] |")
    lines += ["", "| seed | " + " | ".join(k for k in per_seed[seeds[0]]["ctr"]) + " |",
              "| ---: |" + " ---: |" * len(per_seed[seeds[0]]["ctr"])]
    for s in seeds:
        lines.append(f"| {s} AUC | " + " | ".join(f"{m['AUC']:.4f}" for m in
                                                 per_seed[s]["ctr"].values()) + " |")
    return "\n".join(lines)


def predictions(out_dir: str, seeds: list, ablation_mode: str) -> dict:
    """{seed: {CTR experiment name: predictions.npz}} of every CTR run the seeds hold."""
    every = [f"courier_{flag}" for _, flag in ABLATIONS] + [*BASELINES, "courier_clip"]
    out: dict = {}
    for s in seeds:
        out[s] = {}
        for _, exp in ctr_runs(every, ablation_mode):
            path = os.path.join(out_dir, f"seed{s}", exp.name, "predictions.npz")
            if os.path.exists(path):
                out[s][exp.name] = npz.read(path)
    return out


def checks(out_dir: str, preds: dict, ablation_mode: str) -> list[str]:
    """The paper's orderings (Tables 5, B1, 6 and 8), each judged across the seeds by a bootstrap
    over seeds and test pages together; writes <out_dir>/claims.json."""
    ctr = experiments.ctr_experiment
    claims = list(experiments.COURIER_CLAIMS)
    for enc in ("courier", "s1"):
        claims += [experiments.Claim(f"{experiments.get(enc).title}: {hi} above {lo} (AUC)",
                                     ctr(enc, hi).name, ctr(enc, lo).name, "AUC",
                                     paper="paper 002 §4.2 and Table B1: \"Cluster-ID is the "
                                           "best-performing method among the three\"")
                   for hi, lo in (("cluster_id", "simscore"), ("simscore", "vector"))]
    claims += [experiments.Claim(f"COURIER beats {row} ({ablation_mode}, AUC)",
                                 ctr("courier", ablation_mode).name,
                                 ctr(f"courier_{flag}", ablation_mode).name, "AUC",
                                 paper="paper 002 Table 6 and App. D")
               for row, flag in ABLATIONS]
    claims += [*experiments.TABLE_5_CLAIMS, experiments.TABLE_8_CLAIM]
    lines, records = experiments.judge_claims(claims, preds, significance.compare_ctr_seeds)
    experiments.write_claims(records, out_dir)
    return lines


def report(a, per_seed: dict) -> str:
    text = tables(per_seed, a.ablation_mode)
    preds = predictions(a.out_dir, sorted(per_seed), a.ablation_mode)
    text += ("\n\nThe paper's orderings, each judged by a bootstrap over the training seeds "
             "and the test pages together (the mean difference over seeds, its 95% interval, the "
             "seeds' standard deviation, and each seed's difference with its own verdict over "
             "pages alone):\n" + "\n".join(checks(a.out_dir, preds, a.ablation_mode)))
    first = min(per_seed)
    seed_dir = os.path.join(a.out_dir, f"seed{first}")
    names = [e for e in ("courier", *(f"courier_{flag}" for _, flag in ABLATIONS), *BASELINES,
                         "courier_clip") if os.path.isdir(os.path.join(seed_dir, e, "ckpt"))]
    encoders = ({title("s1"): s1_dir(a, first)}
                | {title(e): os.path.join(seed_dir, e) for e in names})
    clusters_files = {title(e): os.path.join(seed_dir, experiments.ctr_experiment(
        e, "cluster_id").name, "clusters.npz") for e in ("s1", *names)}
    text += (f"\n\nWhat the vectors carry, without the CTR model (seed {first}):"
             f"\n\n{diagnostics.user_intent(a.data_dir, encoders, clusters_files)}")
    if truth.exists(a.data_dir):
        perfect = diagnostics.perfect_style_encoder(a.data_dir, seed_dir, first, a.ctr_steps)
        base = per_seed[first]["ctr"]["baseline"]
        text += (f"\n\nThe same CTR model fed a perfect style encoder (evaluation only: each "
                 f"vector is the one-hot of the planted style, the clusters are the styles; "
                 f"seed {first}), against that seed's baseline:\n\n"
                 "| mode | ΔAUC | ΔGAUC |\n| --- | ---: | ---: |\n" + "\n".join(
                     f"| {m} | {(r['AUC'] - base['AUC']) * 100:+.2f} ({r['AUC']:.4f}) | "
                     f"{(r['GAUC'] - base['GAUC']) * 100:+.2f} ({r['GAUC']:.4f}) |"
                     for m, r in perfect.items()))
    times = {k: np.mean([r["courier_seconds"].get(k, np.nan) for r in per_seed.values()])
             for k in per_seed[first]["courier_seconds"]}
    text += ("\n\nCOURIER training time per run (s): " +
             ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    return text


def s1_dir(a, seed: int) -> str:
    return os.path.join(a.visual_dir, f"seed{seed}", "s1")


def main() -> None:
    p = experiments.repro_flags(__doc__, "runs/courier", extra=True)
    p.add_argument("--courier_steps", type=int, default=200, help="COURIER steps (one epoch).")
    p.add_argument("--ablation_mode", default="cluster_id", choices=MODES,
                   help="Image feature mode of the Table 6 rows.")
    p.add_argument("--skip_ablations", action="store_true")
    p.add_argument("--encoder_steps", type=int, default=0,
                   help="Steps of Table 5's other baselines (0: their stages' defaults, S1's "
                        "budget).")
    p.add_argument("--skip_baselines", action="store_true",
                   help="Leave out Table 5's other baselines and Table 8's COURIER + CLIP.")
    a = p.parse_args()

    def seed_run(seed: int, out: str) -> None:
        s1 = experiments.ensure(experiments.get("s1"), a.data_dir, s1_dir(a, seed), {}, seed,
                                os.path.join(out, "log.txt"))
        run_seed(a.data_dir, s1, out, seed, a)

    experiments.reproduce(a, seed_run, lambda per_seed: report(a, per_seed), "table5.md")


if __name__ == "__main__":
    main()

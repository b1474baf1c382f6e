"""Reproduces paper 002's Tables 5, 8, B1 and 6 (COURIER, its pre-training baselines and the
downstream image features) on a synthetic world.

For each seed: takes the S1 encoder of `repro_visual.py` from <visual_dir>/seed<N>/s1 (training
it if missing), trains COURIER from its backbone, each Table 6 / Appendix D variant (on the
seeds of `--ablation_seeds`, default all) and COURIER + CLIP (Table 8); then the CTR predictor
without image features (the baseline), with S1 and COURIER features in the vector, simscore and
cluster_id modes, with each Table 6 variant's in `--ablation_mode` (cluster_id) and with
COURIER + CLIP's as cluster_id.

Table 5 is run twice (`experiments.TABLE_5_PROTOCOLS`): as App. E runs it, every method from the
same pre-trained weights (S1's backbone standing in for ImageNet's) on the same number of images
(`experiments.TABLE_5_IMAGES`), and every method from random weights; SimCLR at App. E's tuned
tau = 0.2, Supervised on the world's early train days. Each row's Cluster-ID features go into a
CTR model trained on the late train days only (after Supervised's), beside a baseline on the
same days. Every step is a `python -m trainer.task` command line. Prints delta AUC and delta GAUC
against the baseline (percentage points, raw values in parentheses), judges the paper's
orderings across the seeds and writes table5.md and claims.json. The world needs item titles
(CLIP, MaskCLIP, COURIER + CLIP) and early / late splits (`early_days`).

  python scripts/repro_courier.py --data_dir=data/small --visual_dir=runs/visual \
      --out_dir=runs/courier --seeds=0,1,2
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable

import numpy as np

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from trainer import diagnostics, experiments
from trainer.data import npz
from trainer.eval import read_metrics, significance
from trainer.synth import truth  # evaluation only

MODES = experiments.MODES
ABLATIONS = experiments.COURIER_ABLATIONS  # (Table 6 row, config flag)
TABLE_5_MODE = experiments.TABLE_5_MODE
VARIANTS = tuple(f"courier_{flag}" for _, flag in ABLATIONS)  # Table 6's encoders
# The encoders trained from S1 besides Table 5's, in the order run_seed trains them.
COURIER_RUNS = ("courier", *VARIANTS, "courier_clip")
SECONDS_FILE = "encoder_seconds.json"  # {encoder: training seconds} of one seed's run
PROTOCOLS = experiments.TABLE_5_PROTOCOLS  # {protocol: Table 5's rows in the paper's order}
# Every encoder of the two Table 5s (COURIER from S1 is in both).
TABLE_5_ROWS = tuple(dict.fromkeys(e for rows in PROTOCOLS.values() for e in rows))
TABLE_5_DIR = "table5"  # the Table 5 CTR runs (on the late train days) under a seed's dir
# The paper's Table 5 figures, by row position (Supervised, CLIP, SimCLR, SimSiam, MaskCLIP,
# COURIER).
PAPER_5 = [experiments.PAPER_TABLE_5[e] for e in experiments.TABLE_5]
PAPER_B1 = experiments.PAPER_TABLE_B1
PAPER_6 = experiments.PAPER_TABLE_6


def row_title(name: str) -> str:
    return experiments.get(name).title


def ctr_runs(encoders: list, ablation_mode: str) -> list:
    """(result key, CTR experiment) on every train day: the baseline, S1 and COURIER in every
    mode, each trained Table 6 variant in `ablation_mode`, COURIER + CLIP in Table 5's mode."""
    runs = [("baseline", experiments.ctr_experiment(None))]
    runs += [(f"{row_title(enc)}/{mode}", experiments.ctr_experiment(enc, mode))
             for enc in ("s1", "courier") for mode in MODES]
    runs += [(f"{row}/{ablation_mode}", experiments.ctr_experiment(f"courier_{flag}",
                                                                   ablation_mode))
             for row, flag in ABLATIONS if f"courier_{flag}" in encoders]
    if "courier_clip" in encoders:
        runs.append((f"COURIER+CLIP/{TABLE_5_MODE}",
                     experiments.ctr_experiment("courier_clip", TABLE_5_MODE)))
    return runs


def table_5_runs() -> list:
    """(result key, CTR experiment) of both Table 5 protocols: the baseline and each row's
    Cluster-ID features, keyed by experiment name (trained on the late train days)."""
    return [("baseline", experiments.ctr_experiment(None))] + [
        (e, experiments.ctr_experiment(e, TABLE_5_MODE)) for e in TABLE_5_ROWS]


def encoder_seconds(out: str) -> dict[str, float]:
    """{encoder: training seconds} of the seed run in `out`. Written as each encoder finishes
    (SECONDS_FILE), so a run stopped part-way through a seed (the session ends, a machine is
    preempted) keeps the times of what it trained; results.json holds those of earlier runs."""
    seconds: dict[str, float] = {}
    for path, key in ((os.path.join(out, "results.json"), "courier_seconds"),
                      (os.path.join(out, SECONDS_FILE), None)):
        if os.path.exists(path):
            with open(path) as f:
                seconds.update(json.load(f) if key is None else json.load(f).get(key, {}))
    return seconds


def run_seed(data_dir: str, s1: str, out: str, seed: int, a) -> dict:
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "log.txt")
    dirs = {"s1": s1}
    variants = ["courier"] + (list(VARIANTS) if seed in ablation_seeds(a) else [])
    table_5 = [] if a.skip_baselines else [e for e in TABLE_5_ROWS if e != "courier"]
    variants += [] if a.skip_baselines else ["courier_clip"]
    seconds = encoder_seconds(out)
    for name in variants + table_5:
        exp = experiments.get(name)
        dirs[name] = os.path.join(out, name)
        # The equal-protocol rows carry their own steps (`experiments.TABLE_5_IMAGES`).
        own_steps = any(path == "train.steps" for path, _ in exp.sets)
        steps = ([] if own_steps else
                 [f"--train_steps={a.courier_steps}"] if exp.stage == "courier" else
                 [f"--train_steps={a.encoder_steps}"] if a.encoder_steps else [])
        if experiments.trained(dirs[name]):  # a rerun keeps trained encoders
            continue
        t = experiments.run(experiments.command(exp, data_dir, dirs[name], dirs, seed,
                                                flags=steps), log)
        seconds[name] = t
        with open(os.path.join(out, SECONDS_FILE), "w") as f:
            json.dump(seconds, f, indent=2)
        print(f"  seed {seed}: trained {name} ({t:.0f}s)", flush=True)

    def ctr(runs: list, root: str, sets: tuple = ()) -> dict:
        results = {}
        for key, exp in runs:
            if exp.needs and not all(os.path.isdir(dirs.get(n, "")) for n in exp.needs):
                continue
            model_dir = os.path.join(root, exp.name)
            t = 0.0
            if not read_metrics(model_dir):  # a rerun only reports
                t = experiments.run(experiments.command(
                    exp, data_dir, model_dir, dirs, seed, sets=sets,
                    flags=[f"--train_steps={a.ctr_steps}"] + a.extra.split()), log)
            m = results[key] = read_metrics(model_dir) or {}
            print(f"  seed {seed}: {os.path.relpath(model_dir, out)}: AUC {m['AUC']:.4f} GAUC "
                  f"{m['GAUC']:.4f} ({t:.0f}s)", flush=True)
        return results

    out_results = {"ctr": ctr(ctr_runs(variants, a.ablation_mode), out),
                   "table5": ctr(table_5_runs(), os.path.join(out, TABLE_5_DIR),
                                 (("ctr.train_split", "late"),)) if table_5 else {},
                   "courier_seconds": seconds}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(out_results, f, indent=2)
    return out_results


def _with(per_seed: dict, keys: list) -> dict:
    """The seeds of `per_seed` whose CTR runs hold every one of `keys` (Table 6's rows are on
    `--ablation_seeds` only)."""
    return {s: r for s, r in per_seed.items() if all(k in r["ctr"] for k in keys)}


def _over(held: Iterable[int]) -> str:
    seeds = sorted(held)
    return (f"seed {seeds[0]} only: one training run, its intervals are over test pages alone"
            if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}")


def _delta(per_seed: dict, key: str, metric: str, table: str = "ctr") -> str:
    return experiments.delta_cell([r[table][key][metric] for r in per_seed.values()],
                                  [r[table]["baseline"][metric] for r in per_seed.values()])


def tables(per_seed: dict, ablation_mode: str) -> str:
    seeds = sorted(per_seed)
    base = {m: np.mean([r["ctr"]["baseline"][m] for r in per_seed.values()])
            for m in ("AUC", "GAUC")}
    first = per_seed[seeds[0]]["ctr"]
    lines = [f"Delta AUC and delta GAUC against the CTR model without image features "
             f"(percentage points, mean ± half-range over seeds {', '.join(map(str, seeds))}; "
             f"raw means in parentheses). Baseline AUC {base['AUC']:.4f}, GAUC "
             f"{base['GAUC']:.4f}.", ""]
    five = per_seed[seeds[0]].get("table5", {})
    for protocol, rows in PROTOCOLS.items():
        if not all(e in five for e in rows):
            continue
        b5 = {m: np.mean([r["table5"]["baseline"][m] for r in per_seed.values()])
              for m in ("AUC", "GAUC")}
        lines += [f"Table 5 layout, every method {protocol} ({TABLE_5_MODE} features; the CTR "
                  "model and its baseline trained on the late train days, baseline AUC "
                  f"{b5['AUC']:.4f}, GAUC {b5['GAUC']:.4f}); the paper's ΔAUC (women's "
                  "clothing), ΔAUC, ΔGAUC (all categories) in brackets:", "",
                  "| Method | ΔAUC | ΔGAUC | paper |", "| --- | ---: | ---: | --- |"]
        for i, e in enumerate(rows):
            paper = ", ".join(f"{v:+.2f}%" for v in PAPER_5[i])
            lines.append(f"| {row_title(e)} | {_delta(per_seed, e, 'AUC', 'table5')} | "
                         f"{_delta(per_seed, e, 'GAUC', 'table5')} | [{paper}] |")
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
    six = [f"{row}/{ablation_mode}" for row, _ in ABLATIONS]
    variants = [row for row, _ in ABLATIONS
                if _with(per_seed, [f"{row}/{ablation_mode}"])]
    ablated = _with(per_seed, [f"{row}/{ablation_mode}" for row in variants])
    if variants:
        lines += ["", f"Table 6 layout ({ablation_mode} features; {_over(ablated)}); the paper's "
                  "ΔAUC (women's clothing), ΔAUC, ΔGAUC in brackets:", "",
                  "| Variant | ΔAUC | ΔGAUC | paper |", "| --- | ---: | ---: | --- |"]
        for row in variants + ["COURIER"]:
            key = f"{row}/{ablation_mode}"
            paper = ", ".join(f"{v:+.2f}%" for v in PAPER_6[row])
            lines.append(f"| {row} | {_delta(ablated, key, 'AUC')} | "
                         f"{_delta(ablated, key, 'GAUC')} | [{paper}] |")
    keys = list(dict.fromkeys(k for r in per_seed.values() for k in r["ctr"]))
    keys = [k for k in keys if k not in six] + [k for k in keys if k in six]
    lines += ["", "| seed | " + " | ".join(keys) + " |", "| ---: |" + " ---: |" * len(keys)]
    for s in seeds:
        run = per_seed[s]["ctr"]
        lines.append(f"| {s} AUC | " + " | ".join(
            f"{run[k]['AUC']:.4f}" if k in run else "–" for k in keys) + " |")
    return "\n".join(lines)


def predictions(out_dir: str, seeds: list, ablation_mode: str) -> dict:
    """{seed: {run: predictions.npz}} of every CTR run the seeds hold, by CTR experiment name
    (the Table 5 runs as 'table5/' + it)."""
    every = [*VARIANTS, "courier_clip"]
    runs = [exp.name for _, exp in ctr_runs(every, ablation_mode)]
    runs += [f"{TABLE_5_DIR}/{exp.name}" for _, exp in table_5_runs()]
    out: dict = {}
    for s in seeds:
        out[s] = {}
        for name in runs:
            path = os.path.join(out_dir, f"seed{s}", name, "predictions.npz")
            if os.path.exists(path):
                out[s][name] = npz.read(path)
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
    claims.append(experiments.TABLE_8_CLAIM)
    for protocol, rows in PROTOCOLS.items():
        claims += experiments.table_5_claims(rows, f"{TABLE_5_DIR}/", protocol)
    lines, records = experiments.judge_claims(claims, preds, significance.compare_ctr_seeds)
    # Table 6's variants may be on fewer seeds (`--ablation_seeds`): each is judged over the
    # seeds that trained it, and says which.
    for row, flag in ABLATIONS:
        claim = experiments.Claim(f"COURIER beats {row} ({ablation_mode}, AUC)",
                                  ctr("courier", ablation_mode).name,
                                  ctr(f"courier_{flag}", ablation_mode).name, "AUC",
                                  paper="paper 002 Table 6 and App. D")
        held = {s: p for s, p in preds.items() if claim.b in p}
        if held and len(held) < len(preds):
            claim = dataclasses.replace(claim, text=f"{claim.text} ({_over(held)})")
        more_lines, more = experiments.judge_claims([claim], held, significance.compare_ctr_seeds)
        lines += more_lines
        records += more
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
    main = [e for e in COURIER_RUNS if os.path.isdir(os.path.join(seed_dir, e, "ckpt"))]
    five = [e for e in TABLE_5_ROWS
            if e != "courier" and os.path.isdir(os.path.join(seed_dir, e, "ckpt"))]

    def label(e: str) -> str:
        return f"{row_title(e)} ({e})"

    encoders = ({label("s1"): s1_dir(a, first)}
                | {label(e): os.path.join(seed_dir, e) for e in (*main, *five)})
    clusters_files = {label(e): os.path.join(seed_dir, experiments.ctr_experiment(
        e, "cluster_id").name, "clusters.npz") for e in ("s1", *main)} | {
        label(e): os.path.join(seed_dir, TABLE_5_DIR, experiments.ctr_experiment(
            e, "cluster_id").name, "clusters.npz") for e in five}
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
    order = [*COURIER_RUNS, *TABLE_5_ROWS]  # the order run_seed trains them in
    timed: dict[str, list[float]] = {}  # an encoder trained by an earlier version may lack one
    for seed in per_seed:
        for k, t in encoder_seconds(os.path.join(a.out_dir, f"seed{seed}")).items():
            timed.setdefault(k, []).append(t)
    text += ("\n\nTraining time per encoder (s, mean over seeds "
             f"{', '.join(map(str, sorted(per_seed)))}; in brackets how many seeds have a time "
             "where fewer do): " + ", ".join(
                 f"{k} {np.mean(v):.0f}" + ("" if len(v) == len(per_seed) else f" ({len(v)})")
                 for k, v in sorted(timed.items(), key=lambda kv: order.index(kv[0])
                                    if kv[0] in order else len(order))))
    return text


def ablation_seeds(a) -> list[int]:
    """The seeds that train the Table 6 / App. D variants (`--ablation_seeds`)."""
    if a.skip_ablations:
        return []
    return [int(s) for s in (a.ablation_seeds or a.seeds).split(",")]


def s1_dir(a, seed: int) -> str:
    return os.path.join(a.visual_dir, f"seed{seed}", "s1")


def main() -> None:
    p = experiments.repro_flags(__doc__, "runs/courier", extra=True)
    p.add_argument("--courier_steps", type=int, default=200, help="COURIER steps (one epoch).")
    p.add_argument("--ablation_mode", default="cluster_id", choices=MODES,
                   help="Image feature mode of the Table 6 rows.")
    p.add_argument("--skip_ablations", action="store_true",
                   help="Train no Table 6 / App. D variant.")
    p.add_argument("--ablation_seeds", default="",
                   help="Comma-separated seeds that train the Table 6 / App. D variants (default: "
                        "every seed). Table 6 and its claims are then over these seeds only; a "
                        "rerun with more fills them in.")
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

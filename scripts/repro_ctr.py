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
from trainer import diagnostics, experiments
from trainer.data import npz
from trainer.eval import read_metrics, significance

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
    missing = [e for e in ENCODERS if not experiments.trained(os.path.join(out, e))]
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
        if read_metrics(model_dir):  # a rerun only reports
            seconds = 0.0
        else:
            seconds = experiments.run(experiments.command(exp, data_dir, model_dir, dirs, seed,
                                                          flags=extra), log)
        m = results[exp.title] = read_metrics(model_dir) or {}
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


def checks(out_dir: str, preds: dict) -> list[str]:
    """The paper's orderings (§4.2, Table 2: `experiments.CTR_CLAIMS`), each judged across the
    seeds by a bootstrap over seeds and test pages together; writes <out_dir>/claims.json."""
    by_name = {s: {e.name: preds[s][e.title] for e in RUNS} for s in preds}
    lines, records = experiments.judge_claims(experiments.CTR_CLAIMS, by_name,
                                              significance.compare_ctr_seeds)
    experiments.write_claims(records, out_dir)
    return lines


def report(a, per_seed: dict) -> str:
    seeds = sorted(per_seed)
    preds = predictions(a.out_dir, seeds)
    text = (table(per_seed, preds) + "\n\nThe paper's orderings, each judged by a bootstrap over "
            f"the {len(seeds)} training seeds and the test pages together (the mean difference "
            "over seeds, its 95% interval, the seeds' standard deviation, and each seed's "
            "difference with its own verdict over pages alone):\n"
            + "\n".join(checks(a.out_dir, preds)))
    text += ("\n\nWhat the image features carry, without the CTR model:\n\n"
             + diagnostics.query_similarity_and_popularity(
                 a.data_dir, {s: os.path.join(a.visual_dir, f"seed{s}") for s in seeds},
                 ("resnet_c", *COMPETITORS, "s1", "s2", "s1s2")))
    ref = diagnostics.planted_click_scores(a.data_dir)
    if ref:
        text += ("\n\nReference from the planted truth (evaluation only): the AUC of parts of the "
                 "simulator's click logit (user price sensitivity, shop quality, device and the "
                 f"logit noise left out):\n\n{ref}")
    return text


def main() -> None:
    p = experiments.repro_flags(__doc__, "runs/ctr", ctr_steps=False, extra=True)
    a = p.parse_args()
    experiments.reproduce(
        a, lambda seed, out: run_seed(a.data_dir, ensure_encoders(a.data_dir, a.visual_dir, seed),
                                      out, seed, a.extra.split()),
        lambda per_seed: report(a, per_seed), "table2.md")


if __name__ == "__main__":
    main()

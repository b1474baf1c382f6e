"""Reproduces paper 000's Table 1 (visual search) on a synthetic world.

For each seed: trains the experiments ResNet-C, S1, S2 and S1+S2 (`trainer.experiments`) with
`python -m trainer.task` (the same command lines a user runs), evaluates each with
`--stage=eval_search` (plus an untrained encoder as a reference), and prints the table laid out
like Table 1; the table is also written as Markdown.

  python scripts/repro_visual.py --data_dir=data/small --out_dir=runs/visual --seeds=0,1
"""
from __future__ import annotations

import json
import os

import numpy as np

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from trainer import diagnostics, experiments
from trainer.data import npz
from trainer.eval import read_metrics, significance, visual_search

ENCODERS = ("resnet_c", "s1", "s2", "s1s2")
METHODS = tuple(experiments.get(e).title for e in ENCODERS)  # ResNet-C, S1, S2, S1+S2
COLUMNS = ("HR", "LR@10", "LR@100", "CR@10", "CR@100")
PAPER = experiments.PAPER_TABLE_1


def run_seed(data_dir: str, out: str, seed: int, extra: list) -> dict:
    """Trains and evaluates every method for one seed; returns {method: metrics}."""
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "log.txt")
    dirs = {name: os.path.join(out, name) for name in (*ENCODERS, "random")}
    times = {}
    for name in ENCODERS:
        exp = experiments.get(name)
        times[exp.title] = experiments.run(experiments.command(
            exp, data_dir, dirs[name], dirs, seed, flags=extra), log)
        print(f"  seed {seed}: trained {exp.title} in {times[exp.title]:.0f}s", flush=True)
    results = {}
    for name in (*ENCODERS, "random"):
        method = experiments.get(name).title if name != "random" else "random"
        evaluation = experiments.get("random" if name == "random" else "eval")
        experiments.run(experiments.command(evaluation, data_dir, dirs[name], dirs, seed,
                                            flags=extra), log)
        results[method] = read_metrics(dirs[name]) or {}
        results[method]["train_seconds"] = times.get(method, 0.0)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def per_query(out_dir: str, seeds: list) -> dict:
    """{seed: {method: per-query parts}} of every evaluation (`visual_search.PER_QUERY`)."""
    names = {**{m: e for m, e in zip(METHODS, ENCODERS, strict=True)}, "random": "random"}
    return {s: {m: npz.read(os.path.join(out_dir, f"seed{s}", name, visual_search.PER_QUERY))
                for m, name in names.items()} for s in seeds}


def table(per_seed: dict, parts: dict) -> str:
    """Markdown laid out like Table 1: mean (and spread over seeds), the half-width of each
    metric's 95% bootstrap interval over queries, the paper's figures beside."""
    seeds = sorted(per_seed)
    lines = [f"Visual search (paper 000 Table 1 layout), seeds {', '.join(map(str, seeds))}: "
             "mean ± half-range over seeds, then (±) the half-width of the 95% bootstrap interval "
             "over queries (mean over seeds); the paper's figures in brackets.", "",
             "| Method | " + " | ".join(COLUMNS) + " |", "| --- |" + " ---: |" * len(COLUMNS)]
    for method in METHODS + ("random",):
        cells = []
        for i, col in enumerate(COLUMNS):
            vals = np.array([per_seed[s][method][col] for s in seeds])
            half = np.mean([significance.interval_search(parts[s][method], col).half_width
                            for s in seeds])
            cell = f"{experiments.spread(vals)} (±{half:.4f})"
            if method in PAPER:
                cell += f" [{PAPER[method][i]:.4f}]"
            cells.append(cell)
        name = "untrained encoder (reference)" if method == "random" else method
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| seed | " + " | ".join(f"{m} HR" for m in METHODS) + " |",
              "| ---: |" + " ---: |" * len(METHODS)]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(f"{per_seed[s][m]['HR']:.4f}" for m in METHODS)
                     + " |")
    return "\n".join(lines)


def checks(out_dir: str, parts: dict) -> list[str]:
    """The paper's orderings (§4.1, Table 1: `experiments.VISUAL_CLAIMS`), each judged across the
    seeds by a bootstrap over seeds and queries together; writes <out_dir>/claims.json."""
    by_name = {s: {name: parts[s][experiments.get(name).title] for name in ENCODERS}
               for s in parts}
    lines, records = experiments.judge_claims(experiments.VISUAL_CLAIMS, by_name,
                                              significance.compare_search_seeds)
    experiments.write_claims(records, out_dir)
    return lines


def report(out_dir: str, data_dir: str, per_seed: dict) -> str:
    parts = per_query(out_dir, sorted(per_seed))
    text = (table(per_seed, parts) + "\n\nThe paper's orderings, each judged by a bootstrap "
            f"over the {len(per_seed)} training seeds and the judged queries together (the mean "
            "difference over seeds, its 95% interval, the seeds' standard deviation, and each "
            "seed's difference with its own verdict over queries alone):\n"
            + "\n".join(checks(out_dir, parts)))
    diag = diagnostics.search_on_photos(data_dir, {s: os.path.join(out_dir, f"seed{s}")
                                                   for s in per_seed})
    if diag:
        text += f"\n\nDiagnostics from the planted truth (evaluation only):\n\n{diag}"
    return text


def main() -> None:
    p = experiments.repro_flags(__doc__, "runs/visual", visual_dir=False, ctr_steps=False,
                                extra=True)
    a = p.parse_args()
    experiments.reproduce(a, lambda seed, out: run_seed(a.data_dir, out, seed, a.extra.split()),
                          lambda per_seed: report(a.out_dir, a.data_dir, per_seed), "table1.md")


if __name__ == "__main__":
    main()

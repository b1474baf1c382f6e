"""Reproduces paper 002's Table 7 (COURIER's batch size) on a synthetic world.

For each seed: trains COURIER from the S1 encoder of `repro_visual.py` (<visual_dir>/seed<N>/s1,
trained if missing) at each global batch size, over `--replicas` replicas (MirroredStrategy on
logical CPU devices, so Eq. 6's negatives are gathered across replicas as on GPUs) for the same
number of page views (`--epochs` of the train days'), from the smallest size up; a size whose run
fails (out of memory) ends the sweep and is reported as the first that does not fit. Then trains
and evaluates the CTR model with each encoder's Cluster-ID features (the paper's Table 5 mode)
and without image features, and prints delta AUC and delta GAUC against the latter, with the
paper's, and judges "larger batches are better" by a paired bootstrap over test pages.

  python scripts/repro_batch.py --data_dir=data/small --visual_dir=runs/visual \
      --out_dir=runs/batch --seeds=0,1
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import time

import numpy as np

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from trainer import experiments
from trainer.data import npz, pipeline, records
from trainer.eval import read_metrics, significance
from trainer.synth import marketplace

# Paper 002 Table 7: batch size -> (delta AUC women's clothing, delta AUC, delta GAUC), %.
PAPER_7 = {64: (0.15, -0.06, -0.08), 256: (0.23, 0.04, 0.02), 512: (0.36, 0.09, 0.10),
           2048: (0.43, 0.15, 0.17), 3072: (0.46, 0.16, 0.19), 4096: (0.47, 0.16, 0.21)}
MODE = "cluster_id"


def page_views(data_dir: str) -> int:
    """Train page views of the data dir (its manifest's count, else counted)."""
    manifest = marketplace.load_manifest(data_dir)
    if manifest:
        return int(manifest["files"]["pageviews"]["train"]["records"])
    pattern = records.default_pattern(data_dir, "pageviews", "train")
    return sum(len(b["user_id"]) for b in pipeline.iter_columns(pattern, "pageviews",
                                                                ("user_id",)))


def run_seed(a, seed: int, out: str) -> None:
    log = os.path.join(out, "log.txt")
    s1 = experiments.ensure(experiments.get("s1"), a.data_dir,
                            os.path.join(a.visual_dir, f"seed{seed}", "s1"), {}, seed, log)
    pages = page_views(a.data_dir) * a.epochs
    courier = experiments.get("courier")
    results: dict = {"runs": {}, "does_not_fit": None}
    base_dir = os.path.join(out, "ctr", "no_image")
    if not read_metrics(base_dir):
        experiments.run(experiments.command(experiments.ctr_experiment(None), a.data_dir,
                                            base_dir, {}, seed,
                                            flags=[f"--train_steps={a.ctr_steps}"]), log)
    for bs in sorted(int(b) for b in a.batch_sizes.split(",")):
        enc_dir = os.path.join(out, f"courier_bs{bs}")
        steps = max(1, math.ceil(pages / bs))
        t0 = time.time()
        if not experiments.trained(enc_dir):
            args = experiments.command(courier, a.data_dir, enc_dir, {"s1": s1}, seed, flags=[
                f"--batch_size={bs}", f"--train_steps={steps}", "--strategy=mirrored",
                f"--logical_cpus={a.replicas}", f"--checkpoint_interval={steps}"])
            with open(log, "a") as f:
                f.write(f"$ {' '.join(args)}\n")
                f.flush()
                proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT)
            if proc.returncode:
                print(f"  seed {seed}: batch {bs} failed ({proc.returncode}, see {log}): the "
                      "largest that fits is the one before", flush=True)
                results["does_not_fit"] = bs
                break
        seconds = time.time() - t0
        ctr_dir = os.path.join(out, "ctr", f"courier_bs{bs}_{MODE}")
        if not read_metrics(ctr_dir):
            experiments.run(experiments.command(
                experiments.ctr_experiment("courier", MODE), a.data_dir, ctr_dir,
                {"courier": enc_dir}, seed, flags=[f"--train_steps={a.ctr_steps}"]), log)
        results["runs"][bs] = {"steps": steps, "seconds": seconds, **(read_metrics(ctr_dir) or {})}
        m = results["runs"][bs]
        print(f"  seed {seed}: batch {bs} ({steps} steps, {seconds:.0f}s): AUC {m['AUC']:.4f} "
              f"GAUC {m['GAUC']:.4f}", flush=True)
    results["baseline"] = read_metrics(base_dir)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


def report(a, per_seed: dict) -> str:
    seeds = sorted(per_seed)
    sizes = sorted(set.intersection(*(set(int(b) for b in r["runs"]) for r in per_seed.values())))
    lines = [f"COURIER at each global batch size over {a.replicas} replicas (negatives gathered "
             f"across them), {a.epochs:g} epoch(s) of page views each; the CTR model with its "
             f"{MODE} features against the model without image features, in percentage points "
             f"(mean ± half-range over seeds {', '.join(map(str, seeds))}; raw means in "
             "parentheses); the paper's ΔAUC (women's clothing), ΔAUC, ΔGAUC in brackets.", "",
             "| Batch size | steps | COURIER s | ΔAUC | ΔGAUC | paper |",
             "| ---: | ---: | ---: | ---: | ---: | --- |"]
    for bs in sizes:
        runs = [per_seed[s]["runs"][str(bs)] for s in seeds]
        cells = [experiments.delta_cell([r[metric] for r in runs],
                                        [per_seed[s]["baseline"][metric] for s in seeds])
                 for metric in ("AUC", "GAUC")]
        paper = ", ".join(f"{v:+.2f}%" for v in PAPER_7[bs]) if bs in PAPER_7 else "-"
        lines.append(f"| {bs} | {runs[0]['steps']} | {np.mean([r['seconds'] for r in runs]):.0f}"
                     f" | {cells[0]} | {cells[1]} | [{paper}] |")
    unfit = {per_seed[s]["does_not_fit"] for s in seeds} - {None}
    if unfit:
        lines += ["", f"Batch size {min(unfit)} does not fit this machine (its run failed)."]
    if len(sizes) > 1:
        preds = {s: {bs: npz.read(os.path.join(a.out_dir, f"seed{s}", "ctr",
                                               f"courier_bs{bs}_{MODE}", "predictions.npz"))
                     for bs in sizes} for s in seeds}
        lines += ["", "The paper's ordering (larger batches better), each pair judged by a "
                  "bootstrap over the training seeds and the test pages together:"]
        pairs = [(hi, lo) for lo, hi in zip(sizes, sizes[1:], strict=False)]
        if (sizes[-1], sizes[0]) not in pairs:
            pairs.append((sizes[-1], sizes[0]))
        for hi, lo in pairs:
            for metric in ("AUC", "GAUC"):
                lines.append(f"- batch {hi} above batch {lo} ({metric}): "
                             + significance.compare_ctr_seeds(
                                 {s: (preds[s][hi], preds[s][lo]) for s in seeds},
                                 metric).describe(metric))
    return "\n".join(lines)


def main() -> None:
    p = experiments.repro_flags(__doc__, "runs/batch")
    p.add_argument("--batch_sizes", default="64,128,256,512",
                   help="Global batch sizes (page views), tried from the smallest up.")
    p.add_argument("--replicas", type=int, default=2,
                   help="Replicas (logical CPU devices) the global batch is split over.")
    p.add_argument("--epochs", type=float, default=1.0,
                   help="Passes over the train page views at every batch size.")
    a = p.parse_args()
    experiments.reproduce(a, lambda seed, out: run_seed(a, seed, out),
                          lambda per_seed: report(a, per_seed), "table7.md")


if __name__ == "__main__":
    main()

"""Paper 002 Fig. 3: the downstream CTR metric against COURIER's temperature tau.

For each tau: trains COURIER from the seed's S1 encoder with `--temperature=tau`, then the CTR
model with its features in the simscore mode (as the paper does for this sweep: "much faster"
than Cluster-ID), and reports delta AUC and delta GAUC against the CTR model without image
features. Runs that `repro_courier.py` already made with the same settings (the baseline, and
tau = 0.05) are reused. With several seeds, each point is the mean with the half-range as its
error bar. Prints the table, draws fig3.png and writes fig3.md.

  python scripts/sweep_tau.py --data_dir=data/small --visual_dir=runs/visual \
      --out_dir=runs/courier --seeds=0,1 --taus=0.02,0.05,0.1,0.2,0.5
"""
from __future__ import annotations

import os
import time

import numpy as np

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from trainer import console, experiments
from trainer.eval import read_metrics

DEFAULT_TAU = 0.05


def _ctr(exp: experiments.Experiment, data_dir: str, model_dir: str, dirs: dict, seed: int,
         flags: list, log: str) -> dict:
    if not read_metrics(model_dir):
        experiments.run(experiments.command(exp, data_dir, model_dir, dirs, seed, flags=flags),
                        log)
    return read_metrics(model_dir) or {}


def sweep_seed(a, seed: int) -> dict:
    """{tau: (ΔAUC, ΔGAUC, AUC, GAUC)} of one seed, percentage points against its baseline."""
    out = os.path.join(a.out_dir, f"seed{seed}")
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "log.txt")
    dirs = {"s1": experiments.ensure(experiments.get("s1"), a.data_dir,
                                     os.path.join(a.visual_dir, f"seed{seed}", "s1"), {}, seed,
                                     log)}
    steps = [f"--train_steps={a.ctr_steps}"]
    base = experiments.ctr_experiment(None)
    baseline = _ctr(base, a.data_dir, os.path.join(out, base.name), dirs, seed, steps, log)
    courier, simscore = experiments.get("courier"), experiments.ctr_experiment("courier",
                                                                                "simscore")
    rows = {}
    for tau in [float(t) for t in a.taus.split(",")]:
        # The default tau's runs are repro_courier.py's own (reused).
        suffix = "" if tau == DEFAULT_TAU else f"_tau{tau:g}"
        dirs["courier"] = os.path.join(out, "courier" + suffix)
        experiments.run(experiments.command(
            courier, a.data_dir, dirs["courier"], dirs, seed,
            sets=[("courier.temperature", tau)], flags=[f"--train_steps={a.courier_steps}"]), log)
        m = _ctr(simscore, a.data_dir, os.path.join(out, simscore.name + suffix), dirs, seed,
                 steps, log)
        rows[tau] = ((m["AUC"] - baseline["AUC"]) * 100, (m["GAUC"] - baseline["GAUC"]) * 100,
                     m["AUC"], m["GAUC"])
        print(f"seed {seed}, tau {tau:g}: ΔAUC {rows[tau][0]:+.2f} ΔGAUC {rows[tau][1]:+.2f}",
              flush=True)
    return rows


def main() -> None:
    p = console.CommandLine(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--visual_dir", default="runs/visual")
    p.add_argument("--out_dir", default="runs/courier",
                   help="repro_courier.py's output: its baseline and tau=0.05 runs are reused.")
    p.add_argument("--seeds", default="0")
    p.add_argument("--taus", default="0.02,0.05,0.1,0.2,0.5")
    p.add_argument("--courier_steps", type=int, default=200)
    p.add_argument("--ctr_steps", type=int, default=470)
    a = p.parse_args()
    t0 = time.time()
    seeds = [int(s) for s in a.seeds.split(",")]
    per_seed = {seed: sweep_seed(a, seed) for seed in seeds}
    taus = list(per_seed[seeds[0]])
    # [tau, seed, (ΔAUC, ΔGAUC, AUC, GAUC)]
    v = np.array([[per_seed[s][t] for s in seeds] for t in taus])
    mean, half = v.mean(axis=1), (v.max(axis=1) - v.min(axis=1)) / 2

    def cell(i, j, raw):
        spread = f" ± {half[i, j]:.2f}" if len(seeds) > 1 else ""
        return f"{mean[i, j]:+.2f}{spread} ({mean[i, raw]:.4f})"

    lines = [f"COURIER temperature sweep (paper 002 Fig. 3), simscore features, seeds "
             f"{', '.join(map(str, seeds))}: change against the CTR model without image features "
             "in percentage points (mean ± half-range over seeds; raw means in parentheses).", "",
             "| tau | ΔAUC | ΔGAUC |", "| ---: | ---: | ---: |"]
    lines += [f"| {t:g} | {cell(i, 0, 2)} | {cell(i, 1, 3)} |" for i, t in enumerate(taus)]
    best = taus[int(mean[:, 0].argmax())]
    lines += ["", f"Best tau by mean ΔAUC: {best:g} (the paper's: 0.05).",
              f"\nTotal time: {(time.time() - t0) / 60:.1f} min."]
    _plot(taus, mean, half, os.path.join(a.out_dir, "fig3.png"))
    experiments.write_report("\n".join(lines), os.path.join(a.out_dir, "fig3.md"))


def _plot(taus: list, mean: np.ndarray, half: np.ndarray, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for j, (label, fmt) in enumerate((("ΔAUC", "o-"), ("ΔGAUC", "s--"))):
        ax.errorbar(taus, mean[:, j], yerr=half[:, j], fmt=fmt, capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks(taus, [f"{t:g}" for t in taus])
    ax.minorticks_off()
    ax.set_xlabel("tau")
    ax.set_ylabel("change (%)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

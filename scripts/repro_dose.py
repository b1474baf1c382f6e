"""When does each method help? The dose-response study of the three properties of the data that
the papers' claims rest on (`trainer.synth.config.DOSES`), each at several strengths from 0 (the
property absent) to 1 (the world as named), the pair of runs that the property should separate
trained on each, over several training seeds:

- style (fine-grained visual style drives clicks): the CTR model with S1's image vectors against
  the model without image features (overall AUC);
- popularity (impressions are biased by popularity): S1+S2+D against S1+S2 on the bottom-10%
  impression slice (what D should give) and overall (what it must not cost);
- intention (the user's intention is visible in their history's images): COURIER's Cluster-IDs
  against S1's (overall AUC).

Every world has the same catalog (items and images), so a seed's S1 is trained once, on the
strength-1 world, and serves every world; S2 (S1+S2) and COURIER learn from the behaviour and are
trained on each world. Each gain is judged across the seeds by a bootstrap over seeds and test
pages together (`significance.compare_ctr_seeds`). A finished run is kept: a rerun continues where
the last stopped. Writes <out_dir>/dose.md and dose.png.

  python scripts/repro_dose.py --data_root=data/dose --out_dir=runs/dose --seeds=0,1,2
"""
from __future__ import annotations

import json
import os
import sys
import time

import matplotlib
import numpy as np

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from trainer import console, experiments
from trainer.data import npz
from trainer.eval import read_metrics, significance
from trainer.synth import config as worlds
from trainer.synth import marketplace

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ctr = experiments.ctr_experiment
D = ctr("s1s2", debias=True)
# D's architecture without its loss (Eq. 4 with L_D's weight 0: the gate and the MLP on v^S2
# trained by the click loss alone), which separates what L_D gives from what the extra branch
# gives.
D_NO_LOSS = D.derive(f"{D.name}_noloss", "S1+S2+D without L_D", "S1+S2+D with L_D's weight 0",
                     (("ctr.debias.loss_weight", 0.0),))
# Each property: what it tests, and its comparisons (label, the better run, the other, metrics).
Comparison = tuple[str, experiments.Experiment, experiments.Experiment, tuple[str, ...]]
STUDIES: dict[str, tuple[str, list[Comparison]]] = {
    "style": ("learned image features", [
        ("S1 vectors vs no image features", ctr("s1"), ctr(None), ("AUC",))]),
    "popularity": ("D", [
        ("S1+S2+D vs S1+S2", D, ctr("s1s2"), ("AUC_bottom10", "AUC")),
        ("S1+S2+D vs the same without L_D", D, D_NO_LOSS, ("AUC_bottom10", "AUC"))]),
    "intention": ("COURIER", [
        ("COURIER vs S1 as Cluster-IDs", ctr("courier", "cluster_id"), ctr("s1", "cluster_id"),
         ("AUC",))]),
}
# The encoders each study trains on its world (S1 is the seed's, from the strength-1 world).
ENCODERS = {"style": (), "popularity": ("s1s2",), "intention": ("courier",)}


def world_dir(a, dose: str, strength: float) -> str:
    """A world's data dir: every property's strength-1 world is the one named world."""
    return os.path.join(a.data_root, "base" if strength == 1 else f"{dose}{strength:g}")


def ensure_world(a, dose: str, strength: float) -> str:
    d = world_dir(a, dose, strength)
    if not os.path.exists(os.path.join(d, marketplace.MANIFEST)):
        t0 = time.time()
        args = [sys.executable, "-m", "trainer.task", "--stage=synth", f"--world={a.world}",
                f"--data_dir={d}", f"--seed={a.world_seed}"]
        if strength != 1:
            args += [f"--set=dose={dose}", f"--set=strength={strength}"]
        experiments.run(args, os.path.join(a.out_dir, "worlds.log"))
        print(f"generated {d} ({time.time() - t0:.0f}s)", flush=True)
    return d


def run_seed(a, seed: int, out: str) -> dict:
    log = os.path.join(out, "log.txt")
    steps = {"pretrain": a.s1_steps, "finetune": a.s2_steps, "courier": a.courier_steps}
    base = ensure_world(a, "style", 1.0)
    s1 = os.path.join(out, "s1")
    seconds: dict = {}  # the runs' times, kept from earlier invocations for the runs they made
    previous = os.path.join(out, "results.json")
    if os.path.exists(previous):
        with open(previous) as f:
            seconds = json.load(f).get("seconds", {})

    def train(exp: experiments.Experiment, data_dir: str, model_dir: str, dirs: dict) -> None:
        if experiments.trained(model_dir):
            return
        t = experiments.run(experiments.command(exp, data_dir, model_dir, dirs, seed,
                                                flags=[f"--train_steps={steps[exp.stage]}"]),
                            log)
        seconds[os.path.relpath(model_dir, out)] = t
        print(f"  seed {seed}: trained {os.path.relpath(model_dir, out)} ({t:.0f}s)", flush=True)

    train(experiments.get("s1"), base, s1, {})
    results: dict = {}
    for dose, (_, comparisons) in STUDIES.items():
        pair = list({e.name: e for _, hi, lo, _ in comparisons for e in (hi, lo)}.values())
        for strength in a.strengths:
            data_dir = ensure_world(a, dose, strength)
            root = os.path.join(out, os.path.basename(data_dir))
            dirs = {"s1": s1}
            for name in ENCODERS[dose]:
                dirs[name] = os.path.join(root, name)
                train(experiments.get(name), data_dir, dirs[name], dirs)
            for exp in pair:
                model_dir = os.path.join(root, exp.name)
                if not read_metrics(model_dir):
                    t = experiments.run(experiments.command(
                        exp, data_dir, model_dir, dirs, seed,
                        flags=[f"--train_steps={a.ctr_steps}"]), log)
                    seconds[os.path.relpath(model_dir, out)] = t
                    print(f"  seed {seed}: {os.path.relpath(model_dir, out)} ({t:.0f}s)",
                          flush=True)
                results[os.path.relpath(model_dir, out)] = read_metrics(model_dir)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"ctr": results, "seconds": seconds}, f, indent=1)
    return results


def _prediction_path(a, seed: int, world: str, exp: experiments.Experiment) -> str:
    return os.path.join(a.out_dir, f"seed{seed}", world, exp.name, "predictions.npz")


def _predictions(a, seed: int, world: str, exp: experiments.Experiment) -> dict:
    return npz.read(_prediction_path(a, seed, world, exp))


def report(a, per_seed: dict) -> str:
    seeds = sorted(per_seed)
    lines = [f"The dose-response study on the `{a.world}` world (seed {a.world_seed}), training "
             f"seeds {', '.join(map(str, seeds))}; each gain is the mean over seeds of the "
             "difference between the pair's test-day metrics, with its 95% interval over the "
             "seeds and the test pages together, and the verdict on 'the first is better'.", ""]
    lines += ["The worlds, by what their logs show (`manifest.json`'s statistics; the same "
              "shares can be counted on any impression log):", "",
              "| dose | strength | click rate | impressions on the top 10% of items | items "
              "under 5 impressions |", "| --- | ---: | ---: | ---: | ---: |"]
    for dose in STUDIES:
        for strength in a.strengths:
            st = (marketplace.load_manifest(world_dir(a, dose, strength)) or {}).get("stats", {})
            lines.append(f"| {dose} | {strength:g} | {st.get('click_rate', float('nan')):.4f} | "
                         f"{st.get('share_impressions_30d_on_top10pct_items', float('nan')):.3f}"
                         f" | {st.get('share_items_under_5_impressions_30d', float('nan')):.3f} |")
    lines.append("")
    curves: dict = {}
    for dose, (what, comparisons) in STUDIES.items():
        lines += [f"**{dose}** ({worlds.DOSES[dose]}): {what}", "",
                  "| strength | comparison | metric | gain | 95% interval | seed sd | verdict |",
                  "| ---: | --- | --- | ---: | --- | ---: | --- |"]
        for strength in a.strengths:
            world = os.path.basename(world_dir(a, dose, strength))
            for label, hi, lo, metrics in comparisons:
                missing = [f"seed {s} {e.name}" for s in seeds for e in (hi, lo)
                           if not os.path.exists(_prediction_path(a, s, world, e))]
                if missing:
                    lines.append(f"| {strength:g} | {label} | | | not run yet: "
                                 f"{', '.join(missing)} | | |")
                    continue
                preds = {s: (_predictions(a, s, world, hi), _predictions(a, s, world, lo))
                         for s in seeds}
                for metric in metrics:
                    c = significance.compare_ctr_seeds(preds, metric)
                    d = c.difference
                    curves.setdefault((dose, label, metric), []).append((strength, d))
                    lines.append(f"| {strength:g} | {label} | {metric} | {d.value:+.4f} | "
                                 f"[{d.low:+.4f}, {d.high:+.4f}] | {c.seed_sd:.4f} | "
                                 f"{c.judged()} |")
        lines.append("")
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for ax, (dose, (what, comparisons)) in zip(axes, STUDIES.items(), strict=True):
        for label, _, _, metrics in comparisons:
            for metric in metrics:
                pts = curves.get((dose, label, metric), [])
                if not pts:
                    continue
                x = np.array([p[0] for p in pts])
                y = np.array([p[1].value for p in pts])
                err = np.array([[p[1].value - p[1].low for p in pts],
                                [p[1].high - p[1].value for p in pts]])
                ax.errorbar(x, y * 100, yerr=err * 100, marker="o", capsize=3,
                            color=next(colours), label=f"{label}: {metric}")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xlabel(f"strength of '{dose}'")
        ax.set_ylabel("gain (AUC points)")
        ax.set_title(what, fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Gain against the strength of each property (mean over {len(seeds)} seeds, "
                 "95% interval over seeds x test pages)", fontsize=9)
    fig.tight_layout()
    path = os.path.join(a.out_dir, "dose.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    times = [v for s in seeds for v in per_seed[s].get("seconds", {}).values()]
    if times:
        lines.append(f"Runs: {len(times)}, {sum(times) / 60:.1f} min of training and evaluation.")
    lines += ["", f"![dose-response]({os.path.basename(path)})"]
    return "\n".join(lines)


def main() -> None:
    p = console.CommandLine(description=__doc__.splitlines()[0])
    p.add_argument("--data_root", default="data/dose", help="Where the worlds are written.")
    p.add_argument("--out_dir", default="runs/dose")
    p.add_argument("--world", default="dose", help="The named world every strength scales.")
    p.add_argument("--world_seed", type=int, default=0)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--strengths", default="0,0.33,0.67,1")
    p.add_argument("--s1_steps", type=int, default=400)
    p.add_argument("--s2_steps", type=int, default=400)
    p.add_argument("--courier_steps", type=int, default=150)
    p.add_argument("--ctr_steps", type=int, default=235,
                   help="CTR steps (one epoch of the `dose` world at batch 512).")
    p.add_argument("--report_only", action="store_true")
    a = p.parse_args()
    a.strengths = [float(s) for s in a.strengths.split(",")]
    os.makedirs(a.out_dir, exist_ok=True)

    def seed_run(seed: int, out: str) -> None:
        results = run_seed(a, seed, out)
        print(f"  seed {seed}: {len(results)} CTR runs", flush=True)

    experiments.reproduce(a, seed_run, lambda per_seed: report(a, per_seed), "dose.md")


if __name__ == "__main__":
    main()

"""Two weeks of the daily cycle on a moving world (`make daily`; docs/daily.md): for each day d
from 1 to the second-to-last, three CTR models are trained with the data up to day d and scored on
day d + 1's records (tomorrow's traffic: what the model serves),

  (a) daily    yesterday's model trained on with day d's records (`--stage=daily`: grown
               vocabularies, the new items embedded, warm start by id, the gate on day d's
               held-out pages, the export);
  (b) scratch  a model trained from scratch on days 0..d (`--stage=ctr`, the same epochs over
               every day so far, so its training time grows with the days);
  (c) frozen   day 0's model as it was (its vocabularies and image table of day 0);

with AUC over all of day d + 1's samples and over those of the items added on day d (new to (c),
one day old to (a) and (b)), each with its 95% interval over pages, (a) - (b) and (a) - (c) by
the paired bootstrap, the new items' AUC pooled over all days, and the training seconds of (a)
and (b). Writes <report_dir>/index.md, daily.json and daily.png. Every run is a command line with
its log in <out_dir>/logs/; trained runs are kept, so an interrupted run resumes.

  python scripts/daily.py --data_dir=data/moving --out_dir=runs/daily --report_dir=report/daily
"""
from __future__ import annotations

import json
import math
import os
import sys

import matplotlib
import numpy as np

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from trainer import console, experiments
from trainer.ctr import task as ctr_task
from trainer.data import npz, pipeline
from trainer.eval import read_metrics, significance

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TASK = (sys.executable, "-m", "trainer.task")
BATCH = 512  # the CTR models' global batch (the stages' default)
VERDICT = {"holds": "above", "fails": "below", "within noise": "within noise"}


def main() -> None:
    p = console.CommandLine(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True, help="A moving world (synth --world=moving).")
    p.add_argument("--out_dir", default="runs/daily")
    p.add_argument("--report_dir", default="report/daily")
    p.add_argument("--epochs", type=float, default=2.0,
                   help="Passes over the training records: day 0's model over day 0, the daily "
                        "model over its day, the scratch model over every day so far.")
    p.add_argument("--pretrain_steps", type=int, default=300, help="S1 on day 0's catalog.")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    manifest = json.load(open(os.path.join(a.data_dir, "manifest.json")))
    days = sorted(manifest.get("days") or {})
    if len(days) < 2:
        sys.exit(f"{a.data_dir} is not a moving world (its manifest lists no days); generate "
                 "one with --stage=synth --world=moving")
    out, logs = a.out_dir, os.path.join(a.out_dir, "logs")
    seconds: dict = {}

    def run(name: str, args: list, done: str) -> None:
        """Runs a command unless `done` (a file it writes last) is there."""
        if os.path.exists(done):
            return
        seconds[name] = experiments.run([*TASK, *args] if args[0].startswith("--") else args,
                                        os.path.join(logs, f"{name}.txt"))
        print(f"  {name}: {seconds[name]:.0f}s", flush=True)

    def data(day: int) -> str:
        return os.path.join(a.data_dir, days[day])

    def steps(first: int, last: int) -> int:
        samples = sum(manifest["days"][days[d]]["files"]["ctr"]["train"]["records"]
                      for d in range(first, last + 1))
        return max(1, math.ceil(a.epochs * samples / BATCH))

    def budget(n: int) -> list:
        return [f"--train_steps={n}", f"--log_interval={max(n // 10, 1)}",
                f"--checkpoint_interval={max(n // 2, 1)}", f"--seed={a.seed}"]

    def pattern(last: int, kind: str, split: str = "") -> str:
        """Days 0..last's files of a record kind, as one comma-separated pattern."""
        glob = f"{split}-*" if split else "*"
        return ",".join(os.path.join(data(d), kind, glob) for d in range(last + 1))

    s1, export = os.path.join(out, "s1"), os.path.join(out, "encoder_export")
    serving = os.path.join(out, "serving")
    print(f"daily: {len(days)} days of {a.data_dir} into {out}", flush=True)
    run("s1", ["--stage=pretrain", f"--data_dir={data(0)}", f"--model_dir={s1}",
               f"--train_steps={a.pretrain_steps}",
               f"--log_interval={max(a.pretrain_steps // 10, 1)}",
               f"--seed={a.seed}"], os.path.join(s1, "metrics.json"))
    run("encoder_export", [sys.executable, "-m", "export.encoder", f"--model_dir={s1}",
                           f"--export_dir={export}"], os.path.join(export, "1"))

    def scratch(d: int, model_dir: str) -> None:
        """The CTR model trained from scratch on days 0..d, checked on day d's held-out pages."""
        run(os.path.basename(model_dir) if d == 0 else f"scratch_day{d:02d}", [
            "--stage=ctr", f"--data_dir={data(d)}", f"--model_dir={model_dir}",
            "--set=images.encoder=s1", f"--set=images.model_dir={s1}",
            f"--set=images.catalog_pattern={pattern(d, 'catalog')}",
            f"--set=images.queries_pattern={os.path.join(data(0), 'queries', '*')}",
            f"--set=ctr.train_pattern={pattern(d, 'ctr', 'train')}",
            f"--set=ctr.test_pattern={os.path.join(data(d), 'ctr', 'holdout-*')}",
            *budget(steps(0, d))], os.path.join(model_dir, "metrics.json"))

    day0 = os.path.join(out, "day0")
    scratch(0, day0)
    run("serving_v1", [sys.executable, "-m", "export.ctr", f"--model_dir={day0}",
                       f"--export_dir={serving}", "--version=1"], os.path.join(serving, "1"))
    models: dict = {"frozen": None}
    rows, pooled = [], []
    previous = day0
    for d in range(1, len(days) - 1):
        print(f"daily: day {d}", flush=True)
        daily = os.path.join(out, "daily", days[d])
        run(f"daily_day{d:02d}", [
            "--stage=daily", f"--data_dir={data(d)}", f"--model_dir={daily}",
            f"--previous={previous}", f"--encoder_export={export}", f"--export_dir={serving}",
            f"--day={d}", *budget(steps(d, d))], os.path.join(daily, "daily.json"))
        previous = daily  # trained on from yesterday's model, whether or not the gate served it
        scratch_dir = os.path.join(out, "scratch", days[d])
        scratch(d, scratch_dir)
        tomorrow = os.path.join(data(d + 1), "ctr", "*")
        predictions = {}
        for name, model_dir in (("daily", daily), ("scratch", scratch_dir), ("frozen", day0)):
            path = os.path.join(out, "scores", f"{name}_{days[d]}.npz")
            if not os.path.exists(path):
                if name != "frozen" or models["frozen"] is None:
                    models[name] = ctr_task.load_trained(model_dir)
                npz.write(path, **ctr_task.predict(models[name], tomorrow))
            predictions[name] = npz.read(path)
        new = np.isin(predictions["daily"]["item"], items_added(data(d)))
        rows.append(score_day(d, predictions, new, {"daily": daily, "scratch": scratch_dir},
                              a.seed))
        pooled.append((predictions, new))
        r = rows[-1]
        print(f"  AUC on day {d + 1}: daily {r['daily']['AUC']:.4f} scratch "
              f"{r['scratch']['AUC']:.4f} frozen {r['frozen']['AUC']:.4f}; train s daily "
              f"{r['daily']['train_seconds']:.1f} scratch {r['scratch']['train_seconds']:.1f}; "
              f"gate {r['gate']}", flush=True)
    new_pooled = score_pooled(pooled, a.seed)
    os.makedirs(a.report_dir, exist_ok=True)
    with open(os.path.join(a.report_dir, "daily.json"), "w") as f:
        json.dump({"rows": rows, "new_items_pooled": new_pooled, "epochs": a.epochs,
                   "seconds": seconds}, f, indent=1)
    plot(rows, os.path.join(a.report_dir, "daily.png"))
    text = report(rows, new_pooled, a)
    experiments.write_report(text, os.path.join(a.report_dir, "index.md"))
    print(text)


def score_day(d: int, predictions: dict, new: np.ndarray, model_dirs: dict, seed: int) -> dict:
    """Day d's row: each model's AUC on day d + 1 (all samples; the items added on day d) with
    its interval, the paired differences of the daily model from the others, the training
    seconds, the gate's decision."""
    first = predictions["daily"]
    row: dict = {"day": d, "samples": len(first["label"]), "new_item_samples": int(new.sum()),
                 "new_item_clicks": int(first["label"][new].sum()),
                 **judge(predictions, new, seed, f"day {d + 1}")}
    record = json.load(open(os.path.join(model_dirs["daily"], "daily.json")))
    row["new_items"] = record["new_items"]
    row["daily"]["train_seconds"] = record["holdout"]["train_seconds"]
    row["scratch"]["train_seconds"] = (read_metrics(model_dirs["scratch"]) or {})["train_seconds"]
    gate = record.get("gate") or {}
    row["gate"] = ("passed" if gate.get("passed") else "refused") if gate else "first"
    row["gate_difference"] = [gate.get("low"), gate.get("high")] if gate else None
    return row


def score_pooled(days: list, seed: int) -> dict:
    """The new items' AUC over every day's samples of them at once (pages of different days are
    different units): a day alone has too few of their clicks to tell the models apart."""
    names = days[0][0].keys()
    pooled = {n: {k: np.concatenate([p[n][k] for p, _ in days])
                  for k in ("label", "score", "item")} for n in names}
    group = np.concatenate([np.unique(p["daily"]["group"], return_inverse=True)[1] + i * 10**9
                            for i, (p, _) in enumerate(days)])
    for n in names:
        pooled[n]["group"] = group
    new = np.concatenate([m for _, m in days])
    out = judge(pooled, new, seed, "pooled", metrics=(("AUC_new", new),))
    return {"samples": int(new.sum()), "clicks": int(pooled["daily"]["label"][new].sum()), **out}


def judge(predictions: dict, new: np.ndarray, seed: int, what: str,
          metrics: tuple | None = None) -> dict:
    """Each model's AUC (and on the `new` samples) with its 95% interval over pages, and the
    daily model's paired difference from the others."""
    metrics = metrics or (("AUC", None), ("AUC_new", new))
    first = predictions["daily"]
    for name, pred in predictions.items():
        for k in ("label", "group", "item"):
            if not np.array_equal(pred[k], first[k]):
                raise ValueError(f"{what}: the {name} model's predictions are not of the same "
                                 f"samples ('{k}' differs)")
    _, unit_of = np.unique(first["group"], return_inverse=True)
    units = int(unit_of.max()) + 1
    out: dict = {}
    for name, pred in predictions.items():
        cell: dict = {}
        for metric, mask in metrics:
            iv = significance.bootstrap(significance.auc_metric(first["label"], unit_of, mask),
                                        pred["score"], units, seed=seed)
            cell[metric], cell[f"{metric}_interval"] = iv.value, [iv.low, iv.high]
        out[name] = cell
    for other in ("scratch", "frozen"):
        for metric, mask in metrics:
            c = significance.compare(significance.auc_metric(first["label"], unit_of, mask),
                                     first["score"], predictions[other]["score"], units,
                                     seed=seed)
            out[f"daily-{other}:{metric}"] = {
                "diff": c.difference.value, "low": c.difference.low,
                "high": c.difference.high, "verdict": VERDICT[c.verdict]}
    return out


def items_added(data_dir: str) -> np.ndarray:
    """The ids of the items a day added to the catalog (its `catalog` records)."""
    pattern = os.path.join(data_dir, "catalog", "*")
    return np.unique(pipeline.read_columns(pattern, "catalog", ("item_id",))["item_id"])


def plot(rows: list, path: str) -> None:
    days = [r["day"] for r in rows]
    fig, (ax, new_ax, t_ax) = plt.subplots(1, 3, figsize=(15, 4))
    for name, style in (("daily", "o-"), ("scratch", "s--"), ("frozen", "^:")):
        for axis, metric in ((ax, "AUC"), (new_ax, "AUC_new")):
            v = np.array([r[name][metric] for r in rows])
            lo = np.array([r[name][f"{metric}_interval"][0] for r in rows])
            hi = np.array([r[name][f"{metric}_interval"][1] for r in rows])
            axis.plot(days, v, style, label=name)
            axis.fill_between(days, lo, hi, alpha=0.15)
        if name != "frozen":
            t_ax.plot(days, [r[name]["train_seconds"] for r in rows], style, label=name)
    ax.set_title("AUC on the next day's records")
    new_ax.set_title("AUC on the items added on the day, next day")
    t_ax.set_title("training seconds")
    for axis in (ax, new_ax, t_ax):
        axis.set_xlabel("day trained on")
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(rows: list, pooled: dict, a) -> str:
    def cell(c: dict, metric: str) -> str:
        lo, hi = c[f"{metric}_interval"]
        if np.isnan(c[metric]):
            return "n/a"
        return f"{c[metric]:.4f} [{lo:.3f}, {hi:.3f}]"

    def diff(r: dict, key: str) -> str:
        c = r[key]
        if np.isnan(c["diff"]):
            return "n/a"
        return f"{c['diff']:+.4f} [{c['low']:+.3f}, {c['high']:+.3f}] {c['verdict']}"

    lines = [
        "# The daily cycle over two weeks", "",
        f"World `{a.data_dir}`, {a.epochs:g} epochs per training run, seed {a.seed} "
        "(`make daily`, `scripts/daily.py`). The models trained with the data up to day d are "
        "scored on day d + 1's records (every sample of the day: what the model would serve); "
        "intervals are 95% over pages (paired for the differences). (a) daily: yesterday's "
        "model trained on with day d's records; (b) scratch: trained from scratch on days "
        "0..d; (c) frozen: day 0's model. Training seconds are the training loop's (the "
        "cycle's vocabulary, embedding and export steps and the process start are not in "
        "them). The gate compares (a) with the serving version on day d's held-out pages.", "",
        "| day d | samples of d + 1 | AUC (a) daily | (b) scratch | (c) frozen | (a) - (b) | "
        "(a) - (c) | train s (a) | (b) | gate: (a) - serving |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["gate_difference"]
        gate = f"{r['gate']} [{g[0]:+.3f}, {g[1]:+.3f}]" if g else r["gate"]
        lines.append(
            f"| {r['day']} | {r['samples']} | {cell(r['daily'], 'AUC')} | "
            f"{cell(r['scratch'], 'AUC')} | {cell(r['frozen'], 'AUC')} | "
            f"{diff(r, 'daily-scratch:AUC')} | {diff(r, 'daily-frozen:AUC')} | "
            f"{r['daily']['train_seconds']:.1f} | {r['scratch']['train_seconds']:.1f} | "
            f"{gate} |")
    lines += ["", "AUC on the items added on day d, on day d + 1 (one day old to (a) and (b), "
              "unknown to (c)):", "",
              "| day d | items added (samples, clicks on d + 1) | (a) daily | (b) scratch | "
              "(c) frozen | (a) - (b) | (a) - (c) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['day']} | {r['new_items']} ({r['new_item_samples']}, "
                     f"{r['new_item_clicks']}) | {cell(r['daily'], 'AUC_new')} | "
                     f"{cell(r['scratch'], 'AUC_new')} | {cell(r['frozen'], 'AUC_new')} | "
                     f"{diff(r, 'daily-scratch:AUC_new')} | {diff(r, 'daily-frozen:AUC_new')} |")
    lines.append(f"| all | pooled ({pooled['samples']}, {pooled['clicks']}) | "
                 f"{cell(pooled['daily'], 'AUC_new')} | {cell(pooled['scratch'], 'AUC_new')} | "
                 f"{cell(pooled['frozen'], 'AUC_new')} | {diff(pooled, 'daily-scratch:AUC_new')} "
                 f"| {diff(pooled, 'daily-frozen:AUC_new')} |")
    last = rows[-1]
    ratio = last["daily"]["train_seconds"] / last["scratch"]["train_seconds"]
    verdicts = [r["daily-scratch:AUC"]["verdict"] for r in rows]
    lines += ["", "![AUC and training time per day](daily.png)", "",
              f"- (a) against (b), day by day: {', '.join(verdicts)}.",
              f"- Training time on the last day: (a) {last['daily']['train_seconds']:.1f} s, "
              f"(b) {last['scratch']['train_seconds']:.1f} s: a ratio of {ratio:.2f}.",
              f"- (a) - (c) on the last day: {diff(last, 'daily-frozen:AUC')}.",
              f"- The gate: {sum(r['gate'] == 'passed' for r in rows)} passed, "
              f"{sum(r['gate'] == 'refused' for r in rows)} refused."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

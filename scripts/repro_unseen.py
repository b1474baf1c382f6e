"""Reproduces paper 002's Fig. 4 (COURIER's gains in categories it was not pre-trained on) on a
synthetic world.

Paper 002 pre-trains COURIER on women's clothing only and plots the CTR model's AUC gain in
every category. Here, for each seed: a seeded random `--pretrain_share` of the categories are
the pre-training ones; the train page views whose items are all of those categories are written
to <out_dir>/seed<N>/subset (the others dropped), COURIER is trained on them from the S1 encoder
of `repro_visual.py` (trained if missing), and the CTR model, trained on every category's logs as
usual, is evaluated with its Cluster-ID features against the model without image features. The
test-day AUC of each category's impressions gives the gain per category; fig4.png plots them
sorted, held-out categories marked, and the paired bootstrap over test pages judges "positive
in the held-out categories" and "smaller than in the pre-training ones".

  python scripts/repro_unseen.py --data_dir=data/small --visual_dir=runs/visual \
      --out_dir=runs/unseen --seeds=0,1
"""
from __future__ import annotations

import json
import os

import matplotlib
import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from trainer import experiments
from trainer.data import npz, pipeline, records
from trainer.eval import ctr_metrics, read_metrics, significance

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODE = "cluster_id"


def write_subset(data_dir: str, categories: np.ndarray, out: str) -> tuple[str, int, int]:
    """The train page views whose page items are all of `categories`, written under `out` in
    the data dir layout; returns (their file pattern, pages kept, pages read)."""
    catalog = pipeline.read_columns(records.default_pattern(data_dir, "catalog"), "catalog",
                                    ("item_id", "category_id"))
    category = dict(zip(catalog["item_id"].tolist(), catalog["category_id"].tolist(),
                        strict=True))
    allowed = set(categories.tolist())
    pattern = records.default_pattern(data_dir, "pageviews", "train")
    keep = []
    for batch in pipeline.iter_columns(pattern, "pageviews", ("pv_item_ids", "pv_item_ids_mask")):
        for ids, mask in zip(batch["pv_item_ids"], batch["pv_item_ids_mask"], strict=True):
            keep.append(all(category.get(int(i)) in allowed for i in ids[mask]))
    files = pipeline.list_files(pattern)  # the order iter_columns read them in
    os.makedirs(os.path.join(out, "pageviews"), exist_ok=True)
    path = os.path.join(out, "pageviews", "train-00000-of-00001.tfrecord")
    n = 0
    with tf.io.TFRecordWriter(path) as w:
        for raw in tf.data.TFRecordDataset(files):
            if keep[n]:
                w.write(raw.numpy())
            n += 1
    if n != len(keep):
        raise RuntimeError(f"{pattern}: read {n} records, parsed {len(keep)}")
    return path, int(sum(keep)), n


def per_category(pred: dict, category: np.ndarray) -> dict:
    """{category: AUC of its test impressions}."""
    return {int(c): ctr_metrics.auc(pred["label"][category == c], pred["score"][category == c])
            for c in np.unique(category)}


def rows(pred: dict, mask: np.ndarray) -> dict:
    return {k: v[mask] for k, v in pred.items()}


def run_seed(a, seed: int, out: str) -> None:
    log = os.path.join(out, "log.txt")
    cats = np.unique(pipeline.read_columns(records.default_pattern(a.data_dir, "catalog"),
                                           "catalog", ("category_id",))["category_id"])
    k = max(1, min(len(cats) - 1, round(a.pretrain_share * len(cats))))
    pretrain = np.sort(np.random.default_rng([seed, 4]).permutation(cats)[:k])
    subset, kept, read = write_subset(a.data_dir, pretrain, os.path.join(out, "subset"))
    print(f"  seed {seed}: pre-training categories {pretrain.tolist()} of {len(cats)}: "
          f"{kept} of {read} page views", flush=True)
    s1 = experiments.ensure(experiments.get("s1"), a.data_dir,
                            os.path.join(a.visual_dir, f"seed{seed}", "s1"), {}, seed, log)
    dirs = {"s1": s1, "courier": os.path.join(out, "courier_subset")}
    experiments.ensure(experiments.get("courier").derive(
        "courier_subset", "COURIER (subset)", "COURIER on the pre-training categories' pages",
        (("courier.pageviews_pattern", subset),)), a.data_dir, dirs["courier"], dirs, seed, log)
    results = {"pretrain": pretrain.tolist(), "categories": cats.tolist(), "pages": [kept, read]}
    for name, exp in (("baseline", experiments.ctr_experiment(None)),
                      ("courier", experiments.ctr_experiment("courier", MODE))):
        model_dir = os.path.join(out, exp.name)
        if not read_metrics(model_dir):
            experiments.run(experiments.command(exp, a.data_dir, model_dir, dirs, seed,
                                                flags=[f"--train_steps={a.ctr_steps}"]), log)
        results[name] = os.path.join(model_dir, "predictions.npz")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


def report(a, per_seed: dict) -> str:
    seeds = sorted(per_seed)
    catalog = pipeline.read_columns(records.default_pattern(a.data_dir, "catalog"), "catalog",
                                    ("item_id", "category_id"))
    order = np.argsort(catalog["item_id"])
    gains: dict = {}  # category -> [delta AUC per seed]
    held_by_seed: dict = {}
    judged: dict = {"held-out": {}, "pre-training": {}}
    for s in seeds:
        r = per_seed[s]
        base, cour = npz.read(r["baseline"]), npz.read(r["courier"])
        pos = np.searchsorted(catalog["item_id"][order], base["item"])
        category = catalog["category_id"][order][pos]
        auc_b, auc_c = per_category(base, category), per_category(cour, category)
        for c in auc_b:
            gains.setdefault(c, []).append((auc_c[c] - auc_b[c]) * 100)
        seen = np.isin(category, r["pretrain"])
        held_by_seed[s] = set(np.unique(category[~seen]).tolist())
        for name, mask in (("held-out", ~seen), ("pre-training", seen)):
            judged[name][s] = significance.compare_ctr(rows(cour, mask), rows(base, mask), "AUC")
    cats = sorted(gains, key=lambda c: -np.mean(gains[c]))
    held_everywhere = set.intersection(*held_by_seed.values())
    held_somewhere = set.union(*held_by_seed.values())
    subsets = "; ".join(f"seed {s}: {per_seed[s]['pretrain']}" for s in seeds)
    lines = [f"COURIER pre-trained on a random {a.pretrain_share:.0%} of the categories' page "
             f"views (per seed: {subsets}), its {MODE} features in the CTR model trained on "
             "every category; the test-day AUC gain over the model without image features per "
             f"category (percentage points, mean over seeds {', '.join(map(str, seeds))}), "
             "sorted as paper 002's Fig. 4.", "",
             "| category | ΔAUC | held out on seeds |", "| ---: | ---: | --- |"]
    for c in cats:
        held = [str(s) for s in seeds if c in held_by_seed[s]]
        lines.append(f"| {c} | {np.mean(gains[c]):+.2f} | {', '.join(held) or '-'} |")
    lines += ["", "Over the impressions of each group (paired bootstrap over test pages, "
              "difference and its 95% interval per seed):"]
    lines.append("- COURIER's gain is positive in the held-out categories: "
                 + significance.judged_over_seeds(judged["held-out"]))
    lines.append("- ... and in the pre-training categories: "
                 + significance.judged_over_seeds(judged["pre-training"]))
    diffs = {s: (judged["pre-training"][s].difference.value,
                 judged["held-out"][s].difference.value) for s in seeds}
    lines.append("- smaller in the held-out than in the pre-training categories (point "
                 "estimates per seed, pre-training vs held-out): " + "; ".join(
                     f"seed {s}: {p * 100:+.2f} vs {h * 100:+.2f}"
                     f" ({'holds' if h < p else 'fails'})" for s, (p, h) in diffs.items()))
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(cats)), 3))
    colours = ["#d62728" if c in held_everywhere else "#ff9896" if c in held_somewhere
               else "#1f77b4" for c in cats]
    ax.bar(range(len(cats)), [np.mean(gains[c]) for c in cats], color=colours)
    ax.set_xticks(range(len(cats)), [str(c) for c in cats], rotation=60, fontsize=7)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("ΔAUC (pp)")
    ax.set_title("COURIER's gain per category (red: held out)", fontsize=9)
    fig.tight_layout()
    path = os.path.join(a.out_dir, "fig4.png")
    fig.savefig(path, dpi=120)
    lines += ["", f"![Fig. 4]({os.path.basename(path)})"]
    return "\n".join(lines)


def main() -> None:
    p = experiments.repro_flags(__doc__, "runs/unseen")
    p.add_argument("--pretrain_share", type=float, default=0.5,
                   help="Share of the categories COURIER is pre-trained on.")
    a = p.parse_args()
    experiments.reproduce(a, lambda seed, out: run_seed(a, seed, out),
                          lambda per_seed: report(a, per_seed), "fig4.md")


if __name__ == "__main__":
    main()

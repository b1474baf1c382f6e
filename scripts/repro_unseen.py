"""Reproduces paper 002's Fig. 4 (COURIER's gains in categories it was not pre-trained on) on a
synthetic world.

Paper 002 pre-trains COURIER on women's clothing only and plots the CTR model's AUC gain in
every category. Here a random `--pretrain_share` of the categories (drawn once from
`--category_seed`, the same for every training seed, so every seed is judged on the same test
pages) are the pre-training ones, and the held-out categories are absent from pre-training
entirely: the catalog images S1 is trained on, and the train page views COURIER is trained on
(every page item and every item of the click history of a kept page view is of a pre-training
category), are written to <out_dir>/subset. For each seed: S1 on that catalog, COURIER on those
page views from that S1, and the CTR model (trained on every category's logs as usual) with each
one's Cluster-ID features and without image features. The test-day AUC of each category's
impressions gives the gain per category; fig4.png plots COURIER's and S1's, sorted by COURIER's,
held-out categories marked; a bootstrap over the training seeds and the test pages judges
"COURIER's gain is positive in the held-out categories" and "above S1's there".

  python scripts/repro_unseen.py --data_dir=data/small --out_dir=runs/unseen --seeds=0,1,2
"""
from __future__ import annotations

import json
import os

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS and quiet logs before TensorFlow loads)

# isort: split
import matplotlib
import numpy as np
import tensorflow as tf

from trainer import experiments
from trainer.data import npz, pipeline, records
from trainer.eval import ctr_metrics, read_metrics, significance

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODE = "cluster_id"


def write_subset(data_dir: str, categories: np.ndarray, out: str) -> dict:
    """The catalog records and the train page views of `categories` only (a page view is kept
    when every page item and every clicked item of its history is of them), written under `out`
    in the data dir layout; returns {'catalog': pattern, 'pageviews': pattern, counts}. Kept
    from an earlier run of the same categories."""
    done = os.path.join(out, "subset.json")
    if os.path.exists(done):
        with open(done) as f:
            info = json.load(f)
        if info["categories"] == categories.tolist():
            return info
    catalog_pattern = records.default_pattern(data_dir, "catalog")
    catalog = pipeline.read_columns(catalog_pattern, "catalog", ("item_id", "category_id"))
    allowed = set(categories.tolist())
    keep_item = [c in allowed for c in catalog["category_id"].tolist()]
    category = dict(zip(catalog["item_id"].tolist(), catalog["category_id"].tolist(),
                        strict=True))
    pattern = records.default_pattern(data_dir, "pageviews", "train")
    keep_page = []
    for batch in pipeline.iter_columns(pattern, "pageviews", (
            "pv_item_ids", "pv_item_ids_mask", "click_item_ids", "click_item_ids_mask")):
        for ids, mask, clicks, cmask in zip(batch["pv_item_ids"], batch["pv_item_ids_mask"],
                                            batch["click_item_ids"],
                                            batch["click_item_ids_mask"], strict=True):
            keep_page.append(all(category.get(int(i)) in allowed
                                 for i in (*ids[mask], *clicks[cmask])))
    info = {"categories": categories.tolist()}
    for kind, source, keep in (("catalog", catalog_pattern, keep_item),
                               ("pageviews", pattern, keep_page)):
        files = pipeline.list_files(source)  # the order iter_columns read them in
        os.makedirs(os.path.join(out, kind), exist_ok=True)
        path = os.path.join(out, kind, "train-00000-of-00001.tfrecord")
        n = 0
        with tf.io.TFRecordWriter(path) as w:
            for raw in tf.data.TFRecordDataset(files):
                if keep[n]:
                    w.write(raw.numpy())
                n += 1
        if n != len(keep):
            raise RuntimeError(f"{source}: read {n} records, parsed {len(keep)}")
        info[kind] = path
        info[f"{kind}_kept"], info[f"{kind}_read"] = int(sum(keep)), n
    with open(done, "w") as f:
        json.dump(info, f)
    return info


def pretrain_categories(data_dir: str, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(every category, the pre-training ones): a random `share` of them drawn from `seed`."""
    cats = np.unique(pipeline.read_columns(records.default_pattern(data_dir, "catalog"),
                                           "catalog", ("category_id",))["category_id"])
    k = max(1, min(len(cats) - 1, round(share * len(cats))))
    return cats, np.sort(np.random.default_rng([seed, 4]).permutation(cats)[:k])


def per_category(pred: dict, category: np.ndarray) -> dict:
    """{category: AUC of its test impressions}."""
    return {int(c): ctr_metrics.auc(pred["label"][category == c], pred["score"][category == c])
            for c in np.unique(category)}


def rows(pred: dict, mask: np.ndarray) -> dict:
    return {k: v[mask] for k, v in pred.items()}


def run_seed(a, seed: int, out: str) -> None:
    log = os.path.join(out, "log.txt")
    cats, pretrain = pretrain_categories(a.data_dir, a.pretrain_share, a.category_seed)
    subset = write_subset(a.data_dir, pretrain, os.path.join(a.out_dir, "subset"))
    print(f"  seed {seed}: pre-training categories {pretrain.tolist()} of {len(cats)}: "
          f"{subset['catalog_kept']} of {subset['catalog_read']} catalog images, "
          f"{subset['pageviews_kept']} of {subset['pageviews_read']} page views", flush=True)
    dirs = {"s1": os.path.join(out, "s1_subset"), "courier": os.path.join(out, "courier_subset")}
    s1 = experiments.get("s1").derive("s1_subset", "S1 (subset)", "S1 on the pre-training "
                                      "categories' catalog images",
                                      (("pretrain.catalog_pattern", subset["catalog"]),))
    experiments.ensure(s1, a.data_dir, dirs["s1"], dirs, seed, log)
    courier = experiments.get("courier").derive(
        "courier_subset", "COURIER (subset)", "COURIER on the pre-training categories' pages",
        (("courier.pageviews_pattern", subset["pageviews"]),))
    experiments.ensure(courier, a.data_dir, dirs["courier"], dirs, seed, log)
    results = {"pretrain": pretrain.tolist(), "categories": cats.tolist(),
               "pages": [subset["pageviews_kept"], subset["pageviews_read"]],
               "images": [subset["catalog_kept"], subset["catalog_read"]]}
    for name, exp in (("baseline", experiments.ctr_experiment(None)),
                      ("courier", experiments.ctr_experiment("courier", MODE)),
                      ("s1", experiments.ctr_experiment("s1", MODE))):
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
    pretrain = per_seed[seeds[0]]["pretrain"]
    if any(per_seed[s]["pretrain"] != pretrain for s in seeds):
        raise ValueError("the seeds were pre-trained on different categories; rerun them with "
                         "one --category_seed")
    preds = {s: {k: npz.read(per_seed[s][k]) for k in ("baseline", "courier", "s1")}
             for s in seeds}
    first = preds[seeds[0]]["baseline"]
    pos = np.searchsorted(catalog["item_id"][order], first["item"])
    category = catalog["category_id"][order][pos]
    seen = np.isin(category, pretrain)
    gains: dict = {"courier": {}, "s1": {}}  # encoder -> category -> [delta AUC per seed]
    for s in seeds:
        auc_b = per_category(preds[s]["baseline"], category)
        for enc in gains:
            auc = per_category(preds[s][enc], category)
            for c in auc_b:
                gains[enc].setdefault(c, []).append((auc[c] - auc_b[c]) * 100)
    cats = sorted(gains["courier"], key=lambda c: -np.mean(gains["courier"][c]))
    r0 = per_seed[seeds[0]]
    lines = [f"COURIER and S1 pre-trained on {len(pretrain)} of {len(r0['categories'])} "
             f"categories ({pretrain}; {r0['images'][0]} of {r0['images'][1]} catalog images, "
             f"{r0['pages'][0]} of {r0['pages'][1]} train page views: the held-out categories "
             "appear in neither), their Cluster-ID features in the CTR model trained on every "
             "category; the test-day AUC gain over the model without image features per category "
             f"(percentage points, mean over seeds {', '.join(map(str, seeds))}), sorted by "
             "COURIER's as paper 002's Fig. 4.", "",
             "| category | held out | COURIER ΔAUC | S1 ΔAUC |", "| ---: | --- | ---: | ---: |"]
    for c in cats:
        lines.append(f"| {c} | {'yes' if c not in pretrain else ''} | "
                     f"{experiments.spread(gains['courier'][c], '+.2f')} | "
                     f"{experiments.spread(gains['s1'][c], '+.2f')} |")
    lines += ["", "Over the impressions of each group, judged by a bootstrap over the training "
              "seeds and the test pages together:"]
    for group, mask in (("held-out", ~seen), ("pre-training", seen)):
        pick = {s: {k: rows(v, mask) for k, v in preds[s].items()} for s in seeds}
        for hi, lo, text in (("courier", "baseline", "COURIER's gain is positive"),
                             ("s1", "baseline", "S1's gain is positive"),
                             ("courier", "s1", "COURIER's features beat S1's")):
            judged = significance.compare_ctr_seeds({s: (pick[s][hi], pick[s][lo])
                                                     for s in seeds}, "AUC")
            lines.append(f"- {text} in the {group} categories: {judged.describe('AUC')}")
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(cats)), 3.2))
    x = np.arange(len(cats))
    for offset, enc, colour in ((-0.2, "courier", "#d62728"), (0.2, "s1", "#1f77b4")):
        means = [np.mean(gains[enc][c]) for c in cats]
        errs = [(max(gains[enc][c]) - min(gains[enc][c])) / 2 for c in cats]
        ax.bar(x + offset, means, width=0.4, yerr=errs, color=colour, alpha=0.85,
               label={"courier": "COURIER", "s1": "S1"}[enc], capsize=2)
    for i, c in enumerate(cats):
        if c not in pretrain:
            ax.axvspan(i - 0.5, i + 0.5, color="#dddddd", zorder=0)
    ax.set_xticks(x, [str(c) for c in cats], rotation=60, fontsize=7)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("ΔAUC (pp), ± half-range over seeds")
    ax.set_title("Gain per category (grey: held out of pre-training)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(a.out_dir, "fig4.png")
    fig.savefig(path, dpi=120)
    lines += ["", f"![Fig. 4]({os.path.basename(path)})"]
    return "\n".join(lines)


def main() -> None:
    p = experiments.repro_flags(__doc__, "runs/unseen", visual_dir=False)
    p.add_argument("--pretrain_share", type=float, default=0.5,
                   help="Share of the categories S1 and COURIER are pre-trained on.")
    p.add_argument("--category_seed", type=int, default=0,
                   help="Seed of the draw of the pre-training categories (one for every "
                        "training seed).")
    a = p.parse_args()
    experiments.reproduce(a, lambda seed, out: run_seed(a, seed, out),
                          lambda per_seed: report(a, per_seed), "fig4.md")


if __name__ == "__main__":
    main()

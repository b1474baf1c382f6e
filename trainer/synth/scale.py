"""The `scale` synthetic world: catalogs and logs of a size no laptop-sized world reaches (10^6
items and users, 10^7 CTR samples), streamed to disk in bounded memory, for memory and throughput
measurements (`scripts/bench_memory.py`), not for accuracy.

It has no images. Written:
  embeddings.npz   the catalog's and query photos' image vectors as an encoder's embedding table
                   (`trainer.features.embeddings.EmbeddingTable`): unit vectors around the
                   centres of a power-law mixture (`trainer.synth.vectors`), one centre per style,
                   20 styles per category; power-law 30-day impressions
  ctr/<split>-*    `ctr` records of the `synthetic` feature spec, written a chunk at a time: the
                   user's click history holds items of the user's preferred styles, the displayed
                   item is of them with probability 1/2, and the click probability rises with that
                   match and falls with the position (so a model has something to learn)
  scale.json       sizes, seconds and the generator's peak memory

Memory is the catalog's columns and vectors plus one chunk of samples, whatever `samples` is.

  python -m trainer.synth.scale --out=data/scale --items=1000000 --users=1000000 \\
      --samples=10000000
"""
from __future__ import annotations

import json
import os
import resource
import time

import numpy as np
import tensorflow as tf

from trainer import console
from trainer.features import embeddings as embeddings_lib
from trainer.synth import vectors

CHUNK = 100_000
HISTORY = 20
STYLES_PER_CATEGORY = 20


def _int(values) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def generate(out: str, items: int, users: int, samples: int, test_samples: int = 0,
             queries: int = 0, categories: int = 0, dim: int = 64, shards: int = 0,
             seed: int = 0) -> dict:
    """Writes the world into `out`; returns its manifest."""
    t0 = time.time()
    rng = np.random.default_rng(seed)
    categories = categories or max(4, items // 5000)
    queries = queries or max(1, items // 10)
    test_samples = test_samples or max(1, samples // 10)
    item_vector, style = vectors.clustered(items, categories * STYLES_PER_CATEGORY, dim, 0.3,
                                           seed)
    category = style % categories
    impressions = np.minimum(rng.zipf(1.3, items) - 1, 10 ** 7).astype(np.int64)
    query_style = rng.integers(0, categories * STYLES_PER_CATEGORY, queries)
    # A query photo: the centre of its style's items, approximately (one of them, jittered).
    by_style = np.argsort(style, kind="stable")
    starts = np.searchsorted(style[by_style], np.arange(categories * STYLES_PER_CATEGORY + 1))
    counts = np.diff(starts)

    def item_of(styles: np.ndarray) -> np.ndarray:
        """A random item (row) of each style (any item for a style without one)."""
        n = counts[styles]
        pick = starts[styles] + (rng.random(len(styles)) * np.maximum(n, 1)).astype(np.int64)
        return np.where(n > 0, by_style[np.minimum(pick, items - 1)],
                        rng.integers(0, items, len(styles)))

    query_vector = item_vector[item_of(query_style)] + 0.05 * rng.normal(
        size=[queries, dim]).astype(np.float32)
    query_vector /= np.linalg.norm(query_vector, axis=1, keepdims=True)
    os.makedirs(out, exist_ok=True)
    embeddings_lib.save(embeddings_lib.EmbeddingTable(
        np.arange(1, items + 1, dtype=np.int64), category, impressions, item_vector,
        np.arange(1, queries + 1, dtype=np.int64), query_vector.astype(np.float32),
        f"scale world, seed {seed}"), os.path.join(out, embeddings_lib.FILE))
    user_style = rng.integers(0, categories * STYLES_PER_CATEGORY, users)
    shop = rng.integers(1, max(2, items // 50), items)
    brand = rng.integers(1, max(2, items // 200), items)
    price = rng.lognormal(3.0, 1.0, items).astype(np.float32)
    files = {}
    for split, n in (("train", samples), ("test", test_samples)):
        n_files = shards or max(1, n // 1_000_000)
        os.makedirs(os.path.join(out, "ctr"), exist_ok=True)
        paths = [os.path.join(out, "ctr", f"{split}-{i:05d}-of-{n_files:05d}.tfrecord")
                 for i in range(n_files)]
        writers = [tf.io.TFRecordWriter(p) for p in paths]
        page = 0 if split == "train" else samples
        for lo in range(0, n, CHUNK):
            m = min(CHUNK, n - lo)
            user = rng.integers(0, users, m)
            liked = user_style[user]
            match = rng.random(m) < 0.5
            shown = np.where(match, item_of(liked),
                             rng.integers(0, items, m))
            history = item_of(np.repeat(liked, HISTORY)).reshape(m, HISTORY)
            history_len = rng.integers(0, HISTORY + 1, m)
            position = rng.integers(0, 10, m)
            logit = -3.0 + 1.5 * (style[shown] == liked) - 0.1 * position
            label = (rng.random(m) < 1 / (1 + np.exp(-logit))).astype(np.int64)
            query = rng.integers(1, queries + 1, m)
            for i in range(m):
                item = int(shown[i])
                feature = {
                    "label": _int([label[i]]), "page_id": _int([page + (lo + i) // 10]),
                    "item_id": _int([item + 1]), "shop_id": _int([shop[item]]),
                    "brand_id": _int([brand[item]]), "category_id": _int([category[item]]),
                    "user_id": _int([user[i] + 1]), "age_bucket": _int([user[i] % 7]),
                    "gender": _int([user[i] % 3]), "device": _int([(lo + i) % 4]),
                    "position": _int([position[i]]),
                    "price": tf.train.Feature(float_list=tf.train.FloatList(
                        value=[price[item]])),
                    "preferred_category_ids": _int([liked[i] % categories]),
                    "query_id": _int([query[i]]),
                    "click_history_item_ids": _int(history[i, :history_len[i]] + 1)}
                writers[(lo + i) % n_files].write(tf.train.Example(
                    features=tf.train.Features(feature=feature)).SerializeToString())
            print(f"scale: {split} {lo + m:,}/{n:,} samples ({time.time() - t0:.0f}s)",
                  flush=True)
        for w in writers:
            w.close()
        files[split] = paths
    manifest = {"items": items, "users": users, "queries": queries, "categories": categories,
                "dim": dim, "samples": {"train": samples, "test": test_samples},
                "seconds": round(time.time() - t0, 1),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "files": files, "seed": seed}
    with open(os.path.join(out, "scale.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def main() -> None:
    p = console.CommandLine(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--samples", type=int, default=10_000_000)
    p.add_argument("--test_samples", type=int, default=0, help="0: a tenth of --samples.")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    m = generate(args.out, args.items, args.users, args.samples, args.test_samples,
                 dim=args.dim, seed=args.seed)
    print(json.dumps({k: v for k, v in m.items() if k != "files"}))


if __name__ == "__main__":
    main()

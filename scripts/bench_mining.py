"""D's positive mining at catalog scale: exact search against faiss IVF per category, one run.

A catalog of `--items` items in `--categories` categories, with S1-like image vectors (unit
vectors around the centres of a power-law mixture, `trainer.synth.vectors`: items of one category
share styles) and power-law 30-day impressions, so that about a third of each category are
low-impression candidates. P~ (K = 15) is mined for every item with exact inner-product search
and with IVF at each `--nprobe`; prints the seconds of each and the recall@15 of IVF against the
exact neighbours over all items, and the estimate `debias.mine` prints from a sample of anchors.

  python scripts/bench_mining.py --items 1000000 --categories 32
"""
from __future__ import annotations

import time

import faiss
import numpy as np

from trainer import configs, console
from trainer.ctr import debias
from trainer.synth import vectors


def main() -> None:
    p = console.CommandLine(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--categories", type=int, default=32)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16])
    args = p.parse_args()
    rng = np.random.default_rng(0)
    x, style = vectors.clustered(args.items, 20 * args.categories, args.dim, 0.3)
    category = style % args.categories  # 20 styles per category
    impressions = np.minimum(rng.zipf(1.3, args.items) - 1, 10 ** 6)
    low = int((impressions < 5).sum())
    print(f"{args.items:,} items, {args.categories} categories, dimension {args.dim}, "
          f"{low:,} low-impression candidates; faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads")
    t0 = time.time()
    exact, _ = debias.mine_positives(x, category, impressions < 5)
    exact_s = time.time() - t0
    print(f"| search | nprobe | s | x exact | recall@15 (all items) | recall@15 (2,000 sampled, "
          f"as printed by the stage) |\n| --- | ---: | ---: | ---: | ---: | ---: |\n"
          f"| exact (flat) | | {exact_s:.1f} | 1.00 | 1 | |")
    for nprobe in args.nprobe:
        cfg = configs.DebiasConfig(index="ivf", nprobe=nprobe)
        (rows, _), report = debias.mine(x, category, impressions < 5, cfg)
        print(f"| IVF | {nprobe} | {report['seconds']:.1f} | {report['seconds'] / exact_s:.2f} | "
              f"{debias.recall(rows, exact):.3f} | {report['recall']:.3f} |", flush=True)


if __name__ == "__main__":
    main()

"""Peak memory and time of the streaming paired bootstrap (`significance.stream_compare_ctr`)
against the number of predictions, one run.

For each size N, two models' predictions of the same N rows, in pages of 10, are written in the
evaluate job's layout (`predictions/` and `pages/` as Parquet shards of 10^6 rows; labels with a
5% click rate, model a's scores a little better than b's), a shard at a time. Then, in a child
process per size, the paired bootstrap of AUC and of GAUC (1,000 draws) streams them; the child
reports its peak resident memory (VmHWM: its own, not the launcher's, as `ru_maxrss` would be
after the fork) and seconds. The goal: the peak does not grow with N
(bounded by the draws' histograms and one chunk of rows).

  python scripts/bench_bootstrap.py --sizes 1000000 10000000
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from trainer import console

PAGE, SHARD = 10, 1_000_000


def write(root: str, rows: int, seed: int = 0) -> None:
    """Models 'a' and 'b' under `root`, each predictions/ and pages/ as the job writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from scipy import stats

    rng = np.random.default_rng(seed)
    for model in ("a", "b"):
        for sub in ("predictions", "pages"):
            os.makedirs(os.path.join(root, model, sub))
    for shard, start in enumerate(range(0, rows, SHARD)):
        n = min(SHARD, rows - start)
        group = (start + np.arange(n)) // PAGE
        label = (rng.random(n) < 0.05).astype(np.int64)
        signal = rng.normal(size=n) + 0.8 * label
        item = rng.integers(0, max(rows // 10, 1), n)
        for model, noise in (("a", 1.0), ("b", 1.3)):
            score = 1 / (1 + np.exp(-(signal + noise * rng.normal(size=n) - 3)))
            score = score.astype(np.float32)
            pq.write_table(pa.table({
                "name": pa.array([f"day:{start + i}" for i in range(n)]), "label": label,
                "score": score, "group": group, "item": item,
                "impressions_30d": item % 1000, "bottom10": item % 1000 < 5,
                "top10": item % 1000 > 990}),
                os.path.join(root, model, "predictions", f"predictions-{shard:05d}.parquet"))
            # Per page: samples, clicks, AUC (NaN with one class), pages of PAGE rows.
            s, y = score.reshape(-1, PAGE), label.reshape(-1, PAGE)
            ranks = stats.rankdata(s, axis=1)
            pos = y.sum(1)
            neg = PAGE - pos
            with np.errstate(invalid="ignore", divide="ignore"):
                auc = ((ranks * y).sum(1) - pos * (pos + 1) / 2) / (pos * neg)
            auc[(pos == 0) | (neg == 0)] = np.nan
            pq.write_table(pa.table({"group": group[::PAGE], "samples": np.full(len(pos), PAGE),
                                     "clicks": pos, "auc": auc}),
                           os.path.join(root, model, "pages", f"pages-{shard:05d}.parquet"))


def child(root: str) -> None:
    from trainer.eval import significance

    for metric in ("AUC", "GAUC"):
        t0 = time.time()
        c = significance.stream_compare_ctr(os.path.join(root, "a"), os.path.join(root, "b"),
                                            metric)
        print(f"RESULT {metric} {time.time() - t0:.1f} {c.difference}", flush=True)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print("PEAK_MB", peak / 1024, flush=True)


def main() -> None:
    p = console.CommandLine(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--child", default="")
    args = p.parse_args()
    if args.child:
        child(args.child)
        return
    print("streaming paired bootstrap, 1,000 draws, pages of 10; peak resident memory of the "
          "process that draws, MB")
    print("| predictions | write s | AUC s | AUC difference [95%] | GAUC s | GAUC difference "
          "[95%] | peak MB |\n| ---: | ---: | ---: | --- | ---: | --- | ---: |")
    peaks = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as root:
            t0 = time.time()
            write(root, size)
            written = time.time() - t0
            out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={root}"],
                                 capture_output=True, text=True, env={
                                     **os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
            if out.returncode:
                raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
            results = {line.split()[1]: line.split(maxsplit=3)[2:]
                       for line in out.stdout.splitlines() if line.startswith("RESULT")}
            peak = float(out.stdout.rsplit("PEAK_MB ", 1)[1].split()[0])
            peaks.append(peak)
            print(f"| {size:,} | {written:.0f} | {results['AUC'][0]} | {results['AUC'][1]} | "
                  f"{results['GAUC'][0]} | {results['GAUC'][1]} | {peak:.0f} |", flush=True)
    print(f"peak {args.sizes[0]:,} -> {args.sizes[-1]:,} predictions: "
          f"{peaks[-1] / peaks[0]:.2f}x")


if __name__ == "__main__":
    main()

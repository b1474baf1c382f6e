"""Cluster-ID k-means at scale: the project's fit (`trainer.features.clusters.fit`) beside raw
`faiss.Kmeans`, one run.

Both get the same k, Lloyd iterations (25) and training sample (at most 256 points per centroid,
faiss's default), and both use this machine's cores through faiss. Raw faiss seeds with k random
points; the project's fit (the default `ClusterConfig`) draws about 5k candidates in 5 rounds of
k-means|| (each one faiss search of the sample against the round's candidates) and picks k seeds
among them by greedy k-means++, weighted by the points nearest to each. Two configurations seed
by k-means++ over the whole sample instead (`seeding_rounds=0`): one draw per centre (the
previous default), and greedy draws with 3 restarts (`seeding_trials=0, restarts=3`, the
configuration before that: the quality to keep). They make k sequential passes over the sample,
hours at 1 million points, so they run up to `--sequential_up_to` points only.

The vectors are unit vectors from a mixture of 2k Gaussians whose component sizes follow a power
law (`trainer.synth.vectors`): `--spread` is the noise around a component's centre (0.1:
tight clusters, where seeding matters; 0.6: diffuse ones). Dimension 64 keeps the run short; every
cost here is linear in the dimension.

Prints seconds and the objective (sum of squared distances to the nearest centroid over all
points) per method and size, the ratio to raw faiss, the time of assigning every point with a
faiss index (batched), and a projection to paper 002's 6e7 images into 1e5 clusters from the
measured scaling (Lloyd and seeding are linear in sample size x k, assignment in N x k).

  python scripts/bench_kmeans.py                  # 200k x 1,000 and 1M x 10,000
  python scripts/bench_kmeans.py --sizes 200000:1000 --repeats 3   # medians of 3, in turn
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable

import faiss
import numpy as np

from trainer import configs, console
from trainer.features import clusters
from trainer.synth import vectors

ITERATIONS, POINTS_PER_CENTROID = 25, 256
DEFAULT = "fit, k-means|| + greedy k-means++"


def objective(x: np.ndarray, centroids: np.ndarray) -> float:
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    return float(index.search(x, 1)[0].sum(dtype=np.float64))


def main() -> None:
    p = console.CommandLine(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["200000:1000", "1000000:10000"],
                   help="N:k pairs")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--spread", type=float, default=0.1)
    p.add_argument("--sequential_up_to", type=int, default=200000,
                   help="Run the configurations that seed over the whole sample up to this "
                   "many points.")
    p.add_argument("--repeats", type=int, default=1,
                   help="Time every method this many times, in turn, and print the median "
                   "(this machine's timings vary by up to 2x from one minute to the next).")
    args = p.parse_args()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; dimension "
          f"{args.dim}, spread {args.spread}, {ITERATIONS} iterations, at most "
          f"{POINTS_PER_CENTROID} points per centroid")
    print(f"{'N':>9} {'k':>6}  {'method':<38} {'s':>8} {'x raw':>6} {'objective':>12} "
          f"{'vs raw':>7}")
    measured = {}
    for size in args.sizes:
        n, k = (int(v) for v in size.split(":"))
        x, _ = vectors.clustered(n, 2 * k, args.dim, args.spread)

        def raw(x=x, k=k) -> clusters.Clusters:
            km = faiss.Kmeans(args.dim, k, niter=ITERATIONS, seed=0,
                              max_points_per_centroid=POINTS_PER_CENTROID)
            km.train(x)
            return clusters.Clusters(np.asarray(km.centroids))

        runs: dict[str, Callable[[], clusters.Clusters]] = {
            "raw faiss.Kmeans (random seeding)": raw,
            DEFAULT: functools.partial(clusters.fit, x, configs.ClusterConfig(num_clusters=k))}
        if n <= args.sequential_up_to:
            runs["fit, k-means++ over the sample"] = functools.partial(
                clusters.fit, x, configs.ClusterConfig(num_clusters=k, seeding_rounds=0,
                                                       seeding_trials=1))
            runs["fit, greedy k-means++ x 3 restarts"] = functools.partial(
                clusters.fit, x, configs.ClusterConfig(num_clusters=k, seeding_rounds=0,
                                                       seeding_trials=0, restarts=3))
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        objectives = {}
        fitted = {}
        for _ in range(args.repeats):  # methods in turn, so that a slow spell hits them all
            for name, run in runs.items():
                t0 = time.time()
                fitted[name] = run()
                seconds[name].append(time.time() - t0)
                objectives[name] = objective(x, fitted[name].centroids)
        t0 = time.time()
        fitted[DEFAULT].assign(x)
        measured[(n, k)] = (float(np.median(seconds[DEFAULT])), time.time() - t0)
        raw_s, raw_obj = float(np.median(seconds[next(iter(runs))])), objectives[next(iter(runs))]
        for name in runs:
            s = float(np.median(seconds[name]))
            spread = (f"  ({', '.join(f'{v:.1f}' for v in seconds[name])})"
                      if args.repeats > 1 else "")
            print(f"{n:>9} {k:>6}  {name:<38} {s:8.1f} {s / raw_s:6.2f} "
                  f"{objectives[name]:12.1f} {objectives[name] / raw_obj - 1:+7.1%}{spread}")
        print(f"{n:>9} {k:>6}  {'assign all N (faiss flat index)':<38} "
              f"{measured[(n, k)][1]:8.1f}")
    (n, k), (fit_s, assign_s) = max(measured.items())
    big_n, big_k = 60_000_000, 100_000
    sample = min(big_n, big_k * POINTS_PER_CENTROID)
    fit_p = fit_s * (sample / min(n, k * POINTS_PER_CENTROID)) * (big_k / k)
    assign_p = assign_s * (big_n / n) * (big_k / k)
    print(f"projection to {big_n:.0e} x {big_k:.0e} (sample {sample:.2e}) from {n} x {k}, "
          f"dimension {args.dim}, this machine: fit {fit_p / 3600:.1f} h, assignment "
          f"{assign_p / 3600:.1f} h (both x dimension / {args.dim}; divided by the cores or GPUs "
          "added)")


if __name__ == "__main__":
    main()

"""The whole chain of both papers on one world, sized to run in about 20 minutes on 2 CPU cores
(`make demo`; then `make export` and `scripts/report.py`).

  encoders: ResNet-C (classify), S1 (pretrain), S2 and S1+S2 (finetune), COURIER (from S1);
            paper 002 Table 5's other pre-training baselines: Supervised, SimSiam, CLIP, MaskCLIP
  eval:     visual search of each encoder and of a random one (Table 1)
  cluster:  faiss k-means over COURIER's catalog embeddings (Cluster-ID)
  CTR:      no image features; each encoder's vectors (Table 2), with D for S1+S2 and COURIER;
            S1 and COURIER as SimScore and Cluster-ID (Tables 5 and B1); and paper 002's feed
            setting (the `feed` feature spec, on a world whose records lack the query photo,
            demographics and preferred categories) without images and with COURIER's Cluster-ID;
            Table 5's baselines as Cluster-IDs

Every run is a named experiment of `trainer.experiments`, run as its `python -m trainer.task`
command line with its log in <out_dir>/logs/. Trained runs are kept (a rerun skips them), so an
interrupted demo resumes. The steps are the demo's, shorter than `make repro-*`'s; timings.json
records them and what each run took.

  python scripts/demo.py --data_dir=data/small --feed_data_dir=data/small_feed --out_dir=runs/demo
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import time

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from trainer import experiments

# Steps per stage on `small` (the repro scripts use the stages' defaults: 300 / 600 / 800 / 200 /
# 940).
# Table 5's baselines get a sixth of S1's steps, two at a time: they add 5.7 min (README).
STEPS = {"classify": 150, "pretrain": 300, "finetune": 200, "courier": 100, "ctr": 250,
         "debias": 250, "supervised": 50, "simsiam": 50, "clip": 50}
LOGGED = 20  # progress lines per run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--feed_data_dir", default="",
                   help="The same world written with the feed spec's `ctr` columns (synth "
                        "--ctr_spec=feed); empty to leave out the feed runs.")
    p.add_argument("--out_dir", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2,
                   help="Evaluation runs in parallel (CTR runs go one at a time: two at once "
                   "took 117 s a pair on 2 cores against 45 s each alone).")
    a = p.parse_args()
    out = a.out_dir
    logs = os.path.join(out, "logs")
    seconds: dict = {}
    baselines = tuple(e.name for e in experiments.BASELINES)
    dirs = {name: os.path.join(out, name) for name in (*experiments.ENCODERS, *baselines)}

    def run(name: str, args: list) -> None:
        seconds[name] = experiments.run(args, os.path.join(logs, f"{name.replace('/', '_')}.txt"))
        print(f"  {name}: {seconds[name]:.0f}s", flush=True)

    def budget(stage: str) -> list:
        steps = STEPS[stage]
        return [f"--train_steps={steps}", f"--log_interval={max(steps // LOGGED, 1)}"]

    t0 = time.time()
    print(f"demo: encoders into {out} (steps {STEPS})", flush=True)

    def train(name: str) -> None:
        exp = experiments.get(name)
        run(name, experiments.command(exp, a.data_dir, dirs[name], dirs, a.seed, flags=budget(
            exp.stage) + [f"--checkpoint_interval={max(STEPS[exp.stage] // 4, 1)}"]))

    for name in experiments.ENCODERS:
        train(name)
    # The short baseline runs are mostly start-up (loading, tracing, the catalog pass): two at a
    # time overlap it.
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        for f in [pool.submit(train, name) for name in baselines]:
            f.result()

    evals = [(f"eval_{name}", experiments.command(experiments.get("eval"), a.data_dir,
                                                  dirs[name], dirs, a.seed))
             for name in experiments.ENCODERS]
    evals.append(("eval_random", experiments.command(
        experiments.get("random"), a.data_dir, os.path.join(out, "random"), dirs, a.seed)))
    runs = [(exp, a.data_dir) for exp in (*experiments.DEMO_CTR, *experiments.DEMO_TABLE_5)]
    if a.feed_data_dir:
        runs += [(exp, a.feed_data_dir) for exp in experiments.DEMO_FEED]
    print(f"demo: {len(evals)} evaluations ({a.jobs} at a time), then clustering and "
          f"{len(runs)} CTR runs", flush=True)
    # Evaluations first: they write the embedding tables the CTR runs read.
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        for f in [pool.submit(run, *job) for job in evals]:
            f.result()
    run("cluster_courier", experiments.command(experiments.get("cluster_courier"), a.data_dir,
                                               dirs["courier"], dirs, a.seed))

    for exp, data_dir in runs:
        model_dir = os.path.join(out, exp.name)
        if exp.name.endswith("courier_cluster_id") and not os.path.exists(
                os.path.join(model_dir, "clusters.npz")):
            os.makedirs(model_dir, exist_ok=True)  # the cluster stage's centroids, not a refit
            shutil.copy(os.path.join(dirs["courier"], "clusters.npz"), model_dir)
        run(exp.name, experiments.command(exp, data_dir, model_dir, dirs, a.seed,
                                          flags=budget(exp.stage)))
    total = time.time() - t0
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump({"seconds": seconds, "total_seconds": total, "steps": STEPS}, f, indent=1)
    print(f"demo: trained and evaluated in {total / 60:.1f} min; timings in "
          f"{os.path.join(out, 'timings.json')}", flush=True)


if __name__ == "__main__":
    main()

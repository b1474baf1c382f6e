"""The whole chain of both papers on one world, sized to run in under 20 minutes on 2 CPU cores
(`make demo`; then `make export` and `scripts/report.py`).

  encoders: ResNet-C (classify), S1 (pretrain), S2 and S1+S2 (finetune), COURIER (from S1)
  eval:     visual search of each encoder and of a random one (Table 1)
  cluster:  faiss k-means over COURIER's catalog embeddings (Cluster-ID)
  CTR:      no image features; each encoder's vectors (Table 2), with D for S1+S2 (Table 2)
            and COURIER; S1 and COURIER as SimScore and Cluster-ID (Tables 5 and B1)

Every step is a `python -m trainer.task` command line; each writes its log to <out_dir>/logs/.
Trained runs are kept (a rerun skips them), so an interrupted demo resumes. The step counts are
the demo's, shorter than `make repro-*`'s; timings.json records what each step took.

  python scripts/demo.py --data_dir=data/small --out_dir=runs/demo
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import sys
import time

from repro_visual import _run

# Steps per stage on `small` (the repro scripts use 300 / 600 / 800 / 200 / 940).
STEPS = {"classify": 150, "pretrain": 300, "finetune": 200, "courier": 100, "ctr": 250}
# (Table name, model dir, stage, flags); {s1} is S1's model dir.
ENCODERS = (("ResNet-C", "resnet_c", "classify", []),
            ("S1", "s1", "pretrain", []),
            ("S2", "s2", "finetune", []),
            ("S1+S2", "s1s2", "finetune", ["--init_checkpoint={s1}"]),
            ("COURIER", "courier", "courier", ["--init_checkpoint={s1}"]))
MODES = ("vector", "simscore", "cluster_id")


def ctr_runs() -> list[tuple[str, str, str, str]]:
    """(run name, stage, encoder dir name or 'none', image feature mode) of every CTR run."""
    runs = [("no_image", "ctr", "none", "vector")]
    runs += [(name, "ctr", name, "vector") for _, name, _, _ in ENCODERS]
    runs += [(f"{name}_d", "debias", name, "vector") for name in ("s1s2", "courier")]
    for name in ("s1", "courier"):
        runs += [(f"{name}_{mode}", "ctr", name, mode) for mode in MODES[1:]]
    return runs


def runner(out: str):
    """run(name, args): `repro_visual._run` logging to <out>/logs/<name>.txt; run.seconds holds
    each step's time."""
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)

    def run(name: str, args: list) -> None:
        run.seconds[name] = _run(args, os.path.join(logs, f"{name}.txt"))
        print(f"  {name}: {run.seconds[name]:.0f}s", flush=True)

    run.seconds = {}
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out_dir", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2,
                   help="Evaluation runs in parallel (CTR runs go one at a time: two at once "
                   "took 117 s a pair on 2 cores against 45 s each alone).")
    a = p.parse_args()
    out = a.out_dir
    run = runner(out)
    task = [sys.executable, "-m", "trainer.task", f"--data_dir={a.data_dir}", f"--seed={a.seed}"]
    t0 = time.time()
    print(f"demo: encoders into {out} (steps {STEPS})", flush=True)
    dirs = {name: os.path.join(out, name) for _, name, _, _ in ENCODERS}
    for _, name, stage, flags in ENCODERS:
        steps = STEPS[stage]
        run(name, task + [f"--stage={stage}", f"--model_dir={dirs[name]}",
                          f"--train_steps={steps}", f"--log_interval={max(steps // 20, 1)}",
                          f"--checkpoint_interval={max(steps // 4, 1)}"]
            + [f.format(s1=dirs["s1"]) for f in flags])

    jobs = [(f"eval_{name}", task + ["--stage=eval_search", f"--model_dir={d}"])
            for name, d in dirs.items()]
    jobs.append(("eval_random", task + ["--stage=eval_search", "--random_init",
                                        f"--model_dir={os.path.join(out, 'random')}"]))
    jobs.append(("cluster_courier", task + ["--stage=cluster", "--image_features=courier",
                                            f"--image_model_dir={dirs['courier']}"]))
    for name, stage, enc, mode in ctr_runs():
        args = task + [f"--stage={stage}", f"--model_dir={os.path.join(out, 'ctr', name)}",
                       f"--train_steps={STEPS['ctr']}", "--log_interval=25",
                       f"--encoders_dir={out}",
                       f"--image_features={enc}",
                       f"--image_feature_mode={mode}"]
        jobs.append((f"ctr_{name}", args))
    # Evaluations first: they write the embedding tables the CTR runs read.
    evals = [j for j in jobs if j[0].startswith("eval_")]
    print(f"demo: {len(evals)} evaluations ({a.jobs} at a time), {len(jobs) - len(evals)} "
          "clustering and CTR runs", flush=True)
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        for f in [pool.submit(run, *j) for j in evals]:
            f.result()
    for job in jobs:
        d = os.path.join(out, "ctr", "courier_cluster_id")
        if job[0] == "ctr_courier_cluster_id" and not os.path.exists(os.path.join(d, "clusters.npz")):
            os.makedirs(d, exist_ok=True)  # the cluster stage's centroids, not a refit
            shutil.copy(os.path.join(dirs["courier"], "clusters.npz"), d)
        if job not in evals:
            run(*job)
    total = time.time() - t0
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump({"seconds": run.seconds, "total_seconds": total, "steps": STEPS}, f, indent=1)
    print(f"demo: trained and evaluated in {total / 60:.1f} min; timings in "
          f"{os.path.join(out, 'timings.json')}", flush=True)


if __name__ == "__main__":
    main()

"""The whole chain of both papers on one world, sized to run in about 25 minutes on 2 CPU cores
(`make demo`; then `make export` and `scripts/report.py`).

  encoders: ResNet-C (classify), S1 (pretrain), S2 and S1+S2 (finetune), COURIER (from S1);
            paper 002 Table 5's other pre-training baselines: Supervised, SimSiam, CLIP, MaskCLIP
  eval:     visual search of each encoder and of a random one (Table 1)
  vocab:    the CTR vocabularies of each data set (the Beam vocab job), shared by its CTR runs
  cluster:  faiss k-means over the catalog embeddings of S1, COURIER and Table 5's baselines
            (Cluster-ID)
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

import concurrent.futures
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from trainer import console, experiments
from trainer.ctr.task import CLUSTERS, VOCABULARIES
from trainer.data import records

# Steps per stage on `small` (the repro scripts use the stages' defaults: 300 / 600 / 800 / 200 /
# 940).
# Table 5's baselines get a sixth of S1's steps, two at a time: they add about 5.2 min
# (docs/results.md).
STEPS = {"classify": 150, "pretrain": 300, "finetune": 200, "courier": 100, "ctr": 250,
         "debias": 250, "supervised": 50, "simsiam": 50, "clip": 50}
LOGGED = 20  # progress lines per run


def main() -> None:
    p = console.CommandLine(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--feed_data_dir", default="",
                   help="The same world written with the feed spec's `ctr` columns (synth "
                        "--ctr_spec=feed); empty to leave out the feed runs.")
    p.add_argument("--out_dir", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2,
                   help="Runs in parallel before the CTR runs (vocabularies, baselines, "
                   "evaluations, k-means); CTR runs go one at a time: two at once took 117 s a "
                   "pair on 2 cores against 45 s each alone.")
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

    # One vocabulary pass per data set, by the Beam vocab job as at scale, put in every CTR model
    # dir before it trains: each of the ~20 runs would otherwise make the same pass itself.
    specs = {a.data_dir: "synthetic", **({a.feed_data_dir: "feed"} if a.feed_data_dir else {})}
    vocab = {d: os.path.join(out, "vocabularies", f"{spec}.npz") for d, spec in specs.items()}

    def vocab_pass(data_dir: str) -> None:
        if not os.path.exists(vocab[data_dir]):
            run(f"vocab_{specs[data_dir]}", [
                sys.executable, "-m", "trainer.pipelines.vocab",
                f"--records={records.default_pattern(data_dir, 'ctr', 'train')}",
                f"--ctr_spec={specs[data_dir]}", f"--output={vocab[data_dir]}"])

    def provide(model_dir: str, data_dir: str, clusters_of: str | None = None) -> None:
        """The shared vocabularies (and an encoder's Cluster-ID centroids) into a new model dir,
        under the names the stages look for."""
        os.makedirs(model_dir, exist_ok=True)
        files = {VOCABULARIES: vocab[data_dir]}
        if clusters_of:
            files[CLUSTERS] = os.path.join(clusters_of, CLUSTERS)
        for name, path in files.items():
            if not os.path.exists(os.path.join(model_dir, name)):
                shutil.copy(path, os.path.join(model_dir, name))

    def chain(*steps: Callable[[], None]) -> Callable[[], None]:
        def in_turn() -> None:
            for step in steps:
                step()
        return in_turn

    def in_pool(tasks: list) -> None:
        with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
            for f in [pool.submit(task) for task in tasks]:
                f.result()

    in_pool([functools.partial(vocab_pass, d) for d in specs])
    for name in experiments.ENCODERS:
        train(name)

    def cluster(name: str) -> None:  # k-means beside the encoder's vectors
        run(f"cluster_{name}", experiments.command(experiments.cluster_experiment(name),
                                                   a.data_dir, dirs[name], dirs, a.seed))

    def evaluate(name: str) -> None:
        run(f"eval_{name}", experiments.command(experiments.get("eval"), a.data_dir, dirs[name],
                                                dirs, a.seed))

    runs = [(exp, a.data_dir) for exp in (*experiments.DEMO_CTR, *experiments.DEMO_TABLE_5)]
    runs += [(exp, a.feed_data_dir) for exp in experiments.DEMO_FEED if a.feed_data_dir]
    clusters_of = {exp.name: dict(exp.sets)["images.model_dir"][1:-1] for exp, _ in runs
                   if dict(exp.sets).get("ctr.image_feature_mode") == "cluster_id"}
    clustered = set(clusters_of.values())

    def prepare(name: str) -> Callable[[], None]:
        """An encoder's visual search, then (if a CTR run takes its Cluster-IDs) its k-means:
        after, as both write its embedding table."""
        if name in clustered:
            return chain(functools.partial(evaluate, name), functools.partial(cluster, name))
        return functools.partial(evaluate, name)

    # Then two at a time (short runs are mostly start-up, which two overlap), longest first:
    # Table 5's baselines, each trained, then clustered, and the visual search of each encoder.
    # They leave the embedding tables and centroids that the CTR runs read.
    for name in baselines:  # Supervised trains inside the CTR model: its vocabularies too
        if experiments.get(name).stage == "supervised":
            provide(dirs[name], a.data_dir)
    print(f"demo: {len(baselines)} baselines and {len(experiments.ENCODERS) + 1} evaluations "
          f"({a.jobs} at a time)", flush=True)
    in_pool([chain(functools.partial(train, name), functools.partial(cluster, name))
             for name in baselines]
            + [prepare(name) for name in experiments.ENCODERS if name in clustered]
            + [prepare(name) for name in experiments.ENCODERS if name not in clustered]
            + [functools.partial(run, "eval_random", experiments.command(
                experiments.get("random"), a.data_dir, os.path.join(out, "random"), dirs,
                a.seed))])

    print(f"demo: {len(runs)} CTR runs", flush=True)
    for exp, data_dir in runs:
        model_dir = os.path.join(out, exp.name)
        provide(model_dir, data_dir, dirs[clusters_of[exp.name]]  # the cluster stage's centroids,
                if exp.name in clusters_of else None)  # not a refit
        run(exp.name, experiments.command(exp, data_dir, model_dir, dirs, a.seed,
                                          flags=budget(exp.stage)))
    total = time.time() - t0
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump({"seconds": seconds, "total_seconds": total, "steps": STEPS}, f, indent=1)
    print(f"demo: trained and evaluated in {total / 60:.1f} min; timings in "
          f"{os.path.join(out, 'timings.json')}", flush=True)


if __name__ == "__main__":
    main()

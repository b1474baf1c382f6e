"""Peak memory of CTR training against catalog size, in today's layout and in the scale-out one,
one run.

For each catalog size (items = users), a `scale` world (`trainer.synth.scale`, image vectors of
dimension 64) with the same number of CTR samples is generated, then the CTR model (the
`synthetic` spec, Vector mode, 30 steps of a batch of 256, then the evaluation) is trained:
- table: one process, `one_device`, the image tables in the model (the layout before issue 19);
- joined + parameter servers: the train records joined with their image vectors by the Beam join
  pipeline (`--table_in_memory`), the spec's image features `layout: joined`, and a cluster of
  local processes from TF_CONFIG: a chief (the coordinator), one worker and one parameter server;
  the chief keeps the image table as the `ctr` stage does (a file copy and streamed statistics,
  `ctr.task.keep_image_table`), and the Beam evaluate job scores the joined test day with the
  checkpoint on a local Dask worker process (the model reads the joined vectors as in training,
  without an image table).
Prints the peak resident memory (VmHWM) of each process per size, and each one's growth over the
range (goal: under 1.5x).

  python scripts/bench_memory.py --sizes 10000 100000 1000000
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from trainer import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH, SAMPLES = 30, 256, 20_000


def _train(world: str, model_dir: str, spec_path: str, train_pattern: str, strategy,
           test_pattern: str = "", by_job: bool = False) -> None:
    from trainer import configs
    from trainer.ctr import spec as ctr_spec
    from trainer.ctr import task as ctr_task
    from trainer.data import npz, records
    from trainer.features import embeddings

    cfg = configs.CtrConfig(train_pattern=train_pattern, test_pattern=test_pattern
                            or records.default_pattern(world, "ctr", "test"))
    train = configs.TrainConfig(steps=STEPS, global_batch_size=BATCH, log_interval=10,
                                checkpoint_interval=STEPS)
    if not by_job:
        table = embeddings.load(os.path.join(world, embeddings.FILE))
        metrics = ctr_task.train_and_evaluate(cfg, ctr_spec.load(spec_path), train, model_dir,
                                              table.item_id, table.impressions_30d, table,
                                              strategy=strategy)
        print(f"trained and evaluated: AUC {metrics['AUC']:.4f}")
        return
    # As the `ctr` stage does under parameter servers: the model dir holds a copy of the table
    # and the image statistics, streamed (the chief never reads the vectors); the model reads
    # its image features from the joined records; the evaluate job scores the joined test day
    # with the checkpoint in a worker process of its own.
    from dask import distributed

    from trainer.pipelines import dask_runner
    from trainer.pipelines import evaluate as evaluate_job

    images, stats = ctr_task.keep_image_table(
        embeddings.describe(os.path.join(world, embeddings.FILE)), model_dir,
        cfg.image_feature_mode)
    configs.save(model_dir, configs.CtrStage(
        model_dir=model_dir, ctr=cfg, images=configs.ImageSourceConfig(encoder="scale")))
    no_items = np.zeros([0], np.int64)
    ctr_task.train_and_evaluate(cfg, ctr_spec.load(spec_path), train, model_dir, no_items,
                                no_items, images, strategy=strategy, image_stats=stats,
                                evaluate_here=False)
    impressions = os.path.join(model_dir, "impressions.npz")
    npz.write(impressions, **npz.read(images.path, ["item_id", "impressions_30d"]))
    cluster = dask_runner.local_cluster(1)
    try:
        metrics = evaluate_job.run(configs.EvaluateConfig(
            records_pattern=cfg.test_pattern, catalog_pattern=impressions,
            checkpoint_dir=model_dir, out_dir=os.path.join(model_dir, "evaluation")),
            ["--runner=dask", f"--dask_client_address={cluster.scheduler_address}"])
        with distributed.Client(cluster) as client:
            peaks = client.run(_peak_mb)
        print("EVAL_WORKER_MB", max(peaks.values()), flush=True)
    finally:
        cluster.close()
    print(f"trained and evaluated by the job: AUC {metrics['AUC']:.4f}")


def _peak_mb(pid: int | str = "self") -> float:
    """A process's own peak resident memory (VmHWM), MB. Not `ru_maxrss`: Linux carries that
    across `execve`, so a child started by this script would report the script's own peak at the
    fork (6 GB after the in-process join of 10^6 items) if it had not reached more itself."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], cwd=REPO,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> tuple[float, str]:
    """(peak MB, output) of a child that runs to its end: its own getrusage report."""
    out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(out[-3000:])
    return _reported(out, "PEAK_MB"), out


def _reported(out: str, key: str) -> float:
    return float(out.rsplit(f"{key} ", 1)[1].split()[0])


def measure(size: int, root: str) -> dict:
    from trainer.ctr import spec as ctr_spec
    from trainer.data import records
    from trainer.features import embeddings
    from trainer.pipelines import join
    from trainer.synth import scale
    from trainer.train import loop

    world = os.path.join(root, f"world-{size}")
    t0 = time.time()
    scale.generate(world, size, size, SAMPLES, SAMPLES // 5)
    gen_s = time.time() - t0
    row = {"items": size, "generate_s": round(gen_s, 1)}
    table_mb, _ = _finish(_child("--role=table", f"--world={world}",
                                   f"--model_dir={root}/table-{size}"))
    row["table_mb"] = round(table_mb)

    d = ctr_spec.load("synthetic").to_dict()
    d["features"] = [{**f, "layout": "joined"} if f["kind"] == "image" else f
                     for f in d["features"]]
    spec_path = os.path.join(root, "joined.yaml")
    ctr_spec.parse(d, "joined").save(spec_path)
    t0 = time.time()
    table = os.path.join(world, embeddings.FILE)
    for split in ("train", "test"):
        join.run(records.default_pattern(world, "ctr", split), ctr_spec.load(spec_path),
                 "vector", table, os.path.join(root, f"joined-{size}"), split,
                 query_embeddings=table, table_in_memory=True)
    row["join_s"] = round(time.time() - t0, 1)
    ports = loop.local_ports(3)
    cluster = {"chief": [f"127.0.0.1:{ports[0]}"], "worker": [f"127.0.0.1:{ports[1]}"],
               "ps": [f"127.0.0.1:{ports[2]}"]}

    def tf_config(kind: str) -> dict:
        return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": kind, "index": 0}})}

    joined = os.path.join(root, f"joined-{size}")
    servers = {k: _child("--role=server", env=tf_config(k)) for k in ("ps", "worker")}
    try:
        chief_mb, out = _finish(_child(
            "--role=chief", f"--world={world}", f"--model_dir={root}/ps-{size}",
            f"--spec={spec_path}",
            "--train_pattern=" + records.default_pattern(joined, "ctr", "train"),
            "--test_pattern=" + records.default_pattern(joined, "ctr", "test"),
            env=tf_config("chief")))
        row["eval_worker_mb"] = round(_reported(out, "EVAL_WORKER_MB"))
        row.update({f"{k}_mb": round(_peak_mb(p.pid)) for k, p in servers.items()})
    finally:
        for p in servers.values():
            p.kill()
            p.communicate()
    row["chief_mb"] = round(chief_mb)
    return row


def main() -> None:
    p = console.CommandLine(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--role", default="main", choices=["main", "table", "chief", "server"])
    p.add_argument("--world", default="")
    p.add_argument("--model_dir", default="")
    p.add_argument("--spec", default="synthetic")
    p.add_argument("--train_pattern", default="")
    p.add_argument("--test_pattern", default="")
    args = p.parse_args()
    if args.role != "main":
        import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
        from trainer.data import records
        from trainer.train import loop

        if args.role == "server":
            loop.serve_if_not_coordinator("parameter_server")
            return
        strategy = (loop.make_strategy("parameter_server") if args.role == "chief"
                    else loop.make_strategy("one_device"))
        _train(args.world, args.model_dir, args.spec,
               args.train_pattern or records.default_pattern(args.world, "ctr", "train"),
               strategy, args.test_pattern, by_job=args.role == "chief")
        print("PEAK_MB", _peak_mb(), flush=True)
        return
    import trainer  # noqa: F401

    print(f"CTR training, {SAMPLES:,} samples, {STEPS} steps of {BATCH}, image dimension 64; "
          "peak resident memory (VmHWM) per process, MB")
    print("| items = users | table layout (one process) | joined + ps: worker | ps | chief "
          "(coordinator) | evaluate job: worker | join s |\n"
          "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for size in args.sizes:
            r = measure(size, root)
            rows.append(r)
            print(f"| {size:,} | {r['table_mb']} | {r['worker_mb']} | {r['ps_mb']} | "
                  f"{r['chief_mb']} | {r['eval_worker_mb']} | {r['join_s']} |", flush=True)
    first, last = rows[0], rows[-1]
    print(f"growth {first['items']:,} -> {last['items']:,} items: table layout "
          f"{last['table_mb'] / first['table_mb']:.2f}x, joined + ps worker "
          f"{last['worker_mb'] / first['worker_mb']:.2f}x (goal < 1.5x), ps "
          f"{last['ps_mb'] / first['ps_mb']:.2f}x, chief "
          f"{last['chief_mb'] / first['chief_mb']:.2f}x, evaluate job worker "
          f"{last['eval_worker_mb'] / first['eval_worker_mb']:.2f}x")


if __name__ == "__main__":
    main()

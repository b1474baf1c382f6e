"""A CTR export at vocabulary sizes up to millions of ids: SavedModel size on disk, the size of
`saved_model.pb`, load time in the stand-in model server, and the p50 / p99 latency of one page of
100 candidates (`serving_default`), one run.

For each size, a CTR model of the `synthetic` spec (no image features) is built with item, user
and shop vocabularies of that many ids, checkpointed untrained into a model dir as the `ctr`
stage leaves it, and exported with `export.ctr`. With the lookups read from asset files
(`trainer.ctr.tables.id_lookup`, the default) `saved_model.pb` stays the same size at any
vocabulary; `--constants` builds them as graph constants, as before, for comparison.

  python scripts/bench_export_vocab.py --sizes 10000 1000000
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from unittest import mock

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import numpy as np
import tensorflow as tf

from export import ctr as export_ctr
from serving import stand_in_server
from trainer import configs, console
from trainer.ctr import spec as ctr_spec
from trainer.ctr import task as ctr_task
from trainer.ctr.model import CtrModel
from trainer.ctr.tables import Vocabularies

PAGE, REQUESTS = 100, 200
LOAD = Vocabularies.load


def model_dir_with_vocabularies(root: str, size: int, constants: bool) -> str:
    """A `ctr` model dir whose item, user and shop tables hold `size` ids each."""
    spec = ctr_spec.load("synthetic")
    rng = np.random.default_rng(0)
    ids = {t.name: np.sort(rng.choice(10 * size, size, replace=False)).astype(np.int64)
           if t.name in ("item_id", "user_id", "shop_id")
           else np.arange(1, 101, dtype=np.int64) for t in spec.tables}
    boundaries = {f.name: np.linspace(1, 100, f.buckets - 1).astype(np.float32)
                  for f in spec.of_kind("numeric") if f.transform == "bucketize"}
    model_dir = os.path.join(root, f"ctr-{size}")
    os.makedirs(model_dir)
    vocabularies = Vocabularies(ids, boundaries, {}, {k: np.ones_like(v) for k, v in ids.items()})
    vocabularies.save(os.path.join(model_dir, ctr_task.VOCABULARIES))
    spec.save(os.path.join(model_dir, ctr_spec.FILE))
    cfg = configs.CtrStage(model_dir=model_dir, data_dir=root)
    configs.save(model_dir, cfg)
    files = None if constants else os.path.join(model_dir, ctr_task.LOOKUP_FILES)
    model = CtrModel(cfg.ctr, spec, dataclasses.replace(vocabularies, files_dir=files))
    model.build_variables()
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model),
                                         os.path.join(model_dir, "ckpt"), max_to_keep=1)
    manager.save(checkpoint_number=0)
    return model_dir


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    p = console.CommandLine(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--constants", action="store_true",
                   help="Vocabularies as graph constants (the layout before the asset files).")
    args = p.parse_args()
    print(f"| ids per table | SavedModel MB | saved_model.pb KB | assets MB | load s | "
          f"p50 ms | p99 ms ({PAGE} candidates) |\n| ---: | ---: | ---: | ---: | ---: | ---: | "
          "---: |")
    with tempfile.TemporaryDirectory() as root:
        for size in args.sizes:
            model_dir = model_dir_with_vocabularies(root, size, args.constants)
            # With --constants the export rebuilds the model with the vocabularies as arrays.
            as_arrays = mock.patch.object(Vocabularies, "load", staticmethod(
                lambda path, files_dir=None: LOAD(path)))
            with as_arrays if args.constants else contextlib.nullcontext():
                version = export_ctr.export(model_dir, os.path.join(root, f"export-{size}"))
            t0 = time.time()
            served = stand_in_server.Version(version)
            served.warm_up()
            load = time.time() - t0
            model = ctr_task.load_trained(model_dir)  # for its spec and vocabularies
            ms = []
            for i in range(REQUESTS):
                inputs = export_ctr.sample_requests(model.spec, model.vocabularies, PAGE, seed=i)
                t0 = time.perf_counter()
                served.run("serving_default", inputs)
                ms.append(1000 * (time.perf_counter() - t0))
            served.close()
            p50, p99 = np.percentile(ms[10:], [50, 99])
            print(f"| {size:,} | {du(version) / 1e6:.1f} | "
                  f"{os.path.getsize(os.path.join(version, 'saved_model.pb')) / 1e3:.0f} | "
                  f"{du(os.path.join(version, 'assets')) / 1e6:.1f} | {load:.1f} | {p50:.2f} | "
                  f"{p99:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Input pipeline throughput on catalog records, from one run:

  1. raw record reading (TFRecord bytes only),
  2. read + parse + decode (the training pipeline without augmentation),
  3. read + parse + decode + S1 augmentation (two views per image),

in images/s (source images; stage 3 produces two views of each), and the ratio of 3 to 1.

  python scripts/bench_input.py --data_dir data/small [--batch_size 256] [--seconds 10]
"""
from __future__ import annotations

import os
import time

import trainer  # noqa: F401
from trainer import console

# isort: split
import tensorflow as tf

from trainer.data import augment, pipeline, records
from trainer.synth import marketplace


def images_per_second(ds: tf.data.Dataset, batch_size: int, seconds: float,
                      warmup: int = 3) -> float:
    it = iter(ds)
    for _ in range(warmup):  # tracing, autotuning, file opening
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    return n * batch_size / (time.perf_counter() - t0)


def main() -> None:
    p = console.CommandLine(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--image_size", type=int, default=None,
                   help="Decode size (default: the world's image size, else 64).")
    p.add_argument("--seconds", type=float, default=10.0, help="Measured time per stage.")
    args = p.parse_args()

    pattern = records.default_pattern(args.data_dir, "catalog")
    files = pipeline.list_files(pattern)
    size = args.image_size or marketplace.image_size(args.data_dir)

    raw = (tf.data.Dataset.from_tensor_slices(files).repeat()
           .interleave(lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 20),
                       cycle_length=min(8, len(files)), num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=False)
           .batch(args.batch_size).prefetch(tf.data.AUTOTUNE))
    cfg = pipeline.InputConfig(pattern, "catalog", global_batch_size=args.batch_size,
                               image_size=size)
    decoded = pipeline.InputPipeline(cfg).dataset()
    augmented = pipeline.InputPipeline(cfg, transform=augment.s1_views_transform()).dataset()

    print(f"catalog: {len(files)} files under {os.path.dirname(files[0])}; batch "
          f"{args.batch_size}; images {size}x{size}; {os.cpu_count()} CPU cores; "
          f"{args.seconds:g}s per stage")
    r1 = images_per_second(raw, args.batch_size, args.seconds)
    print(f"1. raw record reading:                 {r1:10.0f} images/s")
    r2 = images_per_second(decoded, args.batch_size, args.seconds)
    print(f"2. read + parse + decode:              {r2:10.0f} images/s")
    r3 = images_per_second(augmented, args.batch_size, args.seconds)
    print(f"3. read + parse + decode + augment:    {r3:10.0f} images/s (x2 views)")
    print(f"ratio 3 / 1:                           {r3 / r1:10.3f}")


if __name__ == "__main__":
    main()

"""Training-step throughput of S1 and COURIER, from one run:

  - images/s of a training step (forward, backward, optimizer update) on a fixed batch,
  - the step's achieved FLOP/s over the peak of a large float32 matmul measured in the same run
    (step FLOPs = 3 x the encoder's forward FLOPs, counted by TensorFlow's profiler on the traced
    graph: the backward pass costs about twice the forward),
  - whether the input pipeline keeps up: images/s of the stage's real tf.data pipeline over the
    step's images/s (>= 1 keeps up; measured alone, so on shared cores it is an upper bound).

  python scripts/bench_train.py --data_dir data/small [--batch_size 64] [--seconds 10]
"""
from __future__ import annotations

import dataclasses
import time

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import tensorflow as tf
from bench_input import images_per_second

from trainer import configs, console
from trainer.data import records
from trainer.models import courier, encoder, pretrain
from trainer.synth import marketplace
from trainer.train import loop


def _timed(fn, seconds: float, warmup: int = 2) -> float:
    """Calls of `fn` per second (after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def matmul_peak(seconds: float, n: int = 2048) -> float:
    """FLOP/s of an n x n float32 matmul chain: the machine's practical dense peak."""
    a = tf.random.uniform([n, n])
    b = tf.random.uniform([n, n])
    fn = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    return 2 * n ** 3 * _timed(lambda: fn().numpy(), seconds)


def forward_flops(enc: encoder.Encoder, images: int) -> float:
    """Float operations of the encoder's training-mode forward pass on `images` images."""
    size = enc.cfg.image_size
    fn = tf.function(lambda x: enc(x, training=True))
    graph = fn.get_concrete_function(tf.TensorSpec([images, size, size, 3], tf.float32)).graph
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    return float(tf.compat.v1.profiler.profile(graph, options=opts).total_float_ops)


def bench(task: loop.Task, train: configs.TrainConfig, images_per_example: int, seconds: float,
          peak: float) -> dict:
    batch = next(iter(task.build_inputs(None)))
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = task.build_model()
        optimizer = loop.build_optimizer(train)
    step = tf.function(lambda b: loop.train_step(task, model, optimizer, b)[0])
    images = train.global_batch_size * images_per_example
    step_rate = _timed(lambda: step(batch).numpy(), seconds)
    pipeline_images = images_per_second(task.build_inputs(None), images, seconds)
    flops = 3 * forward_flops(model, images)
    return {"train images/s": step_rate * images, "step GFLOP": flops / 1e9,
            "achieved GFLOP/s": flops * step_rate / 1e9,
            "of matmul peak": flops * step_rate / peak,
            "pipeline images/s": pipeline_images,
            "pipeline / train": pipeline_images / (step_rate * images)}


def main() -> None:
    p = console.CommandLine(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--batch_size", type=int, default=64,
                   help="S1 images (two views each) and COURIER pages per step.")
    p.add_argument("--seconds", type=float, default=10.0, help="Timing per measurement.")
    p.add_argument("--depth", type=int, default=configs.EncoderConfig().depth)
    p.add_argument("--width_multiplier", type=float,
                   default=configs.EncoderConfig().width_multiplier)
    a = p.parse_args()
    enc = configs.EncoderConfig(depth=a.depth, width_multiplier=a.width_multiplier,
                                image_size=marketplace.image_size(a.data_dir))
    train = configs.TrainConfig(global_batch_size=a.batch_size, warmup_steps=0)
    catalog = records.default_pattern(a.data_dir, "catalog")
    peak = matmul_peak(a.seconds)
    print(f"matmul peak (2048^2 float32): {peak / 1e9:.1f} GFLOP/s; encoder ResNet-{a.depth} x"
          f"{a.width_multiplier}, {enc.image_size}px, D={enc.feature_dim}; batch {a.batch_size}")
    s1 = pretrain.PretrainTask(configs.PretrainConfig(catalog_pattern=catalog), enc, train)
    cour = courier.CourierTask(configs.CourierConfig(
        pageviews_pattern=records.default_pattern(a.data_dir, "pageviews", "train"),
        catalog_pattern=catalog), enc, train)
    sample = next(iter(cour.build_inputs(None)))
    per_page = int(sample["pv_images"].shape[1] + sample["click_images"].shape[1])
    rows = {"S1": bench(s1, train, 2, a.seconds, peak),
            "COURIER": bench(cour, dataclasses.replace(train), per_page, a.seconds, peak)}
    keys = list(rows["S1"])
    print("| stage | " + " | ".join(keys) + " |\n| --- |" + " ---: |" * len(keys))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.3g}" if k != "of matmul peak"
                                          else f"{r[k]:.1%}" for k in keys) + " |")
    for name, r in rows.items():
        verdict = "keeps up" if r["pipeline / train"] >= 1 else "is the bottleneck"
        print(f"{name}: the input pipeline {verdict} ({r['pipeline / train']:.2f}x the step)")


if __name__ == "__main__":
    main()

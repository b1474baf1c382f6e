"""Serving benchmark of the two exports, from one run:

- encoder: images/s through the SavedModel (`encode_pixels`, and `encode_images` with decoding)
  vs. the in-process Keras model at the same batch size, and their ratio;
- CTR model: p50 / p99 latency of `serving_default` for requests of 1 and of 100 candidates.

    python scripts/bench_serving.py --encoder_dir=runs/visual/seed0/s1s2 \
        --ctr_dir=runs/ctr/seed0/s1s2 [--export_dir=/tmp/bench_models]

Exports both models first (into --export_dir, a fresh temporary dir by default). Times are on
this machine's CPU; they size a deployment, they are not the model server's own figures (no
network, no server-side batching).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import numpy as np
import tensorflow as tf

from export import common
from export import ctr as export_ctr
from export import encoder as export_encoder
from trainer.ctr import task as ctr_task
from trainer.data import parse
from trainer.models import encoder as encoder_lib


def _rate(fn, n_items: int, seconds: float) -> float:
    fn()  # trace / warm
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        count += 1
    return count * n_items / (time.perf_counter() - t0)


def _latencies(fn, repeats: int) -> np.ndarray:
    for _ in range(5):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return np.array(out) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder_dir", required=True, help="trained encoder model dir")
    ap.add_argument("--ctr_dir", required=True, help="trained ctr/debias model dir")
    ap.add_argument("--export_dir", default=None)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10.0, help="per throughput measurement")
    ap.add_argument("--repeats", type=int, default=300, help="requests per latency measurement")
    args = ap.parse_args()
    root = args.export_dir or tempfile.mkdtemp(prefix="bench_serving_")

    enc_path = export_encoder.export(args.encoder_dir, f"{root}/encoder")
    ctr_path = export_ctr.export(args.ctr_dir, f"{root}/ctr")
    keras = encoder_lib.restore(args.encoder_dir)
    size, b = keras.cfg.image_size, args.batch_size
    images = export_encoder.sample_images(b, size)
    pixels = tf.constant(parse.decode_images(tf.constant(images), size))
    keras_fn = tf.function(lambda x: keras(x, training=False))
    loaded = tf.saved_model.load(enc_path)
    by_pixels = loaded.signatures["encode_pixels"]
    by_images = loaded.signatures["encode_images"]
    images_t = tf.constant(images)
    rates = {
        "Keras model (in process), pixels": _rate(lambda: keras_fn(pixels).numpy(), b,
                                                  args.seconds),
        "SavedModel encode_pixels": _rate(lambda: by_pixels(pixels=pixels)["embedding"].numpy(),
                                          b, args.seconds),
        "SavedModel encode_images (PNG decode + resize inside)": _rate(
            lambda: by_images(images=images_t)["embedding"].numpy(), b, args.seconds),
    }
    base = rates["Keras model (in process), pixels"]
    print(f"\nEncoder ({enc_path}; {keras.cfg.depth}-layer ResNet x{keras.cfg.width_multiplier}, "
          f"{size}x{size}, D={keras.cfg.feature_dim}), batch {b}, {args.seconds:.0f} s each:\n")
    print("| path | images/s | vs. Keras |\n| --- | ---: | ---: |")
    for name, r in rates.items():
        print(f"| {name} | {r:.0f} | {r / base:.2f} |")

    ctr_loaded = tf.saved_model.load(ctr_path)
    serve = ctr_loaded.signatures["serving_default"]
    model = ctr_task.load_trained(args.ctr_dir)
    print(f"\nCTR model ({ctr_path}; image features "
          f"{model.cfg.image_feature_mode if model.image_tables else 'none'}, "
          f"D {'on' if model.cfg.debias else 'off'}), serving_default, {args.repeats} requests "
          "each:\n")
    print("| candidates per request | p50 ms | p99 ms | candidates/s at p50 |\n"
          "| ---: | ---: | ---: | ---: |")
    for n in (1, 100):
        inputs = {k: tf.constant(v) for k, v in
                  export_ctr.sample_requests(model.spec, model.vocabularies, n, seed=n).items()}
        ms = _latencies(lambda x=inputs: serve(**x)["ctr"].numpy(), args.repeats)
        p50, p99 = np.percentile(ms, [50, 99])
        print(f"| {n} | {p50:.2f} | {p99:.2f} | {n / p50 * 1e3:.0f} |")
    print(f"\nexports in {root}; warmup records: "
          f"{len(common.read_warmup(enc_path))} (encoder), {len(common.read_warmup(ctr_path))} "
          "(ctr)")


if __name__ == "__main__":
    main()

"""Serving benchmark of the two exports, from one run:

- encoder: images/s through the SavedModel (`encode_pixels`, and `encode_images` with decoding)
  vs. the in-process Keras model at the same batch size, and their ratio;
- CTR model: p50 / p99 latency of one page of 100 candidates, (a) by ids only (`serving_default`)
  and (b) with the query photo as JPEG bytes (`rank`: the photo encoded in the graph), each
  through the stand-in model server's gRPC `Predict` (its own process, TF1 session loader, no
  batching), as a direct call of the loaded SavedModel, and with the in-process Keras model on
  the same inputs; then where the time of (b) goes (the photo's encoding, the CTR model);
- the visual search ad request (`export.search`'s `request`): photo -> top 100 retrieved ->
  ranked by the CTR model -> top 10 by eCPM, p50 / p99 through the stand-in and as a direct
  call, over the whole catalog and within the photo's category, with catalogs of 1e4, 1e5 and
  1e6 items (the model's own catalog, grown with random unit vectors and copies of its items'
  features), and the stand-in process's resident memory with that model loaded.

    python scripts/bench_serving.py --encoder_dir=runs/visual/seed0/s1s2 \
        --ctr_dir=runs/ctr/seed0/s1s2 [--export_dir=/tmp/bench_models]

Exports both models first (into --export_dir, a fresh temporary dir by default). The processes
use --intra_op / --inter_op threads, as a serving process is configured. Times are on this
machine's CPU, over the loopback interface.
"""
from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from trainer import console

# isort: split
import numpy as np
import tensorflow as tf

from export import client as client_lib
from export import common
from export import ctr as export_ctr
from export import encoder as export_encoder
from export import search as export_search
from serving import stand_in_server
from trainer import configs
from trainer.ctr import task as ctr_task
from trainer.data import npz, parse, records
from trainer.models import encoder as encoder_lib

CANDIDATES = 100


def _rate(fn, n_items: int, seconds: float) -> float:
    fn()  # trace / warm
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        count += 1
    return count * n_items / (time.perf_counter() - t0)


def _scores(fn: Callable[..., dict], inputs: dict) -> np.ndarray:
    """The `ctr` output of a signature or a model's serving function on `inputs`."""
    return fn(**inputs)["ctr"].numpy()


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
    ap = console.CommandLine(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder_dir", required=True, help="trained encoder model dir")
    ap.add_argument("--ctr_dir", required=True, help="trained ctr/debias model dir")
    ap.add_argument("--export_dir", default=None)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10.0, help="per throughput measurement")
    ap.add_argument("--repeats", type=int, default=300, help="requests per latency measurement")
    ap.add_argument("--photo_size", type=int, default=512,
                    help="side of the query photo (JPEG), as an app uploads it")
    ap.add_argument("--intra_op", type=int, default=2, help="intra-op threads (all processes)")
    ap.add_argument("--inter_op", type=int, default=2, help="inter-op threads (all processes)")
    ap.add_argument("--profile_dir", default="", help="also write a TensorBoard profile of "
                    "(b) through the SavedModel here")
    ap.add_argument("--catalog_sizes", default="10000,100000,1000000",
                    help="catalog sizes of the search request's rows")
    ap.add_argument("--search_repeats", type=int, default=200,
                    help="requests per search latency measurement")
    args = ap.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.intra_op)
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)
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

    ctr_latency(args, ctr_path, enc_path)
    search_latency(args, root)
    print(f"\nexports in {root}; warmup records: "
          f"{len(common.read_warmup(enc_path))} (encoder), {len(common.read_warmup(ctr_path))} "
          "(ctr)")


def _photo(size: int) -> bytes:
    """A smooth random JPEG of size x size: a photo as an app uploads it."""
    small = np.random.default_rng(7).uniform(0, 255, [8, 8, 3]).astype(np.float32)
    image = tf.cast(tf.image.resize(small[None], [size, size])[0], tf.uint8)
    return tf.io.encode_jpeg(image, quality=90).numpy()


def _stand_in(args, name: str, version_dir: str) -> tuple[Any, client_lib.GrpcClient]:
    """The stand-in server in its own process serving `version_dir`'s model as `name`, with the
    benchmark's thread counts and no batching, and a gRPC client of it."""
    server, port, _ = stand_in_server.launch([
        f"--model={name}={os.path.dirname(version_dir)}",
        f"--tensorflow_intra_op_parallelism={args.intra_op}",
        f"--tensorflow_inter_op_parallelism={args.inter_op}",
        "--file_system_poll_wait_seconds=0"])
    return server, client_lib.GrpcClient(f"127.0.0.1:{port}", timeout=120)


def ctr_latency(args, ctr_path: str, enc_path: str) -> None:
    model = ctr_task.load_trained(args.ctr_dir)
    keras_encoder = encoder_lib.restore(ctr_task.encoder_dir(args.ctr_dir))
    spec = model.spec
    rows = export_ctr.sample_requests(spec, model.vocabularies, CANDIDATES, seed=CANDIDATES)
    for k in spec.inputs:  # one page: the request's features on every row
        if spec.scope(k) == "request":
            rows[k] = np.repeat(rows[k][:1], CANDIDATES, axis=0)
    photo = _photo(args.photo_size)
    page = client_lib.page_inputs(spec, rows, {f.name: photo for f in spec.photos})
    as_tensors = {"serving_default": {k: tf.constant(v) for k, v in rows.items()},
                  "rank": {k: tf.constant(v) for k, v in page.items()}}
    as_numpy = {"serving_default": rows, "rank": page}
    keras = export_ctr.CtrServing(model, keras_encoder)  # in process, not loaded from disk
    loaded = tf.saved_model.load(ctr_path)
    server, grpc = _stand_in(args, "ctr", ctr_path)
    try:
        print(f"\nCTR model ({ctr_path}; image features "
              f"{model.cfg.image_feature_mode if model.image_tables else 'none'}, "
              f"D {'on' if model.cfg.debias else 'off'}), one page of {CANDIDATES} candidates, "
              f"{args.repeats} requests each, {args.intra_op} intra / {args.inter_op} inter-op "
              f"threads; photo {args.photo_size}x{args.photo_size} JPEG "
              f"({len(photo) // 1024} KB):\n")
        print("| request | path | p50 ms | p99 ms |\n| --- | --- | ---: | ---: |")
        for label, sig in (("(a) ids only", "serving_default"),
                           ("(b) photo + candidates", "rank")):
            t = as_tensors[sig]
            paths: dict[str, Callable[[], Any]] = {
                "stand-in server, gRPC Predict": functools.partial(
                    grpc.predict, "ctr", sig, as_numpy[sig]),
                "SavedModel, direct call": functools.partial(_scores, loaded.signatures[sig], t),
                "Keras model, in process": functools.partial(_scores, getattr(
                    keras, "serve" if sig == "serving_default" else "rank"), t),
            }
            for name, fn in paths.items():
                ms = _latencies(fn, args.repeats)
                p50, p99 = np.percentile(ms, [50, 99])
                print(f"| {label} | {name} | {p50:.2f} | {p99:.2f} |")
        # Where (b)'s time goes: the photo through the encoder alone, the CTR model alone.
        enc = tf.saved_model.load(enc_path).signatures["encode_images"]
        parts: dict[str, Callable[[], Any]] = {
            "the photo alone (encoder SavedModel encode_images)": lambda: enc(
                images=tf.constant([photo]))["embedding"].numpy(),
            f"the CTR model alone ({CANDIDATES} rows, serving_default)": lambda: loaded.signatures[
                "serving_default"](**as_tensors["serving_default"])["ctr"].numpy(),
            "both (rank)": lambda: loaded.signatures["rank"](**as_tensors["rank"])["ctr"].numpy(),
        }
        print("\nWhere the time of (b) goes (SavedModel, direct call):\n")
        print("| part | p50 ms | p99 ms |\n| --- | ---: | ---: |")
        for name, fn in parts.items():
            ms = _latencies(fn, args.repeats)
            p50, p99 = np.percentile(ms, [50, 99])
            print(f"| {name} | {p50:.2f} | {p99:.2f} |")
        if args.profile_dir:
            tf.profiler.experimental.start(args.profile_dir)
            for _ in range(20):
                parts["both (rank)"]()
            tf.profiler.experimental.stop()
            print(f"\nprofile of 20 rank requests in {args.profile_dir} (TensorBoard, Profile)")
    finally:
        grpc.close()
        server.terminate()


def _grown_catalog(args, n: int, rng: np.random.Generator) -> tuple[str, dict]:
    """The CTR model's catalog grown to `n` items: (an embeddings.npz of it, its item features)
    — new items get random unit vectors in the real categories and a random real item's
    features and bid."""
    table = ctr_task.image_table_of(args.ctr_dir)
    config = configs.load(args.ctr_dir)
    cols = export_search.read_item_features(records.default_pattern(config.data_dir, "catalog"))
    real = len(table.item_id)
    extra = max(n - real, 0)
    keep = np.arange(min(n, real))
    new_ids = table.item_id.max() + 1 + np.arange(extra)
    vectors = rng.standard_normal([extra, table.dim]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    copies = rng.integers(0, len(cols["item_id"]), extra)
    cats = cols["category_id"][copies]
    path = os.path.join(args.search_root, f"catalog_{n}.npz")
    npz.write(path, item_id=np.concatenate([table.item_id[keep], new_ids]),
              category_id=np.concatenate([table.category_id[keep], cats]),
              embedding=np.concatenate([table.item_vector[keep], vectors]))
    features = {k: np.concatenate([v, v[copies]]) for k, v in cols.items() if k != "item_id"}
    features["item_id"] = np.concatenate([cols["item_id"], new_ids])
    return path, features


def _ecpm(signature, inputs: dict) -> np.ndarray:
    return signature(**inputs)["ecpm"].numpy()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def search_latency(args, root: str) -> None:
    """The whole visual search ad request at each catalog size (module docstring)."""
    import gc
    args.search_root = os.path.join(root, "search")
    os.makedirs(args.search_root, exist_ok=True)
    model = ctr_task.load_trained(args.ctr_dir)
    spec = model.spec
    rows = export_ctr.sample_requests(spec, model.vocabularies, 1, seed=3)
    user = {k: (v[0][v[0] != -1].tolist() if np.asarray(v).ndim > 1 else v[0].item())
            for k, v in rows.items()}
    photo = _photo(args.photo_size)
    rng = np.random.default_rng(0)
    print(f"\nThe visual search ad request (export.search, `request`): a {args.photo_size}x"
          f"{args.photo_size} JPEG -> top 100 retrieved (exact) -> ranked by the CTR model -> "
          f"top 10 by pCTR x bid; {args.search_repeats} requests each, {args.intra_op} intra / "
          f"{args.inter_op} inter-op threads; D={model.image_tables['items'].dim}:\n")
    print("| catalog items | search table MB | stand-in RSS MB | category | stand-in p50 ms | "
          "stand-in p99 ms | direct p50 ms | direct p99 ms |\n"
          "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for n in (int(x) for x in args.catalog_sizes.split(",")):
        embeddings, features = _grown_catalog(args, n, rng)
        t0 = time.perf_counter()
        path = export_search.export(args.ctr_dir, os.path.join(args.search_root, str(n)),
                                    item_embeddings=embeddings, item_features=features)
        export_s = time.perf_counter() - t0
        info = common.export_info(path)
        server, grpc = _stand_in(args, "search", path)
        loaded = tf.saved_model.load(path)
        sig = loaded.signatures["request"]
        category = int(np.bincount(features["category_id"]).argmax())
        try:
            rss = _rss_mb(server.pid)
            for label, c in (("any", -1), ("the photo's", category)):
                inputs = client_lib.request_inputs(spec, user, photo, c, 100, 10)
                tensors = {k: tf.constant(v) for k, v in inputs.items()}
                stand_in = _latencies(functools.partial(grpc.predict, "search", "request",
                                                        inputs), args.search_repeats)
                direct = _latencies(functools.partial(_ecpm, sig, tensors),
                                    args.search_repeats)
                (s50, s99), (d50, d99) = (np.percentile(x, [50, 99]) for x in (stand_in, direct))
                print(f"| {n:,} | {info['table_bytes'] / 2**20:.0f} | {rss:.0f} | {label} | "
                      f"{s50:.2f} | {s99:.2f} | {d50:.2f} | {d99:.2f} |", flush=True)
        finally:
            grpc.close()
            server.terminate()
            server.wait()
            sig = loaded = None
            gc.collect()
        print(f"(the search export of {n:,} items took {export_s:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

"""What the export and serving tests share: brief training configs, command runs, request rows
built from the tiny world's records, and the op audit of a SavedModel."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import tensorflow as tf

from conftest import REPO, read_all
from export import encoder as export_encoder
from trainer import configs
from trainer.ctr import tables as ctr_tables
from trainer.data import records, validate
from trainer.features import clusters

ENC = configs.EncoderConfig(depth=10, width_multiplier=0.5, image_size=32, feature_dim=32)
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


def run_ok(args, **kw):
    out = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
                         **kw)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def run_local_cluster(args: list, workers: int = 2, ps: int = 2, timeout: float = 900
                      ) -> tuple[str, list[str], bool]:
    """Runs the command `args` as the chief of a cluster of `workers` workers and `ps` parameter
    servers, each a local process on 127.0.0.1 told its task by TF_CONFIG. Returns the chief's
    output (it must exit 0), the servers' outputs (ps first, then the workers) and whether every
    server was still serving when the chief finished (they serve until stopped)."""
    from trainer.train import loop
    ports = loop.local_ports(1 + workers + ps)
    cluster = {"chief": [f"127.0.0.1:{ports[0]}"],
               "worker": [f"127.0.0.1:{p}" for p in ports[1:1 + workers]],
               "ps": [f"127.0.0.1:{p}" for p in ports[1 + workers:]]}

    def start(task_type: str, index: int) -> subprocess.Popen:
        env = {**ENV, "TF_CONFIG": json.dumps({"cluster": cluster,
                                               "task": {"type": task_type, "index": index}})}
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    servers = [start("ps", i) for i in range(ps)] + [start("worker", i) for i in range(workers)]
    try:
        chief = start("chief", 0)
        log, _ = chief.communicate(timeout=timeout)
        assert chief.returncode == 0, log[-5000:]
        serving = all(p.poll() is None for p in servers)
    finally:
        for p in servers:
            p.kill()
    return log, [p.communicate()[0] for p in servers], serving


def ctr_config(world: str, model_dir: str, stage: str = "ctr", **sets) -> configs.CtrStage:
    """A brief CTR run's config; `sets` are config paths with '__' for '.'."""
    cfg = configs.apply(configs.for_stage(stage), {
        "data_dir": world, "model_dir": model_dir, "train": {
            "steps": 20, "global_batch_size": 64, "warmup_steps": 0, "log_interval": 20},
        "ctr": {"tower_units": [32, 16]}})
    for path, value in sets.items():
        cfg = configs.override(cfg, path.replace("__", "."), value)
    return cfg  # type: ignore[return-value]


def show(path: str) -> str:
    return run_ok([CLI, "show", "--dir", path, "--all"])


def serialized_examples(pattern: str, n: int) -> list[bytes]:
    files = sorted(glob.glob(pattern))
    return list(tf.data.TFRecordDataset(files, validate.compression_of(files[0])).take(n)
                .as_numpy_iterator())


def png_header(height: int, width: int) -> bytes:
    """A PNG signature and IHDR declaring height x width, without image data."""
    import struct
    import zlib
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr
            + struct.pack(">I", zlib.crc32(ihdr)))


def page_rows(spec, rows: dict, n: int, start: int = 0) -> dict:
    """serving_default inputs of one page of `n` candidates from test records: the request
    features of the first record on every row, candidate features of each."""
    out = {}
    for k in spec.inputs:
        v = rows[k][start:start + n]
        if spec.is_sequence(k):
            v = np.where(rows[k + "_mask"][start:start + n], v, -1)
        if spec.scope(k) == "request":
            v = np.repeat(v[:1], n, axis=0)
        out[k] = v
    return out


def model_batch(spec, inputs: dict) -> dict:
    """The Keras model's batch (masks for the id lists) of serving_default inputs."""
    batch = {}
    for k, v in inputs.items():
        if spec.is_sequence(k):
            batch[k], batch[k + "_mask"] = tf.constant(np.maximum(v, 0)), tf.constant(v != -1)
        else:
            batch[k] = tf.constant(v)
    return batch


def table_entry(table, vectors: np.ndarray) -> np.ndarray:
    """What a trained model's image table holds for encoder vectors, computed outside the graph:
    the nearest centroid (faiss) + 1, or unit(v - centre)."""
    if isinstance(table, ctr_tables.ClusterTable):
        return clusters.Clusters(table.centroids.numpy()).assign(vectors) + 1
    if table.center is None:
        return vectors
    x = vectors - table.center
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def add_items(tiny_world: str, out_dir: str, n: int) -> tuple[np.ndarray, list[bytes]]:
    """A copy of the world's catalog plus `n` items added after training (new ids, new
    images, the other columns of existing items): (new ids, their images)."""
    files = sorted(glob.glob(records.default_pattern(tiny_world, "catalog")))
    compression = validate.compression_of(files[0])
    os.makedirs(os.path.join(out_dir, "catalog"))
    for f in files:
        shutil.copy(f, os.path.join(out_dir, "catalog"))
    ids = read_all(tiny_world, "catalog")["item_id"]
    new_ids = ids.max() + 1 + np.arange(n)
    images = export_encoder.sample_images(n, 32, seed=2027)
    path = os.path.join(out_dir, "catalog", "new-00000-of-00001.tfrecord"
                        + (".gz" if compression else ""))
    with tf.io.TFRecordWriter(path, compression or None) as w:
        for raw, item_id, image in zip(tf.data.TFRecordDataset(files[:1], compression).take(n),
                                       new_ids, images, strict=True):
            example = tf.train.Example.FromString(raw.numpy())
            example.features.feature["item_id"].int64_list.value[:] = [int(item_id)]
            example.features.feature["image"].bytes_list.value[:] = [image]
            w.write(example.SerializeToString())
    return new_ids, images


def wait_for_versions(rest_port: int, model: str, want: list[str], seconds: float = 180):
    import urllib.request
    deadline = time.time() + seconds
    while time.time() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/v1/models/{model}",
                                    timeout=30) as r:
            status = json.loads(r.read())["model_version_status"]
        if sorted(s["version"] for s in status) == sorted(want):
            return
        time.sleep(0.5)
    raise AssertionError(f"{model}: versions {status}, want {want}")


def ops_of(version_dir: str) -> set:
    """Every op of a SavedModel's graphs and functions."""
    from tensorflow.core.protobuf import saved_model_pb2
    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    ops, functions = set(), set()
    for meta in saved.meta_graphs:
        ops |= {n.op for n in meta.graph_def.node}
        for fn in meta.graph_def.library.function:
            functions.add(fn.signature.name)
            ops |= {n.op for n in fn.node_def}
    return ops - functions  # a call of a library function by name is no op of its own

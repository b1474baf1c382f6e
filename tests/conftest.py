"""Shared fixtures: a tiny synthetic world per test session, and helpers to read records."""
from __future__ import annotations

import os

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
import numpy as np
import pytest
import tensorflow as tf

# Two logical CPU devices, so distribution tests can run MirroredStrategy on one machine. This must
# happen before TensorFlow initialises its devices, i.e. at import of the test session.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

from trainer.data import pipeline, records  # noqa: E402
from trainer.synth import config, marketplace  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def mirrored() -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy over the 2 logical CPUs for the whole session: a second instance in
    the same process reuses collective instance keys and trips over the first one's shapes."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> str:
    """The `tiny` world, seed 0, compact layout (images joined from the catalog)."""
    d = str(tmp_path_factory.mktemp("tiny"))
    marketplace.generate(config.get_world("tiny"), d, seed=0)
    return d


def read_all(data_dir: str, kind: str, split: str = "*", image_size: int = 32,
             **overrides) -> dict:
    """Every record of one kind, in file order, as numpy arrays (one pass, no shuffling)."""
    cfg = pipeline.InputConfig(records.default_pattern(data_dir, kind, split), kind,
                               global_batch_size=256, image_size=image_size, shuffle=False,
                               repeat=False, drop_remainder=False, deterministic=True,
                               catalog_pattern=records.default_pattern(data_dir, "catalog"),
                               **overrides)
    pipe = pipeline.InputPipeline(cfg)
    parts: dict = {}
    with pipe.errors_named():
        for batch in pipe.dataset():
            for k, v in batch.items():
                parts.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def write_records(path: str, recs) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as w:
        for r in recs:
            w.write(r)
    return path


def raw_records(pattern: str) -> list[bytes]:
    return [r.numpy() for r in tf.data.TFRecordDataset(pipeline.list_files(pattern))]

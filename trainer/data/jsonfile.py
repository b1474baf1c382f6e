"""Small JSON files of a data set or a run (a world's manifest, a run's metrics, a catalog
embedding's manifest), read on any file system TensorFlow reads."""
from __future__ import annotations

import json

import tensorflow as tf


def read(path: str) -> dict | None:
    """The mapping a JSON file holds, or None where there is no such file (yet)."""
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)

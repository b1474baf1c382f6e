"""NumPy archives on any `tf.io.gfile` file system (local, GCS, HDFS): the vocabularies, centroids,
embedding tables and catalog parts the stages hand on.

np.savez seeks, which remote writers cannot, so the archive is built in memory; it is written
under a temporary name and renamed, so a reader (or a resumed job) sees it whole or not at all.
"""
from __future__ import annotations

import io
import os

import numpy as np
import tensorflow as tf


def write(path: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    tmp = f"{path}.tmp-{os.getpid()}"  # processes writing one cache do not share a scratch file
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(buf.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)


def read(path: str) -> dict:
    """{name: array} of an archive written by `write` (or np.savez)."""
    with tf.io.gfile.GFile(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()))
        return {k: data[k] for k in data.files}

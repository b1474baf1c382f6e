"""Evaluations: visual search (paper 000 Table 1), CTR metrics (Table 2), significance, the
projector; and the one writer and reader of a run's metrics.json."""
import json
import logging
import math
import os

import tensorflow as tf

from trainer.data import jsonfile

FILE = "metrics.json"


def write_metrics(model_dir: str, metrics: dict) -> str:
    """Writes a stage's metrics as `model_dir/metrics.json` (strict JSON: a metric that is NaN or
    infinite, e.g. an AUC over one class, is written as null and named in a warning)."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        logging.getLogger(__name__).warning("metrics %s are not finite; written as null", bad)
    clean = {k: None if k in bad else v for k, v in metrics.items()}
    tf.io.gfile.makedirs(model_dir)
    path = os.path.join(model_dir, FILE)
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(clean, f, indent=2, allow_nan=False)
    return path


def read_metrics(model_dir: str) -> dict | None:
    """A run's metrics (`model_dir/metrics.json`), or None if it has none yet."""
    return jsonfile.read(os.path.join(model_dir, FILE))

"""Numbered SavedModel versions under a model base path, as TF Serving reads them: it watches the
base path and loads the highest numeric subdirectory. The exports (`export/`) write them; the
stages that run an export (`--stage=embed`) read them.
"""
from __future__ import annotations

import os
import re

import tensorflow as tf


def versions(export_dir: str) -> list[int]:
    """The numeric version subdirectories of `export_dir`, ascending."""
    if not tf.io.gfile.isdir(export_dir):
        return []
    return sorted(int(d.rstrip("/")) for d in tf.io.gfile.listdir(export_dir)
                  if re.fullmatch(r"\d+/?", d))


def latest_version_dir(export_dir: str) -> str:
    """The highest-numbered version of an export, as TF Serving would load it."""
    found = versions(export_dir)
    if not found:
        raise FileNotFoundError(f"{export_dir} holds no numbered SavedModel version "
                                "(export one with python -m export.encoder / export.ctr)")
    return os.path.join(export_dir, str(found[-1]))


def version_dir(export: str) -> str:
    """`export` if it is a SavedModel directory (a version), else its latest version."""
    if tf.io.gfile.exists(os.path.join(export, "saved_model.pb")):
        return export
    return latest_version_dir(export)

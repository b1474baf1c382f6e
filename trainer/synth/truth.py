"""The planted truth of a synthetic world, for evaluation and tests only.

Training code must never import this module (a test enforces it): a model that reads an item's
style or a user's interests has learned nothing.
"""
from __future__ import annotations

import json
import os

import numpy as np


def _path(data_dir: str) -> str:
    return os.path.join(data_dir, "truth", "truth.json")


def exists(data_dir: str) -> bool:
    """Whether the data dir is a synthetic world with its planted truth."""
    return os.path.exists(_path(data_dir))


def load(data_dir: str) -> dict:
    """Truth as numpy arrays: items/users/queries tables plus style metadata."""
    path = _path(data_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no planted truth (not a synthetic world?)")
    with open(path) as f:
        raw = json.load(f)
    out = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    for table in ("items", "users", "queries"):
        out[table] = {k: np.asarray(v) for k, v in raw[table].items()}
    out["style_similarity"] = np.asarray(raw["style_similarity"])
    out["category_ids"] = np.asarray(raw["category_ids"])
    return out


def index_of(ids: np.ndarray, table_ids: np.ndarray) -> np.ndarray:
    """Positions of `ids` in `table_ids` (all must be present)."""
    order = np.argsort(table_ids)
    pos = np.searchsorted(table_ids, ids, sorter=order)
    pos = order[np.clip(pos, 0, len(order) - 1)]
    if not np.array_equal(table_ids[pos], ids):
        raise KeyError("some ids are not in the table")
    return pos

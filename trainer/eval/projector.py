"""A TensorBoard projector of catalog embeddings: the analogue of the papers' t-SNE figures.

Writes a sample of the catalog's embeddings with a sprite of their images and a metadata table
(item id, category, impressions and, in a synthetic world, the planted style) to `log_dir`; open it
with `tensorboard --logdir log_dir`, Projector tab, colour by category or style.

The planted style is read here, for labelling only: this module evaluates and never trains.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
from PIL import Image
from tensorboard.plugins import projector

from trainer.data import parse


def style_labels(data_dir: str | None, item_ids: np.ndarray) -> np.ndarray | None:
    """The planted style of each item in a synthetic world; None for other data."""
    from trainer.synth import truth
    if not data_dir or not truth.exists(data_dir):
        return None
    t = truth.load(data_dir)
    return t["items"]["style"][truth.index_of(item_ids, t["items"]["item_id"])]


def write(log_dir: str, catalog: dict, encoded_images: np.ndarray | None = None,
          style: np.ndarray | None = None, sample: int = 1024, seed: int = 0,
          thumb: int = 32) -> str:
    """Writes the projector files for `sample` random catalog items; returns log_dir.

    catalog: 'item_id', 'category_id', 'impressions_30d', 'embedding' arrays; encoded_images:
    the items' encoded images for the sprite (same order), or None.
    """
    n = len(catalog["item_id"])
    rows = np.sort(np.random.default_rng(seed).permutation(n)[:min(sample, n)])
    tf.io.gfile.makedirs(log_dir)
    columns = {"item_id": catalog["item_id"][rows], "category": catalog["category_id"][rows],
               "impressions_30d": catalog["impressions_30d"][rows]}
    if style is not None:
        columns["style"] = style[rows]
    with open(os.path.join(log_dir, "metadata.tsv"), "w") as f:
        f.write("\t".join(columns) + "\n")
        for i in range(len(rows)):
            f.write("\t".join(str(v[i]) for v in columns.values()) + "\n")
    ckpt = tf.train.Checkpoint(embedding=tf.Variable(catalog["embedding"][rows]))
    ckpt.save(os.path.join(log_dir, "embedding.ckpt"))
    config = projector.ProjectorConfig()
    emb = config.embeddings.add()
    emb.tensor_name = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
    emb.metadata_path = "metadata.tsv"
    if encoded_images is not None:
        _write_sprite(os.path.join(log_dir, "sprite.png"), encoded_images[rows], thumb)
        emb.sprite.image_path = "sprite.png"
        emb.sprite.single_image_dim.extend([thumb, thumb])
    projector.visualize_embeddings(log_dir, config)
    return log_dir


def _write_sprite(path: str, encoded: np.ndarray, thumb: int) -> None:
    images = parse.decode_images(tf.constant(list(encoded)), thumb).numpy()
    side = int(np.ceil(np.sqrt(len(images))))
    grid = np.ones([side * thumb, side * thumb, 3], np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, side)
        grid[r * thumb:(r + 1) * thumb, c * thumb:(c + 1) * thumb] = img
    Image.fromarray((grid * 255).astype(np.uint8)).save(path)

"""S1 augmentations (paper 000 §3.1): random crop-resize, colour jitter, random greyscale and
random flip, vectorized over the batch, on CPU.

tf-models-official's colour and crop ops (`official.vision.ops.preprocess_ops`) draw one random
factor per call, i.e. per image inside a per-image `map`; here every image of a batch gets its own
factors from one set of batched ops, which is what keeps augmentation off the critical path.
Randomness is stateless: the same seed gives the same views, whatever the threading.

Differences from SimCLR's reference (Chen et al. 2020), by design of the vectorization: the crop
box is drawn once and clipped into the image (SimCLR retries up to 10 times, then centre-crops);
the jitter runs in a fixed order (brightness, contrast, saturation, hue; SimCLR shuffles the order
per image); hue is a rotation of the YIQ chroma plane (SimCLR shifts HSV hue); and saturation, hue
and greyscale are composed into one colour matrix, clipped once.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import tensorflow as tf

from trainer.configs import AugmentConfig


# NumPy constants: a TensorFlow op at import would initialise the runtime and freeze the device
# configuration (logical devices, strategies) of whoever imports this module.
# Luma weights of tf.image.rgb_to_grayscale.
_LUMA = np.array([0.2989, 0.5870, 0.1140], np.float32)
# RGB -> YIQ; hue rotates the (I, Q) chroma plane about the luma axis.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]], np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def _colour_matrices(saturation: tf.Tensor, hue: tf.Tensor, grey: tf.Tensor) -> tf.Tensor:
    """[B, 3, 3] per-image colour matrices: saturation, then hue rotation, then greyscale.

    saturation: [B] factor (1 = unchanged); hue: [B] shift in turns; grey: [B] bool.
    """
    eye = tf.eye(3)
    luma_rows = tf.constant(np.tile(_LUMA[None, :], [3, 1]))  # every output channel = luma
    sat = saturation[:, None, None] * eye + (1.0 - saturation)[:, None, None] * luma_rows
    theta = 2.0 * math.pi * hue
    c, s = tf.cos(theta), tf.sin(theta)
    one, zero = tf.ones_like(c), tf.zeros_like(c)
    rot = tf.stack([tf.stack([one, zero, zero], -1),
                    tf.stack([zero, c, -s], -1),
                    tf.stack([zero, s, c], -1)], -2)
    hue_m = tf.constant(_YIQ_TO_RGB)[None] @ rot @ tf.constant(_RGB_TO_YIQ)[None]
    m = hue_m @ sat
    return tf.where(grey[:, None, None], luma_rows[None] @ m, m)


def augment(images: tf.Tensor, seed: tf.Tensor, cfg: Optional[AugmentConfig] = None) -> tf.Tensor:
    """One random view of each image. images: [B, H, W, 3] float in [0, 1]; seed: [2] int;
    `cfg` defaults to SimCLR's family."""
    cfg = cfg or AugmentConfig()
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=8)
    # A static batch size (drop_remainder) keeps shapes known to grappler's cost model.
    b = images.shape[0] if images.shape[0] is not None else tf.shape(images)[0]
    h, w = images.shape[1], images.shape[2]

    def uniform(i, lo, hi, shape=None):
        return tf.random.stateless_uniform(shape if shape is not None else [b], seeds[i], lo, hi)

    # Random crop resized back to the input size; a flip swaps the box's x edges, which makes
    # crop_and_resize sample the crop mirrored, so flipping costs nothing.
    area = uniform(0, cfg.crop_area[0], cfg.crop_area[1])
    ratio = tf.exp(uniform(1, math.log(cfg.crop_aspect[0]), math.log(cfg.crop_aspect[1])))
    crop_w = tf.minimum(tf.sqrt(area * ratio), 1.0)
    crop_h = tf.minimum(tf.sqrt(area / ratio), 1.0)
    y0 = uniform(2, 0.0, 1.0) * (1.0 - crop_h)
    x0 = uniform(3, 0.0, 1.0) * (1.0 - crop_w)
    flip = uniform(4, 0.0, 1.0) < cfg.flip_prob
    left, right = tf.where(flip, x0 + crop_w, x0), tf.where(flip, x0, x0 + crop_w)
    boxes = tf.stack([y0, left, y0 + crop_h, right], axis=1)
    x = tf.image.crop_and_resize(images, boxes, tf.range(b), [h, w])

    # Colour jitter with probability jitter_prob (identity factors otherwise): brightness,
    # contrast, then saturation and hue as one matrix; greyscale folds into the same matrix.
    f = tf.random.stateless_uniform([4, b], seeds[5], -1.0, 1.0)
    on = tf.cast(uniform(6, 0.0, 1.0) < cfg.jitter_prob, tf.float32)
    bright = 1.0 + on * cfg.brightness * f[0]
    contrast = 1.0 + on * cfg.contrast * f[1]
    saturation = 1.0 + on * cfg.saturation * f[2]
    hue = on * cfg.hue * f[3]
    grey = uniform(7, 0.0, 1.0) < cfg.greyscale_prob

    x = tf.clip_by_value(x * bright[:, None, None, None], 0.0, 1.0)
    mean = tf.reduce_mean(tf.tensordot(x, tf.constant(_LUMA), 1), axis=[1, 2])[:, None, None, None]
    x = tf.clip_by_value((x - mean) * contrast[:, None, None, None] + mean, 0.0, 1.0)
    m = _colour_matrices(saturation, hue, grey)
    return tf.clip_by_value(tf.einsum("bhwc,bdc->bhwd", x, m), 0.0, 1.0)


def two_views(images: tf.Tensor, seed: tf.Tensor, cfg: Optional[AugmentConfig] = None):
    """The anchor view t(i) and positive view t'(i) of Eq. 1 (paper 000), independently drawn."""
    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    return augment(images, s[0], cfg), augment(images, s[1], cfg)


def s1_views_transform(cfg: Optional[AugmentConfig] = None, image_key: str = "image"):
    """A pipeline transform adding `view_1` and `view_2` (and dropping the unaugmented image)."""
    def transform(seed, batch):
        batch = dict(batch)
        batch["view_1"], batch["view_2"] = two_views(batch.pop(image_key), seed, cfg)
        return batch
    return transform

"""S1 augmentations (paper 000 §3.1): random crop-resize, colour jitter, random greyscale and
random flip, vectorized over the batch, on CPU.

tf-models-official's colour and crop ops (`official.vision.ops.preprocess_ops`) draw one random
factor per call, i.e. per image inside a per-image `map`; here every image of a batch gets its own
factors from one set of batched ops, which is what keeps augmentation off the critical path.
Randomness is stateless: the same seed gives the same views, whatever the threading.

Differences from SimCLR's reference (Chen et al. 2020), by design of the vectorization: the crop
box is drawn once and clipped into the image (SimCLR retries up to 10 times, then centre-crops),
and the four jitter operations run in a fixed order (SimCLR shuffles the order per image).
"""
from __future__ import annotations

import dataclasses
import math

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """SimCLR's augmentation family with colour strength s (defaults: SimCLR, s = 1).

    Attributes:
      crop_area: Range of the crop's area as a fraction of the image.
      crop_aspect: Range of the crop's width / height.
      flip_prob: Probability of a horizontal flip.
      jitter_prob: Probability that colour jitter is applied to an image.
      brightness, contrast, saturation: Each factor is drawn from [1 - x, 1 + x].
      hue: Hue shift drawn from [-hue, hue] turns.
      greyscale_prob: Probability of converting an image to greyscale.
    """

    crop_area: tuple = (0.08, 1.0)
    crop_aspect: tuple = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    greyscale_prob: float = 0.2


def _grey(x: tf.Tensor) -> tf.Tensor:
    return tf.image.rgb_to_grayscale(x)  # [B, H, W, 1]


def augment(images: tf.Tensor, seed: tf.Tensor, cfg: AugmentConfig = AugmentConfig()) -> tf.Tensor:
    """One random view of each image. images: [B, H, W, 3] float in [0, 1]; seed: [2] int."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=10)
    # A static batch size (drop_remainder) keeps shapes known to grappler's cost model.
    b = images.shape[0] if images.shape[0] is not None else tf.shape(images)[0]
    h, w = images.shape[1], images.shape[2]

    def uniform(i, lo, hi, shape=None):
        return tf.random.stateless_uniform(shape if shape is not None else [b], seeds[i], lo, hi)

    # Random crop, resized back to the input size.
    area = uniform(0, cfg.crop_area[0], cfg.crop_area[1])
    log_ratio = uniform(1, math.log(cfg.crop_aspect[0]), math.log(cfg.crop_aspect[1]))
    ratio = tf.exp(log_ratio)
    crop_w = tf.minimum(tf.sqrt(area * ratio), 1.0)
    crop_h = tf.minimum(tf.sqrt(area / ratio), 1.0)
    y0 = uniform(2, 0.0, 1.0) * (1.0 - crop_h)
    x0 = uniform(3, 0.0, 1.0) * (1.0 - crop_w)
    boxes = tf.stack([y0, x0, y0 + crop_h, x0 + crop_w], axis=1)
    x = tf.image.crop_and_resize(images, boxes, tf.range(b), [h, w])

    # Horizontal flip.
    flip = uniform(4, 0.0, 1.0) < cfg.flip_prob
    x = tf.where(flip[:, None, None, None], tf.reverse(x, axis=[2]), x)

    # Colour jitter, applied to each image with probability jitter_prob.
    f = tf.random.stateless_uniform([4, b], seeds[5], -1.0, 1.0)
    jittered = x * (1.0 + cfg.brightness * f[0])[:, None, None, None]
    jittered = tf.clip_by_value(jittered, 0.0, 1.0)
    mean = tf.reduce_mean(_grey(jittered), axis=[1, 2, 3], keepdims=True)
    jittered = tf.clip_by_value((jittered - mean) * (1.0 + cfg.contrast * f[1])[:, None, None, None]
                                + mean, 0.0, 1.0)
    grey = _grey(jittered)
    jittered = tf.clip_by_value((jittered - grey) * (1.0 + cfg.saturation * f[2])[:, None, None, None]
                                + grey, 0.0, 1.0)
    hsv = tf.image.rgb_to_hsv(jittered)
    hue = tf.math.floormod(hsv[..., :1] + cfg.hue * f[3][:, None, None, None], 1.0)
    jittered = tf.clip_by_value(tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], -1)), 0.0, 1.0)
    apply = uniform(6, 0.0, 1.0) < cfg.jitter_prob
    x = tf.where(apply[:, None, None, None], jittered, x)

    # Greyscale.
    to_grey = uniform(7, 0.0, 1.0) < cfg.greyscale_prob
    x = tf.where(to_grey[:, None, None, None], tf.tile(_grey(x), [1, 1, 1, 3]), x)
    return x


def two_views(images: tf.Tensor, seed: tf.Tensor, cfg: AugmentConfig = AugmentConfig()):
    """The anchor view t(i) and positive view t'(i) of Eq. 1 (paper 000), independently drawn."""
    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    return augment(images, s[0], cfg), augment(images, s[1], cfg)


def s1_views_transform(cfg: AugmentConfig = AugmentConfig(), image_key: str = "image"):
    """A pipeline transform adding `view_1` and `view_2` (and dropping the unaugmented image)."""
    def transform(seed, batch):
        batch = dict(batch)
        batch["view_1"], batch["view_2"] = two_views(batch.pop(image_key), seed, cfg)
        return batch
    return transform

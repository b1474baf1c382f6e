"""Encoder SavedModel for TF Serving: `python -m export.encoder --model_dir=M --export_dir=E`.

Exports the encoder of a trained `pretrain`/`finetune`/`classify`/`courier` model dir (paper 000
§3.1, paper 002 §3.2: the vector v that every image feature comes from) as version N+1 of E.

Signatures (batch dimension None):
  encode_images (= serving_default): images [None] string, encoded JPEG/PNG/GIF/BMP of any size
      up to `max_image_pixels` (height x width as the header declares it, checked before
      decoding, so a small file cannot make the server allocate a huge image) -> embedding
      [None, D] float32, L2-normalised. Decoding and resizing (antialiased bilinear, as in
      training) run inside, on the CPU; a request that is not an image, or a PNG/GIF cut
      short, fails naming its index ('request:<i>').
  encode_pixels: pixels [None, S, S, 3] float32 in [0, 1] -> embedding [None, D]; another
      image size, NaN or values outside [0, 1] (0-255 pixels not scaled) fail naming the row.
An empty request (0 rows) returns 0 embeddings.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from export import common
from trainer import tracing
from trainer.data import parse
from trainer.models import encoder as encoder_lib

SIGNATURES = ("encode_images", "encode_pixels")
WARMUP_BATCH_SIZES = (1, 8, 32)
# 4096 x 4096: a phone photo (12-50 MP is downscaled by the apps) fits; an 8000 x 8000 PNG of a
# few hundred KB, which decodes to 768 MB of float32 pixels, does not.
MAX_IMAGE_PIXELS = 4096 * 4096


def request_names(n: tf.Tensor) -> tf.Tensor:
    """'request:<i>' names of a request's rows, for error messages."""
    return parse.record_names(tf.constant("request"), tf.range(tf.cast(n, tf.int64)))


class EncoderServing(tf.Module):
    """The encoder behind the two serving signatures."""

    def __init__(self, encoder: encoder_lib.Encoder, max_image_pixels: int = MAX_IMAGE_PIXELS):
        super().__init__(name="encoder_serving")
        self.encoder = encoder
        self.max_image_pixels = max_image_pixels
        size = encoder.cfg.image_size
        self.encode_images = tracing.function(self._encode_images, input_signature=[
            tf.TensorSpec([None], tf.string, name="images")])
        self.encode_pixels = tracing.function(self._encode_pixels, input_signature=[
            tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")])

    def _encode_images(self, images):
        return {"embedding": self.embed_images(images, request_names(tf.shape(images)[0]),
                                               "image")}

    def embed_images(self, images: tf.Tensor, names: tf.Tensor, feature: str) -> tf.Tensor:
        """[N] encoded images of a request -> [N, D] embeddings; a bad image fails naming its
        row (`names`) and `feature`."""
        return self.embed_parts([(images, names, feature)])[0]

    def embed_parts(self, parts: list[tuple[tf.Tensor, tf.Tensor, str]]) -> list[tf.Tensor]:
        """`embed_images` of several (images, names, feature) parts of a request, encoded as one
        batch."""
        checked = [parse.checked_images(images, names, feature, self.max_image_pixels)
                   for images, names, feature in parts]
        with tf.device("/cpu:0"):
            pixels = parse.decode_images(tf.concat(checked, 0), self.encoder.cfg.image_size)
        vectors = self.encode(pixels)
        if len(parts) == 1:
            return [vectors]
        return tf.split(vectors, tf.stack([tf.shape(c)[0] for c in checked]), num=len(parts))

    def _encode_pixels(self, pixels):
        size = self.encoder.cfg.image_size
        n = tf.shape(pixels)[0]
        names = request_names(n)
        # The element count, not the static shape (which a graph optimiser may take as given).
        shape_ok = tf.debugging.Assert(
            tf.equal(tf.size(pixels, out_type=tf.int64), tf.cast(n, tf.int64) * size * size * 3),
            [f"request: feature 'pixels': must be [N, {size}, {size}, 3]; got", tf.shape(pixels)],
            summarize=4)
        with tf.control_dependencies([shape_ok]):
            flat = tf.reshape(pixels, [n, -1])
        outside = tf.reduce_any((flat < 0.0) | (flat > 1.0), axis=1)
        extremes = tf.stack([tf.reduce_min(flat, axis=1), tf.reduce_max(flat, axis=1)], 1)
        checks = [parse.fail_if(tf.reduce_any(~tf.math.is_finite(flat), axis=1), names, "pixels",
                                "holds NaN or infinite values"),
                  parse.fail_if(outside, names, "pixels", "values must be in [0, 1] (scale 0-255 "
                                "pixels by 1/255); its min and max",
                                tf.boolean_mask(extremes, outside)[:1])]
        with tf.control_dependencies(checks):
            return self._embed(tf.reshape(flat, [n, size, size, 3]))

    def _embed(self, pixels):
        return {"embedding": self.encode(pixels)}

    def encode(self, pixels: tf.Tensor) -> tf.Tensor:
        """The encoder over [N, S, S, 3] pixels; an empty batch gives [0, D] without running it
        (oneDNN's fused convolution fails on an empty batch: "input depth must be evenly
        divisible by filter depth: 3 vs 32", on AVX-512 CPUs with TensorFlow 2.17 and again with
        2.20, through both the TF1 session loader and `tf.saved_model.load`; with
        TF_ENABLE_ONEDNN_OPTS=0 the same graph returns [0, D])."""
        return tf.cond(tf.shape(pixels)[0] > 0, lambda: self.encoder(pixels, training=False),
                       lambda: tf.zeros([0, self.encoder.cfg.feature_dim]))

    def signatures(self) -> dict:
        images = self.encode_images.get_concrete_function()
        return {"serving_default": images, "encode_images": images,
                "encode_pixels": self.encode_pixels.get_concrete_function()}


def sample_images(n: int, size: int, seed: int = 0) -> list[bytes]:
    """`n` PNG-encoded smooth random images of `size` x `size`: warmup and test requests that
    need no data set."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.uniform(0, 255, [4, 4, 3]).astype(np.float32)
        img = tf.image.resize(small[None], [size, size])[0]
        out.append(tf.io.encode_png(tf.cast(tf.clip_by_value(img, 0, 255), tf.uint8)).numpy())
    return out


def warmup_requests(image_size: int, model_name: str = "encoder") -> list:
    """`PredictRequest`s over both signatures at the warmup batch sizes."""
    requests = []
    for b in WARMUP_BATCH_SIZES:
        images = sample_images(b, image_size, seed=b)
        requests.append(common.predict_request(model_name, "encode_images",
                                               {"images": np.array(images, dtype=object)}))
        pixels = tf.io.decode_png(images[0]).numpy().astype(np.float32) / 255.0
        requests.append(common.predict_request(
            model_name, "encode_pixels", {"pixels": np.repeat(pixels[None], b, axis=0)}))
    return requests


def export(model_dir: str, export_dir: str, version: int | None = None,
           model_name: str = "encoder", max_image_pixels: int = MAX_IMAGE_PIXELS) -> str:
    """Exports the trained encoder of `model_dir`; returns the version directory."""
    if max_image_pixels < 1:
        raise ValueError(f"max_image_pixels must be at least 1, got {max_image_pixels}")
    encoder = encoder_lib.restore(model_dir)
    module = EncoderServing(encoder, max_image_pixels)
    info = {"model": "encoder", "model_dir": os.path.abspath(model_dir),
            "checkpoint": encoder_lib.resolve_checkpoint(model_dir),
            "image_size": encoder.cfg.image_size, "feature_dim": encoder.cfg.feature_dim,
            "max_image_pixels": max_image_pixels,
            "signatures": {"encode_images": "images [None] string -> embedding [None, D]",
                           "encode_pixels": "pixels [None, S, S, 3] float32 in [0, 1] -> "
                                            "embedding [None, D]"}}
    return common.save(module, module.signatures(), export_dir,
                       common.warmup_logs(warmup_requests(encoder.cfg.image_size, model_name)),
                       info, version)


if __name__ == "__main__":
    common.main(export, "the encoder", "encoder", "Trained encoder model dir (pretrain, finetune, "
                "classify or courier).", "serving_default = encode_images, encode_pixels",
                {"max_image_pixels": (MAX_IMAGE_PIXELS, "Largest image encode_images decodes "
                                      "(height x width, from its header); larger ones fail "
                                      "naming the request row.")})

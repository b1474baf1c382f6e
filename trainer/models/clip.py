"""CLIP, a Table 5 baseline of paper 002 (Radford et al., "Learning Transferable Visual Models From
Natural Language Supervision", 2021): an item's image and its title are a positive pair, every
other title (image) of the global batch a negative of the image (title).

    L = ( sum_i -log softmax_j(g(v_i, t_j) / tau)[i] + sum_j -log softmax_i(g(v_i, t_j) / tau)[j] )
        / 2N

with g the cosine of the L2-normalised image and text embeddings, over the global batch (both
sides gathered across replicas). A second copy of the same item in the batch is not a negative of
the first (`item_ids`), as in S1 and S2. tau is fixed at paper 002's tuned 0.1 (App. E);
`clip.learn_temperature` trains it as CLIP's paper does (the log of 1/tau, capped at 100).

MaskCLIP (Dong et al., "MaskCLIP: Masked Self-Distillation Advances Contrastive Language-Image
Pretraining", CVPR 2023), `clip.masked_distillation`: CLIP's loss, plus masked self-distillation
in each tower from a moving-average teacher that sees the whole input. The student sees the image
with a random `mask_ratio` of its `mask_patch`-pixel patches replaced by the mean colour; a small
decoder (two 1 x 1 convolutions) on the student's last feature map predicts the teacher's feature
map of the unmasked image at the cells whose patches are mostly masked. The text side is
symmetric: `word_mask_ratio` of the title's words replaced by a mask word, a two-layer decoder on
the student's word outputs predicting the teacher's at the masked words. Each distillation loss
is 1 - cos(prediction, target), averaged over the masked cells (words) of a row; L = L_CLIP +
distillation_weight * (L_image + L_text). The teacher starts as a copy of the student and follows
it at `teacher_momentum` after each update. MaskCLIP's paper distils ViT patch tokens; on a
ResNet the cells of the last feature map (stride 32) take their place, and a ViT backbone here
offers its class token only, a 1 x 1 map.

`--stage=clip` trains the image encoder (the same as every other stage's) with the text tower of
`trainer.models.text` on the catalog's images (a random crop, CLIP's only augmentation) and
`title`s, on S1's batch and budget. Only the image encoder is kept for the downstream features;
the text tower is checkpointed beside it. An item with an empty title pairs its image with the
text tower's vector of no words (a catalog where every title is empty is refused).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf
import tf_keras

from trainer.configs import ClipConfig, EncoderConfig, TrainConfig
from trainer.data import augment, parse, pipeline
from trainer.models import contrastive, text
from trainer.models import encoder as encoder_lib
from trainer.train import loop

_MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap: tau >= 0.01
_TITLE_PROBE = 4096  # catalog records read to check that titles are there


def clip_loss(images: tf.Tensor, texts: tf.Tensor, temperature: float | tf.Tensor,
              item_ids: tf.Tensor | None = None, valid: tf.Tensor | None = None) -> tf.Tensor:
    """This replica's share of the global mean of L. images, texts: [b, D] L2-normalised
    embeddings of the same b items in order; item_ids: [b] int64 (optional); valid: [b] bool,
    the rows that are pairs (optional: all), the others neither anchors nor candidates."""
    b = tf.shape(images)[0]
    ids = item_ids if item_ids is not None else tf.range(b, dtype=tf.int64) + tf.cast(
        contrastive.replica_offset(b), tf.int64)  # distinct rows: every other row a negative
    ok = valid if valid is not None else tf.ones([b], tf.bool)
    all_images, all_texts, all_ids, all_ok = contrastive.gather(
        (images, texts, ids, tf.cast(ok, tf.int64)))
    own = contrastive.replica_offset(b) + tf.range(b)
    # The positive column is always kept.
    candidates = (ids[:, None] != all_ids[None, :]) & (all_ok[None, :] > 0)
    image_to_text = contrastive.info_nce(images, all_texts, own, candidates, temperature)
    text_to_image = contrastive.info_nce(texts, all_images, own, candidates, temperature)
    per_row = 0.5 * (image_to_text + text_to_image)
    if valid is None:
        return contrastive.global_mean(per_row)
    pairs = tf.cast(tf.reduce_sum(all_ok), per_row.dtype)
    return tf.reduce_sum(tf.where(ok, per_row, 0.0)) / tf.maximum(pairs, 1.0)


def title_lookup(catalog_pattern: str, skip_bad_records: bool = False) -> parse.BytesStore:
    """The catalog's titles by item id (b'' for an unknown id), for records that carry item ids
    only (COURIER + CLIP's page views)."""
    require_titles(catalog_pattern, skip_bad_records)
    return pipeline.load_title_store(catalog_pattern, skip_bad_records)


def require_titles(catalog_pattern: str, skip_bad_records: bool = False) -> None:
    """Fails naming the files when the catalog's first records have no title at all."""
    for batch in pipeline.iter_columns(catalog_pattern, "catalog", ("title",),
                                       skip_bad_records, batch_size=_TITLE_PROBE):
        if not np.any(batch["title"] != b""):
            raise ValueError(f"the catalog '{catalog_pattern}' has no item titles (the first "
                             f"{len(batch['title'])} records' `title` is empty or absent); the "
                             "image-title stages need them (docs/data_format.md)")
        return


class LogitScale(tf_keras.layers.Layer):
    """log(1 / tau), CLIP's trained temperature."""

    def __init__(self, temperature: float, trainable: bool):
        super().__init__(name="logit_scale")
        self.value = self.add_weight("value", [], initializer=tf_keras.initializers.Constant(
            math.log(1.0 / temperature)), trainable=trainable)

    def temperature(self) -> tf.Tensor:
        return tf.exp(-tf.minimum(self.value, _MAX_LOGIT_SCALE))


def title_pipeline(cfg: ClipConfig, encoder_cfg: EncoderConfig, train_cfg: TrainConfig,
                   skip_bad_records: bool) -> pipeline.InputPipeline:
    """Catalog items as (augmented `image`, `title_ids`, `item_id`); for MaskCLIP also the
    student's `masked_image` with its `patch_mask` [b, g, g] and `masked_title_ids` with its
    `word_mask` [b, max_words]."""
    size = encoder_cfg.image_size
    grid = -(-size // cfg.mask_patch)

    def transform(seed, batch):
        s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
        out = {"image": augment.augment(batch["image"], s[0], cfg.augment),
               "title_ids": text.tokenize(batch["title"], cfg.text),
               "item_id": batch["item_id"]}
        if cfg.masked_distillation:
            b = tf.shape(out["image"])[0]
            patches = tf.random.stateless_uniform([b, grid, grid], s[1]) < cfg.mask_ratio
            pixels = tf.image.resize(tf.cast(patches, tf.float32)[..., None],
                                     [grid * cfg.mask_patch] * 2, method="nearest")
            pixels = pixels[:, :size, :size]
            out["masked_image"] = (out["image"] * (1.0 - pixels)
                                   + encoder_lib.MEAN_RGB * pixels)
            out["patch_mask"] = patches
            words = (tf.random.stateless_uniform(tf.shape(out["title_ids"]), s[2])
                     < cfg.word_mask_ratio) & (out["title_ids"] > 0)
            out["masked_title_ids"] = tf.where(words, tf.constant(text.mask_id(cfg.text),
                                                                  tf.int64), out["title_ids"])
            out["word_mask"] = words
        return out

    input_cfg = pipeline.InputConfig(
        cfg.catalog_pattern, "catalog", global_batch_size=train_cfg.global_batch_size,
        image_size=encoder_cfg.image_size, deterministic=train_cfg.deterministic,
        skip_bad_records=skip_bad_records, features=("item_id", "image", "title"))
    return pipeline.InputPipeline(input_cfg, transform=transform)


class ClipTask(loop.Task):
    """CLIP as a training-loop task; the text tower and tau are checkpointed beside the
    encoder."""

    name = "clip"
    metric_names: tuple[str, ...] = ("temperature",)

    def __init__(self, cfg: ClipConfig, encoder_cfg: EncoderConfig, train_cfg: TrainConfig,
                 skip_bad_records: bool = False):
        require_titles(cfg.catalog_pattern, skip_bad_records)
        self.cfg, self.encoder_cfg, self.train_cfg = cfg, encoder_cfg, train_cfg
        if cfg.masked_distillation:
            self.name = "maskclip"
            self.metric_names = ("temperature", "image_distillation", "text_distillation")
        self.pipe = title_pipeline(cfg, encoder_cfg, train_cfg, skip_bad_records)
        self.encoder: encoder_lib.Encoder | None = None
        self.text: text.TextEncoder | None = None
        self.scale: LogitScale | None = None
        self.distillation: MaskedDistillation | None = None

    def build_model(self):
        self.encoder = encoder_lib.build(self.encoder_cfg)
        self.text = text.TextEncoder(self.cfg.text, self.encoder_cfg.feature_dim)
        self.scale = LogitScale(self.cfg.temperature, self.cfg.learn_temperature)
        if self.cfg.masked_distillation:
            self.distillation = MaskedDistillation(self.encoder, self.text, self.cfg)
        return self.encoder

    def extra_checkpoint_objects(self):
        extra = {"text": self.text, "logit_scale": self.scale}
        if self.distillation is not None:
            extra["distillation"] = self.distillation
        return extra

    def after_update(self):
        if self.distillation is not None:
            assert self.encoder is not None and self.text is not None
            self.distillation.follow(self.encoder, self.text)

    def build_inputs(self, input_context=None):
        return self.seeded_dataset(input_context)

    def compute_loss(self, batch, training=True):
        assert self.encoder is not None and self.text is not None and self.scale is not None
        tau = self.scale.temperature()
        loss = clip_loss(self.encoder(batch["image"], training=training),
                         self.text(batch["title_ids"], training=training), tau,
                         batch["item_id"])
        metrics = {"temperature": tau / contrastive.num_replicas()}
        if self.distillation is not None:
            image, words = self.distillation.losses(self.encoder, self.text, batch, training)
            loss += self.cfg.distillation_weight * (image + words)
            metrics.update(image_distillation=image, text_distillation=words)
        return loss, metrics


def _masked_mean_error(prediction: tf.Tensor, target: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """This replica's share of the global mean over rows of each row's mean 1 - cos over its
    masked positions. prediction, target: [b, ..., C]; mask: [b, ...] bool."""
    cos = tf.reduce_sum(tf.math.l2_normalize(prediction, -1)
                        * tf.math.l2_normalize(tf.stop_gradient(target), -1), -1)
    m = tf.cast(mask, cos.dtype)
    axes = list(range(1, len(m.shape)))
    per_row = tf.reduce_sum((1.0 - cos) * m, axes) / tf.maximum(tf.reduce_sum(m, axes), 1.0)
    return contrastive.global_mean(per_row)


class MaskedDistillation(tf_keras.layers.Layer):
    """MaskCLIP's moving-average teacher (image encoder and text tower) and the student's two
    decoders (the module docstring)."""

    def __init__(self, student: encoder_lib.Encoder, student_text: text.TextEncoder,
                 cfg: ClipConfig):
        super().__init__(name="masked_distillation")
        self.cfg = cfg
        self.teacher = encoder_lib.Encoder(dataclasses.replace(student.cfg, init_checkpoint=""),
                                           name="teacher")
        self.teacher_text = text.TextEncoder(student_text.cfg, student.cfg.feature_dim,
                                             name="teacher_text")
        # The students' weights in order, and the teachers' in the same order: freezing a model
        # reorders its `weights` (trainable ones first), so the pairing is kept from here.
        self._order = [v.ref() for v in self.teacher.weights + self.teacher_text.weights]
        for t, s in ((self.teacher, student), (self.teacher_text, student_text)):
            t.set_weights(s.get_weights())
            t.trainable = False
        size = student.cfg.image_size
        channels = int(student.feature_map(tf.zeros([1, size, size, 3])).shape[-1])
        self.image_decoder = tf_keras.Sequential([
            tf_keras.layers.Conv2D(channels, 1, activation="gelu"),
            tf_keras.layers.Conv2D(channels, 1, dtype="float32")], name="image_decoder")
        self.image_decoder.build([None, None, None, channels])
        width = student_text.cfg.width
        self.text_decoder = tf_keras.Sequential([
            tf_keras.layers.Dense(width, activation="gelu"), tf_keras.layers.Dense(width)],
            name="text_decoder")
        self.text_decoder.build([None, None, width])

    def losses(self, student: encoder_lib.Encoder, student_text: text.TextEncoder, batch: dict,
               training: bool) -> tuple[tf.Tensor, tf.Tensor]:
        """(image, text) distillation losses: this replica's shares of their global means."""
        target = self.teacher.feature_map(batch["image"], training=False)
        h, w = target.shape[1], target.shape[2]
        # A feature cell is masked when most of the patches under it are.
        cells = tf.image.resize(tf.cast(batch["patch_mask"], tf.float32)[..., None], [h, w],
                                method="area")[..., 0] >= 0.5
        predicted = self.image_decoder(student.feature_map(batch["masked_image"],
                                                           training=training))
        image = _masked_mean_error(tf.cast(predicted, tf.float32), tf.cast(target, tf.float32),
                                   cells)
        words = _masked_mean_error(
            self.text_decoder(student_text.words(batch["masked_title_ids"], training=training)),
            self.teacher_text.words(batch["title_ids"], training=False), batch["word_mask"])
        return image, words

    def follow(self, student: encoder_lib.Encoder, student_text: text.TextEncoder) -> None:
        """One moving-average step of the teacher towards the student."""
        by_ref = {v.ref(): v for v in self.teacher.weights + self.teacher_text.weights}
        loop.moving_average([by_ref[r] for r in self._order],
                            student.weights + student_text.weights, self.cfg.teacher_momentum)

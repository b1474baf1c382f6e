"""CLIP, a Table 5 baseline of paper 002 (Radford et al., "Learning Transferable Visual Models From
Natural Language Supervision", 2021): an item's image and its title are a positive pair, every
other title (image) of the global batch a negative of the image (title).

    L = ( sum_i -log softmax_j(g(v_i, t_j) / tau)[i] + sum_j -log softmax_i(g(v_i, t_j) / tau)[j] )
        / 2N

with g the cosine of the L2-normalised image and text embeddings, over the global batch (both
sides gathered across replicas). A second copy of the same item in the batch is not a negative of
the first (`item_ids`), as in S1 and S2. CLIP learns tau (as the log of 1/tau, capped at 100);
`clip.learn_temperature` = false keeps it fixed.

`--stage=clip` trains the image encoder (the same as every other stage's) with the text tower of
`trainer.models.text` on the catalog's images (a random crop, CLIP's only augmentation) and
`title`s, on S1's batch and budget. Only the image encoder is kept for the downstream features;
the text tower is checkpointed beside it. An item with an empty title pairs its image with the
text tower's vector of no words (a catalog where every title is empty is refused).
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
import tf_keras

from trainer.configs import ClipConfig, EncoderConfig, TrainConfig
from trainer.data import augment, pipeline
from trainer.models import contrastive, text
from trainer.models import encoder as encoder_lib
from trainer.train import loop

_MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap: tau >= 0.01
_TITLE_PROBE = 4096  # catalog records read to check that titles are there


def clip_loss(images: tf.Tensor, texts: tf.Tensor, temperature: float | tf.Tensor,
              item_ids: tf.Tensor | None = None) -> tf.Tensor:
    """This replica's share of the global mean of L. images, texts: [b, D] L2-normalised
    embeddings of the same b items in order; item_ids: [b] int64 (optional)."""
    b = tf.shape(images)[0]
    ids = item_ids if item_ids is not None else tf.range(b, dtype=tf.int64) + tf.cast(
        contrastive.replica_offset(b), tf.int64)  # distinct rows: every other row a negative
    all_images, all_texts, all_ids = contrastive.gather((images, texts, ids))
    own = contrastive.replica_offset(b) + tf.range(b)
    valid = ids[:, None] != all_ids[None, :]  # the positive column is always kept
    image_to_text = contrastive.info_nce(images, all_texts, own, valid, temperature)
    text_to_image = contrastive.info_nce(texts, all_images, own, valid, temperature)
    return contrastive.global_mean(0.5 * (image_to_text + text_to_image))


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
    """Catalog items as (augmented `image`, `title_ids`, `item_id`)."""
    def transform(seed, batch):
        return {"image": augment.augment(batch["image"], seed, cfg.augment),
                "title_ids": text.tokenize(batch["title"], cfg.text),
                "item_id": batch["item_id"]}

    input_cfg = pipeline.InputConfig(
        cfg.catalog_pattern, "catalog", global_batch_size=train_cfg.global_batch_size,
        image_size=encoder_cfg.image_size, deterministic=train_cfg.deterministic,
        skip_bad_records=skip_bad_records, features=("item_id", "image", "title"))
    return pipeline.InputPipeline(input_cfg, transform=transform)


class ClipTask(loop.Task):
    """CLIP as a training-loop task; the text tower and tau are checkpointed beside the
    encoder."""

    name = "clip"
    metric_names = ("temperature",)

    def __init__(self, cfg: ClipConfig, encoder_cfg: EncoderConfig, train_cfg: TrainConfig,
                 skip_bad_records: bool = False):
        require_titles(cfg.catalog_pattern, skip_bad_records)
        self.cfg, self.encoder_cfg, self.train_cfg = cfg, encoder_cfg, train_cfg
        self.pipe = title_pipeline(cfg, encoder_cfg, train_cfg, skip_bad_records)
        self.encoder: encoder_lib.Encoder | None = None
        self.text: text.TextEncoder | None = None
        self.scale: LogitScale | None = None

    def build_model(self):
        self.encoder = encoder_lib.build(self.encoder_cfg)
        self.text = text.TextEncoder(self.cfg.text, self.encoder_cfg.feature_dim)
        self.scale = LogitScale(self.cfg.temperature, self.cfg.learn_temperature)
        return self.encoder

    def extra_checkpoint_objects(self):
        return {"text": self.text, "logit_scale": self.scale}

    def build_inputs(self, input_context=None):
        return self.seeded_dataset(input_context)

    def compute_loss(self, batch, training=True):
        assert self.encoder is not None and self.text is not None and self.scale is not None
        tau = self.scale.temperature()
        loss = clip_loss(self.encoder(batch["image"], training=training),
                         self.text(batch["title_ids"], training=training), tau,
                         batch["item_id"])
        return loss, {"temperature": tau / contrastive.num_replicas()}

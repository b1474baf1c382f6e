"""ResNet-C: the category-classifier baseline of paper 000 §4.1 (Table 1, "a ResNet50 is trained on
the item images to predict the correct category labels").

The same encoder as S1/S2 with a softmax layer on its D-dim features; the embedding used for
search is that penultimate layer, L2-normalised (the encoder's output). Trained with
cross-entropy on catalog images under crop-and-flip augmentation (no colour jitter: colour is
not a category cue here, and a classifier usually trains without it).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras

from trainer.configs import ClassifyConfig, EncoderConfig, TrainConfig
from trainer.data import augment, pipeline
from trainer.models import contrastive
from trainer.models import encoder as encoder_lib
from trainer.train import loop


class ClassifyTask(loop.Task):
    """ResNet-C as a training-loop task. The category vocabulary is the catalog's categories,
    sorted; it is recorded in config.json."""

    name = "classify"
    metric_names = ("accuracy",)

    def __init__(self, cfg: ClassifyConfig, encoder_cfg: EncoderConfig, train_cfg: TrainConfig,
                 skip_bad_records: bool = False):
        self.cfg, self.encoder_cfg, self.train_cfg = cfg, encoder_cfg, train_cfg
        cats = pipeline.read_columns(cfg.catalog_pattern, "catalog", ("category_id",),
                                     skip_bad_records)
        self.categories = np.unique(cats["category_id"]).astype(np.int64)
        input_cfg = pipeline.InputConfig(
            cfg.catalog_pattern, "catalog", global_batch_size=train_cfg.global_batch_size,
            image_size=encoder_cfg.image_size, deterministic=train_cfg.deterministic,
            skip_bad_records=skip_bad_records)
        self.pipe = pipeline.InputPipeline(input_cfg, transform=self._transform)
        self.encoder: encoder_lib.Encoder | None = None
        self.head: tf_keras.layers.Dense | None = None

    def _transform(self, seed, batch):
        label = tf.searchsorted(tf.constant(self.categories), batch["category_id"])
        return {"image": augment.augment(batch["image"], seed, self.cfg.augment),
                "label": tf.cast(label, tf.int32)}

    def build_model(self):
        self.encoder = encoder_lib.build(self.encoder_cfg)
        self.head = tf_keras.layers.Dense(len(self.categories), dtype="float32", name="classifier")
        self.head.build([None, self.encoder_cfg.feature_dim])
        return self.encoder

    def extra_checkpoint_objects(self):
        return {"head": self.head}

    def build_inputs(self, input_context=None):
        return self.seeded_dataset(input_context)

    def compute_loss(self, batch, training=True):
        assert self.encoder is not None and self.head is not None
        logits = self.head(self.encoder.features(batch["image"], training=training))
        per_example = tf_keras.losses.categorical_crossentropy(
            tf.one_hot(batch["label"], len(self.categories)), logits, from_logits=True,
            label_smoothing=self.cfg.label_smoothing)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), batch["label"]),
                          tf.float32)
        return (contrastive.global_mean(per_example),
                {"accuracy": contrastive.global_mean(correct)})

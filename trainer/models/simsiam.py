"""SimSiam, a Table 5 baseline of paper 002 (Chen & He, "Exploring Simple Siamese Representation
Learning", 2021): two augmented views, a projector z = f(x) and a predictor p = h(z), and no
negatives; the stop-gradient on the target branch is what keeps it from collapsing.

    D(p, z) = - cos(p, stopgrad(z)),    L = D(p_1, z_2) / 2 + D(p_2, z_1) / 2

averaged over the global batch. Nothing crosses replicas (there are no negatives), so each replica
contributes its local sum over the global count, as every loss of this project does.

Here f is the encoder up to its linear layer to D (its pre-normalisation output, whose L2-normalised
form is the image vector every other stage uses) and h the bottleneck MLP D -> D/4 -> D with batch
norm and ReLU in between, as SimSiam's. It trains on S1's two augmented views, batch and budget
(`--stage=simsiam`), so Table 5 compares the objectives and nothing else.
"""
from __future__ import annotations

import tensorflow as tf
import tf_keras

from trainer.configs import EncoderConfig, SimsiamConfig, TrainConfig
from trainer.models import contrastive, pretrain
from trainer.models import encoder as encoder_lib
from trainer.train import loop


def simsiam_loss(p_1: tf.Tensor, p_2: tf.Tensor, z_1: tf.Tensor, z_2: tf.Tensor) -> tf.Tensor:
    """This replica's share of the global mean of L. p_k: [b, D] predictor outputs of view k;
    z_k: [b, D] projector outputs of view k (targets, not differentiated)."""
    def d(p, z):
        return -tf.reduce_sum(tf.math.l2_normalize(p, axis=1)
                              * tf.math.l2_normalize(tf.stop_gradient(z), axis=1), axis=1)

    return contrastive.global_mean(0.5 * d(p_1, z_2) + 0.5 * d(p_2, z_1))


class SimsiamTask(loop.Task):
    """SimSiam as a training-loop task: S1's input (two views of each catalog image), the
    predictor checkpointed beside the encoder."""

    name = "simsiam"

    def __init__(self, cfg: SimsiamConfig, encoder_cfg: EncoderConfig, train_cfg: TrainConfig,
                 skip_bad_records: bool = False):
        self.cfg, self.encoder_cfg, self.train_cfg = cfg, encoder_cfg, train_cfg
        self.pipe = pretrain.views_pipeline(cfg.catalog_pattern, cfg.augment, encoder_cfg,
                                            train_cfg, skip_bad_records)
        self.encoder: encoder_lib.Encoder | None = None
        self.predictor: tf_keras.Sequential | None = None

    def build_model(self):
        self.encoder = encoder_lib.build(self.encoder_cfg)
        d = self.encoder_cfg.feature_dim
        self.predictor = tf_keras.Sequential([
            tf_keras.layers.Dense(self.cfg.predictor_units, use_bias=False),
            tf_keras.layers.BatchNormalization(synchronized=self.encoder_cfg.sync_batch_norm),
            tf_keras.layers.ReLU(),
            tf_keras.layers.Dense(d)], name="predictor")
        self.predictor.build([None, d])
        return self.encoder

    def build_inputs(self, input_context=None):
        return self.seeded_dataset(input_context)

    def extra_checkpoint_objects(self):
        return {"predictor": self.predictor}

    def compute_loss(self, batch, training=True):
        assert self.encoder is not None and self.predictor is not None
        b = tf.shape(batch["view_1"])[0]
        z = self.encoder.features(tf.concat([batch["view_1"], batch["view_2"]], axis=0),
                                  training=training)
        p = self.predictor(z, training=training)
        return simsiam_loss(p[:b], p[b:], z[:b], z[b:]), {}

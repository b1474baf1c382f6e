"""S1: self-supervised contrastive pretraining of the visual encoder (paper 000 §3.1, Eq. 1).

Each catalog image i of the global batch N gets two augmented views (random crop, colour jitter,
greyscale, flip: `trainer.data.augment`). With v the L2-normalised encoder outputs and
g = cosine similarity,

    L_S1 = - sum_{i in N} log  exp(g(v_i, v_t(i)) / tau)
                               / sum_{j in N u {t(i)}, j != i} exp(g(v_i, v_j) / tau)

Eq. 1 as printed takes one view as the anchor and "the rest of the images within the mini-batch"
as negatives. We use both views as anchors and both views of every other image as negatives, i.e.
Eq. 1 symmetrised over the two views (SimCLR's NT-Xent: 2|N| anchors, 2|N| - 2 negatives each),
and leave out j = i, whose constant term exp(1/tau) in the printed sum carries no signal. Negatives
are gathered over replicas; the loss is the mean over the 2|N| anchors of the global batch.

Temperature: Eq. 1 has none (tau = 1). With cosine logits in [-1, 1], tau = 1 bounds the softmax
so tightly that negatives barely repel (SimCLR, Chen et al. 2020, Table 5: tau = 1 is worst);
the default is SimCLR's 0.1.
"""
from __future__ import annotations

import tensorflow as tf

from trainer.configs import AugmentConfig, EncoderConfig, PretrainConfig, TrainConfig
from trainer.data import augment, pipeline
from trainer.models import contrastive
from trainer.models import encoder as encoder_lib
from trainer.train import loop


def s1_loss(view_1: tf.Tensor, view_2: tf.Tensor, temperature: float) -> tf.Tensor:
    """This replica's share of the global mean of Eq. 1 (symmetrised).

    view_1, view_2: [b, D] L2-normalised embeddings of this replica's two views.
    """
    b = tf.shape(view_1)[0]
    all_1, all_2 = contrastive.gather((view_1, view_2))
    n = tf.shape(all_1)[0]  # global batch
    candidates = tf.concat([all_1, all_2], axis=0)  # [2N]: views 1 then views 2
    anchors = tf.concat([view_1, view_2], axis=0)  # [2b]
    own = contrastive.replica_offset(b) + tf.range(b)  # global index of the local images
    self_col = tf.concat([own, own + n], axis=0)
    positive = tf.concat([own + n, own], axis=0)  # the other view of the same image
    valid = tf.logical_not(tf.one_hot(self_col, 2 * n, on_value=True, off_value=False))
    per_anchor = contrastive.info_nce(anchors, candidates, positive, valid, temperature)
    return contrastive.global_mean(per_anchor)


def views_pipeline(catalog_pattern: str, augment_cfg: AugmentConfig, encoder_cfg: EncoderConfig,
                   train_cfg: TrainConfig, skip_bad_records: bool) -> pipeline.InputPipeline:
    """Catalog images as two augmented views each (`view_1`, `view_2`): S1's input, and
    SimSiam's."""
    input_cfg = pipeline.InputConfig(
        catalog_pattern, "catalog", global_batch_size=train_cfg.global_batch_size,
        image_size=encoder_cfg.image_size, deterministic=train_cfg.deterministic,
        skip_bad_records=skip_bad_records)
    return pipeline.InputPipeline(input_cfg, transform=augment.s1_views_transform(augment_cfg))


class PretrainTask(loop.Task):
    """S1 as a training-loop task."""

    name = "pretrain"

    def __init__(self, cfg: PretrainConfig, encoder_cfg: EncoderConfig, train_cfg: TrainConfig,
                 skip_bad_records: bool = False):
        self.cfg, self.encoder_cfg, self.train_cfg = cfg, encoder_cfg, train_cfg
        self.pipe = views_pipeline(cfg.catalog_pattern, cfg.augment, encoder_cfg, train_cfg,
                                   skip_bad_records)
        self.encoder: encoder_lib.Encoder | None = None

    def build_model(self):
        self.encoder = encoder_lib.build(self.encoder_cfg)
        return self.encoder

    def build_inputs(self, input_context=None):
        return self.seeded_dataset(input_context)

    def compute_loss(self, batch, training=True):
        assert self.encoder is not None
        b = tf.shape(batch["view_1"])[0]
        # One pass over both views: batch norm sees the same statistics for both.
        v = self.encoder(tf.concat([batch["view_1"], batch["view_2"]], axis=0), training=training)
        return s1_loss(v[:b], v[b:], self.cfg.temperature), {}

"""SimSiam, a Table 5 baseline of paper 002 (Chen & He, "Exploring Simple Siamese Representation
Learning", 2021): two augmented views, a projector z = f(x) and a predictor p = h(z), and no
negatives; the stop-gradient on the target branch is what keeps it from collapsing.

    D(p, z) = - cos(p, stopgrad(z)),    L = D(p_1, z_2) / 2 + D(p_2, z_1) / 2

averaged over the global batch. Nothing crosses replicas (there are no negatives), so each replica
contributes its local sum over the global count, as every loss of this project does.

This module holds the loss; the training stage that uses it on S1's augmentations comes with
paper 002's Table 5 (issue 21).
"""
from __future__ import annotations

import tensorflow as tf

from trainer.models import contrastive


def simsiam_loss(p_1: tf.Tensor, p_2: tf.Tensor, z_1: tf.Tensor, z_2: tf.Tensor) -> tf.Tensor:
    """This replica's share of the global mean of L. p_k: [b, D] predictor outputs of view k;
    z_k: [b, D] projector outputs of view k (targets, not differentiated)."""
    def d(p, z):
        return -tf.reduce_sum(tf.math.l2_normalize(p, axis=1)
                              * tf.math.l2_normalize(tf.stop_gradient(z), axis=1), axis=1)

    return contrastive.global_mean(0.5 * d(p_1, z_2) + 0.5 * d(p_2, z_1))

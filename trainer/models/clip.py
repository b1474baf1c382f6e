"""CLIP, a Table 5 baseline of paper 002 (Radford et al., "Learning Transferable Visual Models From
Natural Language Supervision", 2021): an item's image and its title are a positive pair, every
other title (image) of the global batch a negative of the image (title).

    L = ( sum_i -log softmax_j(g(v_i, t_j) / tau)[i] + sum_j -log softmax_i(g(v_i, t_j) / tau)[j] )
        / 2N

with g the cosine of the L2-normalised image and text embeddings, over the global batch (both
sides gathered across replicas). A second copy of the same item in the batch is not a negative of
the first (`item_ids`), as in S1 and S2. CLIP learns tau; here it is the caller's (a fixed value,
or a trained variable passed in).

This module holds the loss; the text tower and the training stage come with paper 002's Table 5
(issue 21).
"""
from __future__ import annotations

import tensorflow as tf

from trainer.models import contrastive


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

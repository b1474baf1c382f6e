"""The text tower of the image-title stages (CLIP, paper 002 Table 5; COURIER + CLIP, Table 8).

A title becomes words (TF-Text: Unicode case folding, punctuation to spaces, whitespace
tokenisation) hashed into `hash_buckets` buckets, so no vocabulary has to be built over a catalog
of hundreds of millions of items or shipped with a model; 0 pads. The tower embeds them, adds
position embeddings, runs `layers` pre-norm Transformer blocks (tf-models-official's
`TransformerEncoderBlock`) over the words, mean-pools the words and maps to D, L2-normalised like
the image encoder's vectors. Tokenising runs in the input pipeline (`tokenize`), on the host CPU.

CLIP's own text tower is a 12-layer Transformer over BPE tokens of free text; titles here are a
handful of words, and two small layers are enough to relate them.
"""
from __future__ import annotations

import dataclasses

import tensorflow as tf
import tensorflow_text as tf_text
import tf_keras
from official.nlp.modeling import layers as nlp_layers

from trainer.configs import TextConfig

_TOKENIZER = tf_text.WhitespaceTokenizer()


def tokenize(titles: tf.Tensor, cfg: TextConfig) -> tf.Tensor:
    """[b] UTF-8 titles -> [b, max_words] int64 word buckets in 1..hash_buckets, 0 padding (the
    first `max_words` words of each title)."""
    text = tf.strings.regex_replace(tf_text.case_fold_utf8(titles), r"[[:punct:]]+", " ")
    ids = tf.strings.to_hash_bucket_fast(_TOKENIZER.tokenize(text), cfg.hash_buckets) + 1
    return ids.to_tensor(default_value=0, shape=[None, cfg.max_words])


def mask_id(cfg: TextConfig) -> int:
    """The id of a masked word (MaskCLIP's student input)."""
    return cfg.hash_buckets + 1


class TextEncoder(tf_keras.Model):
    """t = normalize(W mean_words(Transformer(E[ids] + P))). `words` gives the per-word outputs
    (MaskCLIP's targets); `call` the title's vector."""

    def __init__(self, cfg: TextConfig, feature_dim: int, name: str = "text_encoder"):
        super().__init__(name=name)
        self.cfg = cfg
        # Rows: padding (0), the buckets, and MaskCLIP's masked word (`mask_id`).
        self.embedding = tf_keras.layers.Embedding(cfg.hash_buckets + 2, cfg.width,
                                                   name="words")
        self.position = tf_keras.layers.Embedding(cfg.max_words, cfg.width, name="positions")
        self.blocks = [nlp_layers.TransformerEncoderBlock(
            num_attention_heads=cfg.heads, inner_dim=4 * cfg.width, inner_activation="gelu",
            norm_first=True, name=f"block_{i}") for i in range(cfg.layers)]
        self.norm = tf_keras.layers.LayerNormalization(epsilon=1e-6, name="norm")
        self.projection = tf_keras.layers.Dense(feature_dim, dtype="float32", name="projection")
        self(tf.zeros([1, cfg.max_words], tf.int64))  # builds every variable now

    def words(self, ids: tf.Tensor, training: bool = False) -> tf.Tensor:
        """[b, max_words, width] outputs of the words of ids [b, max_words] (padding included)."""
        x = self.embedding(ids) + self.position(tf.range(self.cfg.max_words))[None]
        keys = tf.cast(ids > 0, x.dtype)[:, None, :]  # attend to words, never to padding
        mask = tf.tile(keys, [1, self.cfg.max_words, 1])
        for block in self.blocks:
            x = block([x, mask], training=training)
        return self.norm(x)

    def get_config(self) -> dict:
        """The text tower's config tree (SavedModels record it as metadata)."""
        return {"cfg": dataclasses.asdict(self.cfg)}

    def call(self, ids: tf.Tensor, training: bool = False) -> tf.Tensor:
        x = self.words(ids, training=training)
        present = tf.cast(ids > 0, x.dtype)[:, :, None]
        pooled = tf.reduce_sum(x * present, 1) / tf.maximum(tf.reduce_sum(present, 1), 1.0)
        return tf.math.l2_normalize(self.projection(pooled), axis=-1)

"""The visual encoder of paper 000 §3.1 (and the image tower of paper 002 §3.2).

image [B, S, S, 3] in [0, 1] -> normalise -> backbone -> global average pool -> linear to D
(paper: 512) -> L2 normalise -> v [B, D].

The backbone is the config's: ResNet (tf-models-official; the papers'), a Vision Transformer
(tf-models-official; its class token, as ViT classifies) or VGG-16 (Keras applications, random
initialisation), the last two for paper 000 Table 2's competitors. All take the same standardised
input, since none starts from published weights.

S1, S2, ResNet-C and COURIER all train this one model, so an S1 checkpoint warm-starts S2 and a
trained encoder exports as is. The final layer and the normalisation run in float32 under mixed
precision, so embeddings are float32 whatever the compute dtype.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os

import numpy as np
import tensorflow as tf
import tf_keras
from official.vision.modeling.backbones import resnet, vit, vit_specs

from trainer import configs, tracing
from trainer.configs import EncoderConfig

log = logging.getLogger(__name__)

# Per-channel statistics the inputs are standardised with (ImageNet's, as tf-models-official uses).
MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32)
STDDEV_RGB = np.array([0.229, 0.224, 0.225], np.float32)


def set_precision_policy(mixed_precision: str) -> None:
    """Sets tf_keras' global dtype policy; call before building models."""
    policies = {"none": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
    if mixed_precision not in policies:
        raise ValueError(f"mixed_precision must be one of {sorted(policies)}, got "
                         f"'{mixed_precision}'")
    tf_keras.mixed_precision.set_global_policy(policies[mixed_precision])


class Encoder(tf_keras.Model):
    """v = normalize(W pool(ResNet(x))). `call` gives v; `features` gives the pre-norm W pool(.);
    `feature_map` the backbone's map before pooling."""

    def __init__(self, cfg: EncoderConfig, name: str = "encoder"):
        super().__init__(name=name)
        if cfg.image_size < 1:
            raise ValueError(f"the encoder's image_size is {cfg.image_size}: set it, or let a "
                             "stage take it from the data")
        self.cfg = cfg
        size = cfg.image_size
        self.backbone = _backbone(cfg)
        self.pool = tf_keras.layers.GlobalAveragePooling2D()
        self.projection = tf_keras.layers.Dense(cfg.feature_dim, dtype="float32",
                                                name="projection")
        if cfg.gradient_checkpointing:
            if cfg.backbone != "resnet":
                raise ValueError("gradient_checkpointing segments the ResNet backbone at its "
                                 f"block groups; the '{cfg.backbone}' backbone has none")
            _block_groups(self.backbone)  # fails early on a backbone it cannot segment
            _momentum_for_recompute(self.backbone)
        self.build([None, size, size, 3])

    def feature_map(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        """The backbone's last feature map [B, h, w, C] (`_top`)."""
        x = (tf.cast(images, tf.float32) - MEAN_RGB) / STDDEV_RGB
        x = tf.cast(x, self.compute_dtype)
        if self.cfg.gradient_checkpointing and training:
            # Segments are found at trace time, not kept: Keras would track them as layers.
            for segment in _block_groups(self.backbone):
                x = tf.recompute_grad(functools.partial(_apply, segment, training=True))(x)
            return x
        return _top(self.backbone(x, training=training))

    def features(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        return self.projection(self.pool(self.feature_map(images, training=training)))

    def get_config(self) -> dict:
        """The encoder's config tree: what builds it (SavedModels record it as metadata)."""
        return {"cfg": dataclasses.asdict(self.cfg)}

    def call(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        return tf.math.l2_normalize(self.features(images, training=training), axis=-1)


def _backbone(cfg: EncoderConfig) -> tf_keras.Model:
    """The config's backbone for [B, S, S, 3] standardised images."""
    size = cfg.image_size
    spec = tf_keras.layers.InputSpec(shape=[None, size, size, 3])
    if cfg.backbone == "resnet":
        return resnet.ResNet(cfg.depth, input_specs=spec, depth_multiplier=cfg.width_multiplier,
                             use_sync_bn=cfg.sync_batch_norm,
                             norm_momentum=cfg.batch_norm_momentum)
    if cfg.backbone == "vit":
        if cfg.vit_model not in vit_specs.VIT_SPECS:
            raise ValueError(f"encoder.vit_model '{cfg.vit_model}' is not one of "
                             f"{sorted(vit_specs.VIT_SPECS)}")
        arch = vit_specs.VIT_SPECS[cfg.vit_model]
        patch = cfg.vit_patch_size or arch["patch_size"]
        if size % patch:
            raise ValueError(f"the ViT's patch side {patch} does not divide the image side "
                             f"{size}: set encoder.vit_patch_size")
        # No dropout: the contrastive stages regularise by augmentation, as SimCLR does.
        blocks = arch["transformer"]
        return vit.VisionTransformer(
            mlp_dim=blocks["mlp_dim"], num_heads=blocks["num_heads"],
            num_layers=cfg.vit_layers or blocks["num_layers"], hidden_size=arch["hidden_size"],
            patch_size=patch, input_specs=spec, pooler="token", dropout_rate=0.0,
            attention_dropout_rate=0.0)
    if cfg.backbone == "vgg16":
        if size < 32:
            raise ValueError(f"VGG-16 needs images of at least 32 pixels, got {size}")
        return tf_keras.applications.VGG16(include_top=False, weights=None,
                                           input_shape=(size, size, 3))
    raise ValueError(f"unknown encoder.backbone '{cfg.backbone}'")


def _top(outputs) -> tf.Tensor:
    """The backbone's last feature map [B, h, w, C]: ResNet's deepest endpoint, ViT's class token
    as a 1 x 1 map, VGG's last pooling."""
    if isinstance(outputs, dict):
        if "pre_logits" in outputs:
            return outputs["pre_logits"]
        return outputs[max(outputs, key=int)]
    return outputs


def _apply(layers: list, x: tf.Tensor, training: bool) -> tf.Tensor:
    for layer in layers:
        x = layer(x, training=training)
    return x


def _block_groups(backbone: tf_keras.Model) -> list[list]:
    """The backbone's layers as consecutive segments, each ending at a block group's output (the
    tf-models-official ResNet endpoints), so that recomputing a segment needs only its input."""
    layers = [layer for layer in backbone.layers
              if not isinstance(layer, tf_keras.layers.InputLayer)]
    prev = backbone.layers[0]
    for layer in layers:  # each layer must take exactly the previous one's output
        inbound = [x for node in layer._inbound_nodes for x in tf.nest.flatten(node.inbound_layers)]
        if inbound != [prev]:
            raise ValueError(f"gradient_checkpointing needs a sequential backbone; layer "
                             f"'{layer.name}' takes {[x.name for x in inbound]}")
        prev = layer
    ends = {t._keras_history.layer.name for t in backbone.outputs}
    segments, current = [], []
    for layer in layers:
        current.append(layer)
        if layer.name in ends:
            segments.append(current)
            current = []
    if current:
        raise ValueError(f"layers after the last endpoint: {[x.name for x in current]}")
    return segments


def _momentum_for_recompute(backbone: tf_keras.Model) -> None:
    """A recomputed segment runs its batch norms' moving-average updates a second time with the
    same batch statistics; momentum sqrt(m) twice is one update by m, so the statistics stay
    exact."""
    for layer in backbone._flatten_layers():
        if isinstance(layer, tf_keras.layers.BatchNormalization):
            layer.momentum = float(np.sqrt(layer.momentum))


def build(cfg: EncoderConfig) -> Encoder:
    """The encoder, warm-started from `cfg.init_checkpoint` if set (`warm_start`)."""
    encoder = Encoder(cfg)
    if cfg.init_checkpoint:
        warm_start(encoder, cfg.init_checkpoint)
    return encoder


def resolve_checkpoint(path: str) -> str:
    """A checkpoint file prefix from a prefix, a checkpoint directory or a model dir."""
    for d in (path, os.path.join(path, "ckpt")):
        if tf.io.gfile.isdir(d):
            latest = tf.train.latest_checkpoint(d)
            if latest:
                return latest
    if tf.io.gfile.exists(path + ".index"):
        return path
    raise FileNotFoundError(f"no checkpoint at '{path}' (expected a checkpoint prefix, or a "
                            "directory containing one, e.g. a model dir's ckpt/)")


def warm_start(encoder: Encoder, path: str) -> str:
    """Restores the checkpoint's encoder into `encoder`: the backbone and the linear layer to D
    (`init_scope='encoder'`: paper 000's S1 -> S2 fine-tunes the whole pretrained encoder), or
    the backbone alone (`'backbone'`: a new linear layer, as COURIER starts). Checks that every
    restored variable was found with its shape; a checkpoint that holds a bare `backbone` object
    (a user's own) warm-starts the backbone whatever the scope. Returns the checkpoint read."""
    prefix = resolve_checkpoint(path)
    source_cfg = _saved_encoder_config(path)
    if source_cfg is not None:
        mine, theirs = encoder.cfg.architecture(), source_cfg.architecture()
        if mine != theirs:
            raise ValueError(f"init checkpoint {prefix} is a backbone with {theirs}, this encoder "
                             f"has {mine}")
    keys = {name for name, _ in tf.train.list_variables(prefix)}
    whole = encoder.cfg.init_scope == "encoder"
    parts = {"backbone": encoder.backbone}
    # This project's checkpoints hold the encoder as `model`; a bare backbone checkpoint is
    # accepted too.
    if any(k.startswith("model/backbone/") for k in keys):
        if whole:
            parts["projection"] = encoder.projection
        ckpt = tf.train.Checkpoint(model=tf.train.Checkpoint(**parts))
    elif any(k.startswith("backbone/") for k in keys):
        ckpt = tf.train.Checkpoint(**parts)
        whole = False
    else:
        raise ValueError(f"checkpoint {prefix} has no 'backbone' or 'model/backbone' object")
    try:  # a variable of another shape fails the read, a missing one the assertion
        status = ckpt.read(prefix)
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError) as e:
        raise ValueError(f"init checkpoint {prefix} does not match this encoder "
                         f"({encoder.cfg.architecture()}, D {encoder.cfg.feature_dim}): "
                         f"{str(e)[:500]}") from e
    status.expect_partial()
    log.info("%s initialised from %s", "encoder" if whole else "backbone", prefix)
    return prefix


def _saved_encoder_config(path: str) -> EncoderConfig | None:
    """The encoder config a model dir of this project recorded, if `path` (a model dir, its ckpt/
    or a checkpoint prefix in it) is one."""
    for d in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        if d and configs.exists(d):
            return getattr(configs.load(d), "encoder", None)
    return None


def restore(model_dir: str, cfg: EncoderConfig | None = None) -> Encoder:
    """The encoder of a trained model dir (architecture from its config.json unless `cfg`),
    weights from its latest checkpoint."""
    if cfg is None:
        saved = _saved_encoder_config(model_dir)
        if saved is None:
            raise FileNotFoundError(f"{model_dir} has no config.json with an encoder config")
        cfg = dataclasses.replace(saved, init_checkpoint="", sync_batch_norm=False,
                                  gradient_checkpointing=False)
    encoder = Encoder(cfg)
    prefix = resolve_checkpoint(model_dir)
    status = tf.train.Checkpoint(model=encoder).read(prefix)
    status.expect_partial()
    status.assert_existing_objects_matched()
    log.info("encoder restored from %s", prefix)
    return encoder


def embed(encoder: Encoder, images: tf.data.Dataset) -> np.ndarray:
    """Embeddings of a dataset of image batches, in order: [N, D] float32."""
    size = encoder.cfg.image_size
    fn = tracing.function(lambda x: encoder(x, training=False),
                     input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    out = [fn(batch).numpy() for batch in images]
    return np.concatenate(out) if out else np.zeros([0, encoder.cfg.feature_dim], np.float32)

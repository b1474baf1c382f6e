"""The ViT and VGG-16 backbones through the encoder stages on the tiny world: classify,
pretrain, finetune from an init checkpoint and courier each train a step; the encoder restores
from its model dir, warm-starts another, exports for TF Serving with outputs equal to the Keras
model, embeds the catalog; a checkpoint of another architecture is refused."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from export import encoder as export_encoder
from trainer import configs, registry
from trainer.data import records
from trainer.features import embeddings
from trainer.models import encoder
from trainer.stages import common

BACKBONES = {
    "resnet": configs.EncoderConfig(backbone="resnet", depth=10, width_multiplier=0.25,
                                    image_size=32, feature_dim=16),
    # 32-pixel images in 16-pixel patches: 4 tokens and the class token; 2 of 12 layers.
    "vit": configs.EncoderConfig(backbone="vit", vit_model="vit-ti16", vit_layers=2,
                                 image_size=32, feature_dim=16),
    "vgg16": configs.EncoderConfig(backbone="vgg16", image_size=32, feature_dim=16),
}
TRAIN = configs.TrainConfig(steps=1, global_batch_size=8, warmup_steps=0, log_interval=1)


def _stage(cls, world, model_dir, enc, **kw):
    registry.run(cls(data_dir=world, model_dir=model_dir, encoder=enc,
                                    train=TRAIN, **kw))


def _equal(a: encoder.Encoder, b: encoder.Encoder, part: str = "") -> None:
    wa = getattr(a, part).weights if part else a.weights
    wb = getattr(b, part).weights if part else b.weights
    assert len(wa) == len(wb) and wa
    for x, y in zip(wa, wb, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


# ResNet goes through the same steps in test_visual_stages and test_export.
@pytest.mark.parametrize("name", ["vgg16", "vit"])
def test_backbone_trains_restores_exports_and_refuses_another(name, tiny_world, tmp_path):
    enc = BACKBONES[name]
    c_dir, s1_dir = str(tmp_path / "c"), str(tmp_path / "s1")
    _stage(configs.ClassifyStage, tiny_world, c_dir, enc)
    _stage(configs.PretrainStage, tiny_world, s1_dir, enc)
    assert configs.load(c_dir).encoder.architecture() == enc.architecture()
    classifier = encoder.restore(c_dir)
    # S1 -> S2 restores the whole encoder; COURIER the backbone under a new linear layer to D.
    _stage(configs.FinetuneStage, tiny_world, str(tmp_path / "s1s2"),
           dataclasses.replace(enc, init_checkpoint=s1_dir),
           finetune=configs.FinetuneConfig(pool_size=8))
    _stage(configs.CourierStage, tiny_world, str(tmp_path / "courier"),
           dataclasses.replace(enc, init_checkpoint=s1_dir, init_scope="backbone"))
    warm = encoder.build(dataclasses.replace(enc, init_checkpoint=c_dir))
    _equal(warm, classifier)
    backbone_only = encoder.build(dataclasses.replace(enc, init_checkpoint=c_dir,
                                                      init_scope="backbone"))
    _equal(backbone_only, classifier, "backbone")
    assert not np.allclose(backbone_only.projection.kernel.numpy(),
                           classifier.projection.kernel.numpy())

    # Export: the SavedModel's embeddings are the Keras encoder's.
    version = export_encoder.export(c_dir, str(tmp_path / "export"))
    served = tf.saved_model.load(version).signatures["encode_pixels"]
    pixels = tf.random.stateless_uniform([3, 32, 32, 3], seed=[1, 2])
    out = next(iter(served(pixels=pixels).values())).numpy()
    np.testing.assert_allclose(out, classifier(pixels).numpy(), atol=1e-5)
    table = embeddings.for_encoder(c_dir, records.default_pattern(tiny_world, "catalog"), None)
    assert table.item_vector.shape[1] == enc.feature_dim
    np.testing.assert_allclose(np.linalg.norm(table.item_vector, axis=1), 1, atol=1e-4)

    # Any other backbone refuses this model dir, as an init checkpoint and on resume.
    for other_name, other in BACKBONES.items():
        if other_name == name:
            continue
        with pytest.raises(ValueError, match="backbone"):
            encoder.build(dataclasses.replace(other, init_checkpoint=c_dir))
        with pytest.raises(common.UsageError, match="another encoder"):
            _stage(configs.ClassifyStage, tiny_world, c_dir, other)
    # A user's bare backbone checkpoint of another architecture fails on its variables.
    other = BACKBONES["vgg16" if name != "vgg16" else "vit"]
    prefix = tf.train.Checkpoint(backbone=encoder.Encoder(other).backbone).write(
        str(tmp_path / "user" / "bb"))
    with pytest.raises(ValueError, match="does not match this encoder"):
        encoder.build(dataclasses.replace(enc, init_checkpoint=prefix))


def test_vit_patch_must_divide_the_image():
    with pytest.raises(ValueError, match="patch side 16 does not divide the image side 40"):
        encoder.Encoder(dataclasses.replace(BACKBONES["vit"], image_size=40))
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        encoder.Encoder(dataclasses.replace(BACKBONES["vgg16"], gradient_checkpointing=True))

"""Supervised, a paper 002 Table 5 baseline (§4.2.3: "train a CTR model with click labels and image
backbone network end-to-end. We use the trained image network to extract embeddings as other
compared methods").

The CTR model is this project's (`CtrModel`: the feature spec's ids, numbers and sequences, the
same tower) without table-driven image features; the displayed item's image, joined from the
catalog by item id, goes through the image encoder and its L2-normalised vector v_p joins the
tower's input. Click cross-entropy trains both together. The encoder is the model dir's `model`
(so `encoder.restore`, `eval_search` and the CTR stages' `images.model_dir` take it like any
other encoder's); the CTR model is checkpointed beside it.

Only the displayed item's image is encoded end to end: a click history of 20 images would
multiply the encoder's cost per sample by 21, and paper 002 does not say its Supervised CTR model
has more than the item's image.
"""
from __future__ import annotations

import dataclasses

import tensorflow as tf

from trainer.configs import CtrConfig, EncoderConfig, TrainConfig
from trainer.ctr import spec as ctr_spec
from trainer.ctr.model import CtrModel
from trainer.ctr.tables import Vocabularies
from trainer.data import pipeline, schema
from trainer.models import encoder as encoder_lib
from trainer.train import loop

IMAGE = "item_image"  # the displayed item's image, a feature added to the spec's records
VECTOR = "item_image:vector"  # the batch key of v_p


class ImageCtrModel(CtrModel):
    """The CTR model whose tower also takes the batch's `VECTOR`."""

    def __init__(self, cfg: CtrConfig, spec: ctr_spec.CtrSpec, vocabularies: Vocabularies,
                 feature_dim: int):
        super().__init__(cfg, spec, vocabularies)
        self.feature_dim = feature_dim

    def extra_inputs(self, batch: dict) -> list[tf.Tensor]:
        return [batch[VECTOR]]

    def extra_batch(self, batch: dict) -> dict:
        return {**batch, VECTOR: tf.zeros([1, self.feature_dim])}


class SupervisedTask(loop.Task):
    """The end-to-end CTR model as a training-loop task; its `model` is the image encoder."""

    name = "supervised"
    metric_names = ("pred_loss",)

    def __init__(self, cfg: CtrConfig, spec: ctr_spec.CtrSpec, vocabularies: Vocabularies,
                 catalog_pattern: str, encoder_cfg: EncoderConfig, train_cfg: TrainConfig,
                 skip_bad_records: bool = False):
        self.cfg, self.spec, self.vocabularies = cfg, spec, vocabularies
        self.encoder_cfg = encoder_cfg
        # The spec's records with the displayed item's image, joined from the catalog by the
        # parser (as S2's clicked image) when the record does not carry it.
        base = spec.record_kind()
        kind = dataclasses.replace(base, features=[*base.features, schema.FeatureSpec(
            IMAGE, schema.BYTES, f"The image of `{spec.item}`; joined from the catalog when "
            "absent.", image=True, required=False, default=b"")],
            joinable_images={**base.joinable_images, IMAGE: spec.item})
        self.pipe = pipeline.InputPipeline(pipeline.InputConfig(
            cfg.train_pattern, kind, global_batch_size=train_cfg.global_batch_size,
            image_size=encoder_cfg.image_size, catalog_pattern=catalog_pattern,
            deterministic=train_cfg.deterministic, skip_bad_records=skip_bad_records))
        self.encoder: encoder_lib.Encoder | None = None
        self.ctr: ImageCtrModel | None = None

    def build_model(self):
        self.encoder = encoder_lib.build(self.encoder_cfg)
        self.ctr = ImageCtrModel(self.cfg, self.spec, self.vocabularies,
                                 self.encoder_cfg.feature_dim).build_variables()
        return self.encoder

    def extra_checkpoint_objects(self):
        return {"ctr": self.ctr}

    def build_inputs(self, input_context=None):
        return self.seeded_dataset(input_context)

    def compute_loss(self, batch, training=True):
        assert self.encoder is not None and self.ctr is not None
        batch = dict(batch)
        batch[VECTOR] = self.encoder(batch.pop(IMAGE), training=training)
        out = self.ctr.losses_of(batch, training)
        return out.pop("loss"), out


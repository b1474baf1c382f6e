"""The encoder stages: `pretrain` (S1), `finetune` (S2, S1+S2), `classify` (ResNet-C), `courier`
(COURIER) and paper 002 Table 5's baselines `simsiam`, `clip` and `supervised` train the visual
encoder into a model dir; `eval_search` measures one (paper 000 Table 1).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras

from trainer import configs
from trainer.ctr import spec as ctr_spec
from trainer.ctr import supervised
from trainer.ctr import task as ctr_task
from trainer.data import pipeline
from trainer.eval import projector, visual_search, write_metrics
from trainer.features import embeddings
from trainer.models import classify, clip, courier, encoder, finetune, pretrain, simsiam
from trainer.stages import common
from trainer.train import loop

# An encoder stage's task: (the stage's tree with its input patterns filled in, the task).
TaskOf = Callable[[Any, configs.EncoderConfig, str], tuple[Any, loop.Task]]


@common.releases_lock
def _train(cfg: configs.EncoderStage, task_of: TaskOf) -> None:
    """Trains the encoder of an encoder stage into model_dir; `task_of(cfg, encoder config,
    catalog pattern)` builds the stage's task."""
    cfg, strategy = common.training(cfg)  # first: the strategy
    enc = common.encoder_config(cfg)
    encoder.set_precision_policy(enc.mixed_precision)
    catalog = common.pattern(cfg, getattr(cfg, cfg.stage).catalog_pattern, "catalog")
    cfg, task = task_of(cfg, enc, catalog)
    cfg = dataclasses.replace(cfg, encoder=enc)
    common.start(cfg, strategy)
    t0 = time.time()
    last = loop.run(task, cfg.train, cfg.model_dir, strategy, cfg.seed)
    print(f"{cfg.stage}: trained to step {cfg.train.steps} in {cfg.model_dir} "
          f"({time.time() - t0:.0f}s); last: " + ", ".join(f"{k}={v:.4g}" for k, v in last.items()))


def _task(task_class: Callable[..., loop.Task], **inputs: tuple[str, str]) -> TaskOf:
    """`task_class(section, encoder, train, skip_bad_records)` on the stage's own section (named
    after the stage), its catalog pattern filled in and each of `inputs` (a pattern field ->
    (record kind, split)) too, where unset: the data dir's files of that kind."""
    def task_of(cfg, enc, catalog):
        section = getattr(cfg, cfg.stage)
        section = dataclasses.replace(section, catalog_pattern=catalog, **{
            field: common.pattern(cfg, getattr(section, field), kind, split)
            for field, (kind, split) in inputs.items()})
        cfg = dataclasses.replace(cfg, **{cfg.stage: section})
        return cfg, task_class(section, enc, cfg.train, cfg.skip_bad_records)
    return task_of


def run_pretrain(cfg: configs.PretrainStage) -> None:
    """S1 (paper 000 Eq. 1)."""
    _train(cfg, _task(pretrain.PretrainTask))


def run_simsiam(cfg: configs.SimsiamStage) -> None:
    """SimSiam on S1's views (paper 002 Table 5)."""
    _train(cfg, _task(simsiam.SimsiamTask))


def run_clip(cfg: configs.ClipStage) -> None:
    """CLIP and MaskCLIP on catalog images and titles (paper 002 Table 5)."""
    _train(cfg, _task(clip.ClipTask))


def run_supervised(cfg: configs.SupervisedStage) -> None:
    """The encoder trained inside the CTR model on clicks (paper 002 Table 5)."""
    def task_of(cfg, enc, catalog):
        cfg = dataclasses.replace(
            cfg, supervised=dataclasses.replace(cfg.supervised, catalog_pattern=catalog),
            ctr=dataclasses.replace(cfg.ctr, train_pattern=common.ctr_train_pattern(
                cfg, cfg.ctr)))
        spec = ctr_spec.load(cfg.ctr.spec)
        if cfg.ctr.hash_bins:
            spec = spec.with_hash_bins(cfg.ctr.hash_bins)
        spec.check_files(pipeline.list_files(cfg.ctr.train_pattern))
        spec = ctr_task.spec_for(cfg.model_dir, spec)
        return cfg, supervised.SupervisedTask(
            cfg.ctr, spec, ctr_task.vocabularies_for(cfg.model_dir, cfg.ctr, spec,
                                                     cfg.skip_bad_records),
            catalog, enc, cfg.train, cfg.skip_bad_records)
    _train(cfg, task_of)


def run_finetune(cfg: configs.FinetuneStage) -> None:
    """S2, and S1+S2 from S1's weights (paper 000 Eq. 2)."""
    _train(cfg, _task(finetune.FinetuneTask, sessions_pattern=("search_sessions", "train")))


def run_courier(cfg: configs.CourierStage) -> None:
    """COURIER (paper 002 Eq. 1-7)."""
    _train(cfg, _task(courier.CourierTask, pageviews_pattern=("pageviews", "train")))


def run_classify(cfg: configs.ClassifyStage) -> None:
    """ResNet-C, the category classifier (paper 000 Table 1)."""
    def task_of(cfg, enc, catalog):
        classify_cfg = dataclasses.replace(cfg.classify, catalog_pattern=catalog)
        task = classify.ClassifyTask(classify_cfg, enc, cfg.train, cfg.skip_bad_records)
        return dataclasses.replace(cfg, classify=dataclasses.replace(
            classify_cfg, categories=tuple(int(c) for c in task.categories))), task
    _train(cfg, task_of)


def run_eval_search(cfg: configs.EvalSearchStage) -> None:
    """Visual-search metrics of the encoder in model_dir (or of a random one, `random_init`):
    metrics.json, the per-query parts of the metrics (search_per_query.npz), the embedding table
    (embeddings.npz) and a TensorBoard projector there."""
    common.require(cfg, "data_dir", "model_dir")
    catalog = common.pattern(cfg, cfg.search.catalog_pattern, "catalog")
    search = dataclasses.replace(cfg.search, catalog_pattern=catalog, judgments_pattern=(
        common.pattern(cfg, cfg.search.judgments_pattern, "judgments")))
    if cfg.random_init:
        tf_keras.utils.set_random_seed(cfg.seed)
        enc_cfg = dataclasses.replace(cfg.encoder, image_size=common.image_size(
            cfg.encoder.image_size, cfg.data_dir))
        table = embeddings.compute(encoder.Encoder(enc_cfg), catalog, None,
                                   skip_bad_records=cfg.skip_bad_records)
        # This dir is the untrained encoder's own: its config says what was measured.
        configs.save(cfg.model_dir, dataclasses.replace(cfg, encoder=enc_cfg, search=search))
    else:  # cached beside the checkpoint for the CTR stages
        table = embeddings.for_encoder(cfg.model_dir, catalog, queries_pattern(cfg),
                                       skip_bad_records=cfg.skip_bad_records)
    embedded = table.catalog()
    metrics = visual_search.evaluate(embedded, search, cfg.skip_bad_records, os.path.join(
        cfg.model_dir, visual_search.PER_QUERY))
    write_metrics(cfg.model_dir, metrics)
    with tf.summary.create_file_writer(os.path.join(cfg.model_dir, "eval")).as_default():
        for k, v in metrics.items():
            tf.summary.scalar(f"visual_search/{k}", v, step=0)
    images = pipeline.read_columns(catalog, "catalog", ("item_id", "image"),
                                   cfg.skip_bad_records)
    if not np.array_equal(images["item_id"], embedded["item_id"]):
        raise RuntimeError("catalog order changed between two reads")
    log_dir = projector.write(os.path.join(cfg.model_dir, "projector"), embedded, images["image"],
                              projector.style_labels(cfg.data_dir, embedded["item_id"]),
                              seed=cfg.seed)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    print(f"wrote {os.path.join(cfg.model_dir, 'metrics.json')} and a projector in {log_dir} "
          f"(tensorboard --logdir {log_dir})")


def queries_pattern(cfg: configs.StageConfig, given: str = "") -> str:
    """The query photos to embed beside the catalog: `given`, else the data dir's if it has
    any ('' if not: a feed has no query photos)."""
    file_pattern = common.pattern(cfg, given, "queries")
    return file_pattern if given or common.has_files(file_pattern) else ""

"""What the stage runners share: required paths, the data dir's standard file patterns, resolving a
training stage's strategy and batch sizes, and writing its config before it trains."""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import tensorflow as tf

from trainer import configs
from trainer.data import records
from trainer.synth import marketplace
from trainer.train import lock, loop

S = TypeVar("S", bound=configs.StageConfig)
P = ParamSpec("P")


class UsageError(ValueError):
    """A stage was asked for something it cannot do with the configuration given."""


def require(cfg: configs.StageConfig, *keys: str) -> None:
    """Fails naming the first of `keys` (top-level config keys) that is unset."""
    for key in keys:
        if not getattr(cfg, key):
            raise UsageError(f"--stage={cfg.stage} needs {key} (--{key} or --set {key}=...)")


def pattern(cfg: configs.StageConfig, given: str, kind: str, split: str = "*") -> str:
    """`given`, else the file pattern of `kind` in the data dir's standard layout."""
    if given:
        return given
    require(cfg, "data_dir")
    return records.default_pattern(cfg.data_dir, kind, split)


def ctr_train_pattern(cfg: configs.StageConfig, ctr: configs.CtrConfig) -> str:
    """`ctr.train_pattern`, else the data dir's `ctr` records of `ctr.train_split`; a split other
    than 'train' that the data dir lacks fails naming what writes it."""
    found = pattern(cfg, ctr.train_pattern, "ctr", ctr.train_split)
    if not ctr.train_pattern and ctr.train_split != "train" and not has_files(found):
        raise FileNotFoundError(
            f"no `ctr` records of the split '{ctr.train_split}' ({found}): a synthetic world "
            "writes the 'early' and 'late' train days when its `early_days` > 0 (`small` and "
            "`tiny` do since the equal-protocol Table 5: generate the world again), or give "
            "ctr.train_pattern")
    return found


def has_files(file_pattern: str) -> bool:
    return any(tf.io.gfile.glob(p.strip()) for p in file_pattern.split(",") if p.strip())


def image_size(size: int, data_dir: str) -> int:
    """`size`, else the data's: a synthetic world's manifest, else 64."""
    return size or marketplace.image_size(data_dir)


def encoder_config(cfg: Any) -> configs.EncoderConfig:
    """The stage's encoder config with what the data and the strategy decide filled in."""
    return dataclasses.replace(cfg.encoder, image_size=image_size(cfg.encoder.image_size,
                                                                  cfg.data_dir),
                               sync_batch_norm=cfg.train.strategy != "one_device")


def releases_lock(run: Callable[Concatenate[S, P], None]) -> Callable[Concatenate[S, P], None]:
    """Wraps a training stage's runner (its config tree first): the model dir's lock (taken by
    `training`) is released when it returns or fails, not only at exit."""
    @functools.wraps(run)
    def wrapped(cfg: S, *args: P.args, **kwargs: P.kwargs) -> None:
        try:
            run(cfg, *args, **kwargs)
        finally:
            if cfg.model_dir:
                lock.release(cfg.model_dir)
    return wrapped


def training(cfg: S) -> tuple[S, tf.distribute.Strategy]:
    """The strategy (created first: a multi-worker strategy must exist before other TensorFlow
    ops run) and the config with its global batch and run info resolved. The chief takes the
    model dir's lock (`trainer.train.lock`)."""
    assert isinstance(cfg, configs.TrainingStage)
    require(cfg, "data_dir", "model_dir")
    if cfg.train.strategy == "parameter_server" and cfg.stage not in ("ctr", "debias", "daily"):
        raise UsageError(f"--strategy=parameter_server trains the CTR stages, not "
                         f"'{cfg.stage}' (its variables are small enough to mirror: use "
                         "multi_worker_mirrored)")
    loop.serve_if_not_coordinator(cfg.train.strategy)  # a worker or ps process stops here
    strategy = loop.make_strategy(cfg.train.strategy, cfg.train.shard_bytes)
    if loop.is_chief(strategy):  # before anything is written to the model dir
        lock.acquire(cfg.model_dir)
    replicas = strategy.num_replicas_in_sync
    train = cfg.train
    if train.per_replica_batch_size:  # it decides the global batch
        train = dataclasses.replace(
            train, global_batch_size=train.per_replica_batch_size * replicas)
    train.replica_batch_size(replicas)  # the global batch must split evenly
    run = configs.RunInfo(replicas=replicas,
                          per_replica_batch_size=train.global_batch_size // replicas,
                          tensorflow=tf.__version__)
    return dataclasses.replace(cfg, train=train, run=run), strategy


def start(cfg: configs.TrainingStage, strategy: tf.distribute.Strategy) -> None:
    """Before training: refuses to resume a model dir of another stage or encoder architecture
    (so config.json stays true), then writes config.json (the chief only)."""
    if not loop.is_chief(strategy):
        return
    if loop.restored_step(cfg.model_dir) and configs.exists(cfg.model_dir):
        saved = configs.load(cfg.model_dir)
        if type(saved) is not type(cfg):
            raise UsageError(f"{cfg.model_dir} holds a '{saved.stage}' model, not a "
                             f"'{cfg.stage}' one; use a new --model_dir")
        if isinstance(cfg, configs.EncoderStage) and isinstance(saved, configs.EncoderStage):
            saved_arch, arch = (dict(e.architecture(), image_size=e.image_size,
                                     feature_dim=e.feature_dim)
                                for e in (saved.encoder, cfg.encoder))
            diff = {k: (saved_arch.get(k), arch.get(k)) for k in saved_arch.keys() | arch.keys()
                    if saved_arch.get(k) != arch.get(k)}
            if diff:
                raise UsageError(f"{cfg.model_dir} holds a model trained with another encoder "
                                 f"(saved, requested): {diff}; use a new --model_dir")
    configs.save(cfg.model_dir, cfg)


def encoder_dir(cfg: Any, name: str, given: str) -> str:
    """An encoder's model dir: `given`, else `images.encoders_dir/<name>`."""
    if given:
        return given
    if not cfg.images.encoders_dir:
        raise UsageError(f"--stage={cfg.stage} needs the {name} encoder: pass --encoders_dir "
                         f"(holding {name}/) or its model dir")
    return os.path.join(cfg.images.encoders_dir, name)

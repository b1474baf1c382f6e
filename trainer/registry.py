"""Every stage of `python -m trainer.task`, declared once: its config tree (whose `stage` field is
its name), its runner and a one-line doc. The entry point's stage list, help and dispatch come
from here. Runners live in `trainer.stages` and are imported when their stage runs, so that a
stage loads only what it runs. The daily cycle's runner is `export.daily`'s: the cycle ends with
an export, and the training package never imports the export one (it is named here, not
imported).
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

from trainer import configs


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage: `config`, its tree; `runner`, 'module:function' (a module under
    `trainer.stages`, or a dotted path); `doc`."""

    config: type[configs.StageConfig]
    runner: str
    doc: str

    @property
    def name(self) -> str:
        return self.config().stage

    @property
    def trains(self) -> bool:
        """Whether it trains a model (and so takes `train.*`, a strategy and the model dir lock)."""
        return issubclass(self.config, configs.TrainingStage)

    def run_function(self) -> Callable[[configs.StageConfig], None]:
        module, function = self.runner.split(":")
        path = module if "." in module else f"trainer.stages.{module}"
        return getattr(importlib.import_module(path), function)


STAGES = (
    Stage(configs.SynthStage, "data:run_synth",
          "a synthetic marketplace into data_dir (`ctr` records with a feature spec's columns)"),
    Stage(configs.InspectStage, "data:run_inspect",
          "input-pipeline smoke run over every record kind; writes preview.png"),
    Stage(configs.ValidateStage, "data:run_validate",
          "scan records for bad ones (data_dir, or kind + file_pattern)"),
    Stage(configs.PretrainStage, "encoders:run_pretrain",
          "S1: self-supervised contrastive pretraining (paper 000 Eq. 1)"),
    Stage(configs.SimsiamStage, "encoders:run_simsiam",
          "SimSiam on S1's views (a paper 002 Table 5 baseline)"),
    Stage(configs.ClipStage, "encoders:run_clip",
          "CLIP (or MaskCLIP) on catalog images and titles (paper 002 Table 5 baselines)"),
    Stage(configs.SupervisedStage, "encoders:run_supervised",
          "the encoder trained end to end inside the CTR model on clicks (Table 5 baseline)"),
    Stage(configs.FinetuneStage, "encoders:run_finetune",
          "S2: click-supervised contrastive fine-tuning with category negative pools (Eq. 2); "
          "S1+S2 with encoder.init_checkpoint = S1's model dir"),
    Stage(configs.ClassifyStage, "encoders:run_classify",
          "ResNet-C: the encoder trained as a category classifier (the Table 1 baseline)"),
    Stage(configs.CourierStage, "encoders:run_courier",
          "COURIER: contrastive user-intention reconstruction (paper 002 Eq. 1-7)"),
    Stage(configs.EvalSearchStage, "encoders:run_eval_search",
          "visual search with an encoder: HR, LR@K, CR@K (paper 000 §4.1), its embedding table"),
    Stage(configs.CtrStage, "ctr:run_ctr",
          "the CTR predictor, features from a feature spec (ctr.spec) and an encoder's images"),
    Stage(configs.DebiasStage, "ctr:run_ctr",
          "the same with the debiasing network D and its gate (Eq. 3-4): S1+S2+D"),
    Stage(configs.DailyStage, "export.daily:run_daily",
          "the daily cycle: yesterday's CTR model trained on today's data with grown "
          "vocabularies and image table, gated against the serving one, exported as the next "
          "version"),
    Stage(configs.ClusterStage, "ctr:run_cluster",
          "faiss k-means over an encoder's catalog embeddings (paper 002 App. B)"),
    Stage(configs.EmbedStage, "embed:run_embed",
          "the exported encoder over the catalog (the Beam embed pipeline): embeddings, faiss "
          "index, cluster ids"),
    Stage(configs.EvaluateStage, "evaluate:run_evaluate",
          "an exported CTR model judged on a day's records by the Beam evaluate job: AUC, GAUC, "
          "slice AUCs, sharded predictions"),
)
BY_NAME = {s.name: s for s in STAGES}
assert set(BY_NAME) == set(configs.STAGES), "every config tree of a stage is registered"


def get(name: str) -> Stage:
    if name not in BY_NAME:
        raise configs.ConfigError(f"unknown stage '{name}'; known: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def run(cfg: configs.StageConfig) -> None:
    """Runs the stage `cfg` is the tree of."""
    get(cfg.stage).run_function()(cfg)


def describe(width: int = 13) -> str:
    """The stages, a line each, for the command line's help."""
    return "\n".join(f"  {s.name:<{width}}{s.doc}" for s in STAGES)

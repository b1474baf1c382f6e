"""The stage runners, by stage name: each takes its typed config tree (`trainer.configs`).

Imported on demand, so that a stage loads only what it runs."""
from __future__ import annotations

import importlib
from collections.abc import Callable

_RUNNERS = {
    "synth": ("data", "run_synth"), "inspect": ("data", "run_inspect"),
    "validate": ("data", "run_validate"),
    "pretrain": ("encoders", "run_training"), "simsiam": ("encoders", "run_training"),
    "clip": ("encoders", "run_training"), "finetune": ("encoders", "run_training"),
    "classify": ("encoders", "run_training"), "supervised": ("encoders", "run_training"),
    "courier": ("encoders", "run_training"),
    "eval_search": ("encoders", "run_eval_search"),
    "ctr": ("ctr", "run_ctr"), "debias": ("ctr", "run_ctr"), "cluster": ("ctr", "run_cluster"),
    "embed": ("embed", "run_embed"),
}
TRAINING = ("pretrain", "simsiam", "clip", "finetune", "classify", "supervised", "courier", "ctr",
            "debias")


def runner(stage: str) -> Callable:
    module, name = _RUNNERS[stage]
    return getattr(importlib.import_module(f"trainer.stages.{module}"), name)

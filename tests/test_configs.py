"""Typed configs: every stage's tree round-trips through config.json and YAML, `configs.load` is
the one reader of config.json, and defaults are defined once (no second table of them)."""
from __future__ import annotations

import os
import re
import subprocess

import pytest
import yaml

from conftest import REPO
from trainer import configs


@pytest.mark.parametrize("stage", list(configs.STAGES))
def test_every_stage_tree_round_trips_through_its_model_dir(stage, tmp_path):
    cfg = configs.for_stage(stage)
    assert cfg.stage == stage
    if isinstance(cfg, configs.TrainingStage):
        cfg = configs.override(cfg, "train.profile_steps", "2,4")
    path = configs.save(str(tmp_path), cfg)
    assert os.path.basename(path) == "config.json"
    back = configs.load(str(tmp_path))
    assert type(back) is type(cfg) and back == cfg
    assert configs.from_dict(type(cfg), yaml.safe_load(yaml.safe_dump(configs.to_dict(cfg)))) \
        == cfg


def test_stage_defaults_differ_where_the_stages_do():
    assert configs.for_stage("pretrain").train.steps == 600
    assert configs.for_stage("ctr").train.global_batch_size == 512
    assert configs.for_stage("debias").ctr.debias == configs.DebiasConfig()
    assert configs.for_stage("ctr").ctr.debias is None
    # The encoder every stage trains by default: one definition.
    encoders = {configs.to_dict(c().encoder)["depth"] for c in configs.STAGES.values()
                if hasattr(c(), "encoder")}
    assert encoders == {configs.EncoderConfig().depth}


def test_an_optional_section_is_created_by_its_keys_and_removed_by_null():
    cfg = configs.override(configs.for_stage("ctr"), "ctr.debias.num_similar", "3")
    assert cfg.ctr.debias == configs.DebiasConfig(num_similar=3)
    assert configs.override(cfg, "ctr.debias", "null").ctr.debias is None
    with pytest.raises(configs.ConfigError, match="unknown key 'ctr.debias.k'"):
        configs.override(cfg, "ctr.debias.k", "3")
    with pytest.raises(configs.ConfigError, match="'vec' is not one of vector, simscore"):
        configs.override(cfg, "ctr.image_feature_mode", "vec")
    with pytest.raises(configs.ConfigError, match="train.profile_steps: expected 2 values"):
        configs.override(cfg, "train.profile_steps", "1,2,3")


def test_config_json_has_one_reader_and_defaults_one_definition():
    # Only trainer/configs.py opens a config.json; everything else calls configs.load.
    readers = []
    for top in ("trainer", "export", "scripts", "tests"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                path = os.path.join(root, name)
                if not name.endswith(".py") or path.endswith(os.path.join("trainer",
                                                                          "configs.py")):
                    continue
                src = open(path).read()
                if re.search(r"(open|GFile)\([^)]*config\.json", src):
                    readers.append(os.path.relpath(path, REPO))
    assert readers == []
    out = subprocess.run(["grep", "-rn", r"STAGE_DEFAULTS\|ENCODER_DEFAULTS", "trainer",
                          "scripts"], cwd=REPO, capture_output=True, text=True)
    assert out.stdout == "" and out.returncode == 1

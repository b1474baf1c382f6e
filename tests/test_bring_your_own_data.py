"""docs/data.md, "Bring your own data", run as it is: its spec and every line of its command
block, on Parquet tables made from the tiny world the way a marketplace without demographics or
query photos would log them (list columns, a user statistic of its own, some of it null). Small
step counts are appended to the training commands; nothing else is changed."""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
import yaml

from conftest import REPO, read_all
from trainer import configs
from trainer.ctr import spec as ctr_spec
from trainer.ctr import tables as ctr_tables

BUDGETS = {  # appended to `python -m trainer.task --stage=...` lines
    "pretrain": ["--train_steps=2", "--batch_size=16", "--log_interval=1", "--image_size=32",
                 "--feature_dim=32"],
    "courier": ["--train_steps=2", "--batch_size=4", "--log_interval=1", "--image_size=32",
                "--feature_dim=32"],
    "ctr": ["--train_steps=3", "--batch_size=64", "--log_interval=1"],
}


def doc_block(name: str) -> str:
    """The code block between the markers `BYO <name>` of docs/data.md."""
    text = open(os.path.join(REPO, "docs", "data.md")).read()
    block = text.split(f"<!-- BEGIN BYO {name} -->", 1)[1].split(f"<!-- END BYO {name} -->")[0]
    return re.search(r"```\w*\n(.*?)```", block, re.S).group(1)


def _tables(world: str, raw: str) -> None:
    """The tiny world as docs/data.md's Parquet tables and image folder."""
    os.makedirs(os.path.join(raw, "images"))
    cat = read_all(world, "catalog", decode_images=False)
    for item, image in zip(cat["item_id"], cat["image"], strict=True):
        with open(os.path.join(raw, "images", f"{item}.jpg"), "wb") as f:
            f.write(image)
    pq.write_table(pa.table({k: cat[k] for k in ("item_id", "category_id", "shop_id",
                                                 "brand_id", "price", "impressions_30d")}),
                   os.path.join(raw, "items.parquet"))

    def lists(rows: dict, name: str) -> pa.Array:
        return pa.array([r[m].tolist() for r, m in zip(rows[name], rows[name + "_mask"],
                                                       strict=True)], pa.list_(pa.int64()))

    pv = read_all(world, "pageviews", decode_images=False)
    pq.write_table(pa.table({"user_id": pv["user_id"], **{
        k: lists(pv, k) for k in ("pv_item_ids", "pv_labels", "click_item_ids")}}),
        os.path.join(raw, "pageviews.parquet"))
    for split in ("train", "test"):
        ctr = read_all(world, "ctr", split)
        orders = np.log1p(ctr["user_id"] % 13).astype(np.float64)
        table = {k: ctr[k] for k in ("label", "page_id", "user_id", "item_id", "shop_id",
                                      "brand_id", "category_id", "price", "device", "position")}
        table["user_orders_30d"] = pa.array(orders, mask=ctr["user_id"] % 10 == 0)  # some null
        table["click_history_item_ids"] = lists(ctr, "click_history_item_ids")
        pq.write_table(pa.table(table), os.path.join(raw, f"clicks_{split}.parquet"))


def test_the_beam_section_shows_commands_that_this_test_runs():
    """docs/beam.md: each pipeline's local command is a line of docs/data.md's command block,
    run as written below."""
    section = open(os.path.join(REPO, "docs", "beam.md")).read()
    shown = re.findall(r"^python -m trainer\.pipelines\.\w+ .*$", section, re.M)
    assert {re.match(r"python -m trainer\.pipelines\.(\w+)", c).group(1) for c in shown} == {
        "convert", "embed", "join", "vocab", "evaluate"}
    block = doc_block("COMMANDS").splitlines()
    for command in shown:
        assert command in block, command


@pytest.mark.e2e
def test_the_bring_your_own_data_section_runs_as_written(tiny_world, tmp_path):
    raw = str(tmp_path / "raw")
    _tables(tiny_world, raw)
    spec_text = doc_block("SPEC")
    with open(os.path.join(raw, "spec.yaml"), "w") as f:
        f.write(spec_text)
    spec = ctr_spec.parse(yaml.safe_load(spec_text), "docs/data.md")
    assert not {"age_bucket", "gender", "preferred_category_ids", "query_id"} & set(spec.inputs)

    venv_bin = os.path.dirname(sys.executable)
    env = {**os.environ, "RAW": raw, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}
    setup, *commands = [line for line in doc_block("COMMANDS").splitlines()
                        if line.strip() and not line.startswith("#")]
    assert setup.startswith("DATA=") and len(commands) == 15
    for line in commands:
        stage = re.search(r"trainer\.task --stage=(\w+)", line)
        budget = BUDGETS.get(stage.group(1), []) if stage else []
        command = f"{setup}; {line.replace('scripts/', REPO + '/scripts/')} {' '.join(budget)}"
        out = subprocess.run(["bash", "-c", command], cwd=str(tmp_path), env=env, text=True,
                             capture_output=True, timeout=600)
        assert out.returncode == 0, (line, out.stderr[-3000:])
        if "--stage=validate" in line:
            assert re.search(r"ctr: 16000 records in \d+ files, 0 bad", out.stdout)
        if line.startswith("saved_model_cli"):
            shown = out.stdout

    runs = tmp_path / "runs" / "mine"
    config = configs.load(str(runs / "ctr"))
    assert config.ctr.spec.endswith("spec.yaml") and config.images.model_dir.endswith("courier")
    metrics = json.load(open(runs / "ctr" / "metrics.json"))
    assert metrics["feature_spec"] == "my_marketplace" and 0 <= metrics["AUC"] <= 1
    assert metrics["samples"] == 4000 and metrics["image_feature_mode"] == "cluster_id"
    # The evaluate job on the export: the same test day, GAUC within the export's float noise.
    judged = json.load(open(runs / "ctr_eval" / "metrics.json"))
    assert judged["samples"] == 4000 and abs(judged["GAUC"] - metrics["GAUC"]) < 1e-3
    version = str(tmp_path / "models" / "mine" / "ctr" / "1")
    inputs = tf.saved_model.load(version).signatures["serving_default"] \
        .structured_input_signature[1]
    assert sorted(inputs) == sorted(spec.inputs)
    assert all(f"inputs['{name}']" in shown for name in spec.inputs)
    exported = ctr_spec.load(os.path.join(version, "assets.extra", ctr_spec.FILE))
    assert exported.to_dict() == spec.to_dict()
    assert inputs["user_orders_30d"].dtype == tf.float32
    # The Beam steps: no dead letters; the vocabularies the stage used are the pipeline's (with
    # counts); the joined records carry each item's cluster id + 1.
    assert not any(open(p).read() for p in glob.glob(str(tmp_path / "data" / "mine" /
                                                          "dead_letter" / "*.jsonl")))
    vocabularies = ctr_tables.Vocabularies.load(str(runs / "ctr" / "vocabularies.npz"))
    assert vocabularies.counts["item_id"].sum() > 4000
    catalog = np.load(runs / "catalog" / "embeddings.npz")
    cluster_of = dict(zip(catalog["item_id"].tolist(), catalog["cluster_id"].tolist(),
                          strict=True))
    joined = [tf.train.Example.FromString(r.numpy()).features.feature for r in
              tf.data.TFRecordDataset(glob.glob(str(tmp_path / "data" / "mine" / "joined" /
                                                    "ctr" / "train-*.tfrecord")))]
    assert len(joined) == 12000
    for f in joined[:500]:
        item = f["item_id"].int64_list.value[0]
        assert f["item_image_cluster_id"].int64_list.value == [cluster_of[item] + 1]

"""scripts/convert_parquet.py: Parquet (read through tensorflow-io) + images -> the same records."""
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tensorflow.core.example import example_pb2

from conftest import REPO, raw_records
from trainer.data import records

sys.path.insert(0, os.path.join(REPO, "scripts"))
import convert_parquet  # noqa: E402


def _values(rec: bytes) -> dict:
    fmap = example_pb2.Example.FromString(rec).features.feature
    out = {}
    for k, f in fmap.items():
        kind = f.WhichOneof("kind")
        out[k] = list(getattr(f, kind).value)
    return out


def test_catalog_round_trip(tiny_world, tmp_path):
    originals = raw_records(records.default_pattern(tiny_world, "catalog"))
    rows = [_values(r) for r in originals]
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for r in rows:
        (img_dir / f"{r['item_id'][0]}.jpg").write_bytes(r["image"][0])
    table = pa.table({k: pa.array([r[k][0] for r in rows],
                                  pa.float32() if k == "price" else pa.int64())
                      for k in ("item_id", "category_id", "shop_id", "brand_id", "price",
                                "impressions_30d")})
    pq.write_table(table, str(tmp_path / "items.parquet"))
    out = tmp_path / "out"
    convert_parquet.main(["--kind=catalog", f"--parquet={tmp_path / 'items.parquet'}",
                          f"--image_dir={img_dir}", f"--output_dir={out}", "--num_shards=3"])
    converted = raw_records(records.default_pattern(str(out), "catalog", "all"))
    assert len(pq.read_table(str(tmp_path / "items.parquet"))) == len(converted)
    assert converted == originals  # byte for byte: same values, deterministic serialization


def test_ctr_lists_as_space_separated_strings(tiny_world, tmp_path):
    originals = raw_records(records.default_pattern(tiny_world, "ctr", "test"))[:300]
    rows = [_values(r) for r in originals]
    cols = {}
    for k in rows[0]:
        if k in ("preferred_category_ids", "click_history_item_ids"):
            cols[k] = pa.array([" ".join(map(str, r[k])) for r in rows])
        else:
            cols[k] = pa.array([r[k][0] for r in rows],
                               pa.float32() if k == "price" else pa.int64())
    pq.write_table(pa.table(cols), str(tmp_path / "ctr.parquet"))
    paths = convert_parquet.convert("ctr", str(tmp_path / "ctr.parquet"), str(tmp_path / "out"),
                                    "test", 1)
    assert raw_records(paths[0]) == originals


def test_list_columns_are_refused(tmp_path):
    t = pa.table({"user_id": pa.array([1, 2], pa.int64()),
                  "click_history_item_ids": pa.array([[1, 2], [3]], pa.list_(pa.int64()))})
    pq.write_table(t, str(tmp_path / "t.parquet"))
    with pytest.raises(ValueError, match="click_history_item_ids.*space-separated"):
        convert_parquet.convert("ctr", str(tmp_path / "t.parquet"), str(tmp_path / "o"), "x", 1)


def test_missing_column_and_missing_image_are_named(tmp_path):
    t = pa.table({"item_id": pa.array([5], pa.int64()), "category_id": pa.array([1], pa.int64())})
    pq.write_table(t, str(tmp_path / "t.parquet"))
    with pytest.raises(ValueError, match=r"row 0: no image file for id 5"):
        convert_parquet.convert("catalog", str(tmp_path / "t.parquet"), str(tmp_path / "o"),
                                "all", 1, image_dir=str(tmp_path))
    (tmp_path / "5.png").write_bytes(b"\x89PNG fake")
    with pytest.raises(ValueError, match="required column 'shop_id'"):
        convert_parquet.convert("catalog", str(tmp_path / "t.parquet"), str(tmp_path / "o"),
                                "all", 1, image_dir=str(tmp_path))


def test_unparseable_list_value_names_row_and_column(tmp_path):
    t = pa.table({"query_item_id": pa.array([1, 2], pa.int64()),
                  "relevant_item_ids": pa.array(["4 5", "6 x"])})
    pq.write_table(t, str(tmp_path / "j.parquet"))
    with pytest.raises(ValueError, match=r"row 1: column 'relevant_item_ids'.*'6 x'"):
        convert_parquet.convert("judgments", str(tmp_path / "j.parquet"), str(tmp_path / "o"),
                                "all", 1)

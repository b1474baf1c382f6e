"""The single-process Parquet conversion (`trainer.data.parquet.convert`, the command
scripts/convert_parquet.py): Parquet (read with pyarrow, batch by batch) + images -> the same
records as the generator writes; list columns and space-separated strings give equal records."""
import glob
import logging
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tensorflow.core.example import example_pb2

from conftest import REPO, raw_records
from trainer.ctr import spec as ctr_spec
from trainer.data import parquet, records

sys.path.insert(0, os.path.join(REPO, "scripts"))
import convert_parquet  # noqa: E402

CTR = ctr_spec.record_kind("ctr")
LISTS = ("preferred_category_ids", "click_history_item_ids")


def _values(rec: bytes) -> dict:
    fmap = example_pb2.Example.FromString(rec).features.feature
    out = {}
    for k, f in fmap.items():
        kind = f.WhichOneof("kind")
        out[k] = list(getattr(f, kind).value)
    return out


def _ctr_table(rows: list, lists_as: str) -> pa.Table:
    cols = {}
    for k in rows[0]:
        if k in LISTS and lists_as == "strings":
            cols[k] = pa.array([" ".join(map(str, r[k])) for r in rows])
        elif k in LISTS:
            cols[k] = pa.array([r[k] for r in rows], pa.list_(pa.int64()))
        else:
            cols[k] = pa.array([r[k][0] for r in rows],
                               pa.float32() if k == "price" else pa.int64())
    return pa.table(cols)


def catalog_table(world: str, tmp_path) -> tuple[list, pa.Table, object]:
    """The world's catalog records, the same catalog as a Parquet table, and a folder of its
    images named `<item_id>.jpg`."""
    originals = raw_records(records.default_pattern(world, "catalog"))
    rows = [_values(r) for r in originals]
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for r in rows:
        (img_dir / f"{r['item_id'][0]}.jpg").write_bytes(r["image"][0])
    table = pa.table({k: pa.array([r[k][0] for r in rows],
                                  pa.float32() if k in ("price", "bid") else pa.int64())
                      for k in ("item_id", "category_id", "shop_id", "brand_id", "price",
                                "impressions_30d", "bid")})
    # Titles as Parquet strings (UTF-8), the usual type of a text column.
    table = table.append_column("title", pa.array([r["title"][0].decode() for r in rows],
                                                  pa.string()))
    return originals, table, img_dir


def test_catalog_round_trip(tiny_world, tmp_path):
    originals, table, img_dir = catalog_table(tiny_world, tmp_path)
    rows = [_values(r) for r in originals]
    pq.write_table(table, str(tmp_path / "items.parquet"))
    out = tmp_path / "out"
    convert_parquet.main(["--kind=catalog", f"--parquet={tmp_path / 'items.parquet'}",
                          f"--image_dir={img_dir}", f"--output_dir={out}", "--num_shards=3"])
    converted = raw_records(records.default_pattern(str(out), "catalog", "all"))
    assert len(pq.read_table(str(tmp_path / "items.parquet"))) == len(converted)
    assert converted == originals  # byte for byte: same values, deterministic serialization
    # Inline images: a binary column named after the feature gives the same records.
    inline = table.append_column("image", pa.array([r["image"][0] for r in rows], pa.binary()))
    pq.write_table(inline, str(tmp_path / "inline.parquet"))
    paths = parquet.convert("catalog", str(tmp_path / "inline.parquet"),
                                    str(tmp_path / "inline"), "all", 2)
    assert [r for p in paths for r in raw_records(p)] == originals


def test_list_columns_equal_space_separated_strings(tiny_world, tmp_path):
    originals = raw_records(records.default_pattern(tiny_world, "ctr", "test"))[:700]
    rows = [_values(r) for r in originals]
    converted = {}
    for lists_as in ("strings", "lists"):
        # Several files, read in small batches: records cross batch and file boundaries.
        folder = tmp_path / lists_as
        folder.mkdir()
        for i, part in enumerate((rows[:300], rows[300:])):
            pq.write_table(_ctr_table(part, lists_as), str(folder / f"part-{i}.parquet"))
        paths = parquet.convert(CTR, str(folder), str(tmp_path / f"out_{lists_as}"),
                                        "test", 3, batch_rows=64)
        assert len(paths) == 3
        converted[lists_as] = [r for p in paths for r in raw_records(p)]
    assert converted["lists"] == converted["strings"] == originals


def test_float_and_image_path_lists(tmp_path):
    # A spec with a numeric vector (list<double>) and page views with image paths
    # (list<string>): each equals its space-separated form.
    spec = ctr_spec.parse({"label": "label", "group": "page_id", "item": "item_id", "features": [
        {"name": "item_id", "kind": "categorical"},
        {"name": "user_stats", "kind": "numeric", "transform": "normalize", "length": 3}]}, "t")
    png = b"\x89PNG fake image"
    (tmp_path / "a.png").write_bytes(png)
    (tmp_path / "b.png").write_bytes(png + b"b")
    stats = [[0.5, 1.25, -2.0], [3.0, 0.0, 1e-3]]
    base = {"label": pa.array([1, 0], pa.int64()), "page_id": pa.array([7, 8], pa.int64()),
            "item_id": pa.array([3, 4], pa.int64())}
    tables = {"lists": pa.table({**base, "user_stats": pa.array(stats, pa.list_(pa.float64()))}),
              "strings": pa.table({**base, "user_stats": pa.array(
                  [" ".join(map(repr, s)) for s in stats])})}
    pvs = {"lists": pa.table({"user_id": pa.array([1], pa.int64()),
                              "pv_item_ids": pa.array([[10, 11]], pa.list_(pa.int64())),
                              "pv_labels": pa.array([[1, 0]], pa.list_(pa.int64())),
                              "click_item_ids": pa.array([[9]], pa.list_(pa.int64())),
                              "pv_images_path": pa.array([["a.png", "b.png"]],
                                                         pa.list_(pa.string()))}),
           "strings": pa.table({"user_id": pa.array([1], pa.int64()),
                                "pv_item_ids": pa.array(["10 11"]),
                                "pv_labels": pa.array(["1 0"]),
                                "click_item_ids": pa.array(["9"]),
                                "pv_images_path": pa.array(["a.png b.png"])})}
    got = {}
    for form in ("lists", "strings"):
        pq.write_table(tables[form], str(tmp_path / f"ctr_{form}.parquet"))
        pq.write_table(pvs[form], str(tmp_path / f"pv_{form}.parquet"))
        ctr = parquet.convert(spec.record_kind(), str(tmp_path / f"ctr_{form}.parquet"),
                                      str(tmp_path / form), "train", 1)
        pv = parquet.convert("pageviews", str(tmp_path / f"pv_{form}.parquet"),
                                     str(tmp_path / form), "train", 1, image_dir=str(tmp_path))
        got[form] = (raw_records(ctr[0]), raw_records(pv[0]))
    assert got["lists"] == got["strings"]
    ctr_rows = [_values(r) for r in got["lists"][0]]
    np.testing.assert_allclose(ctr_rows[1]["user_stats"], stats[1], rtol=1e-6)
    assert _values(got["lists"][1][0])["pv_images"] == [png, png + b"b"]


def test_unknown_columns_are_left_out_with_a_warning(tmp_path, caplog):
    t = pa.table({"query_item_id": pa.array([1], pa.int64()),
                  "relevant_item_ids": pa.array([[4, 5]], pa.list_(pa.int64())),
                  "annotator": pa.array(["x"]), "notes": pa.array(["y"])})
    pq.write_table(t, str(tmp_path / "j.parquet"))
    with caplog.at_level(logging.WARNING):
        paths = parquet.convert("judgments", str(tmp_path / "j.parquet"),
                                        str(tmp_path / "o"), "all", 1)
    assert "['annotator', 'notes']" in caplog.text and "judgments" in caplog.text
    assert _values(raw_records(paths[0])[0]) == {"query_item_id": [1],
                                                 "relevant_item_ids": [4, 5]}


def test_missing_column_missing_image_and_bad_values_are_named(tmp_path):
    t = pa.table({"item_id": pa.array([5], pa.int64()), "category_id": pa.array([1], pa.int64())})
    path = str(tmp_path / "t.parquet")
    pq.write_table(t, path)
    (tmp_path / "5.png").write_bytes(b"\x89PNG fake")
    with pytest.raises(ValueError, match=rf"{path}: column 'shop_id' \(a required feature of the "
                                         r"record kind 'catalog'\) is missing"):
        parquet.convert("catalog", path, str(tmp_path / "o"), "all", 1,
                                image_dir=str(tmp_path))
    # A ctr column the feature spec requires, missing from a log: file, column and kind named.
    feed_like = pa.table({"label": pa.array([1], pa.int64()), "page_id": pa.array([2], pa.int64()),
                          "item_id": pa.array([3], pa.int64())})
    pq.write_table(feed_like, str(tmp_path / "ctr.parquet"))
    with pytest.raises(ValueError, match=r"ctr.parquet: column 'shop_id' \(a required feature of "
                                         r"the record kind 'ctr'\)"):
        parquet.convert(CTR, str(tmp_path / "ctr.parquet"), str(tmp_path / "o"), "x", 1)
    full = t.append_column("shop_id", pa.array([1], pa.int64())).append_column(
        "brand_id", pa.array([1], pa.int64())).append_column(
        "price", pa.array([2.5])).append_column("impressions_30d", pa.array([0], pa.int64()))
    pq.write_table(full, path)
    with pytest.raises(ValueError, match=r"row 0: no image file for id 5"):
        parquet.convert("catalog", path, str(tmp_path / "o"), "all", 1,
                                image_dir=str(tmp_path / "elsewhere"))
    t = pa.table({"query_item_id": pa.array([1, 2], pa.int64()),
                  "relevant_item_ids": pa.array(["4 5", "6 x"])})
    pq.write_table(t, str(tmp_path / "j.parquet"))
    with pytest.raises(ValueError, match=r"row 1: column 'relevant_item_ids'.*'6 x'"):
        parquet.convert("judgments", str(tmp_path / "j.parquet"), str(tmp_path / "o"),
                                "all", 1)
    t = pa.table({"query_item_id": pa.array([1.5], pa.float64()),
                  "relevant_item_ids": pa.array(["4"])})
    pq.write_table(t, str(tmp_path / "f.parquet"))
    with pytest.raises(ValueError, match=r"column 'query_item_id' must hold integer values"):
        parquet.convert("judgments", str(tmp_path / "f.parquet"), str(tmp_path / "o"),
                                "all", 1)


# Issue 16.5: image paths stay inside --image_dir; nulls are bad rows named by row and column; a
# re-run replaces the kind's shards.

def _pageviews(paths) -> pa.Table:
    n = len(paths)
    return pa.table({"user_id": pa.array(range(n), pa.int64()),
                     "pv_item_ids": pa.array([[1]] * n, pa.list_(pa.int64())),
                     "pv_labels": pa.array([[0]] * n, pa.list_(pa.int64())),
                     "click_item_ids": pa.array([[1]] * n, pa.list_(pa.int64())),
                     "pv_images_path": pa.array(paths)})


def test_image_paths_outside_the_image_dir_are_refused(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "sub" / "a.png").write_bytes(b"\x89PNG a")
    (tmp_path / "secret.txt").write_bytes(b"secret")
    for bad, words in (("sub/a.png ../secret.txt", r"row 1: image path '../secret.txt' leaves "
                                                   r"--image_dir"),
                       ("sub/../../secret.txt", r"row 1: image path 'sub/../../secret.txt' leaves"),
                       (str(tmp_path / "secret.txt"), r"row 1: image path '/.*secret.txt' is "
                                                      r"absolute.*--allow_absolute_image_paths")):
        pq.write_table(_pageviews(["sub/a.png", bad]), str(tmp_path / "pv.parquet"))
        with pytest.raises(ValueError, match=words):
            parquet.convert("pageviews", str(tmp_path / "pv.parquet"),
                                    str(tmp_path / "out"), "train", 1, image_dir=str(images))
    assert not os.path.exists(tmp_path / "out" / "pageviews" / "train-00000-of-00001.tfrecord")
    # Inside the dir, also through '..' that stays inside; absolute paths when allowed.
    pq.write_table(_pageviews(["sub/../sub/a.png", str(tmp_path / "secret.txt")]),
                   str(tmp_path / "pv.parquet"))
    paths = parquet.convert("pageviews", str(tmp_path / "pv.parquet"),
                                    str(tmp_path / "out"), "train", 1, image_dir=str(images),
                                    allow_absolute_image_paths=True)
    got = [_values(r)["pv_images"] for r in raw_records(paths[0])]
    assert got == [[b"\x89PNG a"], [b"secret"]]


def test_nulls_are_bad_rows_named_by_row_and_column(tmp_path):
    t = _pageviews(["a.png", "a.png"])
    (tmp_path / "a.png").write_bytes(b"\x89PNG a")
    catalog = pa.table({"item_id": pa.array([1, 2], pa.int64()),
                        **{c: pa.array([1, 1], pa.int64()) for c in (
                            "category_id", "shop_id", "brand_id", "impressions_30d")},
                        "price": pa.array([1.0, 2.0]), "image_path": pa.array(["a.png", None])})
    for kind, table, column in (("catalog", catalog, "image_path"),
                                ("pageviews", t, "click_item_ids"), ("pageviews", t, "user_id")):
        if kind == "pageviews":
            typ = t.schema.field(column).type
            table = t.set_column(t.schema.get_field_index(column), column,
                                 pa.array([t[column][0].as_py(), None], typ))
        pq.write_table(table, str(tmp_path / "t.parquet"))
        with pytest.raises(ValueError, match=rf"t.parquet: row 1: column '{column}' is null"):
            parquet.convert(kind, str(tmp_path / "t.parquet"), str(tmp_path / "out"),
                                    "train", 1, image_dir=str(tmp_path))


def test_a_rerun_with_other_shards_replaces_the_kinds_files(tmp_path):
    t = pa.table({"query_item_id": pa.array(range(10), pa.int64()),
                  "relevant_item_ids": pa.array([[1, 2]] * 10, pa.list_(pa.int64()))})
    pq.write_table(t, str(tmp_path / "j.parquet"))
    out = str(tmp_path / "out")
    first = parquet.convert("judgments", str(tmp_path / "j.parquet"), out, "all", 4)
    other = parquet.convert("judgments", str(tmp_path / "j.parquet"), out, "test", 1)
    second = parquet.convert("judgments", str(tmp_path / "j.parquet"), out, "all", 3)
    assert len(first) == 4 and len(second) == 3
    pattern = records.default_pattern(out, "judgments", "all")
    assert sorted(glob.glob(pattern)) == sorted(second)
    assert len(raw_records(pattern)) == 10  # each record once
    assert os.path.exists(other[0])  # another split is left alone
    assert sorted(os.listdir(os.path.join(out, "judgments"))) == sorted(
        os.path.basename(p) for p in second + other)  # no scratch left behind
    # A failed run leaves the previous files as they were.
    bad = pa.table({"query_item_id": pa.array([1, None], pa.int64()),
                    "relevant_item_ids": pa.array([[1], [2]], pa.list_(pa.int64()))})
    pq.write_table(bad, str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match="row 1: column 'query_item_id' is null"):
        parquet.convert("judgments", str(tmp_path / "bad.parquet"), out, "all", 2)
    assert sorted(glob.glob(pattern)) == sorted(second) and len(raw_records(pattern)) == 10

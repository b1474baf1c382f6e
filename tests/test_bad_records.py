"""Each kind of bad record: strict mode names file, record and feature; skip mode counts and logs.

Every case writes 8 records where record 3 is bad (a corrupt frame also makes 4..7 unreadable,
and they are counted).
"""
import logging

import numpy as np
import pytest
from tensorflow.core.example import example_pb2

from conftest import raw_records, write_records
from trainer.ctr import spec as ctr_spec
from trainer.data import parse, pipeline, records, validate

BAD = 3
N = 8


def _edit(rec: bytes, fn) -> bytes:
    ex = example_pb2.Example.FromString(rec)
    fn(ex.features.feature)
    return ex.SerializeToString()


def _set_float(name, value):
    def fn(fmap):
        del fmap[name]
        fmap[name].float_list.value.append(value)
    return fn


def _set_int(name, values):
    def fn(fmap):
        del fmap[name]
        fmap[name].int64_list.value.extend(values)
    return fn


def _set_bytes(name, values):
    def fn(fmap):
        del fmap[name]
        fmap[name].bytes_list.value.extend(values)
    return fn


def _drop(name):
    def fn(fmap):
        del fmap[name]
    return fn


def _truncated_jpeg(fmap):
    img = fmap["image"].bytes_list.value[0]
    del fmap["image"]
    fmap["image"].bytes_list.value.append(img[: len(img) // 3])  # valid header, cut body


# (case id, kind, record edit, expected feature, expected words in the reason)
CASES = [
    ("missing_feature", "catalog", _drop("price"), "price", "missing"),
    ("wrong_dtype", "catalog", _set_float("item_id", 1.5), "item_id", "types don't match"),
    ("two_values_for_a_scalar", "catalog", _set_int("category_id", [1, 2]), "category_id",
     "values size"),
    ("label_out_of_range", "ctr", _set_int("label", [2]), "label",
     "must be between 0 and 1 (got 2)"),
    ("negative_id", "catalog", _set_int("shop_id", [-5]), "shop_id", ">= 0"),
    ("nan_price", "catalog", _set_float("price", float("nan")), "price", "not finite"),
    ("garbage_image", "catalog", _set_bytes("image", [b"not an image at all"]), "image",
     "not a JPEG/PNG"),
    ("empty_image", "catalog", _set_bytes("image", [b""]), "image", "empty"),
    ("truncated_jpeg", "catalog", _truncated_jpeg, "image", "jpeg"),
    ("list_length_mismatch", "pageviews", _set_int("pv_labels", [1, 0]), "pv_labels",
     "length differs"),
    ("empty_required_list", "pageviews", _set_int("pv_item_ids", []), "pv_item_ids",
     "at least 1"),
    ("unknown_item_to_join", "pageviews", _set_int("click_item_ids", [12345]), "click_images",
     "catalog lacks"),
    ("over_long_judgment", "judgments", _set_int("relevant_item_ids", list(range(5000))),
     "relevant_item_ids", "more than 4096"),
]


def _good(tiny_world, kind):
    split = {"catalog": "all", "judgments": "all"}.get(kind, "train")
    return raw_records(records.default_pattern(tiny_world, kind, split))[:N]


_STORES = {}


def _pipe(path, kind, tiny_world, skip=False):
    if tiny_world not in _STORES:
        _STORES[tiny_world] = pipeline.load_image_store(
            records.default_pattern(tiny_world, "catalog"))
    cfg = pipeline.InputConfig(path, ctr_spec.record_kind(kind), global_batch_size=4,
                               image_size=32, shuffle=False,
                               repeat=False, drop_remainder=False, deterministic=True,
                               skip_bad_records=skip)
    return pipeline.InputPipeline(cfg, image_store=_STORES[tiny_world])


def _count(pipe) -> int:
    with pipe.errors_named():
        return sum(int(next(iter(b.values())).shape[0]) for b in pipe.dataset())


@pytest.fixture(scope="module")
def cases(tiny_world, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    out = {}
    for case, kind, edit, feature, words in CASES:
        recs = _good(tiny_world, kind)
        recs[BAD] = _edit(recs[BAD], edit)
        out[case] = (write_records(str(d / f"{case}.tfrecord"), recs), kind, feature, words)
    # Not a tf.train.Example at all (a valid TFRecord frame around garbage).
    recs = _good(tiny_world, "catalog")
    recs[BAD] = b"\x0a\xff\xff garbage"
    out["not_an_example"] = (write_records(str(d / "not_an_example.tfrecord"), recs), "catalog",
                             "<record>", "not a serialized tf.train.Example")
    # A flipped byte inside record 3's data: its CRC fails, the rest of the file is unreadable.
    path = write_records(str(d / "corrupt_frame.tfrecord"), _good(tiny_world, "catalog"))
    data = bytearray(open(path, "rb").read())
    offset = sum(16 + len(r) for r in _good(tiny_world, "catalog")[:BAD]) + 12 + 20
    data[offset] ^= 0xFF
    open(path, "wb").write(bytes(data))
    out["corrupt_frame"] = (path, "catalog", "<record>", "corrupt or truncated")
    return out


ALL = [c[0] for c in CASES] + ["not_an_example", "corrupt_frame"]


@pytest.mark.parametrize("case", ALL)
def test_strict_mode_names_file_record_and_feature(case, cases, tiny_world):
    path, kind, feature, words = cases[case]
    with pytest.raises(validate.BadRecordError) as e:
        _count(_pipe(path, kind, tiny_world))
    bad = e.value.bad
    assert (bad.path, bad.index, bad.feature) == (path, BAD, feature), str(e.value)
    assert words.lower() in bad.reason.lower(), str(e.value)
    message = str(e.value)
    assert path in message and f"record {BAD}" in message and f"'{feature}'" in message
    assert "--skip_bad_records" in message


# One case per way a bad record is found: a parse error naming the record, a failed check, an
# image that does not decode (no name: found by scanning), not an Example, a corrupt frame, a join.
SKIP_CASES = ["missing_feature", "label_out_of_range", "truncated_jpeg", "not_an_example",
              "corrupt_frame", "unknown_item_to_join"]


@pytest.mark.parametrize("case", SKIP_CASES)
def test_skip_mode_counts_and_logs(case, cases, tiny_world, caplog):
    path, kind, feature, _ = cases[case]
    pipe = _pipe(path, kind, tiny_world, skip=True)
    with caplog.at_level(logging.WARNING):
        n = _count(pipe)
    expected = BAD if case == "corrupt_frame" else N - 1  # a corrupt frame ends its file
    assert n == expected
    assert pipe.skipped == N - n  # a corrupt frame's lost records are counted too
    logged = caplog.text
    assert f"skipping bad record: {path}: record {BAD}: feature '{feature}'" in logged
    lost = f", {N - BAD - 1} unreadable after a corrupt frame" if case == "corrupt_frame" else ""
    assert f"skip_bad_records: {N} records in 1 files, 1 bad{lost}: skipped" in logged


def test_skip_mode_reads_the_good_records_unchanged(cases, tiny_world):
    path, kind, _, _ = cases["label_out_of_range"]
    pipe = _pipe(path, kind, tiny_world, skip=True)
    got = np.concatenate([b["page_id"].numpy() for b in pipe.dataset()])
    good = [example_pb2.Example.FromString(r) for i, r in enumerate(raw_records(path)) if i != BAD]
    np.testing.assert_array_equal(got, [e.features.feature["page_id"].int64_list.value[0]
                                        for e in good])


def test_clean_files_scan_clean(tiny_world):
    for kind in ("catalog", "pageviews", "ctr"):
        pipe = _pipe(records.default_pattern(tiny_world, kind), kind, tiny_world)
        report = validate.scan(pipe.files, pipe.parser)
        assert report.bad == [] and report.records > 0


def test_duplicate_catalog_ids_are_rejected():
    with pytest.raises(ValueError, match="duplicate item_id 7"):
        parse.ImageStore([1, 7, 7], [b"a", b"b", b"c"])


def test_missing_catalog_for_compact_records(tiny_world):
    cfg = pipeline.InputConfig(records.default_pattern(tiny_world, "pageviews"), "pageviews",
                               global_batch_size=4, image_size=32, shuffle=False, repeat=False)
    pipe = pipeline.InputPipeline(cfg)
    with pytest.raises(validate.BadRecordError, match="no catalog was given"):
        _count(pipe)


def test_errors_not_from_the_input_pass_through_unscanned(tiny_world, monkeypatch):
    import tensorflow as tf
    pipe = _pipe(records.default_pattern(tiny_world, "catalog"), "catalog", tiny_world)
    monkeypatch.setattr(validate, "scan", lambda *a, **k: pytest.fail("scanned the input"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="model says no"):
        with pipe.errors_named():
            tf.debugging.Assert(False, ["model says no"])

"""The Beam pipelines (`trainer.pipelines`) on the in-process DirectRunner: convert equals
the single-process conversion record for record and dead-letters bad rows with their reasons; embed
equals the in-process encoder; vocab equals the in-memory vocabularies; join carries exactly what
the in-model tables look up."""
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from tensorflow.core.example import example_pb2

from conftest import REPO, raw_records, read_all, with_bad_value, write_records
from trainer import configs
from trainer.ctr import model as ctr_model
from trainer.ctr import spec as ctr_spec
from trainer.ctr import tables as ctr_tables
from trainer.data import parquet, parse, records, validate
from trainer.features import clusters as clusters_lib
from trainer.features import embeddings as embeddings_lib
from trainer.pipelines import convert as convert_pipeline
from trainer.pipelines import join as join_pipeline
from trainer.pipelines import vocab as vocab_pipeline

sys.path.insert(0, os.path.join(REPO, "scripts"))
from test_convert_parquet import _ctr_table, _values, catalog_table  # noqa: E402


def test_convert_equals_convert_parquet_record_for_record(tiny_world, tmp_path):
    """ctr records with list columns (several files, small row groups) and the catalog with
    image files: the pipeline's records are the script's, byte for byte (in another order:
    Beam shards by its own)."""
    originals = raw_records(records.default_pattern(tiny_world, "ctr", "test"))[:700]
    rows = [_values(r) for r in originals]
    folder = tmp_path / "ctr"
    folder.mkdir()
    for i, part in enumerate((rows[:300], rows[300:])):
        pq.write_table(_ctr_table(part, "lists"), str(folder / f"part-{i}.parquet"),
                       row_group_size=128)
    ctr = ctr_spec.record_kind("ctr")
    script = parquet.convert(ctr, str(folder), str(tmp_path / "script"), "test", 3)
    beam = convert_pipeline.convert(ctr, str(folder), str(tmp_path / "beam"), "test", 3)
    assert [os.path.basename(p) for p in beam["paths"]] == [os.path.basename(p) for p in script]
    got = [r for p in beam["paths"] for r in raw_records(p)]
    want = [r for p in script for r in raw_records(p)]
    assert sorted(got) == sorted(want) and sorted(want) == sorted(originals)
    assert beam["counters"]["rows"] == beam["counters"]["records"] == 700
    assert convert_pipeline.read_dead_letters(beam["dead_letter"]) == []

    cat, table, img_dir = catalog_table(tiny_world, tmp_path)
    pq.write_table(table, str(tmp_path / "items.parquet"))
    out = convert_pipeline.convert("catalog", str(tmp_path / "items.parquet"),
                                   str(tmp_path / "beam"), "all", 2, image_dir=str(img_dir))
    assert sorted(r for p in out["paths"] for r in raw_records(p)) == sorted(cat)


def test_convert_sends_bad_rows_to_the_dead_letter_output(tiny_world, tmp_path):
    """A missing image, a value of the wrong type and a broken rule: each row lands in the
    dead-letter output with its file and reason; the job completes with the good rows."""
    cat, table, img_dir = catalog_table(tiny_world, tmp_path)
    ids = table.column("item_id").to_pylist()
    os.remove(img_dir / f"{ids[3]}.jpg")  # a missing image
    price = table.column("price").to_pylist()
    price[5] = -2.5  # breaks price's rule (>= 0)
    table = table.set_column(table.schema.get_field_index("price"), "price",
                             pa.array(price, pa.float32()))
    pq.write_table(table, str(tmp_path / "items.parquet"))
    # A file whose brand_id column holds text: every row of it is refused, named.
    bad_type = table.slice(0, 2).set_column(
        table.schema.get_field_index("brand_id"), "brand_id", pa.array(["x", "y"]))
    pq.write_table(bad_type, str(tmp_path / "items_text.parquet"))
    out = convert_pipeline.convert(
        "catalog", f"{tmp_path / 'items.parquet'},{tmp_path / 'items_text.parquet'}",
        str(tmp_path / "out"), "all", 2, image_dir=str(img_dir))
    dead = convert_pipeline.read_dead_letters(out["dead_letter"])
    by_id = {(d["file"].rsplit("/", 1)[1], d["row"]["item_id"]): d for d in dead}
    assert len(dead) == 4, dead
    missing = by_id[("items.parquet", ids[3])]
    assert "no image file for id" in missing["reason"] and missing["stage"] == "convert"
    rule = by_id[("items.parquet", ids[5])]
    assert rule["reason"].startswith("feature 'price': must be >= 0")
    assert rule["stage"] == "validate"
    for i in (0, 1):
        text = by_id[("items_text.parquet", ids[i])]
        assert "column 'brand_id' must hold integer values, not string" in text["reason"]
    got = sorted(r for p in out["paths"] for r in raw_records(p))
    assert got == sorted(r for i, r in enumerate(cat) if i not in (3, 5))
    counters = out["counters"]
    assert counters["rows"] == len(cat) + 2 and counters["records"] == len(cat) - 2
    assert counters["dead_letter_conversion"] == 3 and counters["dead_letter_validation"] == 1


def _assert_vocabularies_equal(got, want):
    assert got.ids.keys() == want.ids.keys() and got.counts.keys() == want.ids.keys()
    for t in want.ids:
        np.testing.assert_array_equal(got.ids[t], want.ids[t])
        np.testing.assert_array_equal(got.counts[t], want.counts[t])
    assert got.boundaries.keys() == want.boundaries.keys()
    for k in want.boundaries:
        np.testing.assert_array_equal(got.boundaries[k], want.boundaries[k])
    assert got.moments.keys() == want.moments.keys()
    for k in want.moments:
        np.testing.assert_allclose(got.moments[k], want.moments[k], rtol=1e-6)


def test_vocab_equals_the_in_memory_vocabularies(tiny_world, tmp_path):
    """The synthetic spec (shared tables, sequences, bucketized price) and a spec with a
    normalised feature and min_count 3: ids, counts, boundaries and moments as in one process."""
    pattern = records.default_pattern(tiny_world, "ctr", "train")
    normalised = ctr_spec.parse({"label": "label", "group": "page_id", "item": "item_id",
                                 "features": [
        {"name": "item_id", "kind": "categorical"},
        {"name": "user_id", "kind": "categorical", "hash_bins": 64},
        {"name": "click_history_item_ids", "kind": "sequence", "max_length": 5,
         "shared_table": "item_id"},
        {"name": "price", "kind": "numeric", "transform": "normalize", "log": True}]},
        "normalised")
    for spec, min_count in ((ctr_spec.load("synthetic"), 1), (normalised, 3)):
        want = ctr_tables.Vocabularies.from_training_data(pattern, spec, min_count)
        got = vocab_pipeline.run(pattern, spec, str(tmp_path / f"{spec.name}.npz"), min_count)
        _assert_vocabularies_equal(got, want)
    assert "user_id" not in got.ids  # hashed: no vocabulary


def test_join_carries_exactly_what_the_in_model_tables_look_up(tiny_world, tmp_path):
    """Vector (centred), SimScore and Cluster-ID entries of the item, query and click-history
    image features equal the CtrModel's own tables' lookups of the parsed ids, record for
    record: padding and ids missing from the tables (some items and queries left out) give
    zeros / 0. The shuffle join and the side-input join agree byte for byte."""
    spec = ctr_spec.load("synthetic")
    recs = raw_records(records.default_pattern(tiny_world, "ctr", "test"))[:400]
    pattern = write_records(str(tmp_path / "ctr" / "in-00000-of-00001.tfrecord"), recs)
    rng = np.random.default_rng(0)
    cat = read_all(tiny_world, "catalog", decode_images=False)
    queries = read_all(tiny_world, "queries", decode_images=False)
    item_ids, query_ids = cat["item_id"][5:], queries["query_id"][3:]  # the rest: unknown

    def unit(n):
        v = rng.normal(size=[n, 8]).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    images = embeddings_lib.EmbeddingTable(
        item_ids, cat["category_id"][5:], cat["impressions_30d"][5:], unit(len(item_ids)),
        query_ids, unit(len(query_ids)))
    table_path = str(tmp_path / "embeddings.npz")
    embeddings_lib.save(images, table_path)
    centroids = clusters_lib.Clusters(unit(6))
    centroids.save(str(tmp_path / "clusters.npz"))
    vocabularies = ctr_tables.Vocabularies.from_training_data(pattern, spec)
    kind = spec.record_kind()
    for mode in ("vector", "simscore", "cluster_id"):
        out = join_pipeline.run(pattern, spec, mode, table_path, str(tmp_path / mode), "train",
                                query_embeddings=table_path,
                                centroids=str(tmp_path / "clusters.npz"), num_shards=2)
        joined = [r for p in out["paths"] for r in raw_records(p)]
        assert len(joined) == len(recs)
        # The side-input join (tables in memory) writes the same records.
        side = join_pipeline.run(pattern, spec, mode, table_path, str(tmp_path / f"{mode}_side"),
                                 "train", query_embeddings=table_path,
                                 centroids=str(tmp_path / "clusters.npz"), num_shards=1,
                                 table_in_memory=True)
        assert sorted(r for p in side["paths"] for r in raw_records(p)) == sorted(joined)
        model = ctr_model.CtrModel(
            configs.CtrConfig(image_feature_mode=mode), spec, vocabularies, images,
            clusters=centroids if mode == "cluster_id" else None)
        # The joined records are the input records plus the joined columns.
        names = tf.constant([f"r:{i}" for i in range(len(joined))])
        batch = parse.RecordParser(kind, decode=False)(names, tf.constant(joined))
        originals = {r for r in recs}
        stripped = set()
        for r in joined:
            example = example_pb2.Example.FromString(r)
            for f in spec.of_kind("image"):
                column = ctr_spec.joined_column(f.name, mode)
                assert column in example.features.feature
                del example.features.feature[column]
            stripped.add(example.SerializeToString(deterministic=True))
        assert stripped == originals
        unknown = padding = 0
        for f in spec.of_kind("image"):
            want = model.image_tables[f.table](batch[f.ids]).numpy()
            column = ctr_spec.joined_column(f.name, mode)
            got = np.stack([np.asarray(_values(r)[column]) for r in joined])
            got = got.reshape(want.shape)
            if mode == "cluster_id":
                np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_allclose(got, want, atol=1e-6)
            ids = batch[f.ids].numpy()
            padding += int((ids == -1).sum())
            unknown += int(((ids != -1) & ~np.isin(ids, np.concatenate(
                [item_ids, query_ids if f.table == "queries" else []]))).sum())
        assert padding > 0 and unknown > 0  # both cases were exercised
        assert out["counters"]["records"] == len(recs)

        # Trained on the joined layout, the model holds no image table and, with the same
        # weights, scores the joined records as the table model scores the ids.
        d = spec.to_dict()
        d["features"] = [{**f, "layout": "joined"} if f["kind"] == "image" else f
                         for f in d["features"]]
        joined_spec = ctr_spec.parse(d, "joined")
        cfg = configs.CtrConfig(image_feature_mode=mode)
        on_joined = ctr_model.CtrModel(
            cfg, joined_spec, vocabularies, images,
            clusters=centroids if mode == "cluster_id" else None).build_variables()
        assert on_joined.image_tables == {}
        path = tf.train.Checkpoint(model=on_joined).write(str(tmp_path / f"{mode}-ckpt"))
        model.build_variables()
        tf.train.Checkpoint(model=model).read(path).expect_partial()
        joined_batch = parse.RecordParser(on_joined.record_kind, decode=False)(
            names, tf.constant(joined))
        np.testing.assert_allclose(on_joined(joined_batch).numpy(), model(batch).numpy(),
                                   atol=1e-5)
        # Evaluation and serving look the ids up in the tables built after a restore.
        on_joined.look_up_joined()
        np.testing.assert_allclose(on_joined(batch).numpy(), model(batch).numpy(), atol=1e-5)


def test_a_bad_record_fails_a_pipeline_naming_it(tiny_world, tmp_path):
    """Whichever worker reads it, a bad record stops the job with its file, index and feature."""
    spec = ctr_spec.load("synthetic")
    path = with_bad_value(records.default_pattern(tiny_world, "ctr", "test"),
                          str(tmp_path / "ctr" / "bad-00000-of-00001.tfrecord"), "price", -1.0)
    with pytest.raises(validate.BadRecordError,
                       match=rf"{path}: record 7: feature 'price': must be >= 0"):
        vocab_pipeline.run(path, spec, str(tmp_path / "vocab.npz"))
    # A file cut short: the frame that does not read is named too.
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) - 40])
    with pytest.raises(validate.BadRecordError,
                       match=rf"{path}: record 19: feature '<record>': corrupt or truncated"):
        vocab_pipeline.run(path, spec, str(tmp_path / "vocab.npz"))


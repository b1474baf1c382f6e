"""Input pipeline: shapes, per-worker sharding, determinism, layouts, compression, distribution."""
import gzip
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import generate_tiny, raw_records, read_all
from trainer.ctr import spec as ctr_spec
from trainer.data import augment, pipeline, records, schema
from trainer.synth import config

L_PV, L_CLICK = schema.L_PV, schema.L_CLICK


def _pipe(d, kind, split="*", **kw):
    kw.setdefault("global_batch_size", 8)
    kw.setdefault("image_size", 32)
    cfg = pipeline.InputConfig(records.default_pattern(d, kind, split),
                               ctr_spec.record_kind(kind),
                               catalog_pattern=records.default_pattern(d, "catalog"), **kw)
    return pipeline.InputPipeline(cfg)


@pytest.mark.parametrize("size", [32, 24])
def test_batch_shapes_of_every_kind(tiny_world, size):
    expect = {
        "catalog": {"item_id": [8], "image": [8, size, size, 3], "price": [8]},
        "queries": {"query_id": [8], "image": [8, size, size, 3]},
        "search_sessions": {"query_image": [8, size, size, 3], "clicked_image": [8, size, size, 3],
                            "clicked_item_id": [8]},
        "pageviews": {"pv_item_ids": [8, L_PV], "pv_labels": [8, L_PV],
                      "pv_item_ids_mask": [8, L_PV], "click_item_ids": [8, L_CLICK],
                      "pv_images": [8, L_PV, size, size, 3],
                      "click_images": [8, L_CLICK, size, size, 3]},
        "ctr": {"label": [8], "click_history_item_ids": [8, schema.L_CTR_HISTORY],
                "preferred_category_ids": [8, 3], "page_id": [8]},
        "judgments": {"relevant_item_ids": [8, 4096], "relevant_item_ids_mask": [8, 4096]},
    }
    for kind, shapes in expect.items():
        pipe = _pipe(tiny_world, kind, image_size=size)
        with pipe.errors_named():
            batch = next(iter(pipe.dataset()))
        for name, shape in shapes.items():
            assert batch[name].shape.as_list() == shape, (kind, name)
        images = [v for k, v in batch.items() if v.dtype == tf.float32 and v.shape.rank >= 4]
        for img in images:
            assert 0.0 <= float(tf.reduce_min(img)) and float(tf.reduce_max(img)) <= 1.0


def test_files_are_sharded_across_input_pipelines(tiny_world):
    cfg = pipeline.InputConfig(records.default_pattern(tiny_world, "catalog"), "catalog",
                               global_batch_size=16, decode_images=False, shuffle=False,
                               repeat=False, drop_remainder=False, deterministic=True)
    pipe = pipeline.InputPipeline(cfg)
    assert len(pipe.files) == 2
    seen = []
    for i in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i,
                                         num_replicas_in_sync=2)
        assert pipeline.shard_files(pipe.files, ctx) == [pipe.files[i]]
        ids = np.concatenate([b["item_id"].numpy() for b in pipe.dataset(ctx)])
        batch_sizes = {b["item_id"].shape[0] for b in pipe.dataset(ctx)}
        assert max(batch_sizes) == 8  # per-replica batch = global / replicas
        seen.append(set(ids.tolist()))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == config.get_world("tiny").num_items


def test_more_pipelines_than_files_is_an_error(tiny_world):
    files = pipeline.list_files(records.default_pattern(tiny_world, "catalog"))
    ctx = tf.distribute.InputContext(num_input_pipelines=3, input_pipeline_id=0)
    with pytest.raises(ValueError, match="at least 3 shards"):
        pipeline.shard_files(files, ctx)


def test_no_matching_files_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no files match"):
        pipeline.list_files(str(tmp_path / "nothing-*.tfrecord"))


def _first_batches(pipe, n=3):
    it = iter(pipe.dataset())
    return [next(it) for _ in range(n)]


def test_deterministic_mode_repeats_exactly(tiny_world):
    def make(seed):
        cfg = pipeline.InputConfig(records.default_pattern(tiny_world, "catalog"), "catalog",
                                   global_batch_size=16, image_size=32, deterministic=True,
                                   seed=seed, shuffle_buffer=64)
        return pipeline.InputPipeline(cfg, transform=augment.s1_views_transform())
    a, b, c = _first_batches(make(0)), _first_batches(make(0)), _first_batches(make(1))
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k].numpy(), y[k].numpy())
    assert not np.array_equal(a[0]["item_id"].numpy(), c[0]["item_id"].numpy())
    # Shuffling actually mixes the files: the first batch is not the first 16 records of file 0.
    first16 = read_all(tiny_world, "catalog", decode_images=False)["item_id"][:16]
    assert not np.array_equal(np.sort(a[0]["item_id"].numpy()), np.sort(first16))


def test_inline_layout_reads_like_the_compact_layout(tiny_world, tmp_path):
    inline = str(tmp_path / "inline")
    generate_tiny(inline, seed=0, inline_images=True)
    a = read_all(tiny_world, "pageviews")
    # Inline records need no catalog: read them without one.
    cfg = pipeline.InputConfig(records.default_pattern(inline, "pageviews"), "pageviews",
                               global_batch_size=256, image_size=32, shuffle=False, repeat=False,
                               drop_remainder=False, deterministic=True)
    pipe = pipeline.InputPipeline(cfg)
    assert pipe.image_store is None
    b = {k: np.concatenate([x[k].numpy() for x in pipe.dataset()]) for k in a}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert a["click_images"].any()


def test_gzip_files_are_read(tiny_world, tmp_path):
    src = pipeline.list_files(records.default_pattern(tiny_world, "catalog"))
    dst = tmp_path / "catalog"
    dst.mkdir()
    for f in src:
        gz = str(dst / (os.path.basename(f) + ".gz"))
        with open(f, "rb") as fin, gzip.open(gz, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    a = read_all(tiny_world, "catalog")
    b = read_all(str(tmp_path), "catalog")
    np.testing.assert_array_equal(a["item_id"], b["item_id"])
    np.testing.assert_array_equal(a["image"], b["image"])


def test_one_pass_reads_every_record_once(tiny_world):
    n = len(raw_records(records.default_pattern(tiny_world, "ctr", "test")))
    ctr = read_all(tiny_world, "ctr", "test")
    assert len(ctr["label"]) == n
    assert len(set(zip(ctr["page_id"].tolist(), ctr["position"].tolist(), strict=True))) == n


def test_distributed_dataset_over_two_replicas(tiny_world, mirrored):
    strategy = mirrored
    pipe = _pipe(tiny_world, "catalog", global_batch_size=16)
    dist = strategy.distribute_datasets_from_function(pipe.dataset)
    batch = next(iter(dist))
    per_replica = strategy.experimental_local_results(batch["image"])
    assert len(per_replica) == 2
    assert [x.shape.as_list() for x in per_replica] == [[8, 32, 32, 3]] * 2
    ids = [set(x.numpy().tolist()) for x in strategy.experimental_local_results(batch["item_id"])]
    assert not ids[0] & ids[1]

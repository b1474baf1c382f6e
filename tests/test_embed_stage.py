"""`--stage=embed`: the Beam embed pipeline over the encoder export equals the in-process encoder,
and starts over when the export changes."""
from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import sys

import faiss
import numpy as np
import tensorflow as tf

from export import encoder as export_encoder
from export_helpers import (
    run_ok,
)
from trainer import configs, registry
from trainer.data import pipeline, records, validate
from trainer.features import catalog_embed, clusters
from trainer.pipelines import embed as embed_pipeline


def test_embed_stage_runs_the_beam_pipeline_and_matches_the_encoder(trained, exports,
                                                                    tiny_world, tmp_path):
    """--stage=embed runs the Beam embed pipeline (RunInference over the export, DirectRunner):
    its embeddings equal the in-process encoder's to 1e-5, its cluster ids the centroids'
    assignment; the table shards, the faiss index and the manifest are written."""
    out_dir = str(tmp_path / "catalog")
    centroids = os.path.join(trained["cluster"][0], "clusters.npz")
    log = run_ok([sys.executable, "-m", "trainer.task", "--stage=embed", f"--data_dir={tiny_world}",
                f"--export_dir={os.path.dirname(exports['encoder'])}", f"--model_dir={out_dir}",
                f"--centroids={centroids}", "--batch_size=64",
                "--set=embed.num_shards=3"])
    assert "embed: done in" in log and "images=" in log  # Beam's counters

    got = dict(np.load(os.path.join(out_dir, "embeddings.npz")))
    table = trained["table"]
    np.testing.assert_array_equal(got["item_id"], np.sort(table.item_id))  # sorted by id
    want = table.item_vector[np.argsort(table.item_id)]
    np.testing.assert_allclose(got["embedding"], want, atol=1e-5)
    np.testing.assert_array_equal(got["cluster_id"],
                                  clusters.Clusters.load(centroids).assign(got["embedding"]))
    shards = sorted(glob.glob(os.path.join(out_dir, "table", "embeddings-*.tfrecord")))
    assert [os.path.basename(p)[-24:] for p in shards] == [
        f"-0000{i}-of-00003.tfrecord" for i in range(3)]
    index = catalog_embed.load_index(os.path.join(out_dir, "catalog.faiss"))
    assert index.ntotal == len(got["item_id"])
    _, top = index.search(got["embedding"][:20], 1)
    np.testing.assert_array_equal(top[:, 0], np.arange(20))
    manifest = catalog_embed.load_manifest(out_dir)
    assert manifest["items"] == len(table.item_id) and manifest["clusters"] == 4
    assert manifest["counters"]["images"] == len(table.item_id)
    assert not os.path.exists(os.path.join(out_dir, "index_sample.npz"))  # exact: none needed


def test_embed_starts_over_when_the_encoder_export_changes(trained, exports, tiny_world,
                                                           tmp_path):
    """Issue 16.4: a new version's rerun in the same out_dir encodes with it (the pipeline's
    table is rewritten whole)."""
    export_dir = str(tmp_path / "encoder")
    shutil.copytree(exports["encoder"], os.path.join(export_dir, "1"))
    cfg = configs.CatalogEmbedConfig(
        catalog_pattern=records.default_pattern(tiny_world, "catalog"), encoder_export=export_dir,
        out_dir=str(tmp_path / "catalog"), batch_size=64, index="ivf", index_sample=300)
    first = embed_pipeline.run(cfg)
    assert first["export"].endswith("/1")
    # The IVF index trains on the pipeline's uniform sample.
    sample = np.load(os.path.join(cfg.out_dir, "index_sample.npz"))["sample"]
    assert sample.shape == (300, first["dim"])
    index = catalog_embed.load_index(os.path.join(cfg.out_dir, "catalog.faiss"))
    assert index.ntotal == first["items"] and faiss.extract_index_ivf(index).nlist == 300 // 39
    old = np.load(os.path.join(cfg.out_dir, "embeddings.npz"))["embedding"]
    # Version 2: the encoder trained one more step.
    enc_dir = str(tmp_path / "s1-more")
    shutil.copytree(trained["encoder"], enc_dir)
    registry.run(dataclasses.replace(
        configs.load(enc_dir), model_dir=enc_dir, data_dir=tiny_world,
        train=configs.TrainConfig(steps=4, global_batch_size=16, log_interval=4,
                                  warmup_steps=0, learning_rate=0.5)))
    export_encoder.export(enc_dir, export_dir)
    second = embed_pipeline.run(cfg)
    assert second["export"].endswith("/2") and second["items"] == len(old)
    assert second["export_fingerprint"] != first["export_fingerprint"]
    table = np.load(os.path.join(cfg.out_dir, "embeddings.npz"))
    got = table["embedding"]
    files = pipeline.list_files(cfg.catalog_pattern)
    first = list(tf.data.TFRecordDataset(files, validate.compression_of(files[0]))
                 .map(lambda s: tf.io.parse_single_example(
                     s, {"image": tf.io.FixedLenFeature([], tf.string),
                         "item_id": tf.io.FixedLenFeature([], tf.int64)}))
                 .take(8).as_numpy_iterator())
    rows = np.searchsorted(table["item_id"], [r["item_id"] for r in first])
    v2 = tf.saved_model.load(os.path.join(export_dir, "2")).signatures["encode_images"]
    np.testing.assert_allclose(
        got[rows], v2(images=tf.constant([r["image"] for r in first]))["embedding"].numpy(),
        atol=1e-5)
    assert not np.allclose(got, old, atol=1e-3)  # the encoder did change

"""Paper 002 Table 5's baselines as stages on the tiny world: the synthetic world's item titles,
their tokenisation, and the SimSiam, CLIP and Supervised stages training, checkpointing their
heads and giving an encoder that restores and embeds like any other; Supervised's click loss
reaches the encoder; CLIP refuses a catalog without titles, which every other stage still
reads."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import read_all
from trainer import configs, registry
from trainer.ctr import spec as ctr_spec
from trainer.ctr import supervised
from trainer.ctr import task as ctr_task
from trainer.data import pipeline, records
from trainer.features import embeddings
from trainer.models import clip, encoder, text
from trainer.synth import titles, truth
from trainer.train import loop

ENC = configs.EncoderConfig(depth=10, width_multiplier=0.25, image_size=32, feature_dim=16)
TRAIN = configs.TrainConfig(steps=2, global_batch_size=16, warmup_steps=0, log_interval=1)
SMALL_TEXT = configs.TextConfig(hash_buckets=1024, max_words=8, width=16, layers=1, heads=2)


def test_titles_name_some_of_what_the_image_shows(tiny_world):
    catalog = read_all(tiny_world, "catalog")
    t = truth.load(tiny_world)
    cat = t["items"]["category"][truth.index_of(catalog["item_id"], t["items"]["item_id"])]
    words = [title.decode().split() for title in catalog["title"]]
    assert all(words)
    named = np.mean([titles.CATEGORY_WORDS[c] in w for c, w in zip(cat, words, strict=True)])
    assert 0.75 < named < 0.95  # most titles name the category, not all (config: 85%)
    brands = np.mean([any(x.startswith("brand") for x in w) for w in words])
    assert 0.45 < brands < 0.75  # the brand, which no image shows (60%)


def test_tokenize_folds_case_drops_punctuation_and_truncates():
    cfg = configs.TextConfig(hash_buckets=1000, max_words=4)
    ids = text.tokenize(tf.constant(["Brand7, RED  dress!", "brand7 red dress", "",
                                     "a b c d e f"]), cfg).numpy()
    assert ids.shape == (4, 4)
    np.testing.assert_array_equal(ids[0], ids[1])
    assert (ids[0, :3] > 0).all() and ids[0, 3] == 0 and (ids[2] == 0).all()
    assert (ids[3] > 0).all() and len(set(ids[3])) == 4  # the first 4 words of 6
    assert ids.max() <= 1000


def test_padding_does_not_change_a_title_vector():
    tower = text.TextEncoder(SMALL_TEXT, 16)
    ids = np.zeros([1, SMALL_TEXT.max_words], np.int64)
    ids[0, :3] = [5, 9, 2]
    longer = ids.copy()
    longer[0, 3] = 7
    a, b = tower(tf.constant(ids)).numpy(), tower(tf.constant(longer)).numpy()
    assert not np.allclose(a, b)  # a fourth word counts; padding's embedding never does
    table = tower.embedding.embeddings.numpy()
    table[0] = np.random.default_rng(0).normal(0, 100, table.shape[1])
    tower.embedding.embeddings.assign(table)
    np.testing.assert_allclose(tower(tf.constant(ids)).numpy(), a, atol=1e-5)


@pytest.mark.parametrize("stage", ["simsiam", "clip", "maskclip", "supervised", "courier_clip"])
def test_baseline_stage_trains_and_gives_an_encoder(stage, tiny_world, tmp_path):
    model_dir = str(tmp_path / stage)
    extra: dict = {"maskclip": {"clip": configs.ClipConfig(text=SMALL_TEXT,
                                                           masked_distillation=True)},
                   "clip": {"clip": configs.ClipConfig(text=SMALL_TEXT)},
                   "courier_clip": {"courier": configs.CourierConfig(clip_weight=1.0,
                                                                     text=SMALL_TEXT)},
                   }.get(stage, {})
    stage = {"maskclip": "clip", "courier_clip": "courier"}.get(stage, stage)
    registry.run(configs.STAGES[stage](
        data_dir=tiny_world, model_dir=model_dir, encoder=ENC, train=TRAIN, **extra))
    saved = configs.load(model_dir)
    assert saved.stage == stage and saved.encoder.architecture() == ENC.architecture()
    names = [n for n, _ in tf.train.list_variables(os.path.join(model_dir, "ckpt"))]
    head = {"simsiam": "predictor", "clip": "text", "supervised": "ctr", "courier": "text"}[stage]
    assert any(n.startswith(f"{head}/") for n in names), names[:20]
    if stage in ("clip", "courier"):
        assert any(n.startswith("logit_scale/") for n in names)
    if stage == "clip":
        distilled = any(n.startswith("distillation/teacher/") for n in names)
        assert distilled == saved.clip.masked_distillation
    restored = encoder.restore(model_dir)
    table = embeddings.for_encoder(model_dir, records.default_pattern(tiny_world, "catalog"), "")
    v = table.catalog()["embedding"]
    assert v.shape == (480, ENC.feature_dim) and np.isfinite(v).all()
    assert restored.cfg.feature_dim == ENC.feature_dim


def test_clip_refuses_a_catalog_without_titles_that_others_read(tiny_world, tmp_path):
    out = tmp_path / "catalog"
    out.mkdir()
    for path in glob.glob(records.default_pattern(tiny_world, "catalog")):
        with tf.io.TFRecordWriter(str(out / os.path.basename(path))) as w:
            for raw in tf.data.TFRecordDataset(path):
                ex = tf.train.Example.FromString(raw.numpy())
                del ex.features.feature["title"]
                w.write(ex.SerializeToString())
    pattern = str(out / "*")
    absent = pipeline.read_columns(pattern, "catalog", ("item_id", "title"))
    assert len(absent["item_id"]) == 480 and (absent["title"] == b"").all()
    with pytest.raises(ValueError, match="has no item titles") as err:
        clip.require_titles(pattern)
    assert pattern in str(err.value)


def test_supervised_click_loss_trains_the_encoder(tiny_world, tmp_path):
    spec = ctr_spec.load("synthetic")
    cfg = configs.CtrConfig(train_pattern=records.default_pattern(tiny_world, "ctr", "train"))
    task = supervised.SupervisedTask(
        cfg, spec, ctr_task.vocabularies_for(str(tmp_path), cfg, spec),
        records.default_pattern(tiny_world, "catalog"), ENC, TRAIN)
    enc = task.build_model()
    batch = next(iter(task.build_inputs()))
    assert batch["item_image"].shape == (16, 32, 32, 3)
    with tf.GradientTape() as tape:
        loss, _ = task.compute_loss(dict(batch))
    grads = tape.gradient(loss, enc.trainable_variables)
    assert all(g is not None for g in grads)
    assert float(tf.linalg.global_norm(grads)) > 0


def test_maskclip_masks_patches_and_words_of_the_students_input(tiny_world):
    cfg = configs.ClipConfig(catalog_pattern=records.default_pattern(tiny_world, "catalog"),
                             text=SMALL_TEXT, masked_distillation=True, mask_patch=8,
                             mask_ratio=0.5, word_mask_ratio=0.3)
    train = configs.TrainConfig(global_batch_size=64)
    batch = next(iter(clip.title_pipeline(cfg, ENC, train, False).dataset()))
    patches = batch["patch_mask"].numpy()
    assert patches.shape == (64, 4, 4) and 0.35 < patches.mean() < 0.65
    pixels = np.repeat(np.repeat(patches, 8, 1), 8, 2)
    masked, image = batch["masked_image"].numpy(), batch["image"].numpy()
    np.testing.assert_allclose(masked[pixels], np.broadcast_to(
        encoder.MEAN_RGB, masked.shape)[pixels], atol=1e-6)
    np.testing.assert_array_equal(masked[~pixels], image[~pixels])
    ids, student, words = (batch[k].numpy() for k in ("title_ids", "masked_title_ids",
                                                     "word_mask"))
    assert (ids[words] > 0).all() and 0.15 < words.sum() / (ids > 0).sum() < 0.45
    assert (student[words] == text.mask_id(SMALL_TEXT)).all()
    np.testing.assert_array_equal(student[~words], ids[~words])


def test_moving_average_updates_each_variable_once_on_two_replicas(mirrored):
    with mirrored.scope():
        target = tf.Variable([1.0, 2.0])
        source = tf.Variable([3.0, 6.0])

    @tf.function
    def step():
        mirrored.run(lambda: loop.moving_average([target], [source], 0.75))

    step()
    for v in mirrored.experimental_local_results(target):
        np.testing.assert_allclose(v.numpy(), [1.5, 3.0])

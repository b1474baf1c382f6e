"""The encoder export for TF Serving on the tiny world: signatures as documented (saved_model_cli),
outputs equal to the Keras model, warmup records that run, serving inputs checked and empty
requests served, and the op audit of every export (core TensorFlow ops only)."""
from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import read_all
from export import common
from export import ctr as export_ctr
from export import encoder as export_encoder
from export_helpers import (
    CLI,
    ops_of,
    png_header,
    run_ok,
    show,
)
from trainer.ctr import model as ctr_model
from trainer.data import parse, records, validate
from trainer.models import encoder


def test_encoder_signatures_and_outputs_equal_the_keras_model(trained, exports, tiny_world,
                                                              tmp_path):
    path = exports["encoder"]
    assert os.path.basename(path) == "1"
    shown = show(path)
    for sig in ("serving_default", "encode_images", "encode_pixels"):
        assert f"signature_def['{sig}']" in shown
    assert "dtype: DT_STRING\n        shape: (-1)" in shown
    assert "shape: (-1, 32, 32, 3)" in shown and "shape: (-1, 32)" in shown

    cat = read_all(tiny_world, "catalog")
    files = sorted(glob.glob(records.default_pattern(tiny_world, "catalog")))
    raw = [r for r in tf.data.TFRecordDataset(files, validate.compression_of(files[0]))
           .map(lambda s: tf.io.parse_single_example(
            s, {"image": tf.io.FixedLenFeature([], tf.string)})["image"]).take(12)
           .as_numpy_iterator()]
    keras = encoder.restore(trained["encoder"])
    loaded = tf.saved_model.load(path)
    want = keras(parse.decode_images(tf.constant(raw), 32), training=False).numpy()
    got = loaded.signatures["encode_images"](images=tf.constant(raw))["embedding"].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    got = loaded.signatures["encode_pixels"](pixels=tf.constant(cat["image"][:12]))["embedding"]
    np.testing.assert_allclose(got.numpy(), keras(cat["image"][:12], training=False).numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got.numpy(), axis=1), 1.0, atol=1e-5)

    # saved_model_cli run on both signatures.
    # (One image: a fixed-width bytes array would pad the shorter ones with NULs.)
    np.save(tmp_path / "images.npy", np.array(raw[:1], dtype="S"))
    np.save(tmp_path / "pixels.npy", cat["image"][:3])
    for sig, arg, expected in (
            ("encode_images", f"images={tmp_path / 'images.npy'}", want[:1]),
            ("encode_pixels", f"pixels={tmp_path / 'pixels.npy'}",
             keras(cat["image"][:3], training=False).numpy())):
        outdir = tmp_path / sig
        run_ok([CLI, "run", "--dir", path, "--tag_set", "serve", "--signature_def", sig,
              "--inputs", arg, "--outdir", str(outdir)])
        np.testing.assert_allclose(np.load(outdir / "embedding.npy"), expected, atol=1e-5)

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"request:1.*image.*not a JPEG"):
        loaded.signatures["encode_images"](images=tf.constant([raw[0], b"not an image"]))


def test_warmup_records_parse_and_run(exports):
    for name in ("encoder", "debias", "cluster"):
        logs = common.read_warmup(exports[name])
        assert 0 < len(logs) <= common.MAX_WARMUP_RECORDS
        loaded = tf.saved_model.load(exports[name])
        sigs = set()
        for log in logs:
            request = log.predict_log.request
            sigs.add(request.model_spec.signature_name)
            out = common.run_request(loaded, request)
            first = next(iter(request.inputs.values()))
            assert all(len(v) == first.tensor_shape.dim[0].size for v in out.values())
        assert sigs == ({"encode_images", "encode_pixels"} if name == "encoder"
                        else {"serving_default", "predict_examples", "rank"})


def test_serving_inputs_are_checked_and_empty_requests_served(trained, exports, tiny_world):
    """Issue 16.7: empty batches, the decoded-pixel cap, pixel checks, mismatched row counts."""
    enc = tf.saved_model.load(exports["encoder"]).signatures
    images = export_encoder.sample_images(2, 32)
    assert enc["encode_images"](images=tf.constant([], tf.string))["embedding"].shape == [0, 32]
    assert enc["encode_pixels"](pixels=tf.zeros([0, 32, 32, 3]))["embedding"].shape == [0, 32]
    # 8000 x 8000 declared by a 33-byte header: refused before anything is decoded.
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"request:1.*image.*larger than max_image_pixels = 16777216.*"
                             r"got.*8000 8000"):
        enc["encode_images"](images=tf.constant([images[0], png_header(8000, 8000)]))
    small = export_encoder.EncoderServing(encoder.restore(trained["encoder"]),
                                          max_image_pixels=32 * 32)
    assert small.encode_images(tf.constant(images))["embedding"].shape == [2, 32]
    big = export_encoder.sample_images(1, 40)[0]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"request:2.*max_image_pixels = "
                                                             r"1024.*got.*40 40"):
        small.encode_images(tf.constant(images + [big]))
    pixels = np.full([3, 32, 32, 3], 0.5, np.float32)
    nan = pixels.copy()
    nan[1, 4, 4, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"request:1.*pixels.*NaN"):
        enc["encode_pixels"](pixels=tf.constant(nan))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"request:0.*pixels.*\[0, 1\]"):
        enc["encode_pixels"](pixels=tf.constant(pixels * 255))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"pixels.{0,3}: must be \[N, 32, 32, 3\]; got.*3 16 16 3"):
        enc["encode_pixels"](pixels=tf.zeros([3, 16, 16, 3]))

    ctr = tf.saved_model.load(exports["debias"]).signatures
    model = trained["debias"][1]
    inputs = export_ctr.sample_requests(model.spec, model.vocabularies, 4)
    empty = {k: tf.constant(v[:0]) for k, v in inputs.items()}
    assert ctr["serving_default"](**empty)["ctr"].shape == [0]
    assert ctr["predict_examples"](examples=tf.constant([], tf.string))["ctr"].shape == [0]
    short = {k: tf.constant(v[:3] if k == "price" else v) for k, v in inputs.items()}
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"feature .{0,2}price.{0,2} has\] \[3\] \[rows, but .*has\] \[4\]"):
        ctr["serving_default"](**short)


def test_every_exported_op_is_a_core_tensorflow_op(trained, exports, tmp_path):
    """What the model server can load: core TensorFlow ops only (no PyFunc, no tensorflow-io or
    TF-Text ops), for the encoder and every CTR mode (vector, simscore, cluster_id, +D)."""
    core = set(dir(tf.raw_ops))
    forbidden = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
    dirs = {name: exports[name] for name in ("encoder", "debias", "cluster")}
    base = trained["debias"][1]
    keras = encoder.restore(trained["encoder"])
    for mode in ("vector", "simscore"):  # untrained: the ops, not the weights, are audited
        cfg = dataclasses.replace(base.cfg, debias=None, image_feature_mode=mode)
        model = ctr_model.CtrModel(cfg, base.spec, base.vocabularies,
                                   trained["table"]).build_variables()
        module = export_ctr.CtrServing(model, keras)
        # rank holds the mode's model and the encoder; the other two signatures add only the
        # parsing that the exports above already hold.
        rank = module.rank.get_concrete_function(**export_ctr.rank_input_specs(base.spec, True))
        dirs[mode] = common.save(module, {"rank": rank}, str(tmp_path / mode), [], {})
    for name, path in dirs.items():
        ops = ops_of(path)
        assert "DecodeImage" in ops or "DecodePng" in ops or name != "encoder"
        assert not ops & forbidden and ops <= core, (name, sorted(ops - core), ops & forbidden)
    assert {"DecodeImage", "ArgMin"} <= ops_of(dirs["cluster"])  # the photo, the centroid

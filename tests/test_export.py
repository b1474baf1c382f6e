"""Exports for TF Serving on the tiny world: signatures as documented (saved_model_cli), outputs
equal to the in-process models, warmup records that run, serving configs that parse, the client
against an in-process stand-in of the model server, and the catalog batch-encoding stage."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import faiss
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, read_all
from export import client as client_lib
from export import common, serving_protos, stand_in_server
from export import ctr as export_ctr
from export import encoder as export_encoder
from trainer import configs
from trainer.ctr import model as ctr_model
from trainer.ctr import tables as ctr_tables
from trainer.ctr import task as ctr_task
from trainer.data import parse, pipeline, records, validate
from trainer.features import catalog_embed, clusters, embeddings, versions
from trainer.models import encoder
from trainer.pipelines import embed as embed_pipeline
from trainer.stages import ctr as ctr_stage
from trainer.stages import encoders as encoder_stages

ENC = configs.EncoderConfig(depth=10, width_multiplier=0.5, image_size=32, feature_dim=32)
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


def _run(args, **kw):
    out = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
                         **kw)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def ctr_config(world: str, model_dir: str, stage: str = "ctr", **sets) -> configs.CtrStage:
    """A brief CTR run's config; `sets` are config paths with '__' for '.'."""
    cfg = configs.apply(configs.for_stage(stage), {
        "data_dir": world, "model_dir": model_dir, "train": {
            "steps": 20, "global_batch_size": 64, "warmup_steps": 0, "log_interval": 20},
        "ctr": {"tower_units": [32, 16]}})
    for path, value in sets.items():
        cfg = configs.override(cfg, path.replace("__", "."), value)
    return cfg  # type: ignore[return-value]


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory) -> dict:
    """A briefly trained encoder and two CTR models on its features, through the stages' own
    runners: vector + D, and cluster_id."""
    root = tmp_path_factory.mktemp("trained")
    enc_dir = str(root / "s1")
    encoder_stages.run_training(configs.PretrainStage(
        data_dir=tiny_world, model_dir=enc_dir, encoder=ENC, train=configs.TrainConfig(
            steps=3, global_batch_size=16, log_interval=3, warmup_steps=0)))
    table = embeddings.for_encoder(enc_dir, records.default_pattern(tiny_world, "catalog"),
                                   records.default_pattern(tiny_world, "queries"))
    out = {"encoder": enc_dir, "table": table}
    ctr_stage.run_ctr(ctr_config(tiny_world, str(root / "debias"), "debias",
                                 images__encoder="s1", images__model_dir=enc_dir,
                                 images__s1_model_dir=enc_dir))
    ctr_stage.run_ctr(ctr_config(tiny_world, str(root / "cluster"), images__encoder="s1",
                                 images__model_dir=enc_dir, ctr__image_feature_mode="cluster_id",
                                 cluster__num_clusters=4))
    for name in ("debias", "cluster"):
        out[name] = (str(root / name), ctr_task.load_trained(str(root / name)))
    return out


@pytest.fixture(scope="module")
def exports(trained, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    _run([sys.executable, "-m", "export.encoder", f"--model_dir={trained['encoder']}",
          f"--export_dir={root / 'encoder'}"])
    out = {"encoder": versions.latest_version_dir(str(root / "encoder")), "root": str(root)}
    for name in ("debias", "cluster"):
        out[name] = export_ctr.export(trained[name][0], str(root / name))
    return out


def _show(path: str) -> str:
    return _run([CLI, "show", "--dir", path, "--all"])


def test_encoder_signatures_and_outputs_equal_the_keras_model(trained, exports, tiny_world,
                                                              tmp_path):
    path = exports["encoder"]
    assert os.path.basename(path) == "1"
    shown = _show(path)
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
        _run([CLI, "run", "--dir", path, "--tag_set", "serve", "--signature_def", sig,
              "--inputs", arg, "--outdir", str(outdir)])
        np.testing.assert_allclose(np.load(outdir / "embedding.npy"), expected, atol=1e-5)

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"request:1.*image.*not a JPEG"):
        loaded.signatures["encode_images"](images=tf.constant([raw[0], b"not an image"]))


def _examples(pattern: str, n: int) -> list[bytes]:
    files = sorted(glob.glob(pattern))
    return list(tf.data.TFRecordDataset(files, validate.compression_of(files[0])).take(n)
                .as_numpy_iterator())


@pytest.mark.parametrize("name", ["debias", "cluster"])
def test_ctr_export_is_self_contained_and_equals_the_model(name, trained, exports, tiny_world,
                                                           tmp_path):
    path = exports[name]
    shown = _show(path)
    assert "signature_def['serving_default']" in shown
    assert "signature_def['predict_examples']" in shown
    assert "inputs['click_history_item_ids'] tensor_info:\n        dtype: DT_INT64\n" \
           "        shape: (-1, -1)" in shown
    assert "outputs['ctr'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1)" in shown

    model = trained[name][1]
    test = records.default_pattern(tiny_world, "ctr", "test")
    n = 300
    examples = _examples(test, n)
    spec = model.spec
    parsed = parse.RecordParser(spec.record_kind(), decode=False)(
        parse.record_names(tf.constant("x"), tf.range(n, dtype=tf.int64)), tf.constant(examples))
    want = tf.sigmoid(model(parsed)).numpy()
    # Nothing but the SavedModel.
    loaded = tf.saved_model.load(path)
    got = loaded.signatures["predict_examples"](examples=tf.constant(examples))["ctr"]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)

    rows = {k: v[:n] for k, v in read_all(tiny_world, "ctr", "test").items()}
    inputs = {k: tf.constant(np.where(rows[k + "_mask"], rows[k], -1) if spec.is_sequence(k)
                             else rows[k])
              for k in spec.inputs}
    got = loaded.signatures["serving_default"](**inputs)["ctr"].numpy()
    want = tf.sigmoid(model(rows)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)

    # Unknown ids share the out-of-vocabulary rows: two unseen item ids score alike.
    a, b = dict(inputs), dict(inputs)
    a["item_id"] = tf.fill([n], tf.constant(10 ** 12, tf.int64))
    b["item_id"] = tf.fill([n], tf.constant(10 ** 12 + 7, tf.int64))
    sa = loaded.signatures["serving_default"](**a)["ctr"].numpy()
    np.testing.assert_allclose(sa, loaded.signatures["serving_default"](**b)["ctr"].numpy())
    assert np.isfinite(sa).all()
    # Malformed requests fail naming the row and the feature.
    bad = dict(inputs)
    bad["price"] = tf.constant(np.r_[rows["price"][:2], -1.0].astype(np.float32))
    bad = {k: v[:3] for k, v in bad.items()}
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"request:2.*price.*>= 0"):
        loaded.signatures["serving_default"](**bad)
    example = tf.train.Example()
    example.ParseFromString(_examples(test, 1)[0])
    del example.features.feature["shop_id"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"request:0.*shop_id.*required"):
        loaded.signatures["predict_examples"](examples=tf.constant([
            example.SerializeToString()]))

    # saved_model_cli run on both signatures (literal inputs, and Examples it builds).
    one = {k: v.numpy()[:1].tolist() for k, v in inputs.items()}
    exprs = ";".join(f"{k}={v}" for k, v in one.items())
    _run([CLI, "run", "--dir", path, "--tag_set", "serve", "--signature_def",
          "serving_default", "--input_exprs", exprs, "--outdir", str(tmp_path / "a")])
    np.testing.assert_allclose(np.load(tmp_path / "a" / "ctr.npy"), want[:1], atol=1e-5)
    feats = {k: (v[0] if isinstance(v[0], list) else v) for k, v in one.items()}
    feats = {k: [x for x in v if x != -1] if spec.is_sequence(k) else v
             for k, v in feats.items()}
    _run([CLI, "run", "--dir", path, "--tag_set", "serve", "--signature_def",
          "predict_examples", "--input_examples", f"examples=[{json.dumps(feats)}]",
          "--outdir", str(tmp_path / "b")])
    np.testing.assert_allclose(np.load(tmp_path / "b" / "ctr.npy"), want[:1], atol=1e-5)


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


def test_serving_config_parses_against_the_protos(tmp_path):
    out = serving_protos.check_config_dir(os.path.join(REPO, "serving_config"))
    models = {c.name: c for c in out["models"].model_config_list.config}
    assert set(models) == {"encoder", "ctr"}
    assert models["ctr"].version_labels["stable"] == 1
    assert out["batching"].max_batch_size.value == out["batching"].allowed_batch_sizes[-1]
    assert out["monitoring"].prometheus_config.enable
    # Strict: a misspelled field is an error.
    (tmp_path / "batching.config").write_text("max_batch_size { value: 8 }\nbatch_timeout_ms: 3\n")
    with pytest.raises(ValueError, match="batch_timeout_ms"):
        serving_protos.parse_batching_config(str(tmp_path / "batching.config"))


def test_clients_against_a_stand_in_server(exports, trained):
    import grpc
    servables = stand_in_server.Servables({"encoder": os.path.dirname(exports["encoder"]),
                                           "ctr": os.path.dirname(exports["debias"])})
    server, port = stand_in_server.start_grpc(servables)
    rest, rest_port = stand_in_server.start_rest(servables)
    try:
        images = export_encoder.sample_images(3, 32)
        want = tf.saved_model.load(exports["encoder"]).signatures["encode_images"](
            images=tf.constant(images))["embedding"]
        model = trained["debias"][1]
        # The client reads the spec the export carries.
        spec = client_lib.spec_of_export(os.path.dirname(exports["debias"]))
        assert spec.to_dict() == model.spec.to_dict()
        inputs = export_ctr.sample_requests(spec, model.vocabularies, 5, seed=1)
        user_features = ("user_id", "age_bucket", "gender", "device", "query_id",
                         "click_history_item_ids", "preferred_category_ids")
        inputs.update({k: np.repeat(inputs[k][:1], 5, axis=0) for k in user_features})
        user = {k: inputs[k][0].tolist() for k in user_features}
        user = {k: [x for x in v if x != -1] if isinstance(v, list) else v
                for k, v in user.items()}
        candidates = [{k: inputs[k][i].item() for k in spec.inputs if k not in user_features}
                      for i in range(5)]
        ctr_want = tf.saved_model.load(exports["debias"]).signatures["serving_default"](
            **{k: tf.constant(v) for k, v in inputs.items()})["ctr"].numpy()
        for c in (client_lib.GrpcClient(f"127.0.0.1:{port}"),
                  client_lib.RestClient(f"http://127.0.0.1:{rest_port}")):
            np.testing.assert_allclose(c.encode(images), want.numpy(), atol=1e-6)
            np.testing.assert_allclose(c.rank(user, candidates, spec), ctr_want, atol=1e-6)
        bad = [dict(candidates[0], price=-3.0)]
        with pytest.raises(grpc.RpcError) as e:
            client_lib.GrpcClient(f"127.0.0.1:{port}").rank(user, bad, spec)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "price" in e.value.details()
        with pytest.raises(RuntimeError, match=r"(?s)HTTP 400.*price"):
            client_lib.RestClient(f"http://127.0.0.1:{rest_port}").rank(user, bad, spec)
        # The command-line client, over gRPC.
        png = os.path.join(exports["root"], "a.png")
        with open(png, "wb") as f:
            f.write(images[0])
        out = _run([sys.executable, "scripts/serving_client.py", f"--grpc=127.0.0.1:{port}",
                    "encode", png])
        assert "D=32 norm=1.0000" in out
    finally:
        server.stop(0)
        rest.shutdown()


def test_embed_stage_runs_the_beam_pipeline_and_matches_the_encoder(trained, exports,
                                                                    tiny_world, tmp_path):
    """--stage=embed runs the Beam embed pipeline (RunInference over the export, DirectRunner):
    its embeddings equal the in-process encoder's to 1e-5, its cluster ids the centroids'
    assignment; the table shards, the faiss index and the manifest are written."""
    out_dir = str(tmp_path / "catalog")
    centroids = os.path.join(trained["cluster"][0], "clusters.npz")
    log = _run([sys.executable, "-m", "trainer.task", "--stage=embed", f"--data_dir={tiny_world}",
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
    manifest = json.load(open(os.path.join(out_dir, "manifest.json")))
    assert manifest["items"] == len(table.item_id) and manifest["clusters"] == 4
    assert manifest["counters"]["images"] == len(table.item_id)
    assert not os.path.exists(os.path.join(out_dir, "index_sample.npz"))  # flat: none needed


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
    encoder_stages.run_training(dataclasses.replace(
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


def _png_header(height: int, width: int) -> bytes:
    """A PNG signature and IHDR declaring height x width, without image data."""
    import struct
    import zlib
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr
            + struct.pack(">I", zlib.crc32(ihdr)))


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
        enc["encode_images"](images=tf.constant([images[0], _png_header(8000, 8000)]))
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


def test_stand_in_rest_answers_bad_requests_as_tf_serving_does(exports):
    """Issue 16.8: 400 with the reason on bad JSON, 404 for an unknown model, the row format of
    b64 values, a read timeout."""
    import base64
    import socket
    import urllib.error
    import urllib.request
    servables = stand_in_server.Servables({"encoder": os.path.dirname(exports["encoder"])})
    rest, port = stand_in_server.start_rest(servables, timeout_seconds=0.5)
    url = f"http://127.0.0.1:{port}/v1/models"

    def post(path: str, data: bytes) -> tuple[int, dict]:
        req = urllib.request.Request(url + path, data=data, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        images = export_encoder.sample_images(2, 32)
        want = tf.saved_model.load(exports["encoder"]).signatures["encode_images"](
            images=tf.constant(images))["embedding"].numpy()
        rows = [{"b64": base64.b64encode(b).decode()} for b in images]
        code, body = post("/encoder:predict", json.dumps({"instances": rows}).encode())
        assert code == 200, body
        np.testing.assert_allclose(body["predictions"], want, atol=1e-5)
        code, body = post("/encoder/versions/1:predict", json.dumps(
            {"instances": [{"images": r} for r in rows]}).encode())
        assert code == 200 and len(body["predictions"]) == 2
        for path, data, want_code, words in (
                ("/encoder:predict", b"{not json", 400, "not JSON"),
                ("/encoder:predict", b"[1, 2]", 400, "JSON object"),
                ("/nope:predict", b"{}", 404, "Servable not found"),
                ("/encoder/versions/9:predict", json.dumps({"instances": rows}).encode(), 404,
                 "Specific(encoder, 9)"),
                ("/encoder:predict", json.dumps({"inputs": {"imagez": rows}}).encode(), 400,
                 "no input 'imagez'"),
                ("/encoder:predict", json.dumps({"instances": [{"b64": "%%%"}]}).encode(), 400,
                 "not base64")):
            code, body = post(path, data)
            assert code == want_code and words in body["error"], (path, code, body)
        with urllib.request.urlopen(url + "/encoder", timeout=30) as r:
            assert json.loads(r.read())["model_version_status"][0]["state"] == "AVAILABLE"
        # A client that stops sending mid-body is dropped after the read timeout.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/models/encoder:predict HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: 100\r\n\r\n{\"inst")
            assert s.recv(1024) == b""  # closed by the server, well before our 10 s
    finally:
        rest.shutdown()


# Issue 17: serving a visual-search request (a new photo, new items, one ranking call).

def _page_rows(spec, rows: dict, n: int, start: int = 0) -> dict:
    """serving_default inputs of one page of `n` candidates from test records: the request
    features of the first record on every row, candidate features of each."""
    out = {}
    for k in spec.inputs:
        v = rows[k][start:start + n]
        if spec.is_sequence(k):
            v = np.where(rows[k + "_mask"][start:start + n], v, -1)
        if spec.scope(k) == "request":
            v = np.repeat(v[:1], n, axis=0)
        out[k] = v
    return out


def _model_batch(spec, inputs: dict) -> dict:
    """The Keras model's batch (masks for the id lists) of serving_default inputs."""
    batch = {}
    for k, v in inputs.items():
        if spec.is_sequence(k):
            batch[k], batch[k + "_mask"] = tf.constant(np.maximum(v, 0)), tf.constant(v != -1)
        else:
            batch[k] = tf.constant(v)
    return batch


def _table_entry(table, vectors: np.ndarray) -> np.ndarray:
    """What a trained model's image table holds for encoder vectors, computed outside the graph:
    the nearest centroid (faiss) + 1, or unit(v - centre)."""
    if isinstance(table, ctr_tables.ClusterTable):
        return clusters.Clusters(table.centroids.numpy()).assign(vectors) + 1
    if table.center is None:
        return vectors
    x = vectors - table.center
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("name", ["debias", "cluster"])
def test_rank_scores_a_new_query_photo_as_the_model_does(name, trained, exports, tiny_world):
    """A photo in no training record, as bytes, with 20 candidates: the scores of the in-process
    model given the encoder's vector for it; the id-only path cannot do that."""
    loaded = tf.saved_model.load(exports[name])
    rank = loaded.signatures["rank"]
    model = ctr_task.load_trained(trained[name][0])  # a copy whose table the test changes
    spec = model.spec
    rows = _page_rows(spec, read_all(tiny_world, "ctr", "test"), 20)
    photo = export_encoder.sample_images(1, 32, seed=2026)[0]
    got = rank(**{k: tf.constant(v) for k, v in client_lib.page_inputs(
        spec, rows, {"query_image": photo}).items()})["ctr"].numpy()
    assert got.shape == (1, 20)

    # The in-process model, its query table's row for some id set to what it would hold for
    # the photo's vector from the Keras encoder (centred, or its faiss-nearest centroid).
    keras = encoder.restore(trained["encoder"])
    vector = keras(parse.decode_images(tf.constant([photo]), 32), training=False).numpy()
    queries = model.image_tables["queries"]
    query_id = int(trained["table"].query_id[0])
    row = int(queries.rows(tf.constant([query_id], tf.int64)).numpy()[0])
    queries.table[row].assign(_table_entry(queries, vector)[0])
    as_known = dict(rows, query_id=np.full(20, query_id, np.int64))
    want = tf.sigmoid(model(_model_batch(spec, as_known))).numpy()
    np.testing.assert_allclose(got[0], want, atol=1e-5)

    # The id-only path with the photo's (unknown) query id: no image feature for it.
    unknown = dict(rows, query_id=np.full(20, 10 ** 12, np.int64))
    id_only = loaded.signatures["serving_default"](
        **{k: tf.constant(v) for k, v in unknown.items()})["ctr"].numpy()
    assert np.abs(id_only - got[0]).max() > 1e-4, "the photo changed nothing"

    # Bad requests name the request row and the feature; an empty page returns no scores.
    page = client_lib.page_inputs(spec, rows, {"query_image": photo})
    two = {k: tf.constant(np.concatenate([v, v])) for k, v in page.items()}
    for bad_photo, words in ((b"not an image", "not a JPEG/PNG"),
                             (photo[:len(photo) // 2], "not a complete image")):
        bad = dict(two, query_image=tf.constant([photo, bad_photo]))
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=rf"request:1.*query_image.*{words}"):
            rank(**bad)
    short = dict(two, price=two["price"][:, :19])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"price.{0,3} has\] \[19\] \[candidates, but .{0,3}item_id"):
        rank(**short)
    empty = {k: v[:, :0] if spec.scope(k) == "candidate" or k == "item_image" else v
             for k, v in page.items()}
    assert rank(**{k: tf.constant(v) for k, v in empty.items()})["ctr"].shape == [1, 0]
    small = export_ctr.CtrServing(model, keras, max_candidates=5)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"request:0.*item_id.*more than max_candidates = 5.*got.*20"):
        small.rank(**{k: tf.constant(v) for k, v in page.items()})
    # Pages padded with -1: the padding scores 0, the rest as before.
    padded = {k: tf.constant(v) for k, v in page.items()}
    padded["item_id"] = tf.constant(np.where(np.arange(20) < 15, page["item_id"], -1))
    out = rank(**padded)["ctr"].numpy()
    np.testing.assert_allclose(out[0, :15], got[0, :15], atol=1e-6)
    assert (out[0, 15:] == 0).all()


def _add_items(tiny_world: str, out_dir: str, n: int) -> tuple[np.ndarray, list[bytes]]:
    """A copy of the world's catalog plus `n` items added after training (new ids, new
    images, the other columns of existing items): (new ids, their images)."""
    files = sorted(glob.glob(records.default_pattern(tiny_world, "catalog")))
    compression = validate.compression_of(files[0])
    os.makedirs(os.path.join(out_dir, "catalog"))
    for f in files:
        shutil.copy(f, os.path.join(out_dir, "catalog"))
    ids = read_all(tiny_world, "catalog")["item_id"]
    new_ids = ids.max() + 1 + np.arange(n)
    images = export_encoder.sample_images(n, 32, seed=2027)
    path = os.path.join(out_dir, "catalog", "new-00000-of-00001.tfrecord"
                        + (".gz" if compression else ""))
    with tf.io.TFRecordWriter(path, compression or None) as w:
        for raw, item_id, image in zip(tf.data.TFRecordDataset(files[:1], compression).take(n),
                                       new_ids, images, strict=True):
            example = tf.train.Example.FromString(raw.numpy())
            example.features.feature["item_id"].int64_list.value[:] = [int(item_id)]
            example.features.feature["image"].bytes_list.value[:] = [image]
            w.write(example.SerializeToString())
    return new_ids, images


def _wait_for_versions(rest_port: int, model: str, want: list[str], seconds: float = 180):
    import urllib.request
    deadline = time.time() + seconds
    while time.time() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/v1/models/{model}",
                                    timeout=30) as r:
            status = json.loads(r.read())["model_version_status"]
        if sorted(s["version"] for s in status) == sorted(want):
            return
        time.sleep(0.5)
    raise AssertionError(f"{model}: versions {status}, want {want}")


def test_refreshed_export_serves_new_items_while_the_old_version_serves(
        trained, exports, tiny_world, tmp_path):
    """Items added after training: --stage=embed, the refresh re-export, a separate stand-in
    server process that picks version 2 up beside version 1; bad requests there are answered
    and the server goes on serving."""
    import grpc
    new_ids, new_images = _add_items(tiny_world, str(tmp_path / "world"), 4)
    embed_dir = str(tmp_path / "catalog_embeddings")
    embed_pipeline.run(configs.CatalogEmbedConfig(  # --stage=embed's runner (its CLI: above)
        catalog_pattern=records.default_pattern(str(tmp_path / "world"), "catalog"),
        encoder_export=os.path.dirname(exports["encoder"]), out_dir=embed_dir, batch_size=64))
    model_dir = trained["debias"][0]
    base = str(tmp_path / "ctr")
    shutil.copytree(exports["debias"], os.path.join(base, "1"))
    config = tmp_path / "models.config"
    config.write_text('model_config_list { config { name: "ctr" base_path: "' + base + '" '
                      'model_platform: "tensorflow" model_version_policy { latest { '
                      'num_versions: 2 } } } }')
    server, grpc_port, rest_port = stand_in_server.launch([
        f"--model_config_file={config}", "--enable_batching",
        f"--batching_parameters_file={REPO}/serving_config/batching.config",
        "--file_system_poll_wait_seconds=1", "--tensorflow_intra_op_parallelism=2",
        "--tensorflow_inter_op_parallelism=2"])
    try:
        out = _run([sys.executable, "-m", "export.ctr", f"--model_dir={model_dir}",
                    f"--export_dir={base}", f"--item_embeddings={embed_dir}/embeddings.npz"])
        assert f"{base}/2" in out
        info = json.load(open(os.path.join(base, "2", "assets.extra", "export_info.json")))
        assert info["item_embeddings"]["new_items"] == 4
        assert info["tensorflow"] == tf.__version__
        assert info["min_model_server"] == ".".join(tf.__version__.split(".")[:2]) + ".0"
        _wait_for_versions(rest_port, "ctr", ["1", "2"])
        assert "loaded ctr version 2 (9 warmup requests replayed" in "".join(server.log)

        grpc_client = client_lib.GrpcClient(f"127.0.0.1:{grpc_port}", timeout=60)
        spec = client_lib.spec_of_export(base)
        rows = _page_rows(spec, read_all(tiny_world, "ctr", "test"), 20)
        rows["item_id"] = np.r_[new_ids, rows["item_id"][4:]]
        v1 = grpc_client.predict("ctr", "serving_default", rows, version=1)["ctr"]
        v2 = grpc_client.predict("ctr", "serving_default", rows, version=2)["ctr"]

        # The in-process model with the refreshed table: version 2's scores, and the new items'
        # table rows are their images' vectors from the Keras encoder, centred.
        model = ctr_task.load_trained(model_dir)
        ctr_task.refresh_items(model, model_dir, f"{embed_dir}/embeddings.npz")
        items = model.image_tables["items"]
        keras = encoder.restore(trained["encoder"])
        vectors = keras(parse.decode_images(tf.constant(new_images), 32), training=False).numpy()
        got_rows = items(tf.constant(new_ids)).numpy()
        np.testing.assert_allclose(got_rows, _table_entry(items, vectors), atol=1e-5)
        assert (np.linalg.norm(got_rows, axis=1) > 0.5).all()
        want = tf.sigmoid(model(_model_batch(spec, rows))).numpy()
        np.testing.assert_allclose(v2, want, atol=1e-5)
        # Version 1 still serves: the new items get no image feature there, the others agree;
        # given the new items' images, its rank signature scores them as version 2 does.
        assert np.abs(v1[:4] - v2[:4]).min() > 1e-5
        np.testing.assert_allclose(v1[4:], v2[4:], atol=1e-4)
        photo = export_encoder.sample_images(1, 32, seed=5)[0]
        page = client_lib.page_inputs(spec, rows, {"query_image": photo})
        r2 = grpc_client.predict("ctr", "rank", page, version=2)["ctr"]
        r1 = grpc_client.predict("ctr", "rank", dict(page, item_image=np.array(
            [list(new_images) + [b""] * 16], dtype=object)), version=1)["ctr"]
        np.testing.assert_allclose(r1, r2, atol=1e-5)

        # The clients' page call, over gRPC and REST (the row format of REST as well).
        user = {k: rows[k][0].tolist() for k in spec.inputs if spec.scope(k) == "request"}
        user = {k: [x for x in v if x != -1] if isinstance(v, list) else v
                for k, v in user.items()}
        candidates = [{k: rows[k][i].item() for k in spec.inputs
                       if spec.scope(k) == "candidate"} for i in range(20)]
        rest_client = client_lib.RestClient(f"http://127.0.0.1:{rest_port}", timeout=60)
        for c in (grpc_client, rest_client):
            np.testing.assert_allclose(c.rank_page(user, candidates, spec, {"query_image": photo}),
                                       r2[0], atol=1e-5)

        # The command-line client with a photo, and a new item sent with its image.
        with open(tmp_path / "query.png", "wb") as f:
            f.write(photo)
        with open(tmp_path / "request.json", "w") as f:
            json.dump({"user": user, "candidates": candidates}, f)
        out = _run([sys.executable, "scripts/serving_client.py", f"--grpc=127.0.0.1:{grpc_port}",
                    "rank", f"--request={tmp_path / 'request.json'}", f"--feature_spec={base}",
                    f"--photo={tmp_path / 'query.png'}"])
        best = int(np.argmax(r2[0]))
        assert out.splitlines()[0] == f"item {rows['item_id'][best]}: ctr {r2[0, best]:.4f}"

        # Bad requests: the row and feature named, and the server serves on.
        bad = dict(page, query_image=np.array([b"\x89PNG\r\n\x1a\n broken"], dtype=object))
        with pytest.raises(grpc.RpcError) as e:
            grpc_client.predict("ctr", "rank", bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert re.search(r"request:0.*query_image.*not a complete image", e.value.details())
        short = dict(page, price=page["price"][:, :19])
        with pytest.raises(grpc.RpcError, match=r"price.{0,3} has\] \[19\] \[candidates"):
            grpc_client.predict("ctr", "rank", short)
        with pytest.raises(RuntimeError, match=r"(?s)HTTP 400.*price.{0,3} has\] \[19\]"):
            rest_client.predict("ctr", "rank", short)
        empty = {k: v[:, :0] if spec.scope(k) == "candidate" or k == "item_image" else v
                 for k, v in page.items() if k in page}
        assert grpc_client.predict("ctr", "rank", empty)["ctr"].shape == (1, 0)
        np.testing.assert_allclose(grpc_client.predict("ctr", "rank", page)["ctr"], r2,
                                   atol=1e-5)
    finally:
        server.terminate()
        server.wait(30)


def _ops(version_dir: str) -> set:
    """Every op of a SavedModel's graphs and functions."""
    from tensorflow.core.protobuf import saved_model_pb2
    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    ops, functions = set(), set()
    for meta in saved.meta_graphs:
        ops |= {n.op for n in meta.graph_def.node}
        for fn in meta.graph_def.library.function:
            functions.add(fn.signature.name)
            ops |= {n.op for n in fn.node_def}
    return ops - functions  # a call of a library function by name is no op of its own


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
        ops = _ops(path)
        assert "DecodeImage" in ops or "DecodePng" in ops or name != "encoder"
        assert not ops & forbidden and ops <= core, (name, sorted(ops - core), ops & forbidden)
    assert {"DecodeImage", "ArgMin"} <= _ops(dirs["cluster"])  # the photo, the centroid


class _RecordingVersion:
    """A stand-in's Version that doubles 'x' and records the batch sizes it is run on; a row
    of -1 fails the whole batch."""

    def __init__(self):
        self.sizes: list[int] = []

    def run(self, signature, inputs):
        x = inputs["x"]
        self.sizes.append(len(x))
        if (x == -1).any():
            raise ValueError("a bad row")
        return {"y": x * 2}


def test_stand_in_batching_merges_pads_and_isolates_a_bad_request():
    """Requests arriving together are merged up to max_batch_size, padded to the next allowed
    batch size with the first row, and split back; a bad request fails alone."""
    from concurrent.futures import ThreadPoolExecutor
    params = serving_protos.parse_batching_config(os.path.join(REPO, "serving_config",
                                                               "batching.config"))
    params.batch_timeout_micros.value = 200_000  # so the three requests below meet
    params.num_batch_threads.value = 1
    version = _RecordingVersion()
    batcher = stand_in_server.Batcher(version, params)
    requests = [np.arange(3, dtype=np.float32) + 10 * i for i in range(3)]
    try:
        with ThreadPoolExecutor(3) as pool:
            outs = list(pool.map(lambda x: batcher.run("s", {"x": x})["y"], requests))
        for x, y in zip(requests, outs, strict=True):
            np.testing.assert_array_equal(y, x * 2)
        assert version.sizes == [32]  # 9 rows in one batch, padded to the allowed 32
        version.sizes.clear()
        bad = np.array([1.0, -1.0], np.float32)
        with ThreadPoolExecutor(2) as pool:
            good = pool.submit(batcher.run, "s", {"x": requests[0]})
            failed = pool.submit(batcher.run, "s", {"x": bad})
            np.testing.assert_array_equal(good.result()["y"], requests[0] * 2)
            with pytest.raises(ValueError, match="a bad row"):
                failed.result()
        assert version.sizes[0] == 8 and sorted(version.sizes[1:]) == [8, 8]  # merged, rerun
        with pytest.raises(ValueError, match="larger than maximum input batch size 512"):
            batcher.run("s", {"x": np.zeros(513, np.float32)})
    finally:
        batcher.stop()


def test_stand_in_keeps_serving_when_a_new_version_fails_to_load(exports, tmp_path):
    """Availability preserving, as TF Serving: a broken new version leaves the old one serving
    (and is not reloaded every poll); the next good version replaces it."""
    base = str(tmp_path / "encoder")
    shutil.copytree(exports["encoder"], os.path.join(base, "1"))
    servables = stand_in_server.Servables({"encoder": base}, log=lambda _: None)
    os.makedirs(os.path.join(base, "2"))  # no saved_model.pb
    with pytest.raises(OSError):
        servables.sync("encoder")
    servables.sync("encoder")
    assert servables.status("encoder") == [1]
    shutil.copytree(exports["encoder"], os.path.join(base, "3"))
    servables.sync("encoder")
    assert servables.status("encoder") == [3]

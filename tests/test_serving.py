"""Serving around the exports: the serving configs parse against TF Serving's protos, the clients
against the stand-in model server, its REST errors as TF Serving gives them, its batching, and
its keeping the old version when a new one fails to load."""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from export import client as client_lib
from export import ctr as export_ctr
from export import encoder as export_encoder
from export_helpers import (
    run_ok,
)
from serving import protos as serving_protos
from serving import stand_in_server


def test_serving_config_parses_against_the_protos(tmp_path):
    out = serving_protos.check_config_dir(os.path.join(REPO, "serving_config"))
    models = {c.name: c for c in out["models"].model_config_list.config}
    assert set(models) == {"encoder", "ctr", "search"}
    assert models["search"].model_version_policy.latest.num_versions == 1
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
        out = run_ok([sys.executable, "scripts/serving_client.py", f"--grpc=127.0.0.1:{port}",
                    "encode", png])
        assert "D=32 norm=1.0000" in out
    finally:
        server.stop(0)
        rest.shutdown()


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

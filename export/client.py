"""Clients of the two exported models on TF Serving: gRPC `PredictionService` (port 8500) and the
REST API (port 8501), with the same calls:

    encode(images)             encoded image bytes -> [N, D] embeddings (model 'encoder')
    rank(user, candidates)     one user's features and a candidate list -> [N] click probabilities
                               (model 'ctr'; the user's features are repeated on every row)

`user` holds the request-level features (user_id, age_bucket, gender, device, query_id,
click_history_item_ids, preferred_category_ids) and each candidate the item-level ones
(item_id, shop_id, brand_id, category_id, price, position), as in `export.ctr`'s signature.
"""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Optional, Sequence

import numpy as np

from export.ctr import LISTS, REQUEST_FEATURES
from trainer.data.schema import CTR as schema

USER_FEATURES = ("user_id", "age_bucket", "gender", "device", "query_id",
                 "click_history_item_ids", "preferred_category_ids")


def candidate_inputs(user: dict, candidates: Sequence[dict]) -> dict:
    """serving_default's inputs (numpy) for one user's candidate list."""
    n = len(candidates)
    if not n:
        raise ValueError("no candidates to rank")
    missing = [k for k in REQUEST_FEATURES if k not in user and k not in candidates[0]]
    if missing:
        raise ValueError(f"request lacks features {missing}")
    out = {}
    for name in REQUEST_FEATURES:
        dtype = np.float32 if name == "price" else np.int64
        if name in LISTS:
            rows = [list(user[name]) if name in user else list(c.get(name, []))
                    for c in candidates]
            # Full schema width at least: server-side batching cannot pad with -1.
            full = schema.feature(name).max_len
            width = max(full, max(len(r) for r in rows))
            arr = np.full([n, width], -1, dtype)
            for i, r in enumerate(rows):
                arr[i, :len(r)] = r
            out[name] = arr
        elif name in user:
            out[name] = np.full([n], user[name], dtype)
        else:
            out[name] = np.array([c[name] for c in candidates], dtype)
    return out


class GrpcClient:
    """TF Serving's gRPC PredictionService."""

    def __init__(self, target: str, timeout: float = 10.0):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20)])
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.timeout = timeout

    def predict(self, model: str, signature: str, inputs: dict,
                version: Optional[int] = None) -> dict:
        import tensorflow as tf
        from export import common
        request = common.predict_request(model, signature, inputs)
        if version is not None:
            request.model_spec.version.value = version
        response = self.stub.Predict(request, timeout=self.timeout)
        return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

    def encode(self, images: Sequence[bytes], model: str = "encoder") -> np.ndarray:
        return self.predict(model, "encode_images",
                            {"images": np.array(list(images), dtype=object)})["embedding"]

    def rank(self, user: dict, candidates: Sequence[dict], model: str = "ctr") -> np.ndarray:
        return self.predict(model, "serving_default", candidate_inputs(user, candidates))["ctr"]

    def close(self) -> None:
        self.channel.close()


class RestClient:
    """TF Serving's REST API (`POST /v1/models/<name>:predict`, columnar "inputs" format; bytes
    travel as {"b64": ...})."""

    def __init__(self, base_url: str, timeout: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def predict(self, model: str, signature: str, inputs: dict,
                version: Optional[int] = None) -> dict:
        def jsonable(v):
            v = np.asarray(v)
            if v.dtype == object or v.dtype.kind == "S":
                return [{"b64": base64.b64encode(b).decode()} for b in v.tolist()]
            return v.tolist()

        path = f"/v1/models/{model}" + (f"/versions/{version}" if version is not None else "")
        body = json.dumps({"signature_name": signature,
                           "inputs": {k: jsonable(v) for k, v in inputs.items()}}).encode()
        req = urllib.request.Request(self.base_url + path + ":predict", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                reply = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{model}/{signature}: HTTP {e.code}: "
                               f"{json.loads(e.read()).get('error', '')}") from e
        outputs = reply["outputs"]
        if not isinstance(outputs, dict):  # a single output comes bare
            outputs = {"output": outputs}
        return {k: np.asarray(v) for k, v in outputs.items()}

    def encode(self, images: Sequence[bytes], model: str = "encoder") -> np.ndarray:
        out = self.predict(model, "encode_images", {"images": np.array(list(images), dtype=object)})
        return np.asarray(next(iter(out.values())), np.float32)

    def rank(self, user: dict, candidates: Sequence[dict], model: str = "ctr") -> np.ndarray:
        out = self.predict(model, "serving_default", candidate_inputs(user, candidates))
        return np.asarray(next(iter(out.values())), np.float32)

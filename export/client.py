"""Clients of the two exported models on TF Serving: gRPC `PredictionService` (port 8500) and the
REST API (port 8501), with the same calls:

    encode(images)                   encoded image bytes -> [N, D] embeddings (model 'encoder')
    rank(user, candidates, spec)     one user's features and a candidate list -> [N] click
                                     probabilities (model 'ctr', serving_default: ids only; the
                                     user's features are repeated on every row)
    rank_page(user, candidates, spec, photos, item_images)
                                     the same with the query photo (and new items' images) as
                                     encoded bytes (model 'ctr', signature 'rank': one page)

and of the visual search export (model 'search', `export.search`):

    search(images, category, k)      photos -> (item_id [B, k], similarity [B, k]) ('search')
    request(photo, user, spec, category, k, n)
                                     one photo and its user -> the top n ads of the k items
                                     retrieved, by pCTR x bid: {item_id, similarity, ctr, bid,
                                     ecpm} [n] ('request')
    ShardedSearch                    `search` over a catalog sharded by category: a category's
                                     request goes to its shard, category -1 to all, merged

`user` holds the request-level features (those of the user and the page) and each candidate the
item-level ones; together they are the input columns of the model's feature spec
(`trainer.ctr.spec`), which the export carries (`spec_of_export`).
"""
from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent import futures

import numpy as np

from trainer.ctr import spec as ctr_spec
from trainer.data import schema


def spec_of_export(path: str) -> ctr_spec.CtrSpec:
    """The feature spec a CTR export was trained with: `path` is a version dir, a model base path
    (its latest version), a spec file or a built-in spec's name."""
    from trainer.features import versions
    if os.path.isdir(path):
        return ctr_spec.load(os.path.join(versions.version_dir(path), "assets.extra",
                                          ctr_spec.FILE))
    return ctr_spec.load(path)


def candidate_inputs(spec: ctr_spec.CtrSpec, user: dict, candidates: Sequence[dict]) -> dict:
    """serving_default's inputs (numpy) for one user's candidate list."""
    n = len(candidates)
    if not n:
        raise ValueError("no candidates to rank")
    columns = spec.record_kind(serving=True).features
    missing = [f.name for f in columns if f.name not in user and f.name not in candidates[0]]
    if missing:
        raise ValueError(f"request lacks features {missing} of the feature spec '{spec.name}'")
    out = {}
    for f in columns:
        dtype = np.float32 if f.dtype == schema.FLOAT else np.int64
        if f.is_list:
            out[f.name] = _padded(f, dtype, [list(user[f.name]) if f.name in user
                                             else list(c.get(f.name, [])) for c in candidates])
        elif f.name in user:
            out[f.name] = np.full([n], user[f.name], dtype)
        else:
            out[f.name] = np.array([c[f.name] for c in candidates], dtype)
    return out


def _padded(f: schema.FeatureSpec, dtype, rows: list[list]) -> np.ndarray:
    """[len(rows), width] of a list column, padded with the feature's pad value; full width at
    least (server-side batching cannot pad ids with -1)."""
    width = max(f.max_len or 0, max((len(r) for r in rows), default=0))
    arr = np.full([len(rows), width], f.pad, dtype)
    for i, r in enumerate(rows):
        arr[i, :len(r)] = r
    return arr


def page_inputs(spec: ctr_spec.CtrSpec, rows: dict, photos: Mapping[str, bytes] | None = None,
                item_images: Sequence[bytes] | None = None, images: bool = True) -> dict:
    """rank's inputs for one page from serving_default's `rows` (one per candidate): request
    columns from the first row, candidate columns as [1, N]. With `images` (the model has image
    features): `photos` {image feature: encoded bytes}, one per `queries` image feature, replace
    their id columns, and `item_images` [N] (default all b'': the item table's) are the
    candidates'."""
    photo_keys = spec.photo_keys if images else set()
    missing = [f.name for f in spec.photos if images and f.name not in (photos or {})]
    if missing:
        raise ValueError(f"a page needs its photo for {missing}")
    out = {name: value[:1] if spec.scope(name) == "request" else value[None]
           for name, value in rows.items() if name not in photo_keys}
    if images:
        for name, photo in (photos or {}).items():
            out[name] = np.array([photo], dtype=object)
        if spec.target_image is not None:
            n = len(rows[spec.item])
            given = [b""] * n if item_images is None else list(item_images)
            out[spec.target_image.name] = np.array(given, dtype=object)[None]
    return out


def request_inputs(spec: ctr_spec.CtrSpec, user: dict, photo: bytes, category: int = -1,
                   k: int = 100, n: int = 10) -> dict:
    """The `request` signature's inputs for one photo and its user's request features."""
    from export import search  # TensorFlow: only where a request is made
    out: dict = {"photo": np.array([photo], dtype=object),
                 "category": np.array([category], np.int64), "k": np.array([k], np.int32),
                 "n": np.array([n], np.int32)}
    declared = {f.name: f for f in spec.record_kind(serving=True).features}
    for name in search.request_input_specs(spec):
        if name in out:
            continue
        if name not in user:
            raise ValueError(f"request lacks the user feature '{name}' of the feature spec "
                             f"'{spec.name}'")
        f = declared[name]
        dtype = np.float32 if f.dtype == schema.FLOAT else np.int64
        if f.is_list:
            out[name] = _padded(f, dtype, [list(user[name])])
        else:
            out[name] = np.array([user[name]], dtype)
    return out


def merge_top_k(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The top `k` by similarity of several shards' (item_id [B, k_s], similarity [B, k_s])
    results (-1: no item), padded as one shard pads: item_id -1, similarity 0. Equal
    similarities keep the shards' order."""
    ids = np.concatenate([p[0] for p in parts], axis=1)
    sims = np.concatenate([p[1] for p in parts], axis=1).astype(np.float32)
    key = np.where(ids >= 0, sims, -np.inf)
    best = np.argsort(-key, axis=1, kind="stable")[:, :k]
    out_ids = np.take_along_axis(ids, best, 1)
    out_sims = np.where(out_ids >= 0, np.take_along_axis(sims, best, 1), 0).astype(np.float32)
    pad = k - out_ids.shape[1]
    if pad > 0:
        out_ids = np.pad(out_ids, [(0, 0), (0, pad)], constant_values=-1)
        out_sims = np.pad(out_sims, [(0, 0), (0, pad)])
    return out_ids, out_sims


class _Calls:
    """The model calls both clients make through their `predict`: {output name: array} (the
    REST API returns a single output bare, so each call takes its one output)."""

    def predict(self, model: str, signature: str, inputs: dict,
                version: int | None = None) -> dict:
        raise NotImplementedError

    def _only(self, model: str, signature: str, inputs: dict) -> np.ndarray:
        return np.asarray(next(iter(self.predict(model, signature, inputs).values())),
                          np.float32)

    def encode(self, images: Sequence[bytes], model: str = "encoder") -> np.ndarray:
        return self._only(model, "encode_images",
                          {"images": np.array(list(images), dtype=object)})

    def rank(self, user: dict, candidates: Sequence[dict], spec: ctr_spec.CtrSpec,
             model: str = "ctr") -> np.ndarray:
        return self._only(model, "serving_default", candidate_inputs(spec, user, candidates))

    def rank_page(self, user: dict, candidates: Sequence[dict], spec: ctr_spec.CtrSpec,
                  photos: Mapping[str, bytes], item_images: Sequence[bytes] | None = None,
                  model: str = "ctr") -> np.ndarray:
        """[N] click probabilities of one page through the `rank` signature (no call for an
        empty page)."""
        if not candidates:
            return np.zeros([0], np.float32)
        rows = candidate_inputs(spec, user, candidates)
        return self._only(model, "rank", page_inputs(spec, rows, photos, item_images)).reshape(-1)

    def search(self, images: Sequence[bytes], category: int | Sequence[int] = -1, k: int = 100,
               model: str = "search") -> tuple[np.ndarray, np.ndarray]:
        """(item_id [B, k] int64, similarity [B, k]) of each photo's k most similar catalog
        items (within `category`, one for all or one per photo; -1: any)."""
        b = len(images)
        out = self.predict(model, "search", {
            "images": np.array(list(images), dtype=object),
            "category": np.broadcast_to(np.asarray(category, np.int64), [b]).copy(),
            "k": np.full([b], k, np.int32)})
        return (np.asarray(out["item_id"], np.int64).reshape(b, -1),
                np.asarray(out["similarity"], np.float32).reshape(b, -1))

    def request(self, photo: bytes, user: dict, spec: ctr_spec.CtrSpec, category: int = -1,
                k: int = 100, n: int = 10, model: str = "search") -> dict:
        """One visual search ad request: the top `n` of the `k` items most similar to `photo`
        by pCTR x bid, {item_id, similarity, ctr, bid, ecpm: [n]}, best first (fewer where the
        category holds fewer items)."""
        out = self.predict(model, "request", request_inputs(spec, user, photo, category, k, n))
        ids = np.asarray(out["item_id"], np.int64).reshape(-1)
        keep = ids >= 0
        return {name: np.asarray(v).reshape(-1)[keep] for name, v in out.items()}


class ShardedSearch:
    """`search` over a catalog exported as shards by category (`export.search --categories`):
    `shards` maps each shard's model name to its categories (its export_info.json's
    `categories`), all served by `client`. A category's photos go to the shard holding it (paper
    000 searches within the photo's category); category -1 asks every shard for its top k and
    keeps the best k of their union, which equals one unsharded search."""

    def __init__(self, client: _Calls, shards: Mapping[str, Sequence[int]]):
        self.client = client
        self.shard_of: dict[int, str] = {}
        for model, categories in shards.items():
            for c in categories:
                if int(c) in self.shard_of:
                    raise ValueError(f"category {c} is in shards {self.shard_of[int(c)]} and "
                                     f"{model}")
                self.shard_of[int(c)] = model
        self.models = list(shards)

    def search(self, images: Sequence[bytes], category: int = -1, k: int = 100
               ) -> tuple[np.ndarray, np.ndarray]:
        if category >= 0:
            if category not in self.shard_of:
                raise KeyError(f"no shard holds category {category}")
            return self.client.search(images, category, k, model=self.shard_of[category])
        with futures.ThreadPoolExecutor(len(self.models)) as pool:  # the shards at once
            parts = list(pool.map(lambda m: self.client.search(images, -1, k, model=m),
                                  self.models))
        return merge_top_k(parts, k)


class GrpcClient(_Calls):
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
                version: int | None = None) -> dict:
        import tensorflow as tf

        from export import common
        request = common.predict_request(model, signature, inputs)
        if version is not None:
            request.model_spec.version.value = version
        response = self.stub.Predict(request, timeout=self.timeout)
        return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

    def close(self) -> None:
        self.channel.close()


class RestClient(_Calls):
    """TF Serving's REST API (`POST /v1/models/<name>:predict`, columnar "inputs" format; bytes
    travel as {"b64": ...})."""

    def __init__(self, base_url: str, timeout: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def predict(self, model: str, signature: str, inputs: dict,
                version: int | None = None) -> dict:
        def b64(x):  # bytes at any depth -> {"b64": ...}
            if isinstance(x, list):
                return [b64(i) for i in x]
            return {"b64": base64.b64encode(x).decode()}

        def jsonable(v):
            v = np.asarray(v)
            return b64(v.tolist()) if v.dtype == object or v.dtype.kind == "S" else v.tolist()

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

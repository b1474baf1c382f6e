"""CTR SavedModel for TF Serving: `python -m export.ctr --model_dir=M --export_dir=E`.

Exports the trained CTR predictor of a `ctr`/`debias` model dir (paper 000 §3.2, paper 002
App. A) as version N+1 of E, self-contained: the id vocabularies and price buckets, the frozen
catalog image-feature table (or the cluster-id table and its centroids), and D with its gate are
all inside, so a request carries only raw feature values of the documented `ctr` schema
(docs/data_format.md), and unknown ids fall into the out-of-vocabulary rows.

Signatures (batch dimension None):
  serving_default: one tensor per raw feature -> ctr [None] float32, the click probability.
      Scalars [None]: item_id, shop_id, brand_id, category_id, user_id, age_bucket, gender,
      device, position, query_id (int64), price (float32). Lists [None, None] int64 padded on
      the right with -1: click_history_item_ids (oldest first, latest last; the latest 20 are
      used), preferred_category_ids (the first 3). Ranking a candidate list is one request whose
      rows repeat the user's features.
  predict_examples: examples [None] string, serialized `tf.train.Example`s in the `ctr` schema
      (label, page_id and day may be absent) -> ctr [None].
A malformed request (a negative id, a non-finite or negative price, a missing feature) fails
with a message naming the row ('request:<i>'), the feature and the rule.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from export import common
from export.encoder import request_names
from trainer.data import parse, schema
from trainer.models import ctr as ctr_lib

SCALARS = tuple(ctr_lib.ID_FEATURES) + ("query_id", "price")
LISTS = tuple(ctr_lib.SHARED_TABLES)  # click_history_item_ids, preferred_category_ids
REQUEST_FEATURES = SCALARS + LISTS
WARMUP_BATCH_SIZES = (1, 10, 100)


def input_specs() -> dict:
    """serving_default's inputs."""
    specs = {}
    for name in REQUEST_FEATURES:
        f = schema.CTR.feature(name)
        dtype = tf.float32 if f.dtype == schema.FLOAT else tf.int64
        specs[name] = tf.TensorSpec([None, None] if f.is_list else [None], dtype, name=name)
    return specs


class CtrServing(tf.Module):
    """The CTR model behind the two serving signatures; both run the schema's checks."""

    def __init__(self, model: ctr_lib.CtrModel):
        super().__init__(name="ctr_serving")
        self.model = model
        self._parser = parse.RecordParser(schema.CTR, features=REQUEST_FEATURES, decode=False)
        self.serve = tf.function(self._serve)
        self.predict_examples = tf.function(self._predict_examples, input_signature=[
            tf.TensorSpec([None], tf.string, name="examples")])

    def _predict(self, batch: dict) -> dict:
        return {"ctr": tf.sigmoid(self.model(batch, training=False))}

    def _serve(self, **features):
        names = request_names(tf.shape(features["item_id"])[0])
        raw = {k: tf.RaggedTensor.from_tensor(v, padding=tf.constant(-1, v.dtype))
               if k in LISTS else v for k, v in features.items()}
        return self._predict(self._parser.from_raw(names, raw))

    def _predict_examples(self, examples):
        return self._predict(self._parser(request_names(tf.shape(examples)[0]), examples))

    def signatures(self) -> dict:
        return {"serving_default": self.serve.get_concrete_function(**input_specs()),
                "predict_examples": self.predict_examples.get_concrete_function()}


def sample_requests(vocabularies: ctr_lib.Vocabularies, n: int, seed: int = 0) -> dict:
    """`n` rows of serving_default inputs drawn from the model's own vocabularies (ids it knows,
    one user's candidate list): for warmup and tests, without a data set."""
    rng = np.random.default_rng(seed)

    def ids(name, size):
        vocab = vocabularies.ids.get(name)
        if vocab is None or not len(vocab):  # a hashed feature: any id
            return rng.integers(0, 1000, size).astype(np.int64)
        return rng.choice(vocab, size).astype(np.int64)

    out = {name: np.repeat(ids(name, 1), n) for name in ("user_id", "age_bucket", "gender",
                                                          "device")}
    for name in ("item_id", "shop_id", "brand_id", "category_id"):
        out[name] = ids(name, n)
    out["query_id"] = np.repeat(ids("item_id", 1), n)  # query ids are not in a vocabulary
    out["position"] = np.arange(n, dtype=np.int64) % 50
    bounds = vocabularies.price_boundaries
    out["price"] = rng.choice(bounds if len(bounds) else np.array([1.0]), n).astype(np.float32)
    history = np.full([n, schema.L_CTR_HISTORY], -1, np.int64)
    history[:, :7] = ids("item_id", 7)[None]
    out["click_history_item_ids"] = history
    preferred = np.full([n, schema.MAX_PREFERRED_CATEGORIES], -1, np.int64)
    preferred[:, :2] = ids("category_id", 2)[None]
    out["preferred_category_ids"] = preferred
    return out


def to_examples(inputs: dict) -> np.ndarray:
    """The rows of serving_default inputs as serialized `tf.train.Example`s (lists without
    their -1 padding)."""
    n = len(inputs["item_id"])
    out = []
    for i in range(n):
        feats = {}
        for name, value in inputs.items():
            row = np.atleast_1d(value[i])
            if name in LISTS:
                row = row[row != -1]
            if row.dtype.kind == "f":
                feats[name] = tf.train.Feature(float_list=tf.train.FloatList(value=row))
            else:
                feats[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=row))
        out.append(tf.train.Example(features=tf.train.Features(feature=feats))
                   .SerializeToString())
    return np.array(out, dtype=object)


def warmup_requests(vocabularies: ctr_lib.Vocabularies, model_name: str = "ctr") -> list:
    requests = []
    for n in WARMUP_BATCH_SIZES:
        inputs = sample_requests(vocabularies, n, seed=n)
        requests.append(common.predict_request(model_name, "serving_default", inputs))
        requests.append(common.predict_request(model_name, "predict_examples",
                                               {"examples": to_examples(inputs)}))
    return requests


def export(model_dir: str, export_dir: str, version: int | None = None,
           model_name: str = "ctr") -> str:
    """Exports the trained CTR model of `model_dir`; returns the version directory."""
    model = ctr_lib.load_trained(model_dir)
    module = CtrServing(model)
    cfg = model.cfg
    info = {"model": "ctr", "model_dir": os.path.abspath(model_dir),
            "checkpoint": tf.train.latest_checkpoint(os.path.join(model_dir, "ckpt")),
            "image_feature_mode": cfg.image_feature_mode if model.images is not None else None,
            "debias": cfg.debias is not None,
            "inputs": {k: f"{s.dtype.name} {s.shape}" for k, s in input_specs().items()}}
    return common.save(module, module.signatures(), export_dir,
                       common.warmup_logs(warmup_requests(model.vocabularies, model_name)),
                       info, version)


if __name__ == "__main__":
    common.main(export, "the CTR model", "ctr", "Trained ctr or debias model dir.",
                "serving_default, predict_examples")

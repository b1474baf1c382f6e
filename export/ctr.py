"""CTR SavedModel for TF Serving: `python -m export.ctr --model_dir=M --export_dir=E`.

Exports the trained CTR predictor of a `ctr`/`debias` model dir (paper 000 §3.2, paper 002
App. A) as version N+1 of E, self-contained: the id vocabularies and numeric statistics, the
frozen catalog image-feature table (or the cluster-id table and its centroids), and D with its
gate are all inside, so a request carries only raw feature values, and unknown ids fall into the
out-of-vocabulary rows. The inputs are the model's feature spec's (`trainer.data.ctr_spec`),
which travels in the export as `assets.extra/feature_spec.yaml`.

Signatures (batch dimension None):
  serving_default: one tensor per input column of the spec -> ctr [None] float32, the click
      probability. Scalars [None] (int64 ids, float32 values); id sequences [None, None] int64
      padded on the right with -1 (an `oldest_first` sequence keeps its latest values, the others
      their first); numeric vectors [None, length] float32. Ranking a candidate list is one
      request whose rows repeat the user's features.
  predict_examples: examples [None] string, serialized `tf.train.Example`s with the spec's
      columns (label and group may be absent) -> ctr [None].
A malformed request (a negative id, a non-finite value, a missing feature) fails with a message
naming the row ('request:<i>'), the feature and the rule; inputs with different row counts fail
naming the feature. An empty request (0 rows) returns 0 scores.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from export import common
from export.encoder import request_names
from trainer.ctr import task as ctr_task
from trainer.ctr.model import CtrModel
from trainer.ctr.tables import Vocabularies
from trainer.data import ctr_spec, parse, schema

WARMUP_BATCH_SIZES = (1, 10, 100)


def input_specs(spec: ctr_spec.CtrSpec) -> dict:
    """serving_default's inputs: exactly the spec's input columns."""
    out = {}
    for f in spec.record_kind(serving=True).features:
        dtype = tf.float32 if f.dtype == schema.FLOAT else tf.int64
        shape = ([None] if not f.is_list else
                 [None, f.max_len] if f.keep == "reject" else [None, None])
        out[f.name] = tf.TensorSpec(shape, dtype, name=f.name)
    return out


class CtrServing(tf.Module):
    """The CTR model behind the two serving signatures; both run the spec's record checks."""

    def __init__(self, model: CtrModel):
        super().__init__(name="ctr_serving")
        self.model = model
        kind = model.spec.record_kind(serving=True)
        self._parser = parse.RecordParser(kind, decode=False)
        self._lists = {f.name: f for f in kind.features if f.is_list}
        self.serve = tf.function(self._serve)
        self.predict_examples = tf.function(self._predict_examples, input_signature=[
            tf.TensorSpec([None], tf.string, name="examples")])

    def _predict(self, batch: dict) -> dict:
        return {"ctr": tf.sigmoid(self.model(batch, training=False))}

    def _serve(self, **features):
        first = next(iter(features))
        n = tf.shape(features[first])[0]
        names = request_names(n)
        # Every input has one row per candidate: a shorter one is named, not a ConcatOp error.
        rows_ok = [tf.debugging.Assert(tf.equal(tf.shape(v)[0], n), [
            f"request: feature '{k}' has", tf.shape(v)[0], f"rows, but '{first}' has", n,
            "(every input needs one row per candidate)"]) for k, v in features.items()]
        with tf.control_dependencies(rows_ok):
            features = {k: tf.identity(v) for k, v in features.items()}
        raw = {}
        for k, v in features.items():
            f = self._lists.get(k)
            if f is None:
                raw[k] = v
            elif f.keep == "reject":  # a fixed-length vector: every value is real
                raw[k] = tf.RaggedTensor.from_tensor(v)
            else:
                raw[k] = tf.RaggedTensor.from_tensor(v, padding=tf.constant(f.pad, v.dtype))
        return self._predict(self._parser.from_raw(names, raw))

    def _predict_examples(self, examples):
        return self._predict(self._parser(request_names(tf.shape(examples)[0]), examples))

    def signatures(self) -> dict:
        return {"serving_default": self.serve.get_concrete_function(
                    **input_specs(self.model.spec)),
                "predict_examples": self.predict_examples.get_concrete_function()}


def sample_requests(spec: ctr_spec.CtrSpec, vocabularies: Vocabularies, n: int,
                    seed: int = 0) -> dict:
    """`n` rows of serving_default inputs drawn from the model's own vocabularies (ids it knows,
    values in its buckets): for warmup and tests, without a data set."""
    rng = np.random.default_rng(seed)
    declared = {f.name: f for f in spec.features}

    def ids(name: str, size) -> np.ndarray:
        f = declared.get(name)
        vocab = vocabularies.ids.get(f.table_name) if f is not None else None
        if vocab is None or not len(vocab):  # hashed, or a key of image vectors only
            return rng.integers(0, 1000, size).astype(np.int64)
        return rng.choice(vocab, size).astype(np.int64)

    out = {}
    for c in spec.record_kind(serving=True).features:
        f = declared.get(c.name)
        if c.dtype == schema.INT64 and not c.is_list:
            out[c.name] = ids(c.name, n)
        elif c.dtype == schema.INT64:  # an id sequence: a third of it, padded with -1
            row = np.full([c.max_len], -1, np.int64)
            k = max(1, c.max_len // 3)
            row[:k] = ids(c.name, k)
            out[c.name] = np.repeat(row[None], n, axis=0)
        elif f is not None and f.name in vocabularies.boundaries:
            bounds = vocabularies.boundaries[f.name]
            out[c.name] = rng.choice(bounds if len(bounds) else np.array([1.0]), n).astype(
                np.float32)
        else:
            mean = vocabularies.moments[c.name][0] if c.name in vocabularies.moments else 0.0
            shape = [n, c.max_len] if c.is_list else [n]
            out[c.name] = (np.broadcast_to(mean, shape) + rng.normal(0, 0.1, shape)).astype(
                np.float32)
    return out


def to_examples(spec: ctr_spec.CtrSpec, inputs: dict) -> np.ndarray:
    """The rows of serving_default inputs as serialized `tf.train.Example`s (id lists without
    their -1 padding)."""
    kind = spec.record_kind(serving=True)
    n = len(next(iter(inputs.values())))
    out = []
    for i in range(n):
        feats = {}
        for f in kind.features:
            row = np.atleast_1d(inputs[f.name][i])
            if f.is_list and f.keep != "reject":
                row = row[row != f.pad]
            if f.dtype == schema.FLOAT:
                feats[f.name] = tf.train.Feature(float_list=tf.train.FloatList(value=row))
            else:
                feats[f.name] = tf.train.Feature(int64_list=tf.train.Int64List(value=row))
        out.append(tf.train.Example(features=tf.train.Features(feature=feats))
                   .SerializeToString())
    return np.array(out, dtype=object)


def warmup_requests(spec: ctr_spec.CtrSpec, vocabularies: Vocabularies,
                    model_name: str = "ctr") -> list:
    requests = []
    for n in WARMUP_BATCH_SIZES:
        inputs = sample_requests(spec, vocabularies, n, seed=n)
        requests.append(common.predict_request(model_name, "serving_default", inputs))
        requests.append(common.predict_request(model_name, "predict_examples",
                                               {"examples": to_examples(spec, inputs)}))
    return requests


def export(model_dir: str, export_dir: str, version: int | None = None,
           model_name: str = "ctr") -> str:
    """Exports the trained CTR model of `model_dir`; returns the version directory."""
    model = ctr_task.load_trained(model_dir)
    module = CtrServing(model)
    cfg, spec = model.cfg, model.spec
    info = {"model": "ctr", "model_dir": os.path.abspath(model_dir),
            "checkpoint": tf.train.latest_checkpoint(os.path.join(model_dir, "ckpt")),
            "feature_spec": spec.name,
            "image_feature_mode": cfg.image_feature_mode if model.image_tables else None,
            "debias": cfg.debias is not None,
            "inputs": {k: f"{s.dtype.name} {s.shape}" for k, s in input_specs(spec).items()}}
    return common.save(module, module.signatures(), export_dir,
                       common.warmup_logs(warmup_requests(spec, model.vocabularies, model_name)),
                       info, version, extra_files={ctr_spec.FILE: spec.dump()})


if __name__ == "__main__":
    common.main(export, "the CTR model", "ctr", "Trained ctr or debias model dir.",
                "serving_default, predict_examples")

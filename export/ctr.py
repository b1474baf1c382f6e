"""CTR SavedModel for TF Serving: `python -m export.ctr --model_dir=M --export_dir=E`.

Exports the trained CTR predictor of a `ctr`/`debias` model dir (paper 000 §3.2, paper 002
App. A) as version N+1 of E, self-contained: the id vocabularies and numeric statistics, the
frozen catalog image-feature table (or the cluster-id table and its centroids), D with its gate,
and the image encoder the table came from are all inside, so a request carries only raw feature
values and images; unknown ids fall into the out-of-vocabulary rows. The inputs are the model's
feature spec's (`trainer.ctr.spec`), which travels in the export as
`assets.extra/feature_spec.yaml`.

Signatures:
  rank: one page per row, as visual search serves it (paper 000 §3.2: ads for the photo the user
      has just uploaded). Request-scoped inputs (the spec's `scope: request`: the user and the
      page) are [B] or [B, L]; the query photo of each `queries` image feature, named after it,
      is [B] string (encoded JPEG/PNG/GIF/BMP), run through the encoder in the graph; candidate
      inputs are [B, N] (or [B, N, L]), with the item id -1 where a page has fewer than N
      candidates; `<item image feature>` [B, N] string carries a candidate's encoded image (b''
      to use the item table: pass it for items added after the export). -> ctr [B, N] (0 where
      the id is -1). Fresh vectors take the table's path: centred (vector), nearest centroid in
      the graph (cluster_id), through D and its gate.
  serving_default: one tensor per input column of the spec -> ctr [None] float32, the click
      probability. Scalars [None] (int64 ids, float32 values); id sequences [None, None] int64
      padded on the right with -1 (an `oldest_first` sequence keeps its latest values, the others
      their first); numeric vectors [None, length] float32. Images come from the frozen tables
      only (an unknown query or item id gets no image feature): for callers without a photo.
  predict_examples: examples [None] string, serialized `tf.train.Example`s with the spec's
      columns (label and group may be absent) -> ctr [None].
A malformed request (a negative id, a non-finite value, a missing feature, an undecodable or
oversized image, more than `max_candidates` candidates in a page) fails with a message naming the
row ('request:<i>', and '/candidate:<j>' in `rank`), the feature and the rule; inputs with
different row or candidate counts fail naming the feature. An empty request returns 0 scores.

New items without retraining (`--item_embeddings`): the item table is rebuilt from the latest
catalog embedding (`--stage=embed`'s embeddings.npz, from the same encoder), with the trained
weights and the trained model's centring and centroids: items added since get their vectors.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from export import client, common
from export import encoder as export_encoder
from export.encoder import request_names
from trainer import tracing
from trainer.ctr import spec as ctr_spec
from trainer.ctr import task as ctr_task
from trainer.ctr.model import CtrModel, fresh_vectors
from trainer.ctr.tables import Vocabularies
from trainer.data import parse, schema
from trainer.models import encoder as encoder_lib

WARMUP_BATCH_SIZES = (1, 10, 100)
# Candidates per page of `rank` at most: a page of ads or a feed screen holds tens; 1000 leaves
# room for a pre-ranking stage while bounding one request's work.
MAX_CANDIDATES = 1000


def _column_spec(f: schema.FeatureSpec, outer: list) -> tf.TensorSpec:
    dtype = tf.float32 if f.dtype == schema.FLOAT else tf.int64
    inner = [] if not f.is_list else [f.max_len] if f.keep == "reject" else [None]
    return tf.TensorSpec(outer + inner, dtype, name=f.name)


def input_specs(spec: ctr_spec.CtrSpec) -> dict:
    """serving_default's inputs: exactly the spec's input columns."""
    return {f.name: _column_spec(f, [None]) for f in spec.record_kind(serving=True).features}


def rank_input_specs(spec: ctr_spec.CtrSpec, images: bool) -> dict:
    """rank's inputs: request columns [B, ...], candidate columns [B, N, ...]; with `images`
    (a model with image features), each query photo [B] instead of its id column and the
    candidates' images [B, N]."""
    photo_keys = spec.photo_keys if images else set()
    out = {}
    for f in spec.record_kind(serving=True).features:
        if f.name not in photo_keys:
            request = spec.scope(f.name) == "request"
            out[f.name] = _column_spec(f, [None] if request else [None, None])
    if images:
        for photo in spec.photos:
            out[photo.name] = tf.TensorSpec([None], tf.string, name=photo.name)
        if spec.target_image is not None:
            name = spec.target_image.name
            out[name] = tf.TensorSpec([None, None], tf.string, name=name)
    return out


def same_size(features: dict, axis: int, what: str) -> dict:
    """`features` once each has the first one's size along `axis`; a different one is named (not
    a ConcatOp error deep in the model)."""
    first = next(iter(features))
    n = tf.shape(features[first])[axis]
    ok = [tf.debugging.Assert(tf.equal(tf.shape(v)[axis], n), [
        f"request: feature '{k}' has", tf.shape(v)[axis], f"{what}, but '{first}' has", n])
        for k, v in features.items()]
    with tf.control_dependencies(ok):
        return {k: tf.identity(v) for k, v in features.items()}


class CtrServing(tf.Module):
    """The CTR model behind the serving signatures; all run the spec's record checks.

    encoder: the image encoder of the model's image features, for `rank` (None: a model without
    image features, whose `rank` takes no images).
    """

    def __init__(self, model: CtrModel, encoder: encoder_lib.Encoder | None = None,
                 max_candidates: int = MAX_CANDIDATES,
                 max_image_pixels: int = export_encoder.MAX_IMAGE_PIXELS):
        super().__init__(name="ctr_serving")
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be at least 1, got {max_candidates}")
        self.model = model
        self.max_candidates = max_candidates
        self.images = (export_encoder.EncoderServing(encoder, max_image_pixels)
                       if encoder is not None and model.image_features else None)
        kind = model.spec.record_kind(serving=True)
        self._parser = parse.RecordParser(kind, decode=False)
        self._lists = {f.name: f for f in kind.features if f.is_list}
        self.serve = tracing.function(self._serve)
        self.rank = tracing.function(self._rank)
        self.predict_examples = tracing.function(self._predict_examples, input_signature=[
            tf.TensorSpec([None], tf.string, name="examples")])

    def _predict(self, batch: dict) -> dict:
        return {"ctr": tf.sigmoid(self.model(batch, training=False))}

    def _parse(self, names: tf.Tensor, features: dict) -> dict:
        """Input columns, lists padded with -1, -> the model's batch, checked."""
        raw = {}
        for k, v in features.items():
            f = self._lists.get(k)
            if f is None:
                raw[k] = v
            elif f.keep == "reject":  # a fixed-length vector: every value is real
                raw[k] = tf.RaggedTensor.from_tensor(v)
            else:
                raw[k] = tf.RaggedTensor.from_tensor(v, padding=tf.constant(f.pad, v.dtype))
        return self._parser.from_raw(names, raw)

    def _serve(self, **features):
        # Every input has one row per candidate.
        features = same_size(features, 0, "rows")
        n = tf.shape(next(iter(features.values())))[0]
        return self._predict(self._parse(request_names(n), features))

    def _rank(self, **inputs):
        return {"ctr": self.score_pages(inputs)}

    def score_pages(self, inputs: dict, photo_vectors: dict | None = None) -> tf.Tensor:
        """[B, N] click probabilities of `rank`'s inputs (0 where the item id is -1). The query
        photos are encoded bytes among `inputs`, or, with `photo_vectors` ({image feature:
        [B, D]}), vectors the caller has encoded already (the served search request encodes its
        photo once, for retrieval and ranking)."""
        spec = self.model.spec
        image_names = {f.name for f in spec.of_kind("image")}
        images = {k: v for k, v in inputs.items() if k in image_names}
        columns = {k: v for k, v in inputs.items() if k not in image_names}
        target = spec.target_image if self.images is not None else None
        if target is not None and target.name not in images:  # the item table's vectors
            target = None
        candidate = {spec.item: columns[spec.item]}
        candidate.update({k: v for k, v in columns.items() if spec.scope(k) == "candidate"})
        if target is not None:  # the candidates' images: one per candidate
            candidate[target.name] = images[target.name]
        candidate = same_size(candidate, 1, "candidates")
        rows = same_size({spec.item: candidate[spec.item], **columns, **images, **candidate}, 0,
                          "rows")
        item = rows[spec.item]
        pages = tf.shape(item, out_type=tf.int64)[0]
        page_names = request_names(pages)
        present = item != -1
        count = tf.reduce_sum(tf.cast(present, tf.int64), axis=1)
        too_many = count > self.max_candidates
        with tf.control_dependencies([parse.fail_if(
                too_many, page_names, spec.item, f"has more than max_candidates = "
                f"{self.max_candidates} candidates", tf.boolean_mask(count, too_many)[:1])]):
            where = tf.where(present)  # [C, 2]: (page, candidate) of each real candidate
        page = where[:, 0]
        names = tf.strings.join([tf.gather(page_names, page), "/candidate:",
                                 tf.strings.as_string(where[:, 1])])
        flat = {k: tf.gather_nd(rows[k], where) if k in candidate else tf.gather(rows[k], page)
                for k in columns}
        if self.images is not None:
            for key in spec.photo_keys:  # a key only: the photo stands in for it
                flat[key] = tf.zeros_like(page)
        batch = self._parse(names, flat)
        if self.images is not None:
            # The photos and the candidates' images, encoded in one batch.
            parts = ([] if photo_vectors is not None else
                     [(rows[f.name], page_names, f.name) for f in spec.photos])
            if target is not None:
                encoded = tf.gather_nd(rows[target.name], where)
                given = tf.where(encoded != b"")
                parts.append((tf.gather_nd(encoded, given), tf.gather_nd(names, given),
                              target.name))
            embedded = self.images.embed_parts(parts) if parts else []
            photos = (photo_vectors if photo_vectors is not None else
                      {f.name: v for f, v in zip(spec.photos, embedded, strict=False)})
            for f in spec.photos:
                vector, has = fresh_vectors(f.name)
                batch[vector] = tf.gather(photos[f.name], page)
                batch[has] = tf.ones_like(page, tf.bool)
            if target is not None:
                fresh = embedded[-1]
                vector, has = fresh_vectors(target.name)
                batch[has] = encoded != b""
                batch[vector] = tf.scatter_nd(given, fresh, tf.stack(
                    [tf.shape(page, out_type=tf.int64)[0], tf.shape(fresh, out_type=tf.int64)[1]]))
        scores = self._predict(batch)["ctr"]
        return tf.scatter_nd(where, scores, tf.shape(item, out_type=tf.int64))

    def _predict_examples(self, examples):
        return self._predict(self._parser(request_names(tf.shape(examples)[0]), examples))

    def signatures(self) -> dict:
        spec = self.model.spec
        return {"serving_default": self.serve.get_concrete_function(**input_specs(spec)),
                "rank": self.rank.get_concrete_function(
                    **rank_input_specs(spec, self.images is not None)),
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
        feature = declared.get(c.name)
        if c.dtype == schema.INT64 and not c.is_list:
            out[c.name] = ids(c.name, n)
        elif c.dtype == schema.INT64:  # an id sequence: a third of it, padded with -1
            length = c.max_len or 1
            row = np.full([length], -1, np.int64)
            k = max(1, length // 3)
            row[:k] = ids(c.name, k)
            out[c.name] = np.repeat(row[None], n, axis=0)
        elif feature is not None and feature.name in vocabularies.boundaries:
            bounds = vocabularies.boundaries[feature.name]
            out[c.name] = rng.choice(bounds if len(bounds) else np.array([1.0]), n).astype(
                np.float32)
        else:
            mean = np.asarray(vocabularies.moments[c.name][0] if c.name in vocabularies.moments
                              else 0.0)  # a value, or one per element of a dense vector
            shape = [n, c.max_len or 1] if c.is_list else [n]
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
                    model_name: str = "ctr", image_size: int | None = None) -> list:
    """serving_default, predict_examples and rank requests at the warmup batch sizes (rank: one
    page of that many candidates, with a photo and every other candidate's image when the model
    takes images: `image_size`)."""
    requests = []
    for n in WARMUP_BATCH_SIZES:
        inputs = sample_requests(spec, vocabularies, n, seed=n)
        requests.append(common.predict_request(model_name, "serving_default", inputs))
        requests.append(common.predict_request(model_name, "predict_examples",
                                               {"examples": to_examples(spec, inputs)}))
        photos, item_images = None, None
        if image_size:
            pictures = export_encoder.sample_images(2, image_size, seed=n)
            photos = {f.name: pictures[0] for f in spec.photos}
            item_images = [pictures[1] if i % 2 else b"" for i in range(n)]
        requests.append(common.predict_request(model_name, "rank", client.page_inputs(
            spec, inputs, photos, item_images, images=bool(image_size))))
    return requests


def export(model_dir: str, export_dir: str, version: int | None = None,
           model_name: str = "ctr", item_embeddings: str | None = None,
           max_candidates: int = MAX_CANDIDATES,
           max_image_pixels: int = export_encoder.MAX_IMAGE_PIXELS,
           extra_info: dict | None = None) -> str:
    """Exports the trained CTR model of `model_dir` (with `item_embeddings`, an embeddings.npz
    of `--stage=embed`, as its item table); returns the version directory. `extra_info` joins
    the export's `export_info.json` (the daily cycle's parent version, data day, gate)."""
    model = ctr_task.load_trained(model_dir)
    refreshed = (ctr_task.refresh_items(model, model_dir, item_embeddings) if item_embeddings
                 else None)
    encoder, images_from = None, None
    if model.image_features:
        images_from = ctr_task.encoder_dir(model_dir)
        encoder = encoder_lib.restore(images_from)
    module = CtrServing(model, encoder, max_candidates, max_image_pixels)
    cfg, spec = model.cfg, model.spec
    info = {"model": "ctr", "model_dir": os.path.abspath(model_dir),
            "checkpoint": tf.train.latest_checkpoint(os.path.join(model_dir, "ckpt")),
            "feature_spec": spec.name,
            "image_feature_mode": cfg.image_feature_mode if model.image_tables else None,
            "debias": cfg.debias is not None,
            "encoder": images_from,
            "item_embeddings": refreshed, "max_candidates": max_candidates,
            "max_image_pixels": max_image_pixels,
            "inputs": {k: f"{s.dtype.name} {s.shape}" for k, s in input_specs(spec).items()},
            "rank_inputs": {k: f"{s.dtype.name} {s.shape}" for k, s in rank_input_specs(
                spec, encoder is not None).items()}, **(extra_info or {})}
    warmup = warmup_requests(spec, model.vocabularies, model_name,
                             encoder.cfg.image_size if encoder is not None else None)
    return common.save(module, module.signatures(), export_dir, common.warmup_logs(warmup),
                       info, version, extra_files={ctr_spec.FILE: spec.dump()})


if __name__ == "__main__":
    common.main(export, "the CTR model", "ctr", "Trained ctr or debias model dir.",
                "rank, serving_default, predict_examples", {
                    "item_embeddings": (None, "An embeddings.npz of --stage=embed (the same "
                                        "encoder's): the export's item table, so items added "
                                        "to the catalog after training get their image "
                                        "features (the daily refresh)."),
                    "max_candidates": (MAX_CANDIDATES, "Candidates per page of `rank` at most; "
                                       "more fail naming the request row."),
                    "max_image_pixels": (export_encoder.MAX_IMAGE_PIXELS, "Largest request "
                                         "image (height x width, from its header).")})

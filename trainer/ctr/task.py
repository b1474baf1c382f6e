"""Training, evaluating and restoring the CTR model: the library side of the `ctr` and `debias`
stages. A model dir holds what rebuilds the model: `config.json`, the feature spec
(`feature_spec.yaml`), `vocabularies.npz`, `clusters.npz` (Cluster-ID) and the checkpoints; the
image-feature encoder's embedding table stays beside that encoder (`config.json` names it).
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
import time

import numpy as np
import tensorflow as tf

from trainer import configs, tracing
from trainer.configs import CtrConfig, TrainConfig
from trainer.ctr import spec as ctr_spec
from trainer.ctr.model import CtrModel, image_statistics, training_records
from trainer.ctr.tables import ClusterTable, ImageTable, Vocabularies
from trainer.data import npz, pipeline
from trainer.eval import ctr_metrics
from trainer.features import clusters as clusters_lib
from trainer.features import embeddings as embeddings_lib
from trainer.train import loop

VOCABULARIES = "vocabularies.npz"
LOOKUP_FILES = "lookups"  # the lookups' id files (`tables.id_lookup`), assets of an export
CLUSTERS = "clusters.npz"
IMAGE_STATISTICS = "image_statistics.npz"  # a model's image normalisation, where it is fixed
POSITIVES = "positives.npz"  # D's mined positives (rows, weights), where they are kept
S1_TABLE = "s1_embeddings.npz"  # with D: the S1 table the positives were mined on


class CtrTask(loop.Task):
    """CTR training (without or with D) as a training-loop task."""

    def __init__(self, cfg: CtrConfig, spec: ctr_spec.CtrSpec, vocabularies: Vocabularies,
                 train_cfg: TrainConfig,
                 images: embeddings_lib.EmbeddingTable | embeddings_lib.TableFile | None = None,
                 positives: tuple[np.ndarray, np.ndarray] | None = None,
                 skip_bad_records: bool = False,
                 clusters: clusters_lib.Clusters | None = None,
                 image_stats: dict | None = None):
        self.cfg, self.spec, self.vocabularies = cfg, spec, vocabularies
        self.images, self.positives, self.clusters = images, positives, clusters
        self.image_stats = image_stats
        self.name = "debias" if cfg.debias is not None else "ctr"
        self.metric_names = (("pred_loss", "debias_loss") if cfg.debias is not None
                             else ("pred_loss",))
        self.pipe = pipeline.InputPipeline(pipeline.InputConfig(
            cfg.train_pattern, training_records(cfg, spec, images),
            global_batch_size=train_cfg.global_batch_size,
            decode_images=False, deterministic=train_cfg.deterministic,
            skip_bad_records=skip_bad_records))
        self.model: CtrModel | None = None

    def build_model(self) -> CtrModel:
        self.model = CtrModel(self.cfg, self.spec, self.vocabularies, self.images,
                              self.positives, self.clusters, self.image_stats).build_variables()
        return self.model

    def build_inputs(self, input_context=None):
        return self.seeded_dataset(input_context)

    def compute_loss(self, batch, training=True):
        assert self.model is not None
        out = self.model.losses_of(batch, training)
        return out.pop("loss"), out


def predict(model: CtrModel, pattern: str, batch_size: int = 2048,
            skip_bad_records: bool = False) -> dict:
    """One ordered pass over `ctr` records: {"score" (click probability), "label", "group",
    "item"} as numpy arrays (the spec's label, group and displayed-item columns)."""
    spec = model.spec
    cfg = pipeline.InputConfig(pattern, spec.record_kind(), global_batch_size=batch_size,
                               decode_images=False, shuffle=False, repeat=False,
                               drop_remainder=False, deterministic=True,
                               skip_bad_records=skip_bad_records)
    pipe = pipeline.InputPipeline(cfg)
    fn = tracing.function(lambda b: tf.sigmoid(model(b, training=False)))
    columns = {"label": spec.label, "group": spec.group, "item": spec.item}
    out: dict = {k: [] for k in ("score", *columns)}
    with pipe.errors_named():
        for batch in pipe.dataset():
            out["score"].append(fn(batch).numpy())
            for k, column in columns.items():
                out[k].append(batch[column].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def evaluate(model: CtrModel, pattern: str, catalog_item_id: np.ndarray,
             catalog_impressions: np.ndarray, skip_bad_records: bool = False,
             predictions_path: str | None = None) -> dict:
    """Table 2's metrics on the records of `pattern` (`ctr_metrics.ctr_metrics`); with
    `predictions_path`, also writes each sample's label, score, group, item and item
    impressions there."""
    pred = predict(model, pattern, skip_bad_records=skip_bad_records)
    order = np.argsort(catalog_item_id)
    pos = np.clip(np.searchsorted(catalog_item_id[order], pred["item"]), 0, len(order) - 1)
    known = catalog_item_id[order][pos] == pred["item"]
    if not known.all():
        missing = np.unique(pred["item"][~known])
        raise ValueError(f"{pattern}: {model.spec.item} {missing[:5].tolist()} "
                         f"({len(missing)} items) not in the catalog, so their impressions are "
                         "unknown")
    impressions = catalog_impressions[order][pos]
    if predictions_path:
        npz.write(predictions_path, **pred, impressions_30d=impressions)
    return ctr_metrics.ctr_metrics(pred["label"], pred["score"], pred["group"], pred["item"],
                                   impressions)


def spec_for(model_dir: str, spec: ctr_spec.CtrSpec) -> ctr_spec.CtrSpec:
    """`spec`, written into the model dir; a model dir trained with another spec is refused (one
    that differs only in what serving reads, `scope`, is updated)."""
    path = os.path.join(model_dir, ctr_spec.FILE)
    if tf.io.gfile.exists(path):
        saved = ctr_spec.load(path)
        if saved.training_dict() != spec.training_dict():
            raise ValueError(f"{model_dir} holds a model trained with another feature spec "
                             f"({path}); use a new model dir")
        if saved.to_dict() == spec.to_dict():
            return saved
    spec.save(path)
    return ctr_spec.load(path)


def vocabularies_for(model_dir: str, cfg: CtrConfig, spec: ctr_spec.CtrSpec,
                     skip_bad_records: bool = False) -> Vocabularies:
    """The model dir's saved vocabularies (a resumed run keeps its lookups), else built from the
    training data and saved."""
    path = os.path.join(model_dir, VOCABULARIES)
    if tf.io.gfile.exists(path):
        return Vocabularies.load(path, os.path.join(model_dir, LOOKUP_FILES))
    vocabularies = Vocabularies.from_training_data(cfg.train_pattern, spec, cfg.min_count,
                                                   skip_bad_records)
    vocabularies.save(path)
    return dataclasses.replace(vocabularies, files_dir=os.path.join(model_dir, LOOKUP_FILES))


def restore(model_dir: str, model: CtrModel) -> CtrModel:
    """`model` (built) with the weights of `model_dir`'s latest checkpoint."""
    prefix = tf.train.latest_checkpoint(os.path.join(model_dir, "ckpt"))
    if not prefix:
        raise FileNotFoundError(f"no checkpoint in {model_dir}/ckpt")
    status = tf.train.Checkpoint(model=model).read(prefix)
    status.expect_partial()  # the optimizer's slots
    status.assert_existing_objects_matched()
    return model


def train_and_evaluate(cfg: CtrConfig, spec: ctr_spec.CtrSpec, train_cfg: TrainConfig,
                       model_dir: str, catalog_item_id: np.ndarray,
                       catalog_impressions: np.ndarray,
                       images: embeddings_lib.EmbeddingTable | embeddings_lib.TableFile
                       | None = None,
                       positives: tuple[np.ndarray, np.ndarray] | None = None,
                       clusters: clusters_lib.Clusters | None = None,
                       skip_bad_records: bool = False,
                       strategy: tf.distribute.Strategy | None = None,
                       seed: int = 0, image_stats: dict | None = None,
                       evaluate_here: bool = True) -> dict:
    """Trains the CTR model into `model_dir` (resuming from its checkpoint; the spec and the
    vocabularies are written there first) and, with `evaluate_here`, evaluates its latest
    checkpoint on the test records (`cfg.test_pattern`) in this process: `evaluate`'s metrics
    plus `train_seconds` (without: `train_seconds`; the caller runs the evaluate job)."""
    strategy = strategy or loop.make_strategy(train_cfg.strategy, train_cfg.shard_bytes)
    spec = spec_for(model_dir, spec)
    vocabularies = vocabularies_for(model_dir, cfg, spec, skip_bad_records)
    task = CtrTask(cfg, spec, vocabularies, train_cfg, images, positives, skip_bad_records,
                   clusters, image_stats)
    t0 = time.time()
    last = loop.run(task, train_cfg, model_dir, strategy, seed)
    seconds = time.time() - t0
    print(f"{task.name}: trained to step {train_cfg.steps} in {model_dir} ({seconds:.0f}s); "
          "last: " + ", ".join(f"{k}={v:.4g}" for k, v in last.items()))
    if not (evaluate_here and loop.is_chief(strategy)):  # the chief evaluates
        return {"train_seconds": seconds}
    model = restore(model_dir, CtrModel(cfg, spec, vocabularies, images, positives,
                                        clusters, image_stats).build_variables()).look_up_joined()
    metrics = evaluate(model, cfg.test_pattern, catalog_item_id,
                       catalog_impressions, skip_bad_records,
                       os.path.join(model_dir, "predictions.npz"))
    return {**metrics, "train_seconds": seconds}


def encoder_dir(model_dir: str) -> str:
    """The model dir of the encoder whose embedding table a CTR model's image features use."""
    config = configs.load(model_dir)
    if not isinstance(config, configs.CtrStage) or config.images.encoder == "none":
        raise ValueError(f"{model_dir} holds no CTR model with image features")
    if not config.images.model_dir:
        raise ValueError(f"{model_dir}/config.json names no image-feature encoder dir")
    return config.images.model_dir


def refresh_items(model: CtrModel, model_dir: str, embeddings_path: str,
                  data: dict | None = None) -> dict:
    """Replaces `model`'s item image table (trained from `model_dir`) with the catalog embedding
    at `embeddings_path` (`--stage=embed`'s embeddings.npz), as the trained model would have
    built it: centred on the training catalog's mean (vector), assigned to the trained centroids
    (cluster_id). Items added to the catalog since training get their image features; the
    weights are unchanged. The embedding must come from the model's encoder: the vectors of the
    items both tables hold must agree (median cosine >= 0.999), else this raises. `data`: the
    file's arrays, when the caller has read them already. Returns what was done, for the
    export's record."""
    if "items" not in model.image_tables:
        raise ValueError(f"{model_dir}: the model has no item image table to refresh")
    data = data if data is not None else npz.read(embeddings_path)
    for key in ("item_id", "embedding"):
        if key not in data:
            raise ValueError(f"{embeddings_path}: no '{key}' array (is it --stage=embed's "
                             "embeddings.npz?)")
    ids, vectors = np.asarray(data["item_id"], np.int64), np.asarray(data["embedding"],
                                                                     np.float32)
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{embeddings_path}: repeated item ids")
    encoder = encoder_dir(model_dir)
    training = image_table_of(model_dir)
    if vectors.shape[1] != training.dim:
        raise ValueError(f"{embeddings_path}: vectors of dimension {vectors.shape[1]}; the "
                         f"model was trained on dimension {training.dim}")
    common, new_rows, old_rows = np.intersect1d(ids, training.item_id, return_indices=True)
    if not len(common):
        raise ValueError(f"{embeddings_path} shares no item with the catalog the model was "
                         "trained on, so it cannot be checked to come from the same encoder")
    cosine = float(np.median(np.sum(vectors[new_rows] * training.item_vector[old_rows], 1)))
    if cosine < 0.999:
        raise ValueError(f"{embeddings_path}: the items it shares with the training catalog have "
                         f"other vectors (median cosine {cosine:.3f}): it comes from another "
                         f"encoder than {encoder}")
    old = model.image_tables["items"]
    # The refreshed ids' file must outlive this call (the export copies it as an asset) and must
    # not replace the trained model's own: a scratch dir, removed when the process ends.
    files_dir = tempfile.mkdtemp(prefix="refreshed-items-")
    atexit.register(shutil.rmtree, files_dir, True)
    if isinstance(old, ClusterTable):
        table = ClusterTable(ids, vectors, old.centroids.numpy(), files_dir, name=old.name)
    else:
        table = ImageTable(ids, vectors, old.center, files_dir, name=old.name)
    model.image_tables["items"] = table
    return {"path": os.path.abspath(embeddings_path), "items": len(ids),
            "new_items": int(len(ids) - len(common)), "checked_items": int(len(common)),
            "median_cosine": round(cosine, 6)}


def image_table_of(model_dir: str) -> embeddings_lib.EmbeddingTable:
    """The image table a trained CTR model looks its ids up in: the model dir's own
    (`embeddings.npz`: the `ctr` stage keeps a copy, the daily cycle grows it), else (a model dir
    written before) its encoder's (`images.model_dir`)."""
    return image_file_of(model_dir).load()


def image_file_of(model_dir: str) -> embeddings_lib.TableFile:
    """`image_table_of`'s table, unread (`embeddings.TableFile`)."""
    own = os.path.join(model_dir, embeddings_lib.FILE)
    if tf.io.gfile.exists(own):
        return embeddings_lib.describe(own)
    return embeddings_lib.describe(os.path.join(encoder_dir(model_dir), embeddings_lib.FILE))


def keep_image_table(table: embeddings_lib.TableFile, model_dir: str, mode: str
                     ) -> tuple[embeddings_lib.TableFile, dict]:
    """The model dir's own copy of the image table (the encoder's cache follows the last catalog
    it embedded; the daily cycle grows this one) and how the model normalises its vectors
    (`image_statistics`, written as IMAGE_STATISTICS for whatever rebuilds the model), neither
    reading the vectors into memory: the file is copied, the statistics are streamed."""
    own = os.path.join(model_dir, embeddings_lib.FILE)
    if os.path.abspath(table.path) != os.path.abspath(own):  # not the encoder's own dir
        tf.io.gfile.makedirs(model_dir)
        tf.io.gfile.copy(table.path, own, overwrite=True)
    kept = embeddings_lib.describe(own)
    stats = image_statistics(kept, mode)
    npz.write(os.path.join(model_dir, IMAGE_STATISTICS), **stats)
    return kept, stats


def image_statistics_of(model_dir: str) -> dict | None:
    """How the model normalises image vectors, where its dir records it (the daily cycle keeps
    the first day's as the table grows), else None: computed from the table."""
    path = os.path.join(model_dir, IMAGE_STATISTICS)
    return npz.read(path) if tf.io.gfile.exists(path) else None


def load_trained(model_dir: str, joined_records: bool = False) -> CtrModel:
    """The trained CTR model of a `ctr`/`debias` stage's model dir, rebuilt from what the dir
    records: config.json, the feature spec, vocabularies.npz, clusters.npz (Cluster-ID) and the
    image table (`image_file_of`), then its latest checkpoint. It looks its `layout: joined`
    image features up by id (`CtrModel.look_up_joined`), or with `joined_records` reads them
    from joined records as in training: it then reads the image table's rows only for features
    of `layout: table` (or D).

    The checkpoint holds the image and cluster tables the model was trained with; they must equal
    the ones rebuilt from the image table, or that table has changed since (a retrained encoder,
    other data) and the ids would map to other vectors: that raises.
    """
    config = configs.load(model_dir)
    if not isinstance(config, configs.CtrStage):
        raise ValueError(f"{model_dir} holds a '{config.stage}' stage's outputs, not a CTR "
                         "model's")
    spec = ctr_spec.load(os.path.join(model_dir, ctr_spec.FILE))
    vocabularies = Vocabularies.load(os.path.join(model_dir, VOCABULARIES),
                                     os.path.join(model_dir, LOOKUP_FILES))
    images = clusters = images_from = None
    if config.images.encoder != "none":
        images = image_file_of(model_dir)
        images_from = images.source[:200]
        if config.ctr.image_feature_mode == "cluster_id":
            clusters = clusters_lib.Clusters.load(os.path.join(model_dir, CLUSTERS))
    model = CtrModel(config.ctr, spec, vocabularies, images, None, clusters,
                     image_statistics_of(model_dir)).build_variables()
    tables = list(model.image_tables.values())
    built = [t.table.numpy() for t in tables]
    restore(model_dir, model)
    for t, before in zip(tables, built, strict=True):
        if not np.allclose(t.table.numpy(), before, atol=1e-5):
            raise ValueError(f"{model_dir}: the '{t.name}' table in the checkpoint differs from "
                             f"the one rebuilt from its image table ({images_from}): those "
                             "embeddings changed after this model was trained")
    return model if joined_records else model.look_up_joined()

"""The CTR predictor (paper 000 §3.2; the model of paper 002 Appendix A), built on TFRS.

    ids       item, shop, brand, category, price bucket, user, age, gender, preferred categories,
              device, position -> Keras lookup layers (vocabularies from the training data, or
              hashing into a configured number of bins) -> embeddings
    history   the user's latest clicks: [item-id embedding, image vector] per click -> dense ->
              multi-head self-attention + residual + layer norm -> masked mean pool -> dense
              (paper 002 App. A)
    image     from an encoder's embedding table (`trainer.features.embeddings`), frozen here, in
              one of paper 002 Appendix B's three forms (`image_feature_mode`):
              vector:     v_p, the displayed item's image vector (through D and its gate in
                          S1+S2+D, as paper 000 describes for the item p), v_q, the query
                          photo's vector (paper 000: v_q = v^S2_q), and each history item's
                          vector beside its id embedding; all centred on the catalog's mean
                          vector and re-normalised (input normalisation, App. B: COURIER's
                          vectors fill a narrow cone, mean cosine 0.78, so uncentred the tower
                          sees a large constant and small variations)
              simscore:   cos(v_p, v_click^k) for each of the l_click history items (Eq. B1)
                          and cos(v_p, v_q), standardised by the cosine's mean and spread
                          over random catalog pairs (0 for padding)
              cluster_id: the nearest k-means centroid's id (`trainer.features.clusters`) of the
                          item, the query photo and each history item, embedded like an id, from
                          unit-norm initial embeddings (the scale of the image vector they stand
                          for; at Keras' default +-0.05 they stayed where they started)
    tower     concatenation -> MLP 512-256-128 ReLU -> logit; p = sigmoid(logit)

Loss: `tfrs.tasks.Ranking` with binary cross-entropy (L_pred of Eq. 4), plus L_D (Eq. 3,
`trainer.models.debias`) when D is on: L_CTR = L_pred + L_D.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs
import tf_keras

from trainer.data import npz, pipeline, schema
from trainer.eval import ctr_metrics
from trainer.features import clusters as clusters_lib
from trainer.features import embeddings as embeddings_lib
from trainer.models import contrastive, debias as debias_lib
from trainer.train import loop

# Single-valued id features and the lookup table each uses.
ID_FEATURES = ("item_id", "shop_id", "brand_id", "category_id", "user_id", "age_bucket", "gender",
               "device", "position")
# List features that share a single-valued feature's table.
SHARED_TABLES = {"click_history_item_ids": "item_id", "preferred_category_ids": "category_id"}


@dataclasses.dataclass
class CtrConfig:
    """CTR predictor settings.

    Attributes:
      train_pattern, test_pattern: `ctr` TFRecords of the train days and of the test day.
      embedding_dim: Size of every id embedding unless overridden in `embedding_dims`.
      embedding_dims: Per-feature embedding sizes, e.g. {"item_id": 32}.
      hash_bins: Features hashed into this many bins instead of looked up in a vocabulary built
        from the training data (for unbounded ids), e.g. {"user_id": 1_000_000}.
      min_count: Ids seen fewer times in the training data share the out-of-vocabulary row.
      price_buckets: Price quantile buckets (boundaries from the training data).
      history_length: Latest clicks of the history used.
      history_dim: Width of the history's attention layer and of its pooled output.
      attention_heads: Heads of the history's self-attention.
      history_pooling: 'mean' (paper 002 App. A: masked mean of the attended history) or
        'target' (the displayed item attends over the history, as in DIN).
      cross_layers: DCN-v2 cross layers (`tfrs.layers.dcn.Cross`) on the tower's input, so that
        it can form products such as v_q x v_p; 0 for none (paper 000's plain tower).
      cross_projection_dim: Rank of the cross layers' weight (low-rank DCN).
      tower_units: The tower MLP's hidden layers (paper 000 §4: 512, 256, 128).
      query_image: Feed the query photo's image feature.
      image_feature_mode: 'vector', 'simscore' or 'cluster_id' (module docstring).
      debias: D's settings; None trains without D (D needs the 'vector' mode).
    """

    train_pattern: str = ""
    test_pattern: str = ""
    embedding_dim: int = 16
    embedding_dims: dict = dataclasses.field(default_factory=dict)
    hash_bins: dict = dataclasses.field(default_factory=dict)
    min_count: int = 1
    price_buckets: int = 16
    history_length: int = 20
    history_dim: int = 64
    attention_heads: int = 2
    history_pooling: str = "mean"
    cross_layers: int = 0
    cross_projection_dim: int = 64
    tower_units: tuple = (512, 256, 128)
    query_image: bool = True
    image_feature_mode: str = "vector"
    debias: Optional[debias_lib.DebiasConfig] = None


@dataclasses.dataclass
class Vocabularies:
    """What the id lookups were built from: per id feature the vocabulary (sorted ids), and the
    price bucket boundaries. Saved in the model dir so that a resumed or exported model looks ids
    up exactly as it was trained."""

    ids: dict
    price_boundaries: np.ndarray

    @classmethod
    def from_training_data(cls, pattern: str, cfg: CtrConfig) -> "Vocabularies":
        columns = list(ID_FEATURES) + ["price"] + [f for f in SHARED_TABLES] + [
            f"{f}_mask" for f in SHARED_TABLES]
        data = pipeline.read_columns(pattern, "ctr", columns)
        ids = {}
        for name in ID_FEATURES:
            if name in cfg.hash_bins:
                continue
            values = [data[name]] + [data[f][data[f + "_mask"]] for f, t in SHARED_TABLES.items()
                                     if t == name]
            uniq, counts = np.unique(np.concatenate(values), return_counts=True)
            ids[name] = uniq[counts >= cfg.min_count]
        qs = np.linspace(0, 1, cfg.price_buckets + 1)[1:-1]
        return cls(ids, np.unique(np.quantile(data["price"], qs)).astype(np.float32))

    def save(self, path: str) -> None:
        npz.write(path, price_boundaries=self.price_boundaries,
                  **{f"ids/{k}": v for k, v in self.ids.items()})

    @classmethod
    def load(cls, path: str) -> "Vocabularies":
        data = npz.read(path)
        return cls({k[4:]: v for k, v in data.items() if k.startswith("ids/")},
                   data["price_boundaries"])


class ImageTable(tf_keras.layers.Layer):
    """Frozen id -> image vector lookup: row 0 (ids missing from the table) is zeros. With
    `center`, the vectors are stored as unit(v - center)."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, center: Optional[np.ndarray] = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.lookup = tf_keras.layers.IntegerLookup(vocabulary=np.asarray(ids, np.int64),
                                                    num_oov_indices=1, mask_token=None)
        vectors = np.asarray(vectors, np.float32)
        if center is not None:
            vectors = vectors - center
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        table = np.concatenate([np.zeros([1, vectors.shape[1]], np.float32), vectors])
        self.table = self.add_weight(
            "vectors", shape=table.shape, trainable=False,
            initializer=tf_keras.initializers.Constant(table))
        self.dim = int(vectors.shape[1])

    def rows(self, ids: tf.Tensor) -> tf.Tensor:
        """Table rows of `ids` (0 for unknown ids)."""
        return self.lookup(ids)

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        return tf.gather(self.table, self.rows(ids))


class ClusterTable(tf_keras.layers.Layer):
    """Frozen id -> cluster id + 1 lookup (0 for ids missing from the table), from the nearest
    centroid of each id's vector; the centroids are kept as a weight, saved with the model."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, centroids: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        self.lookup = tf_keras.layers.IntegerLookup(vocabulary=np.asarray(ids, np.int64),
                                                    num_oov_indices=1, mask_token=None)
        assigned = clusters_lib.Clusters(centroids).assign(vectors) + 1
        self.table = self.add_weight(
            "cluster_ids", shape=[len(ids) + 1], dtype=tf.int64, trainable=False,
            initializer=tf_keras.initializers.Constant(np.concatenate([[0], assigned])))
        self.centroids = self.add_weight(
            "centroids", shape=centroids.shape, trainable=False,
            initializer=tf_keras.initializers.Constant(centroids))

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        return tf.gather(self.table, self.lookup(ids))


IMAGE_FEATURE_MODES = ("vector", "simscore", "cluster_id")


class CtrModel(tfrs.Model):
    """The CTR predictor; `call` returns logits [B]."""

    def __init__(self, cfg: CtrConfig, vocabularies: Vocabularies,
                 images: Optional[embeddings_lib.EmbeddingTable] = None,
                 positives: Optional[tuple[np.ndarray, np.ndarray]] = None,
                 clusters: Optional[clusters_lib.Clusters] = None):
        """images: the encoder's table (None: no image features). positives: D's (neighbour rows,
        weights) over `images.item_id` rows (`debias.mine_positives`), needed to train with D.
        clusters: the k-means centroids, needed in the 'cluster_id' mode."""
        super().__init__()
        self.cfg, self.vocabularies = cfg, vocabularies
        mode = cfg.image_feature_mode
        if mode not in IMAGE_FEATURE_MODES:
            raise ValueError(f"image_feature_mode must be one of {IMAGE_FEATURE_MODES}, got "
                             f"'{mode}'")
        if cfg.debias is not None and (images is None or mode != "vector"):
            raise ValueError("D needs image vectors (image_feature_mode 'vector')")
        if images is not None and mode == "cluster_id" and clusters is None:
            raise ValueError("image_feature_mode 'cluster_id' needs k-means centroids")
        self.lookups, self.id_embeddings = {}, {}
        for name in ID_FEATURES:
            dim = cfg.embedding_dims.get(name, cfg.embedding_dim)
            if name in cfg.hash_bins:
                self.lookups[name] = tf_keras.layers.Hashing(cfg.hash_bins[name], name=f"{name}_hash")
                size = cfg.hash_bins[name]
            else:
                vocab = vocabularies.ids[name]
                self.lookups[name] = tf_keras.layers.IntegerLookup(
                    vocabulary=vocab, num_oov_indices=1, mask_token=None, name=f"{name}_lookup")
                size = len(vocab) + 1
            self.id_embeddings[name] = tf_keras.layers.Embedding(size, dim, name=f"{name}_embedding")
        self.price_bucket = tf_keras.layers.Discretization(
            bin_boundaries=vocabularies.price_boundaries.tolist(), name="price_bucket")
        self.price_embedding = tf_keras.layers.Embedding(
            len(vocabularies.price_boundaries) + 1, cfg.embedding_dims.get("price", cfg.embedding_dim),
            name="price_embedding")

        self.images = self.queries = self.debias = None
        if images is not None and mode == "cluster_id":
            self.images = ClusterTable(images.item_id, images.item_vector, clusters.centroids,
                                       name="item_clusters")
            if cfg.query_image:
                self.queries = ClusterTable(images.query_id, images.query_vector,
                                            clusters.centroids, name="query_clusters")
            dim = cfg.embedding_dims.get("cluster_id", cfg.embedding_dim)
            # Unit expected norm, as the image vector a cluster id stands for: at Keras' default
            # (+-0.05) the item-query and item-history matches were not learned in a run's epoch,
            # even with the planted style as the cluster id (README, Table B1).
            self.cluster_embedding = tf_keras.layers.Embedding(
                clusters.num_clusters + 1, dim, name="cluster_embedding",
                embeddings_initializer=tf_keras.initializers.RandomNormal(stddev=dim ** -0.5))
        elif images is not None:
            center = images.item_vector.mean(axis=0) if mode == "vector" else None
            self.images = ImageTable(images.item_id, images.item_vector, center,
                                     name="item_images")
            if cfg.query_image:
                self.queries = ImageTable(images.query_id, images.query_vector, center,
                                          name="query_images")
            if mode == "simscore":
                # Standardise the cosines by their spread over random catalog pairs (App. B:
                # input normalisation matters): an encoder whose vectors fill a narrow cone
                # gives cosines in a narrow band that the tower would otherwise barely see.
                rng = np.random.default_rng(0)
                v = images.item_vector
                i, j = rng.integers(0, len(v), [2, 20000])
                cos = np.sum(v[i] * v[j], axis=1)
                self.score_shift, self.score_scale = float(cos.mean()), float(cos.std() + 1e-6)
        self.positive_rows = None  # D's mined positives: training only (L_D), not inference
        if cfg.debias is not None:
            self.debias = debias_lib.DebiasNetwork(cfg.debias, images.dim, name="debias")
        if cfg.debias is not None and positives is not None:
            rows, weights = positives
            # In ImageTable row numbering: catalog row r is row r + 1, row 0 has no positives.
            self.positive_rows = tf.constant(np.concatenate(
                [np.zeros([1, rows.shape[1]], np.int64), np.where(rows >= 0, rows + 1, 0)]))
            self.positive_weights = tf.constant(np.concatenate(
                [np.zeros([1, rows.shape[1]], np.float32), weights]))

        self.history_in = tf_keras.layers.Dense(cfg.history_dim, activation="relu",
                                                name="history_in")
        self.history_attention = tf_keras.layers.MultiHeadAttention(
            cfg.attention_heads, cfg.history_dim // cfg.attention_heads, name="history_attention")
        self.history_norm = tf_keras.layers.LayerNormalization(name="history_norm")
        self.history_out = tf_keras.layers.Dense(cfg.history_dim, activation="relu",
                                                 name="history_out")
        if cfg.history_pooling not in ("mean", "target"):
            raise ValueError(f"history_pooling must be 'mean' or 'target', got "
                             f"'{cfg.history_pooling}'")
        if cfg.history_pooling == "target":
            self.target_query = tf_keras.layers.Dense(cfg.history_dim, name="target_query")
            self.target_attention = tf_keras.layers.MultiHeadAttention(
                cfg.attention_heads, cfg.history_dim // cfg.attention_heads,
                name="target_attention")
        self.cross = [tfrs.layers.dcn.Cross(projection_dim=cfg.cross_projection_dim,
                                            name=f"cross_{i}") for i in range(cfg.cross_layers)]
        self.tower = tfrs.layers.blocks.MLP(list(cfg.tower_units) + [1], final_activation=None,
                                            name="tower")
        self.task = tfrs.tasks.Ranking(
            loss=tf_keras.losses.BinaryCrossentropy(
                from_logits=True, reduction=tf_keras.losses.Reduction.NONE),
            metrics=[tf_keras.metrics.AUC(from_logits=True, name="auc")])

    def _embed(self, name: str, ids: tf.Tensor, table: Optional[str] = None) -> tf.Tensor:
        table = table or name
        return self.id_embeddings[table](self.lookups[table](ids))

    def _item_images(self, ids: tf.Tensor) -> tuple[tf.Tensor, Optional[tf.Tensor]]:
        """(v_p, v^D) of item ids [B]: through D and the gate when D is on."""
        v = self.images(ids)
        if self.debias is None:
            return v, None
        v_p, v_d, _ = self.debias(v)
        return v_p, v_d

    def image_features(self, batch: dict, hist_ids: tf.Tensor, hist_mask: tf.Tensor
                       ) -> tuple[list, list, Optional[tf.Tensor], dict]:
        """(the tower's image inputs, the history items' image inputs, the displayed item's image
        representation for target attention, {"v_d": v^D if D is on}) in the configured mode."""
        mode = self.cfg.image_feature_mode
        if self.images is None:
            return [], [], None, {}
        if mode == "vector":
            v_p, v_d = self._item_images(batch["item_id"])
            parts = [v_p] + ([self.queries(batch["query_id"])] if self.queries is not None else [])
            return parts, [self.images(hist_ids)], v_p, {"v_d": v_d}
        if mode == "simscore":
            v_p = self.images(batch["item_id"])
            # Eq. B1 (table vectors are unit or zero, so the dot product is the cosine).
            def standard(cos):
                return (cos - self.score_shift) / self.score_scale

            scores = standard(tf.reduce_sum(v_p[:, None, :] * self.images(hist_ids), axis=-1))
            parts = [scores * tf.cast(hist_mask, scores.dtype)]  # padding: 0, the mean
            if self.queries is not None:
                parts.append(standard(tf.reduce_sum(v_p * self.queries(batch["query_id"]),
                                                    axis=-1, keepdims=True)))
            return parts, [], v_p, {}
        v_p = self.cluster_embedding(self.images(batch["item_id"]))
        parts = [v_p] + ([self.cluster_embedding(self.queries(batch["query_id"]))]
                         if self.queries is not None else [])
        return parts, [self.cluster_embedding(self.images(hist_ids))], v_p, {}

    def features(self, batch: dict, training: bool = False) -> tuple[tf.Tensor, dict]:
        """(the tower's input [B, F], {"v_d": v^D of the displayed items, if D is on})."""
        L = self.cfg.history_length
        parts = [self._embed(n, batch[n]) for n in ID_FEATURES]
        parts.append(self.price_embedding(self.price_bucket(batch["price"])))
        pref = self._embed("preferred_category_ids", batch["preferred_category_ids"], "category_id")
        parts.append(_masked_mean(pref, batch["preferred_category_ids_mask"]))

        hist_ids = batch["click_history_item_ids"][:, -L:]
        hist_mask = batch["click_history_item_ids_mask"][:, -L:]
        image_parts, image_hist, v_p, aux = self.image_features(batch, hist_ids, hist_mask)
        parts += image_parts
        hist = [self._embed("click_history_item_ids", hist_ids, "item_id")] + image_hist
        h = self.history_in(tf.concat(hist, axis=-1))
        attention_mask = hist_mask[:, :, None] & hist_mask[:, None, :]
        h = self.history_norm(h + self.history_attention(h, h, attention_mask=attention_mask,
                                                         training=training))
        if self.cfg.history_pooling == "mean":
            pooled = _masked_mean(h, hist_mask)
        else:
            item = [parts[0]] + ([v_p] if v_p is not None else [])  # parts[0]: item id
            target = self.target_query(tf.concat(item, axis=-1))
            pooled = self.target_attention(target[:, None, :], h,
                                           attention_mask=hist_mask[:, None, :],
                                           training=training)[:, 0]
            pooled *= tf.cast(tf.reduce_any(hist_mask, axis=1), pooled.dtype)[:, None]
        parts.append(self.history_out(pooled))
        x = tf.concat(parts, axis=-1)
        x0 = x
        for layer in self.cross:
            x = layer(x0, x)
        return x, aux

    def call(self, batch: dict, training: bool = False) -> tf.Tensor:
        x, _ = self.features(batch, training)
        return tf.squeeze(self.tower(x, training=training), -1)

    def losses_of(self, batch: dict, training: bool = False,
                  compute_metrics: bool = False) -> dict:
        """This replica's shares of the global-mean losses: {"loss", "pred_loss"[, "debias_loss"]}."""
        x, aux = self.features(batch, training)
        logits = tf.squeeze(self.tower(x, training=training), -1)
        labels = tf.cast(batch["label"], tf.float32)
        per_example = self.task(labels=labels[:, None], predictions=logits[:, None],
                                training=training, compute_metrics=compute_metrics)
        out = {"pred_loss": contrastive.global_mean(per_example)}
        total = out["pred_loss"]
        if self.debias is not None:
            if self.positive_rows is None:
                raise ValueError("training with D needs its mined positives")
            anchors = self.images.rows(batch["item_id"])
            positives, has = debias_lib.sample_positives(
                tf.gather(self.positive_rows, anchors), tf.gather(self.positive_weights, anchors))
            _, v_d_pos, _ = self.debias(tf.gather(self.images.table, tf.maximum(positives, 0)))
            out["debias_loss"] = debias_lib.debias_loss(
                aux["v_d"], v_d_pos, anchors, positives, has, self.cfg.debias.temperature)
            total = total + self.cfg.debias.loss_weight * out["debias_loss"]
        out["loss"] = total
        return out

    def compute_loss(self, inputs: dict, training: bool = False) -> tf.Tensor:
        return self.losses_of(inputs, training, compute_metrics=not training)["loss"]


def _schema_batch() -> dict:
    """A batch of one all-zero `ctr` example as the pipeline gives it (all-True masks)."""
    out = {}
    for f in schema.CTR.features:
        dtype = tf.float32 if f.dtype == schema.FLOAT else tf.int64
        if f.is_list:
            out[f.name] = tf.zeros([1, f.max_len], dtype)
            out[f.name + "_mask"] = tf.ones([1, f.max_len], tf.bool)
        else:
            out[f.name] = tf.zeros([1], dtype)
    return out


def _masked_mean(x: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Mean over axis 1 of the rows where `mask` [B, L] is True; zeros for empty rows."""
    m = tf.cast(mask, x.dtype)[..., None]
    return tf.reduce_sum(x * m, axis=1) / tf.maximum(tf.reduce_sum(m, axis=1), 1.0)


class CtrTask(loop.Task):
    """CTR training (without or with D) as a training-loop task."""

    def __init__(self, cfg: CtrConfig, vocabularies: Vocabularies,
                 train_cfg: loop.TrainConfig,
                 images: Optional[embeddings_lib.EmbeddingTable] = None,
                 positives: Optional[tuple[np.ndarray, np.ndarray]] = None,
                 skip_bad_records: bool = False,
                 clusters: Optional[clusters_lib.Clusters] = None):
        self.cfg, self.vocabularies, self.images, self.positives = cfg, vocabularies, images, positives
        self.clusters = clusters
        self.name = "debias" if cfg.debias is not None else "ctr"
        self.metric_names = ("pred_loss", "debias_loss") if cfg.debias is not None else ("pred_loss",)
        self.pipe = pipeline.InputPipeline(pipeline.InputConfig(
            cfg.train_pattern, "ctr", global_batch_size=train_cfg.global_batch_size,
            decode_images=False, deterministic=train_cfg.deterministic,
            skip_bad_records=skip_bad_records))
        self.model: Optional[CtrModel] = None

    def build_model(self) -> CtrModel:
        self.model = CtrModel(self.cfg, self.vocabularies, self.images, self.positives,
                              self.clusters)
        # Variables now, outside the training function (lookups and lazily built layers).
        self.model(_schema_batch(), training=False)
        return self.model

    def build_inputs(self, input_context=None):
        return self.seeded_dataset(input_context)

    def compute_loss(self, batch, training=True):
        out = self.model.losses_of(batch, training)
        return out.pop("loss"), out


def predict(model: CtrModel, pattern: str, batch_size: int = 2048,
            skip_bad_records: bool = False) -> dict:
    """One ordered pass over `ctr` records: {"score" (click probability), "label", "page_id",
    "item_id"} as numpy arrays."""
    cfg = pipeline.InputConfig(pattern, "ctr", global_batch_size=batch_size, decode_images=False,
                               shuffle=False, repeat=False, drop_remainder=False,
                               deterministic=True, skip_bad_records=skip_bad_records)
    pipe = pipeline.InputPipeline(cfg)
    fn = tf.function(lambda b: tf.sigmoid(model(b, training=False)))
    out: dict = {k: [] for k in ("score", "label", "page_id", "item_id")}
    with pipe.errors_named():
        for batch in pipe.dataset():
            out["score"].append(fn(batch).numpy())
            for k in ("label", "page_id", "item_id"):
                out[k].append(batch[k].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def vocabularies_for(model_dir: str, cfg: CtrConfig) -> Vocabularies:
    """The model dir's saved vocabularies (a resumed run keeps its lookups), else built from the
    training data and saved."""
    path = os.path.join(model_dir, "vocabularies.npz")
    if tf.io.gfile.exists(path):
        return Vocabularies.load(path)
    vocabularies = Vocabularies.from_training_data(cfg.train_pattern, cfg)
    tf.io.gfile.makedirs(model_dir)
    vocabularies.save(path)
    return vocabularies


def restore(model_dir: str, cfg: CtrConfig, vocabularies: Vocabularies,
            images: Optional[embeddings_lib.EmbeddingTable] = None,
            positives: Optional[tuple[np.ndarray, np.ndarray]] = None,
            clusters: Optional[clusters_lib.Clusters] = None) -> CtrModel:
    """The trained model of `model_dir` (its latest checkpoint)."""
    return restore_into(CtrModel(cfg, vocabularies, images, positives, clusters), model_dir)


def restore_into(model: CtrModel, model_dir: str) -> CtrModel:
    """`model` with the weights of `model_dir`'s latest checkpoint."""
    prefix = tf.train.latest_checkpoint(os.path.join(model_dir, "ckpt"))
    if not prefix:
        raise FileNotFoundError(f"no checkpoint in {model_dir}/ckpt")
    status = tf.train.Checkpoint(model=model).read(prefix)
    status.expect_partial()  # the optimizer's slots
    status.assert_existing_objects_matched()
    return model


def evaluate(model: CtrModel, cfg: CtrConfig, catalog_item_id: np.ndarray,
             catalog_impressions: np.ndarray, skip_bad_records: bool = False,
             predictions_path: Optional[str] = None) -> dict:
    """Table 2's metrics on the test day (`ctr_metrics.ctr_metrics`); with `predictions_path`,
    also writes each test sample's label, score, page_id, item_id and item impressions there."""
    pred = predict(model, cfg.test_pattern, skip_bad_records=skip_bad_records)
    order = np.argsort(catalog_item_id)
    pos = np.clip(np.searchsorted(catalog_item_id[order], pred["item_id"]), 0, len(order) - 1)
    known = catalog_item_id[order][pos] == pred["item_id"]
    if not known.all():
        missing = np.unique(pred["item_id"][~known])
        raise ValueError(f"{cfg.test_pattern}: item_id {missing[:5].tolist()} ({len(missing)} "
                         "items) not in the catalog, so their impressions are unknown")
    impressions = catalog_impressions[order][pos]
    if predictions_path:
        npz.write(predictions_path, label=pred["label"], score=pred["score"],
                  page_id=pred["page_id"], item_id=pred["item_id"], impressions_30d=impressions)
    return ctr_metrics.ctr_metrics(pred["label"], pred["score"], pred["page_id"],
                                   pred["item_id"], impressions)


def train_and_evaluate(cfg: CtrConfig, train_cfg: loop.TrainConfig, model_dir: str,
                       catalog_item_id: np.ndarray, catalog_impressions: np.ndarray,
                       images: Optional[embeddings_lib.EmbeddingTable] = None,
                       positives: Optional[tuple[np.ndarray, np.ndarray]] = None,
                       clusters: Optional[clusters_lib.Clusters] = None,
                       skip_bad_records: bool = False, config: Optional[dict] = None,
                       strategy: Optional[tf.distribute.Strategy] = None) -> dict:
    """Trains the CTR model into `model_dir` (resuming from its checkpoint) and evaluates its
    latest checkpoint on the test day: `evaluate`'s metrics plus `train_seconds`. `config` is
    written to the model dir's config.json; `strategy` defaults to `train_cfg.strategy`'s."""
    strategy = strategy or loop.make_strategy(train_cfg.strategy)
    vocabularies = vocabularies_for(model_dir, cfg)
    task = CtrTask(cfg, vocabularies, train_cfg, images, positives, skip_bad_records, clusters)
    t0 = time.time()
    last = loop.run(task, train_cfg, model_dir, config or {"ctr": dataclasses.asdict(cfg)},
                    strategy)
    seconds = time.time() - t0
    print(f"{task.name}: trained to step {train_cfg.steps} in {model_dir} ({seconds:.0f}s); "
          "last: " + ", ".join(f"{k}={v:.4g}" for k, v in last.items()))
    if not loop.is_chief(strategy):  # the chief evaluates
        return {"train_seconds": seconds}
    model = restore(model_dir, cfg, vocabularies, images, positives, clusters)
    metrics = evaluate(model, cfg, catalog_item_id, catalog_impressions, skip_bad_records,
                       os.path.join(model_dir, "predictions.npz"))
    return {**metrics, "train_seconds": seconds}


def config_from_dict(d: dict) -> CtrConfig:
    """A `CtrConfig` from its `dataclasses.asdict` form (a model dir's config.json)."""
    d = dict(d)
    if d.get("debias") is not None:
        d["debias"] = debias_lib.DebiasConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                 for k, v in d["debias"].items()})
    d["tower_units"] = tuple(d["tower_units"])
    return CtrConfig(**d)


def load_trained(model_dir: str) -> CtrModel:
    """The trained CTR model of a `ctr`/`debias` stage's model dir, rebuilt from what the dir
    records: config.json, vocabularies.npz, clusters.npz (cluster_id mode) and the image-feature
    encoder's embedding table (`encoder_dirs` in config.json), then its latest checkpoint.

    The checkpoint holds the image and cluster tables the model was trained with; they must equal
    the ones rebuilt from the encoder's table, or that table has changed since (a retrained
    encoder, other data) and the ids would map to other vectors: that raises.
    """
    with tf.io.gfile.GFile(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    if "ctr" not in config:
        raise ValueError(f"{model_dir}/config.json is not a CTR model's (no 'ctr' section)")
    cfg = config_from_dict(config["ctr"])
    vocabularies = Vocabularies.load(os.path.join(model_dir, "vocabularies.npz"))
    images = clusters = None
    if config.get("image_features", "none") != "none":
        encoder_dir = config.get("encoder_dirs", {}).get("image")
        if not encoder_dir:
            raise ValueError(f"{model_dir}/config.json names no image-feature encoder dir")
        images = embeddings_lib.load(os.path.join(encoder_dir, embeddings_lib.FILE))
        if cfg.image_feature_mode == "cluster_id":
            clusters = clusters_lib.Clusters.load(os.path.join(model_dir, "clusters.npz"))
    model = CtrModel(cfg, vocabularies, images, None, clusters)
    model(_schema_batch(), training=False)  # variables before the restore
    tables = [t for t in (model.images, model.queries) if t is not None]
    built = [t.table.numpy() for t in tables]
    restore_into(model, model_dir)
    for t, before in zip(tables, built):
        if not np.allclose(t.table.numpy(), before, atol=1e-5):
            raise ValueError(f"{model_dir}: the '{t.name}' table in the checkpoint differs from "
                             f"the one rebuilt from {encoder_dir}/{embeddings_lib.FILE}: that "
                             "encoder's embeddings changed after this model was trained")
    return model

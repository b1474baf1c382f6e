"""The CTR predictor (paper 000 §3.2; the model of paper 002 Appendix A), built on TFRS from a
declared feature spec (`trainer.ctr.spec`): the spec says which inputs exist, this module
how each kind enters the model.

    categorical  id -> Keras lookup (a vocabulary of the training data, or hashing) -> embedding;
                 a feature with a `shared_table` uses another feature's lookup and embedding
    numeric      bucketized -> embedding of its bucket; normalised -> the standardised values
    sequence     ids -> their embeddings, each element's image feature beside it -> pooled by
                 the masked mean, or by attention: dense -> multi-head self-attention + residual
                 + layer norm -> masked mean (paper 002 App. A) or the displayed item's attention
                 over the sequence (DIN; `history_pooling`) -> dense
    image        from an encoder's embedding table (`trainer.features.embeddings`), frozen here,
                 in one of paper 002 Appendix B's three forms (`image_feature_mode`):
                 vector:     v_p, the displayed item's image vector (through D and its gate in
                             S1+S2+D, as paper 000 describes for the item p), the vector of each
                             other scalar image feature (v_q, the query photo's: paper 000 has
                             v_q = v^S2_q) and each sequence element's vector beside its id
                             embedding; all centred on the catalog's mean vector and re-normalised
                             (input normalisation, App. B: COURIER's vectors fill a narrow cone,
                             mean cosine 0.78, so uncentred the tower sees a large constant and
                             small variations)
                 simscore:   cos(v_p, v) for each other image feature and each element of an
                             image sequence (Eq. B1: the click history), standardised by the
                             cosine's mean and spread over random catalog pairs (0 for padding)
                 cluster_id: the nearest k-means centroid's id (`trainer.features.clusters`) of
                             each image feature, embedded like an id, from unit-norm initial
                             embeddings (the scale of the image vector they stand for; at Keras'
                             default +-0.05 they stayed where they started)
    tower        concatenation -> [DCN cross layers] -> MLP 512-256-128 ReLU -> logit;
                 p = sigmoid(logit)

Loss: `tfrs.tasks.Ranking` with binary cross-entropy (L_pred of Eq. 4), plus L_D (Eq. 3,
`trainer.ctr.debias`) when D is on: L_CTR = L_pred + L_D.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs
import tf_keras

from trainer.configs import CtrConfig
from trainer.ctr import debias as debias_lib
from trainer.ctr import spec as ctr_spec
from trainer.ctr.tables import (
    ClusterTable,
    Embedding,
    ImageTable,
    Vocabularies,
    gather_rows,
    id_lookup,
)
from trainer.data import schema
from trainer.features import clusters as clusters_lib
from trainer.features import embeddings as embeddings_lib
from trainer.models import contrastive


def image_statistics(images: embeddings_lib.EmbeddingTable | embeddings_lib.TableFile,
                     mode: str) -> dict:
    """How a model normalises its image vectors, from the catalog it is trained on: Vector
    mode centres every table on the catalog's mean vector; SimScore standardises the cosines by
    their mean and spread over random catalog pairs (App. B: input normalisation matters: an
    encoder whose vectors fill a narrow cone gives cosines in a narrow band that the tower would
    otherwise barely see). A table in memory or a saved one, streamed: the same values."""
    if mode == "vector":
        total, n = np.zeros([images.dim], np.float64), 0
        for chunk in images.item_vectors():
            total += chunk.sum(axis=0, dtype=np.float64)
            n += len(chunk)
        return {"center": (total / max(n, 1)).astype(np.float32)}
    if mode == "simscore":
        rng = np.random.default_rng(0)
        i, j = rng.integers(0, images.items, [2, 20000])
        pairs = embeddings_lib.take_rows(images.item_vectors(), np.concatenate([i, j]))
        cos = np.sum(pairs[:len(i)] * pairs[len(i):], axis=1)
        return {"score_shift": np.float64(cos.mean()), "score_scale": np.float64(cos.std() + 1e-6)}
    return {}


class CtrModel(tfrs.Model):
    """The CTR predictor; `call` returns logits [B]."""

    def __init__(self, cfg: CtrConfig, spec: ctr_spec.CtrSpec, vocabularies: Vocabularies,
                 images: embeddings_lib.EmbeddingTable | embeddings_lib.TableFile | None = None,
                 positives: tuple[np.ndarray, np.ndarray] | None = None,
                 clusters: clusters_lib.Clusters | None = None,
                 image_stats: dict | None = None):
        """images: the encoder's table (None: no image features, whatever the spec declares),
        or its saved file (`embeddings.TableFile`), read only if a table must be built (a
        feature of `layout: table`, D, `look_up_joined`): a model that reads joined records
        never holds the catalog's vectors.
        positives: D's (neighbour rows, weights) over `images.item_id` rows
        (`debias.mine_positives`), needed to train with D. clusters: the k-means centroids,
        needed in the 'cluster_id' mode. image_stats: how image vectors are normalised
        (`image_statistics`; default: from `images`), fixed by the daily cycle as the table
        grows. The spec's `layout: joined` image features come from the records' joined
        columns and get no table (training); `look_up_joined` builds their tables, to look ids
        up (evaluation and serving)."""
        super().__init__()
        self.cfg, self.spec, self.vocabularies = cfg, spec, vocabularies
        mode = cfg.image_feature_mode
        self.joined = {f.name for f in spec.joined} if images is not None else set()
        self._images, self._clusters = images, clusters  # for `look_up_joined`
        self.image_stats: dict = (image_stats if image_stats is not None else
                                  image_statistics(images, mode) if images is not None else {})
        self._center = self.image_stats.get("center")
        self.image_features = spec.of_kind("image") if images is not None else []
        self.target = spec.target_image if images is not None else None
        if cfg.debias is not None and (self.target is None or mode != "vector"):
            raise ValueError("D needs the displayed item's image vector (an image feature of "
                             f"'{spec.item}' in the spec, image_feature_mode 'vector')")
        if self.image_features and mode == "simscore" and self.target is None:
            raise ValueError(f"{spec.source}: SimScore compares the displayed item's image with "
                             f"the others; the spec has no image feature of '{spec.item}'")
        if self.image_features and mode == "cluster_id" and clusters is None:
            raise ValueError("image_feature_mode 'cluster_id' needs k-means centroids")

        self.lookups, self.id_embeddings = {}, {}
        for f in spec.tables:
            if f.hash_bins:
                self.lookups[f.name] = tf_keras.layers.Hashing(f.hash_bins, name=f"{f.name}_hash")
                size = f.hash_bins
            else:
                vocab = vocabularies.ids[f.name]
                self.lookups[f.name] = id_lookup(vocab, f"{f.name}_lookup",
                                                 vocabularies.files_dir)
                size = len(vocab) + 1
            self.id_embeddings[f.name] = Embedding(
                size, f.embedding_dim or cfg.embedding_dim, name=f"{f.name}_embedding")
        self.buckets, self.bucket_embeddings = {}, {}
        for f in spec.of_kind("numeric"):
            if f.transform == "bucketize":
                bounds = vocabularies.boundaries[f.name]
                self.buckets[f.name] = tf_keras.layers.Discretization(
                    bin_boundaries=bounds.tolist(), name=f"{f.name}_bucket")
                self.bucket_embeddings[f.name] = Embedding(
                    len(bounds) + 1, cfg.embedding_dim, name=f"{f.name}_embedding")

        self.image_tables: dict = {}
        self.debias = None
        if images is not None:
            self._build_images(images, clusters)
        self.positive_rows = None  # D's mined positives: training only (L_D), not inference
        if cfg.debias is not None:
            assert images is not None  # checked above
            self.debias = debias_lib.DebiasNetwork(cfg.debias, images.dim, name="debias")
            if positives is not None:
                rows, weights = positives
                # In ImageTable row numbering: catalog row r is row r + 1, row 0 has none.
                # Variables, not graph constants: under the parameter-server strategy they are
                # sharded like the item table they index.
                rows = np.concatenate([np.zeros([1, rows.shape[1]], np.int64),
                                       np.where(rows >= 0, rows + 1, 0)])
                weights = np.concatenate([np.zeros([1, rows.shape[1]], np.float32), weights])
                self.positive_rows = self.add_weight(
                    "positive_rows", shape=rows.shape, dtype=tf.int64, trainable=False,
                    initializer=tf_keras.initializers.Constant(rows))
                self.positive_weights = self.add_weight(
                    "positive_weights", shape=weights.shape, trainable=False,
                    initializer=tf_keras.initializers.Constant(weights))

        self.sequence_in, self.sequence_attention, self.sequence_norm = {}, {}, {}
        self.sequence_out, self.target_query, self.target_attention = {}, {}, {}
        dim, heads = cfg.history_dim, cfg.attention_heads
        for f in spec.of_kind("sequence"):
            if f.pooling != "attention":
                continue
            self.sequence_in[f.name] = tf_keras.layers.Dense(dim, activation="relu",
                                                             name=f"{f.name}_in")
            self.sequence_attention[f.name] = tf_keras.layers.MultiHeadAttention(
                heads, dim // heads, name=f"{f.name}_attention")
            self.sequence_norm[f.name] = tf_keras.layers.LayerNormalization(
                name=f"{f.name}_norm")
            self.sequence_out[f.name] = tf_keras.layers.Dense(dim, activation="relu",
                                                              name=f"{f.name}_out")
            if cfg.history_pooling == "target":
                if not self._item_is_embedded() and self.target is None:
                    raise ValueError(f"history_pooling 'target' needs the displayed item "
                                     f"'{spec.item}' as an embedded id or an image feature")
                self.target_query[f.name] = tf_keras.layers.Dense(
                    dim, name=f"{f.name}_target_query")
                self.target_attention[f.name] = tf_keras.layers.MultiHeadAttention(
                    heads, dim // heads, name=f"{f.name}_target_attention")
        self.cross = [tfrs.layers.dcn.Cross(projection_dim=cfg.cross_projection_dim,
                                            name=f"cross_{i}") for i in range(cfg.cross_layers)]
        self.tower = tfrs.layers.blocks.MLP(list(cfg.tower_units) + [1], final_activation=None,
                                            name="tower")
        self.task = tfrs.tasks.Ranking(
            loss=tf_keras.losses.BinaryCrossentropy(
                from_logits=True, reduction=tf_keras.losses.Reduction.NONE),
            metrics=[tf_keras.metrics.AUC(from_logits=True, name="auc")])

    def _build_images(self, images: embeddings_lib.EmbeddingTable | embeddings_lib.TableFile,
                      clusters: clusters_lib.Clusters | None) -> None:
        mode = self.cfg.image_feature_mode
        self.image_dim = images.dim
        needed = {f.table for f in self.image_features if f.name not in self.joined}
        if self.cfg.debias is not None:
            needed.add("items")  # D's positives are looked up in it
        for table in sorted(needed):
            self.image_tables[table] = self._image_table(table)
        if mode == "cluster_id":
            assert clusters is not None
            dim = self.cfg.cluster_embedding_dim or self.cfg.embedding_dim
            # Unit expected norm, as the image vector a cluster id stands for: at Keras' default
            # (+-0.05) the item-query and item-history matches were not learned in a run's epoch,
            # even with the planted style as the cluster id (docs/results.md, Table B1).
            self.cluster_embedding = Embedding(
                clusters.num_clusters + 1, dim, name="cluster_embedding",
                embeddings_initializer=tf_keras.initializers.RandomNormal(stddev=dim ** -0.5))
        if mode == "simscore":
            self.score_shift = float(self.image_stats["score_shift"])
            self.score_scale = float(self.image_stats["score_scale"])

    def _image_table(self, table: str) -> ImageTable | ClusterTable:
        if isinstance(self._images, embeddings_lib.TableFile):
            self._images = self._images.load()  # the rows, now that a table needs them
        images, clusters = self._images, self._clusters
        assert images is not None
        ids, vectors = ((images.item_id, images.item_vector) if table == "items"
                        else (images.query_id, images.query_vector))
        if not len(ids):
            raise ValueError(f"the feature spec's image features need the {table}' vectors, "
                             f"and the embedding table ({images.source[:200]}) has none")
        if self.cfg.image_feature_mode == "cluster_id":
            assert clusters is not None
            return ClusterTable(ids, vectors, clusters.centroids, self.vocabularies.files_dir,
                                name=f"{table}_clusters")
        return ImageTable(ids, vectors, self._center, self.vocabularies.files_dir,
                          name=f"{table}_images")

    def look_up_joined(self) -> CtrModel:
        """Builds the tables of the `layout: joined` image features, so that their ids are looked
        up as serving does (evaluation, export): after restoring a checkpoint, which does not
        hold them."""
        for table in sorted({f.table for f in self.image_features if f.name in self.joined}
                            - set(self.image_tables)):
            self.image_tables[table] = self._image_table(table)
        self.joined = set()
        return self

    @property
    def record_kind(self):
        """The records the model reads: with the joined columns while it reads joined features."""
        return (training_records(self.cfg, self.spec, self._images) if self.joined
                else self.spec.record_kind())

    def _item_is_embedded(self) -> bool:
        return any(f.name == self.spec.item and f.kind == "categorical"
                   for f in self.spec.features)

    def _embed(self, f: ctr_spec.CtrFeature, ids: tf.Tensor) -> tf.Tensor:
        table = f.table_name
        return self.id_embeddings[table](self.lookups[table](ids))

    def _numeric(self, f: ctr_spec.CtrFeature, x: tf.Tensor) -> tf.Tensor:
        x = tf.cast(x, tf.float32)
        if f.log:
            x = tf.math.log1p(tf.maximum(x, 0.0))
        if f.transform == "bucketize":
            return self.bucket_embeddings[f.name](self.buckets[f.name](x))
        mean, std = self.vocabularies.moments[f.name]
        x = tf.reshape(x, [-1, f.length])
        return (x - mean) / std

    def _table_value(self, f: ctr_spec.CtrFeature, batch: dict) -> tf.Tensor:
        """Image feature `f`'s table entry for the batch's ids (a vector, or a cluster id + 1);
        where the batch carries fresh encoder vectors for it (`fresh_vectors`: a request's photo,
        a new candidate's image), the entry those vectors give instead."""
        if f.name in self.joined:
            value = batch[ctr_spec.joined_column(f.name, self.cfg.image_feature_mode)]
            if self.spec.is_sequence(f.ids) and self.cfg.image_feature_mode != "cluster_id":
                value = tf.reshape(value, [-1, self.spec.feature(f.ids).max_length,
                                           self.image_dim])
            return value
        table = self.image_tables[f.table]
        looked_up = table(batch[f.ids])
        vector_key, has_key = fresh_vectors(f.name)
        if vector_key not in batch:
            return looked_up
        has = batch[has_key]
        if looked_up.shape.rank == 2:
            has = has[:, None]
        return tf.where(has, table.from_vectors(batch[vector_key]), looked_up)

    def _image(self, f: ctr_spec.CtrFeature, batch: dict) -> tf.Tensor:
        """Image feature `f` as the mode feeds it: a vector, or a cluster embedding."""
        value = self._table_value(f, batch)
        if self.cfg.image_feature_mode == "cluster_id":
            return self.cluster_embedding(value)
        return value

    def _standard(self, cos: tf.Tensor) -> tf.Tensor:
        return (cos - self.score_shift) / self.score_scale

    def item_image(self, batch: dict) -> tuple[tf.Tensor | None, tf.Tensor | None]:
        """(v_p as the mode uses it, v^D when D is on): the vector, through D and the gate with D
        (vector), the raw vector (simscore), the cluster embedding (cluster_id)."""
        if self.target is None:
            return None, None
        if self.cfg.image_feature_mode == "simscore":
            return self._table_value(self.target, batch), None
        v = self._image(self.target, batch)
        if self.debias is None:
            return v, None
        v_p, v_d, _ = self.debias(v)
        return v_p, v_d

    def image_inputs(self, f: ctr_spec.CtrFeature, batch: dict, v_p: tf.Tensor | None
                     ) -> list:
        """What image feature `f` gives the tower (a sequence's vectors go into its pooling)."""
        mode = self.cfg.image_feature_mode
        if f == self.target:
            return [] if mode == "simscore" else [v_p]
        if mode != "simscore":
            return [] if self.spec.is_sequence(f.ids) else [self._image(f, batch)]
        # Eq. B1 (table vectors are unit or zero, so the dot product is the cosine).
        assert v_p is not None  # SimScore needs the displayed item's image (checked when built)
        v = self._table_value(f, batch)
        if self.spec.is_sequence(f.ids):
            scores = self._standard(tf.reduce_sum(v_p[:, None, :] * v, axis=-1))
            return [scores * tf.cast(batch[f.ids + "_mask"], scores.dtype)]  # padding: 0
        return [self._standard(tf.reduce_sum(v_p * v, axis=-1, keepdims=True))]

    def _sequence(self, f: ctr_spec.CtrFeature, batch: dict, item: list,
                  training: bool) -> tf.Tensor:
        ids, mask = batch[f.name], batch[f.name + "_mask"]
        if f.pooling == "mean":
            return _masked_mean(self._elements(f, batch), mask)
        if training:
            h = self._self_attention(f, batch, training)
        else:
            # A ranking request repeats its user's history on every candidate: when every row
            # holds the same history, attend over it once (the same values, an 8th of the time
            # of a page of 100 on 2 cores).
            same = tf.reduce_all(tf.equal(ids, ids[:1])) & tf.reduce_all(tf.equal(mask, mask[:1]))
            # The first row of every input (the ids', and their joined or request-time vectors).
            once = {k: v[:1] for k, v in batch.items() if v.shape.rank}
            h = tf.cond(
                same & (tf.shape(ids)[0] > 1),
                lambda: tf.repeat(self._self_attention(f, once, training), tf.shape(ids)[0], 0),
                lambda: self._self_attention(f, batch, training))
        if self.cfg.history_pooling == "mean":
            pooled = _masked_mean(h, mask)
        else:
            target = self.target_query[f.name](tf.concat(item, axis=-1))
            pooled = self.target_attention[f.name](target[:, None, :], h,
                                                   attention_mask=mask[:, None, :],
                                                   training=training)[:, 0]
            pooled *= tf.cast(tf.reduce_any(mask, axis=1), pooled.dtype)[:, None]
        return self.sequence_out[f.name](pooled)

    def _elements(self, f: ctr_spec.CtrFeature, batch: dict) -> tf.Tensor:
        """[B, L, E] each element's id embedding and (not SimScore) its image feature."""
        elements = [self._embed(f, batch[f.name])]
        image = self.spec.image_of(f.name) if self.image_features else None
        if image is not None and self.cfg.image_feature_mode != "simscore":
            elements.append(self._image(image, batch))
        return tf.concat(elements, axis=-1)

    def _self_attention(self, f: ctr_spec.CtrFeature, batch: dict, training: bool) -> tf.Tensor:
        """[B, L, history_dim]: the sequence's elements after self-attention (paper 002 App. A)."""
        mask = batch[f.name + "_mask"]
        h = self.sequence_in[f.name](self._elements(f, batch))
        attention_mask = mask[:, :, None] & mask[:, None, :]
        return self.sequence_norm[f.name](h + self.sequence_attention[f.name](
            h, h, attention_mask=attention_mask, training=training))

    def features(self, batch: dict, training: bool = False) -> tuple[tf.Tensor, dict]:
        """(the tower's input [B, F], {"v_d": v^D of the displayed items, if D is on})."""
        v_p, v_d = self.item_image(batch)
        item = [self._embed(self.spec.feature(self.spec.item), batch[self.spec.item])
                ] if self._item_is_embedded() else []
        if v_p is not None:
            item.append(v_p)  # the displayed item's representation for target attention
        parts = []
        for f in self.spec.features:
            if f.kind == "categorical":
                parts.append(item[0] if f.name == self.spec.item else
                             self._embed(f, batch[f.name]))
            elif f.kind == "numeric":
                parts.append(self._numeric(f, batch[f.name]))
            elif f.kind == "sequence":
                parts.append(self._sequence(f, batch, item, training))
            elif self.image_features:
                parts += self.image_inputs(f, batch, v_p)
        x = tf.concat(parts + self.extra_inputs(batch), axis=-1)
        x0 = x
        for layer in self.cross:
            x = layer(x0, x)
        return x, {"v_d": v_d}

    def extra_inputs(self, batch: dict) -> list[tf.Tensor]:
        """More inputs of the tower, from the batch (`trainer.ctr.supervised`: an image vector
        computed by an encoder trained with the model)."""
        return []

    def get_config(self) -> dict:
        """The model's config tree and feature spec (SavedModels record it as metadata); its
        tables come from the training data, not from a config."""
        return {"cfg": dataclasses.asdict(self.cfg), "spec": self.spec.source}

    def call(self, batch: dict, training: bool = False) -> tf.Tensor:
        x, _ = self.features(batch, training)
        return tf.squeeze(self.tower(x, training=training), -1)

    def losses_of(self, batch: dict, training: bool = False,
                  compute_metrics: bool = False) -> dict:
        """This replica's shares of the global-mean losses: {"loss", "pred_loss"[,
        "debias_loss"]}."""
        x, aux = self.features(batch, training)
        logits = tf.squeeze(self.tower(x, training=training), -1)
        labels = tf.cast(batch[self.spec.label], tf.float32)
        per_example = self.task(labels=labels[:, None], predictions=logits[:, None],
                                training=training, compute_metrics=compute_metrics)
        out = {"pred_loss": contrastive.global_mean(per_example)}
        total = out["pred_loss"]
        if self.debias is not None:
            if self.positive_rows is None:
                raise ValueError("training with D needs its mined positives")
            assert self.cfg.debias is not None
            items = self.image_tables["items"]
            anchors = items.rows(batch[self.spec.item])
            positives, has = debias_lib.sample_positives(
                gather_rows(self.positive_rows, anchors),
                gather_rows(self.positive_weights, anchors))
            _, v_d_pos, _ = self.debias(gather_rows(items.table, tf.maximum(positives, 0)))
            out["debias_loss"] = debias_lib.debias_loss(
                aux["v_d"], v_d_pos, anchors, positives, has, self.cfg.debias.temperature)
            total = total + self.cfg.debias.loss_weight * out["debias_loss"]
        out["loss"] = total
        return out

    def compute_loss(self, inputs: dict, training: bool = False) -> tf.Tensor:
        return self.losses_of(inputs, training, compute_metrics=not training)["loss"]

    def build_variables(self) -> CtrModel:
        """Creates the variables (lookups and lazily built layers) outside any training function,
        from one all-zero example of the spec's records."""
        self(self.extra_batch(schema_batch(self.record_kind)), training=False)
        return self

    def extra_batch(self, batch: dict) -> dict:
        """`batch` with what `extra_inputs` reads (none here)."""
        return batch


def training_records(cfg: CtrConfig, spec: ctr_spec.CtrSpec,
                     images: embeddings_lib.EmbeddingTable | embeddings_lib.TableFile | None
                     ) -> schema.RecordKind:
    """The `ctr` records training reads: the spec's, with the joined columns of its `layout:
    joined` image features when the model has image features."""
    if images is None or not spec.joined:
        return spec.record_kind()
    return spec.record_kind(joined=(cfg.image_feature_mode, images.dim))


def fresh_vectors(image_feature: str) -> tuple[str, str]:
    """The batch keys of an image feature's fresh encoder vectors [B, D] and of where they apply
    [B] bool (elsewhere the table's entry for the id is used): how serving passes the vectors of
    images encoded at request time (`export.ctr`'s `rank`)."""
    return f"{image_feature}:vector", f"{image_feature}:has_vector"


def schema_batch(kind: schema.RecordKind) -> dict:
    """A batch of one all-zero example of `kind`'s records as the pipeline gives it (all-True
    masks)."""
    out = {}
    for f in kind.features:
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

"""Typed configuration: one config tree per stage, every default defined once, here.

A stage's configuration is a tree of dataclasses, as in Model Garden's experiment configs
(`official/core/config_definitions.py`): the paths every stage shares at the top (`data_dir`,
`model_dir`, `seed`), then the training loop (`train`), the image tower (`encoder`) and the
stage's own settings (`pretrain`, `ctr`, ...). Library code takes these dataclasses; only
`trainer/task.py` turns flags into overrides.

- Defaults: the field defaults below, and each stage tree's own factory where stages differ
  (S1 trains 600 steps of 128 images, the CTR model 940 steps of 512 samples). They are sized for
  the `small` synthetic world on 2 CPU cores; the papers' scale is an override
  (`--set encoder.depth=50 --set encoder.width_multiplier=1 --set encoder.image_size=224`).
- `to_dict` / `from_dict` round-trip a tree through JSON or YAML; `save` writes a model dir's
  `config.json` and `load` is the one reader of it.
- `apply` (a partial tree from `--config=FILE`) and `override` (`--set path=value`) check what
  they are given against the tree: an unknown key or a value of the wrong type fails with the
  key's path.

Model Garden's own `hyperparams.Config` is not the base: with tf-models-official 2.17 it accepted
the string 'abc' for an int field, named an unknown key without its path, and could not hold a
dict field (the CTR model's hash bins). These dataclasses keep its design with those checks.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any, TypeVar

import tensorflow as tf
import yaml

FILE = "config.json"
T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that does not fit its tree; the message names the key's path."""


def _is_optional(hint: Any) -> bool:
    """`Optional[X]` or `X | None`."""
    return (typing.get_origin(hint) in (typing.Union, types.UnionType)
            and type(None) in typing.get_args(hint))


def _strip_optional(hint: Any) -> Any:
    return next(a for a in typing.get_args(hint) if a is not type(None))


def _choices(*values: str, default: str) -> Any:
    return dataclasses.field(default=default, metadata={"choices": values})


# ---------------------------------------------------------------------------------------------
# The library's settings.


@dataclasses.dataclass
class TrainConfig:
    """How a stage trains (`trainer.train.loop`).

    Attributes:
      steps: Total optimizer steps (a resumed run trains up to this many).
      global_batch_size: Examples per step over all replicas; each replica gets its share.
      per_replica_batch_size: If set, the global batch is this times the replicas (the way GPU
        jobs are sized); exclusive with a non-default global batch.
      optimizer: A tf-models-official optimizer type.
      learning_rate: Peak learning rate, reached after the warmup.
      lr_schedule: 'cosine' (decayed to 0 at `steps`) or 'constant'.
      warmup_steps: Linear warmup steps (at most a fifth of `steps`).
      weight_decay: Decoupled weight decay (adamw, lars); 0 for none.
      momentum: Momentum of sgd and lars.
      checkpoint_interval: Steps between checkpoints.
      log_interval: Steps between progress lines and TensorBoard scalars.
      strategy: 'one_device', 'mirrored', 'multi_worker_mirrored' or 'parameter_server' (the
        cluster from TF_CONFIG; workers update the parameter servers asynchronously).
      shard_bytes: Under 'parameter_server', a variable of at least this size is split into
        row shards over the parameter servers (one shard per this many bytes, at most one per
        server).
      deterministic: Fixed input order and op determinism (reproducible runs; slower): the same
        global batches for any number of workers, and a run killed and resumed ends with the
        weights of an uninterrupted one.
      profile_steps: (start, end) global steps to trace with the TensorBoard profiler into
        `model_dir/train/plugins/profile`; None for no trace.
    """

    steps: int = 1000
    global_batch_size: int = 128
    per_replica_batch_size: int = 0
    optimizer: str = _choices("adam", "adamw", "sgd", "lars", "adagrad", default="adam")
    learning_rate: float = 1e-3
    lr_schedule: str = _choices("cosine", "constant", default="cosine")
    warmup_steps: int = 50
    weight_decay: float = 0.0
    momentum: float = 0.9
    checkpoint_interval: int = 200
    log_interval: int = 50
    strategy: str = _choices("one_device", "mirrored", "multi_worker_mirrored",
                             "parameter_server", default="one_device")
    shard_bytes: int = 1 << 20
    deterministic: bool = False
    profile_steps: tuple[int, int] | None = None

    def replica_batch_size(self, replicas: int) -> int:
        """Each replica's share of the global batch; the global batch must split evenly."""
        if self.global_batch_size % replicas:
            raise ValueError(f"global_batch_size {self.global_batch_size} does not split over "
                             f"{replicas} replicas; use a multiple of {replicas}")
        return self.global_batch_size // replicas


@dataclasses.dataclass
class EncoderConfig:
    """Architecture of the visual encoder (`trainer.models.encoder`).

    Attributes:
      backbone: 'resnet' (tf-models-official's ResNet; the papers' encoder), 'vit'
        (tf-models-official's Vision Transformer; paper 000 Table 2's ViT competitor) or 'vgg16'
        (Keras applications' VGG-16, randomly initialised; the VGG competitor). Swin (paper 002
        §5) has no TensorFlow implementation that builds on this stack's tf_keras (README).
      depth: ResNet depth (tf-models-official's `RESNET_SPECS`: 10, 18, 26, 34, 50, ...). The
        papers use 50; the default is sized for CPU runs.
      width_multiplier: Scales every ResNet layer's channels; 0.5 quarters the FLOPs.
      vit_model: A tf-models-official `VIT_SPECS` name (e.g. 'vit-ti16', 'vit-b16').
      vit_patch_size: The ViT's patch side in pixels; 0 takes the spec's (16 for 'vit-ti16').
        The image side must be a multiple of it.
      vit_layers: Transformer layers of the ViT; 0 takes the spec's (12 for 'vit-ti16').
      image_size: Input side in pixels; 0 takes the data's (a synthetic world's manifest, else 64)
        when a stage starts.
      feature_dim: D, the size of the visual feature vector (paper 000 §4: 512).
      mixed_precision: Compute dtype of the backbone.
      batch_norm_momentum: Momentum of the batch-norm moving statistics used at inference.
      sync_batch_norm: Batch statistics over the global batch under a distribution strategy (as
        SimCLR does, so a contrastive loss cannot use per-replica statistics as a shortcut). Set
        from the strategy when a stage starts.
      gradient_checkpointing: Recompute each block group's activations in the backward pass
        (`tf.recompute_grad`): activation memory of one group instead of the whole backbone, for
        paper-scale batches (paper 002 App. E), at about a third more compute.
      init_checkpoint: Checkpoint (file prefix or directory, e.g. S1's model dir for S1+S2) that
        initialises this encoder; empty for a random initialisation.
      init_scope: What `init_checkpoint` restores: 'encoder', the backbone and the linear layer
        to D (paper 000 fine-tunes S1's whole encoder in S2), or 'backbone', with a new random
        linear layer (COURIER's start from S1).
    """

    backbone: str = _choices("resnet", "vit", "vgg16", default="resnet")
    depth: int = 10
    width_multiplier: float = 0.5
    vit_model: str = "vit-ti16"
    vit_patch_size: int = 0
    vit_layers: int = 0
    image_size: int = 0
    feature_dim: int = 512
    mixed_precision: str = _choices("none", "float16", "bfloat16", default="none")
    batch_norm_momentum: float = 0.99
    sync_batch_norm: bool = False
    gradient_checkpointing: bool = False
    init_checkpoint: str = ""
    init_scope: str = _choices("encoder", "backbone", default="encoder")

    def architecture(self) -> dict[str, Any]:
        """The settings that decide the backbone's variables: a checkpoint restores only into an
        encoder with the same ones (a ViT's position embeddings also depend on the image side)."""
        keys = {"resnet": ("depth", "width_multiplier"), "vgg16": (),
                "vit": ("vit_model", "vit_patch_size", "vit_layers", "image_size")}[self.backbone]
        return {"backbone": self.backbone, **{k: getattr(self, k) for k in keys}}


@dataclasses.dataclass
class AugmentConfig:
    """SimCLR's augmentation family with colour strength s (defaults: SimCLR, s = 1;
    `trainer.data.augment`).

    Attributes:
      crop_area: Range of the crop's area as a fraction of the image.
      crop_aspect: Range of the crop's width / height.
      flip_prob: Probability of a horizontal flip.
      jitter_prob: Probability that colour jitter is applied to an image.
      brightness, contrast, saturation: Each factor is drawn from [1 - x, 1 + x].
      hue: Hue shift drawn from [-hue, hue] turns.
      greyscale_prob: Probability of converting an image to greyscale.
    """

    crop_area: tuple[float, float] = (0.08, 1.0)
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    greyscale_prob: float = 0.2


@dataclasses.dataclass
class PretrainConfig:
    """S1 (paper 000 Eq. 1, `trainer.models.pretrain`).

    Attributes:
      catalog_pattern: Catalog TFRecords whose images are the training set (empty: the data dir's).
      temperature: tau of Eq. 1 (0.1, SimCLR's; the module docstring says why).
      augment: The augmentation family that makes the two views.
    """

    catalog_pattern: str = ""
    temperature: float = 0.1
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)


@dataclasses.dataclass
class SimsiamConfig:
    """SimSiam, a paper 002 Table 5 baseline (`trainer.models.simsiam`).

    Attributes:
      catalog_pattern: Catalog TFRecords whose images are the training set (empty: the data dir's).
      predictor_units: Hidden units of the predictor MLP h (SimSiam's bottleneck: D / 4).
      augment: The augmentation family that makes the two views (S1's).
    """

    catalog_pattern: str = ""
    predictor_units: int = 128
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)


@dataclasses.dataclass
class TextConfig:
    """The text tower of the image-title stages (`trainer.models.text`): words hashed into
    buckets (no vocabulary to build or ship), a small pre-norm Transformer, mean pooling, a
    linear layer to D.

    Attributes:
      hash_buckets: Word buckets (collisions are rare below a tenth of this many distinct words).
      max_words: Words of a title kept (the first ones).
      width: Token width of the Transformer.
      layers: Transformer layers (0: a bag of words).
      heads: Attention heads.
    """

    hash_buckets: int = 1 << 16
    max_words: int = 16
    width: int = 128
    layers: int = 2
    heads: int = 4


@dataclasses.dataclass
class ClipConfig:
    """CLIP, a paper 002 Table 5 baseline (`trainer.models.clip`): the item's cover image and its
    title as a positive pair.

    Attributes:
      catalog_pattern: Catalog TFRecords with `title`s (empty: the data dir's).
      temperature: tau (paper 002 App. E tuned it over 0.1, 0.2, 0.5: 0.1 was best).
      learn_temperature: Train tau from that value, as CLIP's own paper does (its log, capped
        at 1/tau = 100); off by default, as paper 002's baseline.
      augment: Image augmentation (CLIP's: a random crop only).
      text: The text tower.
      masked_distillation: MaskCLIP: CLIP plus masked self-distillation in both towers
        (`trainer.models.clip`).
      mask_patch: MaskCLIP: side in pixels of the square patches masked in the student's image.
      mask_ratio: MaskCLIP: share of the image's patches masked.
      word_mask_ratio: MaskCLIP: share of the title's words masked.
      teacher_momentum: MaskCLIP: momentum of the moving-average teacher.
      distillation_weight: MaskCLIP: weight of the two distillation losses beside CLIP's.
    """

    catalog_pattern: str = ""
    temperature: float = 0.1
    learn_temperature: bool = False
    augment: AugmentConfig = dataclasses.field(default_factory=lambda: AugmentConfig(
        crop_area=(0.5, 1.0), flip_prob=0.0, jitter_prob=0.0, greyscale_prob=0.0))
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    masked_distillation: bool = False
    mask_patch: int = 16
    mask_ratio: float = 0.5
    word_mask_ratio: float = 0.3
    teacher_momentum: float = 0.996
    distillation_weight: float = 1.0


@dataclasses.dataclass
class FinetuneConfig:
    """S2 (paper 000 Eq. 2, `trainer.models.finetune`).

    Attributes:
      sessions_pattern: search_sessions TFRecords (query image, clicked item).
      catalog_pattern: Catalog TFRecords: the negative pools, and the clicked images when the
        sessions carry only item ids.
      pool_size: Catalog images of the batch's category drawn per global batch as negatives.
      in_batch_negatives: The other clicked images of the batch's category are negatives too.
      temperature: tau of Eq. 2.
    """

    sessions_pattern: str = ""
    catalog_pattern: str = ""
    pool_size: int = 128
    in_batch_negatives: bool = True
    temperature: float = 0.1


@dataclasses.dataclass
class ClassifyConfig:
    """ResNet-C, the category-classifier baseline (`trainer.models.classify`).

    Attributes:
      catalog_pattern: Catalog TFRecords (images and category labels).
      augment: Training augmentation (crop and flip; colour is no category cue here).
      label_smoothing: Cross-entropy label smoothing.
      categories: The classifier's outputs, in order; empty: the catalog's categories, sorted
        (filled in when training starts, so config.json records them).
    """

    catalog_pattern: str = ""
    augment: AugmentConfig = dataclasses.field(default_factory=lambda: AugmentConfig(
        crop_area=(0.25, 1.0), jitter_prob=0.0, greyscale_prob=0.0))
    label_smoothing: float = 0.0
    categories: tuple[int, ...] = ()


@dataclasses.dataclass
class CourierConfig:
    """COURIER (paper 002 Eq. 1-7, `trainer.models.courier`).

    Attributes:
      pageviews_pattern: `pageviews` TFRecords (page items, click labels, click history).
      catalog_pattern: Catalog TFRecords, for images joined by item id (compact layout).
      temperature: tau of Eq. 6 (§4.3.1: 0.05).
      heads: Attention heads of the reconstruction (the paper's is single-head).
      no_ucs, no_contrast, self_attention, no_neg_pv, projection_head: Table 6 / Appendix D
        ablations (the module's docstring).
      clip_weight: Table 8's COURIER + CLIP: the weight of a CLIP loss between the page items'
        images and their catalog titles beside COURIER's (0: none).
      clip_temperature: That CLIP loss's tau (the `clip` stage's).
      text: That CLIP loss's text tower.
    """

    pageviews_pattern: str = ""
    catalog_pattern: str = ""
    temperature: float = 0.05
    heads: int = 1
    no_ucs: bool = False
    no_contrast: bool = False
    self_attention: bool = False
    no_neg_pv: bool = False
    projection_head: bool = False
    clip_weight: float = 0.0
    clip_temperature: float = 0.1
    text: TextConfig = dataclasses.field(default_factory=TextConfig)


COURIER_ABLATIONS = ("no_ucs", "no_contrast", "self_attention", "no_neg_pv", "projection_head")


@dataclasses.dataclass
class SearchEvalConfig:
    """Visual-search evaluation (paper 000 §4.1, `trainer.eval.visual_search`).

    Attributes:
      catalog_pattern: Catalog TFRecords: the searched images, their categories and impressions.
      judgments_pattern: Judgments TFRecords: query items and their relevant items.
      ks: The K of LR@K and CR@K.
      low_impressions: Items with fewer 30-day impressions than this are low-impression items.
    """

    catalog_pattern: str = ""
    judgments_pattern: str = ""
    ks: tuple[int, ...] = (10, 100)
    low_impressions: int = 5


@dataclasses.dataclass
class DebiasConfig:
    """D, the debiasing network (paper 000 Eq. 3-4, `trainer.ctr.debias`; §4 defaults).

    Attributes:
      num_similar: K, the size of P~_p.
      positives: The pool P~_p is mined from: 'not_displayed', items with no impression in the
        training logs (paper 000 §3.2's non-displayed items; one pass over the logs' item ids),
        or 'low_impression', items with fewer than `low_impressions` 30-day impressions (§4.1's
        long tail). The default is 'low_impression': on the synthetic worlds nearly every item
        is displayed in the training days (71 of `small`'s 8,000, under 10 per category, fewer
        than K), while a production catalog such as the paper's has many never displayed.
      low_impressions: 'low_impression' candidates have fewer 30-day impressions than this
        (paper 000 §4.1: 5).
      hidden_units: The MLP's hidden layers.
      activations: Their activations.
      temperature: tau of g = cosine / tau.
      loss_weight: Weight of L_D in Eq. 4 (the paper adds it with weight 1).
      index: How P~ is searched per category: 'exact' (a flat inner-product index) or 'ivf'
        (faiss IVF, approximate: for catalogs of millions; its recall against exact search is
        measured on a sample of anchors and printed).
      nprobe: IVF lists searched per query ('ivf'); each category gets about sqrt(candidates)
        lists.
      recall_sample: Anchors whose exact neighbours are searched to measure the IVF recall.
    """

    num_similar: int = 15
    positives: str = _choices("low_impression", "not_displayed", default="low_impression")
    low_impressions: int = 5
    index: str = _choices("exact", "ivf", default="exact")
    nprobe: int = 32
    recall_sample: int = 2000
    hidden_units: tuple[int, ...] = (128, 16, 128)
    activations: tuple[str, ...] = ("relu", "tanh", "relu")
    temperature: float = 0.1
    loss_weight: float = 1.0


@dataclasses.dataclass
class CtrConfig:
    """The CTR predictor (paper 000 §3.2, paper 002 App. A, `trainer.ctr.model`). Its features
    are declared in a feature spec (`trainer.data.ctr_spec`); these settings shape the model.

    Attributes:
      spec: The feature spec: a built-in name ('synthetic', 'feed') or a YAML/JSON file.
      train_pattern, test_pattern: `ctr` TFRecords of the train days and of the test day (empty:
        the data dir's).
      embedding_dim: Size of an id embedding whose feature sets none in the spec.
      hash_bins: Features hashed into this many bins instead of looked up in a vocabulary from
        the training data, over the spec's, e.g. {"user_id": 1000000}.
      min_count: Ids seen fewer times in the training data share the out-of-vocabulary row.
      history_dim: Width of the attention of attention-pooled sequences and of their output.
      attention_heads: Heads of that self-attention.
      history_pooling: After the self-attention: 'mean' (paper 002 App. A: masked mean) or
        'target' (the displayed item attends over the sequence, as in DIN).
      cross_layers: DCN-v2 cross layers on the tower's input; 0 for none (paper 000's tower).
      cross_projection_dim: Rank of the cross layers' weight (low-rank DCN).
      tower_units: The tower MLP's hidden layers (paper 000 §4: 512, 256, 128).
      image_feature_mode: How image features enter the model (paper 002 App. B).
      cluster_embedding_dim: Size of the cluster-id embedding; 0: `embedding_dim`.
      debias: D's settings; None trains without D (D needs the 'vector' mode).
    """

    spec: str = "synthetic"
    train_pattern: str = ""
    test_pattern: str = ""
    embedding_dim: int = 16
    hash_bins: dict[str, int] = dataclasses.field(default_factory=dict)
    min_count: int = 1
    history_dim: int = 64
    attention_heads: int = 2
    history_pooling: str = _choices("mean", "target", default="mean")
    cross_layers: int = 0
    cross_projection_dim: int = 64
    tower_units: tuple[int, ...] = (512, 256, 128)
    image_feature_mode: str = _choices("vector", "simscore", "cluster_id", default="vector")
    cluster_embedding_dim: int = 0
    debias: DebiasConfig | None = None


@dataclasses.dataclass
class ImageSourceConfig:
    """Whose catalog embeddings are a CTR model's image features.

    Attributes:
      encoder: The encoder's name ('none': no image features): its model dir is
        `encoders_dir/<encoder>` unless `model_dir` is set.
      encoders_dir: Directory holding encoder model dirs by name (resnet_c/, s1/, s1s2/, ...).
      model_dir: The encoder's model dir (filled in from the two above when a stage starts).
      s1_model_dir: D's positives are mined with this encoder (default `encoders_dir/s1`).
      catalog_pattern, queries_pattern: The images to embed (empty: the data dir's).
    """

    encoder: str = "none"
    encoders_dir: str = ""
    model_dir: str = ""
    s1_model_dir: str = ""
    catalog_pattern: str = ""
    queries_pattern: str = ""


@dataclasses.dataclass
class ClusterConfig:
    """Cluster-ID k-means (paper 002 App. B, `trainer.features.clusters`).

    Attributes:
      num_clusters: k; 0 for one cluster per `items_per_cluster` vectors (at least 2).
      items_per_cluster: Average cluster size that sets k when `num_clusters` is 0 (paper 002 §5:
        about 600).
      iterations: Lloyd iterations.
      max_points_per_centroid: faiss trains on a random sample of at most this many points per
        centroid.
      restarts: k-means runs, each from its own seeding; the one with the lowest objective is
        kept.
      seeding_rounds: Rounds of k-means|| (Bahmani et al., 2012) that draw candidate centres
        from the training sample, each one faiss search of the sample against about
        `oversampling` x k new candidates; k-means++ then picks the k seeds among the
        candidates, weighted by the points nearest to each. 0: k-means++ over the whole sample,
        k sequential passes over it (`scripts/bench_kmeans.py` compares both).
      oversampling: Expected new candidates per k-means|| round, in multiples of k.
      seeding_trials: Draws per k-means++ centre: 1 is k-means++ (Arthur & Vassilvitskii, 2007);
        more keeps the best of that many draws by the resulting sum of squared distances
        (greedy k-means++, as scikit-learn's; 0: 2 + log k), a lower objective on tightly
        clustered vectors for that many times the cost of picking the seeds.
    """

    num_clusters: int = 0
    items_per_cluster: int = 500
    iterations: int = 25
    max_points_per_centroid: int = 256
    restarts: int = 1
    seeding_rounds: int = 5
    oversampling: float = 1.0
    seeding_trials: int = 0


@dataclasses.dataclass
class CatalogEmbedConfig:
    """Catalog batch encoding (`--stage=embed`, `trainer.features.catalog_embed`).

    Attributes:
      catalog_pattern: The catalog TFRecords (empty: the data dir's).
      encoder_export: An encoder export: its base path (the latest version) or a version dir.
      out_dir: Where the table, embeddings, index and manifest go (empty: the stage's model
        dir, else DATA_DIR/catalog_embeddings).
      batch_size: Images per call of the SavedModel (RunInference's batch).
      num_shards: Files of the embedding table (0: the Beam runner's choice).
      centroids: A `clusters.npz` to assign cluster ids with; empty for none.
      index: 'flat' (exact) or 'ivf' (IndexIVFFlat, nlist about 4 sqrt(N)).
      nprobe: Inverted lists searched per query of an 'ivf' index.
      index_sample: Vectors sampled (uniformly, by the pipeline) to train an 'ivf' index on.
      beam_options: Beam pipeline options for the stage's pipeline, e.g. '--runner=FlinkRunner
        --flink_master=host:8081' (empty: the in-process DirectRunner).
    """

    catalog_pattern: str = ""
    encoder_export: str = ""
    out_dir: str = ""
    batch_size: int = 256
    num_shards: int = 0
    centroids: str = ""
    index: str = _choices("flat", "ivf", default="flat")
    nprobe: int = 16
    index_sample: int = 1_000_000
    beam_options: str = ""


# ---------------------------------------------------------------------------------------------
# One tree per stage.


@dataclasses.dataclass
class StageConfig:
    """What every stage has.

    Attributes:
      stage: The stage's name (the registry's key).
      data_dir: The data set (a synthetic world or yours, docs/data_format.md).
      model_dir: The stage's outputs.
      seed: Seed of initialisation, input order, augmentation and sampling.
      skip_bad_records: Skip bad input records (counted and logged) instead of stopping at the
        first.
      logical_cpus: Split the CPU into this many logical devices, so that
        `train.strategy=mirrored` runs that many replicas without GPUs (0: no split).
    """

    stage: str = ""
    data_dir: str = ""
    model_dir: str = ""
    seed: int = 0
    skip_bad_records: bool = False
    logical_cpus: int = 0


@dataclasses.dataclass
class RunInfo:
    """What a training run recorded when it started (written, never read as a setting)."""

    replicas: int = 0
    per_replica_batch_size: int = 0
    tensorflow: str = ""


@dataclasses.dataclass
class SynthStage(StageConfig):
    """`synth`: a synthetic marketplace into `data_dir`.

    Attributes:
      world: 'tiny', 'small' or 'medium' (`trainer.synth.config`).
      workers: Processes rendering images (0: one per CPU).
      inline_images: Write page-view images inline (paper 002's production layout) instead of
        joining them from the catalog by item id.
      overwrite: Replace an existing world in `data_dir`.
      ctr_spec: The feature spec whose columns the `ctr` records hold (the others are left out,
        as in a data set that lacks them).
    """

    stage: str = "synth"
    world: str = "small"
    workers: int = 0
    inline_images: bool = False
    overwrite: bool = False
    ctr_spec: str = "synthetic"


@dataclasses.dataclass
class InspectStage(StageConfig):
    """`inspect`: an input-pipeline smoke run over every record kind (`ctr` per `ctr_spec`)."""

    stage: str = "inspect"
    batch_size: int = 64
    image_size: int = 0
    ctr_spec: str = "synthetic"


@dataclasses.dataclass
class ValidateStage(StageConfig):
    """`validate`: scan records for bad ones; `kind` and `file_pattern` for one set of files,
    else every record kind of `data_dir` (`ctr` checked against `ctr_spec`)."""

    stage: str = "validate"
    kind: str = ""
    file_pattern: str = ""
    image_size: int = 0
    ctr_spec: str = "synthetic"


@dataclasses.dataclass
class TrainingStage(StageConfig):
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    run: RunInfo = dataclasses.field(default_factory=RunInfo)


@dataclasses.dataclass
class EncoderStage(TrainingStage):
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)


def _s1_train() -> TrainConfig:
    """S1's budget, which Table 5's other self-supervised baselines share."""
    return TrainConfig(steps=600, global_batch_size=128, learning_rate=2e-3, warmup_steps=50)


@dataclasses.dataclass
class PretrainStage(EncoderStage):
    """`pretrain`: S1."""

    stage: str = "pretrain"
    train: TrainConfig = dataclasses.field(default_factory=_s1_train)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)


@dataclasses.dataclass
class SimsiamStage(EncoderStage):
    """`simsiam`: SimSiam, on S1's augmentations and budget."""

    stage: str = "simsiam"
    train: TrainConfig = dataclasses.field(default_factory=_s1_train)
    simsiam: SimsiamConfig = dataclasses.field(default_factory=SimsiamConfig)


@dataclasses.dataclass
class ClipStage(EncoderStage):
    """`clip`: CLIP on the catalog's images and titles, on S1's budget."""

    stage: str = "clip"
    train: TrainConfig = dataclasses.field(default_factory=_s1_train)
    clip: ClipConfig = dataclasses.field(default_factory=ClipConfig)


@dataclasses.dataclass
class FinetuneStage(EncoderStage):
    """`finetune`: S2 (S1+S2 with `encoder.init_checkpoint` = S1's model dir)."""

    stage: str = "finetune"
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        steps=800, global_batch_size=64, learning_rate=5e-4, warmup_steps=20))
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)


@dataclasses.dataclass
class ClassifyStage(EncoderStage):
    """`classify`: ResNet-C."""

    stage: str = "classify"
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        steps=300, global_batch_size=128, learning_rate=2e-3, warmup_steps=20))
    classify: ClassifyConfig = dataclasses.field(default_factory=ClassifyConfig)


@dataclasses.dataclass
class CourierStage(EncoderStage):
    """`courier`: COURIER. 64 pages of 5 PV + 5 click images are 640 images a step; 200 steps are
    an epoch of `small`. Paper 002 App. E: Adam at 1e-4 from ImageNet weights; here from S1
    (`encoder.init_checkpoint`), which plays ImageNet's part."""

    stage: str = "courier"
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        steps=200, global_batch_size=64, learning_rate=5e-4, warmup_steps=20))
    courier: CourierConfig = dataclasses.field(default_factory=CourierConfig)


@dataclasses.dataclass
class EvalSearchStage(StageConfig):
    """`eval_search`: visual search with the encoder of `model_dir` (its own config.json), or an
    untrained one built from `encoder` (`random_init`)."""

    stage: str = "eval_search"
    random_init: bool = False
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    search: SearchEvalConfig = dataclasses.field(default_factory=SearchEvalConfig)


def _ctr_train() -> TrainConfig:
    # Two epochs of `small`. Paper 000 §4 uses Adagrad at 0.05 on a billion samples; at this
    # scale that leaves the model far from converged (README, Table 2), so Adam is the default.
    return TrainConfig(steps=940, global_batch_size=512, learning_rate=1e-3,
                       lr_schedule="constant", warmup_steps=0)


@dataclasses.dataclass
class CtrStage(TrainingStage):
    """`ctr`: the CTR predictor, trained on the train days and evaluated on the test day."""

    stage: str = "ctr"
    train: TrainConfig = dataclasses.field(default_factory=_ctr_train)
    ctr: CtrConfig = dataclasses.field(default_factory=CtrConfig)
    images: ImageSourceConfig = dataclasses.field(default_factory=ImageSourceConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)


@dataclasses.dataclass
class SupervisedConfig:
    """Supervised, a paper 002 Table 5 baseline (`trainer.ctr.supervised`).

    Attributes:
      catalog_pattern: Catalog TFRecords: the displayed items' images, joined by item id (empty:
        the data dir's).
    """

    catalog_pattern: str = ""


@dataclasses.dataclass
class SupervisedStage(EncoderStage):
    """`supervised`: the image encoder trained end to end inside the CTR model on the train days'
    click labels (`ctr` sets the model, as for the `ctr` stage); the encoder is what it keeps.
    600 steps of 128 impressions: about the images per step and the budget of S1."""

    stage: str = "supervised"
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        steps=600, global_batch_size=128, learning_rate=1e-3, warmup_steps=50))
    ctr: CtrConfig = dataclasses.field(default_factory=CtrConfig)
    supervised: SupervisedConfig = dataclasses.field(default_factory=SupervisedConfig)


@dataclasses.dataclass
class DebiasStage(CtrStage):
    """`debias`: the CTR predictor with D and its gate (S1+S2+D)."""

    stage: str = "debias"
    ctr: CtrConfig = dataclasses.field(default_factory=lambda: CtrConfig(debias=DebiasConfig()))


@dataclasses.dataclass
class ClusterStage(StageConfig):
    """`cluster`: k-means over an encoder's catalog embeddings (into `model_dir`, default the
    encoder's)."""

    stage: str = "cluster"
    images: ImageSourceConfig = dataclasses.field(default_factory=ImageSourceConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)


@dataclasses.dataclass
class EmbedStage(StageConfig):
    """`embed`: the exported encoder over the catalog."""

    stage: str = "embed"
    embed: CatalogEmbedConfig = dataclasses.field(default_factory=CatalogEmbedConfig)


STAGES: dict[str, type[StageConfig]] = {cls().stage: cls for cls in (
    SynthStage, InspectStage, ValidateStage, PretrainStage, SimsiamStage, ClipStage,
    FinetuneStage, ClassifyStage, SupervisedStage, EvalSearchStage, CtrStage, DebiasStage,
    CourierStage, ClusterStage, EmbedStage)}


def for_stage(stage: str) -> StageConfig:
    """The stage's config tree with its defaults."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'; known: {', '.join(STAGES)}")
    return STAGES[stage]()


# ---------------------------------------------------------------------------------------------
# JSON / YAML round trip, overrides.


def to_dict(cfg: Any) -> dict:
    """The tree as plain JSON/YAML values (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        out[f.name] = _plain(getattr(cfg, f.name))
    return out


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_dict(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def from_dict(cls: type[T], d: Any, path: str = "") -> T:
    """A `cls` tree from plain values; unset keys keep their defaults."""
    return apply(cls(), d, path)


def apply(cfg: T, d: Any, path: str = "", source: str = "") -> T:
    """`cfg` with the (partial) tree `d` laid over it; `source` (a file) prefixes errors."""
    where = f"{source}: " if source else ""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}{path or 'the config'} must be a mapping, got "
                          f"{type(d).__name__}")
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name: f for f in dataclasses.fields(cfg)}  # type: ignore[arg-type]
    changes = {}
    for key, value in d.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{where}unknown key '{full}'; {path or 'the top level'} has: "
                              f"{', '.join(fields)}")
        current = getattr(cfg, key)
        changes[key] = _value(hints[key], value, current, full, fields[key], where)
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


def _value(hint: Any, value: Any, current: Any, path: str, field: Any, where: str) -> Any:
    """`value` checked against `hint` (and the field's choices)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_optional(hint):
        if value is None:
            return None
        hint = _strip_optional(hint)
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        section: Any = hint
        return apply(current if current is not None else section(), value, path,
                     where.rstrip(": "))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_scalar(args[0], v, f"{path}[{i}]", where) for i, v in enumerate(value)]
        elif args:
            if len(value) != len(args):
                raise ConfigError(f"{where}{path}: expected {len(args)} values, got {value!r}")
            items = [_scalar(a, v, f"{path}[{i}]", where) for i, (a, v) in
                     enumerate(zip(args, value, strict=True))]
        else:
            items = list(value)
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{path}: expected a mapping, got {value!r}")
        kt, vt = args or (str, Any)
        return {_scalar(kt, k, f"{path}.{k}", where): _scalar(vt, v, f"{path}.{k}", where)
                for k, v in value.items()}
    out = _scalar(hint, value, path, where)
    choices = field.metadata.get("choices") if field is not None else None
    if choices and out not in choices:
        raise ConfigError(f"{where}{path}: '{out}' is not one of {', '.join(choices)}")
    return out


def _scalar(hint: Any, value: Any, path: str, where: str) -> Any:
    def bad() -> ConfigError:
        return ConfigError(f"{where}{path}: expected {getattr(hint, '__name__', hint)}, got "
                           f"{value!r} ({type(value).__name__})")

    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if hint is float:
        # YAML 1.1 reads '1e-3' as a string: accept what parses as a number.
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if hint is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise ConfigError(f"{where}{path}: unsupported config type {hint}")


def _parse_text(text: str) -> Any:
    """A `--set` value: YAML scalars, lists and mappings ('5e-4', 'true', '[1, 2]',
    '{user_id: 97}'); comma-separated values are a list."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and "," in value and not text.lstrip().startswith(("'", '"')):
        return [yaml.safe_load(x) for x in value.split(",")]
    return value


def override(cfg: T, path: str, value: Any) -> T:
    """`cfg` with the key at `path` ('train.learning_rate') set; a string `value` is parsed as
    `--set` gives it."""
    if isinstance(value, str):
        parsed = _parse_text(value)
        leaf = _leaf_hint(cfg, path)
        if leaf is str or (_is_optional(leaf) and _strip_optional(leaf) is str):
            parsed = value  # a string field takes the text as it is
        elif leaf in (tuple, list) or typing.get_origin(leaf) in (tuple, list):
            parsed = parsed if isinstance(parsed, list) else [parsed]
        value = parsed
    tree: Any = value
    for key in reversed(path.split(".")):
        tree = {key: tree}
    return apply(cfg, tree)


def _leaf_hint(cfg: Any, path: str) -> Any:
    """The type hint of the key at `path`, None where the path does not exist (apply says so)."""
    node_type: Any = type(cfg)
    hint: Any = None
    for key in path.split("."):
        if not dataclasses.is_dataclass(node_type):
            return None
        hints = typing.get_type_hints(node_type)
        if key not in hints:
            return None
        hint = hints[key]
        node_type = hint
        if _is_optional(hint):
            node_type = _strip_optional(hint)
    return hint


def read_file(path: str, what: str = "config") -> dict:
    """A YAML or JSON file (YAML is a superset of JSON) holding a mapping; `what` it is names it
    in errors."""
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{what} file {path} does not exist")
    with tf.io.gfile.GFile(path) as f:
        try:
            d = yaml.safe_load(f.read())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not YAML or JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a {what} file holds a mapping at the top level")
    return d


# Value rules, checked on every tree a run starts from or a model dir holds (`check`): every
# float is finite, and these fields lie in their ranges. (low, high): inclusive bounds, None for
# none; a field holding a tuple has each element checked.
_AT_LEAST_1 = (1, None)
_NON_NEGATIVE = (0, None)
_PROBABILITY = (0.0, 1.0)
_POSITIVE = (1e-12, None)
RULES: dict[str, dict[str, tuple[Any, Any]]] = {
    "StageConfig": {"logical_cpus": _NON_NEGATIVE},
    "SynthStage": {"workers": _NON_NEGATIVE},
    "InspectStage": {"batch_size": _AT_LEAST_1, "image_size": _NON_NEGATIVE},
    "ValidateStage": {"image_size": _NON_NEGATIVE},
    "TrainConfig": {"steps": _AT_LEAST_1, "global_batch_size": _AT_LEAST_1,
                    "per_replica_batch_size": _NON_NEGATIVE, "learning_rate": _POSITIVE,
                    "warmup_steps": _NON_NEGATIVE, "weight_decay": _NON_NEGATIVE,
                    "momentum": (0.0, 1.0), "checkpoint_interval": _AT_LEAST_1,
                    "log_interval": _AT_LEAST_1, "profile_steps": _NON_NEGATIVE},
    "EncoderConfig": {"width_multiplier": _POSITIVE, "image_size": _NON_NEGATIVE,
                      "feature_dim": _AT_LEAST_1, "batch_norm_momentum": _PROBABILITY},
    "AugmentConfig": {"crop_area": (1e-6, 1.0), "crop_aspect": _POSITIVE,
                      "flip_prob": _PROBABILITY, "jitter_prob": _PROBABILITY,
                      "brightness": _NON_NEGATIVE, "contrast": _NON_NEGATIVE,
                      "saturation": _NON_NEGATIVE, "hue": (0.0, 0.5),
                      "greyscale_prob": _PROBABILITY},
    "PretrainConfig": {"temperature": _POSITIVE},
    "SimsiamConfig": {"predictor_units": _AT_LEAST_1},
    "TextConfig": {"hash_buckets": _AT_LEAST_1, "max_words": _AT_LEAST_1,
                   "width": _AT_LEAST_1, "layers": _NON_NEGATIVE, "heads": _AT_LEAST_1},
    "ClipConfig": {"temperature": (0.01, None), "mask_patch": _AT_LEAST_1,
                   "mask_ratio": (0.0, 1.0), "word_mask_ratio": (0.0, 1.0),
                   "teacher_momentum": _PROBABILITY, "distillation_weight": _NON_NEGATIVE},
    "FinetuneConfig": {"pool_size": _AT_LEAST_1, "temperature": _POSITIVE},
    "ClassifyConfig": {"label_smoothing": (0.0, 0.999)},
    "SearchEvalConfig": {"ks": _AT_LEAST_1, "low_impressions": _NON_NEGATIVE},
    "DebiasConfig": {"num_similar": _AT_LEAST_1, "low_impressions": _NON_NEGATIVE,
                     "nprobe": _AT_LEAST_1, "recall_sample": _NON_NEGATIVE,
                     "hidden_units": _AT_LEAST_1, "temperature": _POSITIVE,
                     "loss_weight": _NON_NEGATIVE},
    "CtrConfig": {"embedding_dim": _AT_LEAST_1, "hash_bins": _AT_LEAST_1,
                  "min_count": _AT_LEAST_1, "history_dim": _AT_LEAST_1,
                  "attention_heads": _AT_LEAST_1, "cross_layers": _NON_NEGATIVE,
                  "cross_projection_dim": _AT_LEAST_1, "tower_units": _AT_LEAST_1,
                  "cluster_embedding_dim": _NON_NEGATIVE},
    "ClusterConfig": {"num_clusters": _NON_NEGATIVE, "items_per_cluster": _AT_LEAST_1,
                      "iterations": _AT_LEAST_1, "max_points_per_centroid": _AT_LEAST_1,
                      "restarts": _AT_LEAST_1, "seeding_rounds": _NON_NEGATIVE,
                      "oversampling": _POSITIVE, "seeding_trials": _NON_NEGATIVE},
    "CourierConfig": {"temperature": _POSITIVE, "heads": _AT_LEAST_1,
                      "clip_weight": _NON_NEGATIVE, "clip_temperature": (0.01, None)},
    "CatalogEmbedConfig": {"batch_size": _AT_LEAST_1, "num_shards": _NON_NEGATIVE,
                           "nprobe": _AT_LEAST_1, "index_sample": _AT_LEAST_1},
}


def _rules_of(cfg: Any) -> dict:
    out: dict = {}
    for cls in reversed(type(cfg).__mro__):
        out.update(RULES.get(cls.__name__, {}))
    return out


def check(cfg: T, path: str = "", source: str = "") -> T:
    """`cfg` if every value in the tree is allowed (finite floats, the ranges of `RULES`), else a
    `ConfigError` naming the first offending key's path; returns `cfg`."""
    where = f"{source}: " if source else ""
    rules = _rules_of(cfg)
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        full = f"{path}.{f.name}" if path else f.name
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check(value, full, source)
            continue
        values = (list(value.values()) if isinstance(value, dict) else list(value)
                  if isinstance(value, (tuple, list)) else [value])
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not math.isfinite(v):
                raise ConfigError(f"{where}{full}: {v} is not a finite number")
            low, high = rules.get(f.name, (None, None))
            if (low is not None and v < low) or (high is not None and v > high):
                bound = (f"at least {low}" if high is None else f"at most {high}"
                         if low is None else f"between {low} and {high}")
                if low == _POSITIVE[0] and high is None:
                    bound = "greater than 0"
                raise ConfigError(f"{where}{full}: {v} is out of range (must be {bound})")
    return cfg


def save(model_dir: str, cfg: StageConfig) -> str:
    """Writes the tree as `model_dir/config.json`; returns the path."""
    tf.io.gfile.makedirs(model_dir)
    path = os.path.join(model_dir, FILE)
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
        json.dump(to_dict(cfg), f, indent=2)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
    return path


def load(model_dir: str) -> Any:
    """The config tree a stage wrote into `model_dir` (the one reader of every config.json)."""
    path = os.path.join(model_dir, FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {model_dir} is not the model dir of a "
                                "trained stage")
    with tf.io.gfile.GFile(path) as f:
        d = json.load(f)
    stage = d.get("stage")
    if stage not in STAGES:
        raise ConfigError(f"{path}: 'stage' is {stage!r}, not one of {', '.join(STAGES)}")
    try:
        return check(apply(STAGES[stage](), d, source=path), source=path)
    except ConfigError as e:  # e.g. a model dir of a version before the config trees
        raise ConfigError(f"{e} (a config.json this version cannot read: retrain into a new "
                          "model dir)") from None


def exists(model_dir: str) -> bool:
    return tf.io.gfile.exists(os.path.join(model_dir, FILE))

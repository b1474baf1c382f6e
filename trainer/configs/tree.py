"""The config trees: one per stage, every default defined once, here, and each value's rules
beside its field (`setting`).

A stage's configuration is a tree of dataclasses, as in Model Garden's experiment configs
(`official/core/config_definitions.py`): the paths every stage shares at the top (`data_dir`,
`model_dir`, `seed`), then the training loop (`train`), the image tower (`encoder`) and the
stage's own settings (`pretrain`, `ctr`, ...). Library code takes these dataclasses; only
`trainer/task.py` turns flags into overrides (`trainer.configs.engine`).

- Defaults: the field defaults below, and each stage tree's own factory where stages differ
  (S1 trains 600 steps of 128 images, the CTR model 940 steps of 512 samples). They are sized for
  the `small` synthetic world on 2 CPU cores; the papers' scale is an override
  (`--set encoder.depth=50 --set encoder.width_multiplier=1 --set encoder.image_size=224`).
- `save` writes a model dir's `config.json` and `load` is the one reader of it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import tensorflow as tf

from trainer.configs.engine import ConfigError, apply, check, setting, to_dict

FILE = "config.json"


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

    steps: int = setting(1000, low=1)
    global_batch_size: int = setting(128, low=1)
    per_replica_batch_size: int = setting(0, low=0)
    optimizer: str = setting("adam", choices=("adam", "adamw", "sgd", "lars", "adagrad"))
    learning_rate: float = setting(1e-3, positive=True)
    lr_schedule: str = setting("cosine", choices=("cosine", "constant"))
    warmup_steps: int = setting(50, low=0)
    weight_decay: float = setting(0.0, low=0)
    momentum: float = setting(0.9, low=0.0, high=1.0)
    checkpoint_interval: int = setting(200, low=1)
    log_interval: int = setting(50, low=1)
    strategy: str = setting("one_device", choices=(
        "one_device", "mirrored", "multi_worker_mirrored", "parameter_server"))
    shard_bytes: int = 1 << 20
    deterministic: bool = False
    profile_steps: tuple[int, int] | None = setting(None, low=0)

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
        §5) has no TensorFlow implementation that builds on this stack's tf_keras
        (docs/visual_encoder.md).
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

    backbone: str = setting("resnet", choices=("resnet", "vit", "vgg16"))
    depth: int = 10
    width_multiplier: float = setting(0.5, positive=True)
    vit_model: str = "vit-ti16"
    vit_patch_size: int = 0
    vit_layers: int = 0
    image_size: int = setting(0, low=0)
    feature_dim: int = setting(512, low=1)
    mixed_precision: str = setting("none", choices=("none", "float16", "bfloat16"))
    batch_norm_momentum: float = setting(0.99, low=0.0, high=1.0)
    sync_batch_norm: bool = False
    gradient_checkpointing: bool = False
    init_checkpoint: str = ""
    init_scope: str = setting("encoder", choices=("encoder", "backbone"))

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

    crop_area: tuple[float, float] = setting((0.08, 1.0), low=1e-06, high=1.0)
    crop_aspect: tuple[float, float] = setting((3 / 4, 4 / 3), positive=True)
    flip_prob: float = setting(0.5, low=0.0, high=1.0)
    jitter_prob: float = setting(0.8, low=0.0, high=1.0)
    brightness: float = setting(0.8, low=0)
    contrast: float = setting(0.8, low=0)
    saturation: float = setting(0.8, low=0)
    hue: float = setting(0.2, low=0.0, high=0.5)
    greyscale_prob: float = setting(0.2, low=0.0, high=1.0)


@dataclasses.dataclass
class PretrainConfig:
    """S1 (paper 000 Eq. 1, `trainer.models.pretrain`).

    Attributes:
      catalog_pattern: Catalog TFRecords whose images are the training set (empty: the data dir's).
      temperature: tau of Eq. 1 (0.1, SimCLR's; the module docstring says why).
      augment: The augmentation family that makes the two views.
    """

    catalog_pattern: str = ""
    temperature: float = setting(0.1, positive=True)
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
    predictor_units: int = setting(128, low=1)
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

    hash_buckets: int = setting(1 << 16, low=1)
    max_words: int = setting(16, low=1)
    width: int = setting(128, low=1)
    layers: int = setting(2, low=0)
    heads: int = setting(4, low=1)


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
    temperature: float = setting(0.1, low=0.01)
    learn_temperature: bool = False
    augment: AugmentConfig = dataclasses.field(default_factory=lambda: AugmentConfig(
        crop_area=(0.5, 1.0), flip_prob=0.0, jitter_prob=0.0, greyscale_prob=0.0))
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    masked_distillation: bool = False
    mask_patch: int = setting(16, low=1)
    mask_ratio: float = setting(0.5, low=0.0, high=1.0)
    word_mask_ratio: float = setting(0.3, low=0.0, high=1.0)
    teacher_momentum: float = setting(0.996, low=0.0, high=1.0)
    distillation_weight: float = setting(1.0, low=0)


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
    pool_size: int = setting(128, low=1)
    in_batch_negatives: bool = True
    temperature: float = setting(0.1, positive=True)


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
    label_smoothing: float = setting(0.0, low=0.0, high=0.999)
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
    temperature: float = setting(0.05, positive=True)
    heads: int = setting(1, low=1)
    no_ucs: bool = False
    no_contrast: bool = False
    self_attention: bool = False
    no_neg_pv: bool = False
    projection_head: bool = False
    clip_weight: float = setting(0.0, low=0)
    clip_temperature: float = setting(0.1, low=0.01)
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
    ks: tuple[int, ...] = setting((10, 100), low=1)
    low_impressions: int = setting(5, low=0)


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

    num_similar: int = setting(15, low=1)
    positives: str = setting("low_impression", choices=("low_impression", "not_displayed"))
    low_impressions: int = setting(5, low=0)
    index: str = setting("exact", choices=("exact", "ivf"))
    nprobe: int = setting(32, low=1)
    recall_sample: int = setting(2000, low=0)
    hidden_units: tuple[int, ...] = setting((128, 16, 128), low=1)
    activations: tuple[str, ...] = ("relu", "tanh", "relu")
    temperature: float = setting(0.1, positive=True)
    loss_weight: float = setting(1.0, low=0)


@dataclasses.dataclass
class CtrConfig:
    """The CTR predictor (paper 000 §3.2, paper 002 App. A, `trainer.ctr.model`). Its features
    are declared in a feature spec (`trainer.ctr.spec`); these settings shape the model.

    Attributes:
      spec: The feature spec: a built-in name ('synthetic', 'feed') or a YAML/JSON file.
      train_pattern, test_pattern: `ctr` TFRecords of the train days and of the test day (empty:
        the data dir's).
      train_split: The data dir's `ctr` split trained on when `train_pattern` is empty: 'train'
        (every train day), or a synthetic world's 'early' / 'late' train days (paper 002
        §4.2.1 pre-trains on days before the CTR model's window: Supervised on 'early', the CTR
        models of the equal-protocol Table 5 on 'late').
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
    train_split: str = setting("train", choices=("train", "early", "late"))
    test_pattern: str = ""
    embedding_dim: int = setting(16, low=1)
    hash_bins: dict[str, int] = setting(factory=dict, low=1)
    min_count: int = setting(1, low=1)
    history_dim: int = setting(64, low=1)
    attention_heads: int = setting(2, low=1)
    history_pooling: str = setting("mean", choices=("mean", "target"))
    cross_layers: int = setting(0, low=0)
    cross_projection_dim: int = setting(64, low=1)
    tower_units: tuple[int, ...] = setting((512, 256, 128), low=1)
    image_feature_mode: str = setting("vector", choices=("vector", "simscore", "cluster_id"))
    cluster_embedding_dim: int = setting(0, low=0)
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

    num_clusters: int = setting(0, low=0)
    items_per_cluster: int = setting(500, low=1)
    iterations: int = setting(25, low=1)
    max_points_per_centroid: int = setting(256, low=1)
    restarts: int = setting(1, low=1)
    seeding_rounds: int = setting(5, low=0)
    oversampling: float = setting(1.0, positive=True)
    seeding_trials: int = setting(0, low=0)


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
      index: 'exact' (every vector compared) or 'ivf' (inverted lists, about 4 sqrt(N) of them;
        `trainer.features.index`).
      nprobe: Inverted lists searched per query of an 'ivf' index.
      index_sample: Vectors sampled (uniformly, by the pipeline) to train an 'ivf' index on.
      beam_options: Beam pipeline options for the stage's pipeline, e.g. '--runner=FlinkRunner
        --flink_master=host:8081' (empty: the in-process DirectRunner).
      known_ids: An .npz whose `ids` array lists ids embedded already: their records are
        skipped (the daily cycle embeds only the items new today; empty: none skipped).
    """

    catalog_pattern: str = ""
    encoder_export: str = ""
    out_dir: str = ""
    batch_size: int = setting(256, low=1)
    num_shards: int = setting(0, low=0)
    centroids: str = ""
    index: str = setting("exact", choices=("exact", "ivf"))
    nprobe: int = setting(16, low=1)
    index_sample: int = setting(1_000_000, low=1)
    beam_options: str = ""
    known_ids: str = ""


@dataclasses.dataclass
class EvaluateConfig:
    """The CTR model judged by a batch job (`--stage=evaluate`, `trainer.pipelines.evaluate`).

    Attributes:
      records_pattern: The day's `ctr` records (empty: DATA_DIR/ctr/test-*).
      catalog_pattern: The catalog records, for the items' 30-day impressions (empty: the data
        dir's), or an .npz of `item_id` and `impressions_30d`.
      model_export: The CTR export judged: its base path (the latest version) or a version dir.
      checkpoint_dir: Or a trained `ctr`/`debias` model dir, judged from its latest checkpoint
        (the model rebuilt in the workers that score).
      out_dir: Where metrics.json, the statistics and the sharded predictions go (empty: the
        stage's model dir).
      batch_size: Records per call of the SavedModel (RunInference's batch).
      num_shards: Files of the predictions and of the pages (0: the Beam runner's choice).
      fraction: The impression slices' share of the samples (Table 2's bottom / top 10%).
      low_impressions: Items with fewer 30-day impressions than this make the low-impression
        slice.
      mantissa_bits: The AUC histograms' resolution: 2^-bits relative bin width (12: 0.024%);
        each AUC's error bound is reported beside it.
      beam_options: Beam pipeline options (empty: the in-process DirectRunner).
    """

    records_pattern: str = ""
    catalog_pattern: str = ""
    model_export: str = ""
    checkpoint_dir: str = ""
    out_dir: str = ""
    batch_size: int = setting(1024, low=1)
    num_shards: int = setting(0, low=0)
    fraction: float = setting(0.1, positive=True)
    low_impressions: int = setting(5, low=0)
    mantissa_bits: int = setting(12, low=0, high=23)
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
    logical_cpus: int = setting(0, low=0)


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
      dose, strength: One property of the world (`trainer.synth.config.DOSES`: 'style',
        'popularity', 'intention') scaled by `strength` in [0, 1], for the dose-response study
        (empty: the world as named).
    """

    stage: str = "synth"
    world: str = "small"
    dose: str = setting("", choices=("", "style", "popularity", "intention"))
    strength: float = setting(1.0, low=0.0, high=1.0)
    workers: int = setting(0, low=0)
    inline_images: bool = False
    overwrite: bool = False
    ctr_spec: str = "synthetic"


@dataclasses.dataclass
class InspectStage(StageConfig):
    """`inspect`: an input-pipeline smoke run over every record kind (`ctr` per `ctr_spec`)."""

    stage: str = "inspect"
    batch_size: int = setting(64, low=1)
    image_size: int = setting(0, low=0)
    ctr_spec: str = "synthetic"


@dataclasses.dataclass
class ValidateStage(StageConfig):
    """`validate`: scan records for bad ones; `kind` and `file_pattern` for one set of files,
    else every record kind of `data_dir` (`ctr` checked against `ctr_spec`)."""

    stage: str = "validate"
    kind: str = ""
    file_pattern: str = ""
    image_size: int = setting(0, low=0)
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
    # scale that leaves the model far from converged (docs/results.md, Table 2), so Adam is the
    # default.
    return TrainConfig(steps=940, global_batch_size=512, learning_rate=1e-3,
                       lr_schedule="constant", warmup_steps=0)


@dataclasses.dataclass
class CtrStage(TrainingStage):
    """`ctr`: the CTR predictor, trained on the train days and evaluated on the test day.

    Attributes:
      evaluation: Where the test day is scored: 'in_process' (the trainer's process rebuilds the
        model from its checkpoint), 'job' (the Beam evaluate job over the checkpoint, with
        `evaluate`'s settings: the rows sharded, no process holding them, the model rebuilt in
        the job's workers; on a joined test day, `ctr.test_pattern` from the join pipeline, a
        joined spec's model holds no image table there either), 'auto' (the job under the
        parameter-server strategy, whose chief then never holds the model's tables; else in
        process).
      evaluate: The evaluate job's settings; its default runner is a local Dask worker process,
        out of the trainer's.
    """

    stage: str = "ctr"
    train: TrainConfig = dataclasses.field(default_factory=_ctr_train)
    ctr: CtrConfig = dataclasses.field(default_factory=CtrConfig)
    images: ImageSourceConfig = dataclasses.field(default_factory=ImageSourceConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    evaluation: str = setting("auto", choices=("auto", "in_process", "job"))
    evaluate: EvaluateConfig = dataclasses.field(default_factory=lambda: EvaluateConfig(
        beam_options="--runner=dask --dask_workers=1"))


@dataclasses.dataclass
class DailyConfig:
    """The daily cycle (`trainer.ctr.daily`, run by `export/daily.py`; docs/daily.md).

    Attributes:
      previous: Yesterday's CTR model dir (a `ctr` or `debias` run, or yesterday's cycle): the
        model today's trains on from. Its config gives today's model settings and features.
      day: Today's day number, what ids' last-seen days and eviction count in (0: yesterday's
        + 1, or 1 after a model trained before the cycle).
      train_pattern, holdout_pattern: Today's `ctr` records to train on, and the held-out pages
        the gate scores (empty: DATA_DIR/ctr/train-* and DATA_DIR/ctr/holdout-*).
      catalog_pattern: Today's catalog records, the items new today among them (empty:
        DATA_DIR/catalog/*).
      encoder_export: The export of the image-feature encoder (the one the model was trained
        on): it embeds the new items, by the Beam embed job.
      s1_export: With D: S1's export, which embeds the new items for mining their positives.
      export_dir: The model server's base path of the CTR model: the gate compares today's
        model with its latest version, and today's model becomes its next version.
      search_export_dir: The model server's base path of the visual search ad request
        (`export.search`): when set, a passing day also exports it from today's model over
        today's grown catalog, as its next version (empty: not exported).
      margin: The gate: today's model is exported if the 95% interval of its AUC minus the
        serving model's, over today's held-out pages, lies above -margin.
      metric: The gate's metric (AUC, GAUC).
      force: Export today's model even if the gate refuses it.
      evict_after_days: Ids unseen for more than this many days leave the vocabularies (0:
        never).
      volume_ratio, click_rate_ratio: A day whose samples or click rate differ from yesterday's
        by more than these ratios (either way) is reported before training.
      unknown_share: A day on which more than this share of the samples show items or users new
        to the model is reported before training.
      beam_options: Beam pipeline options of the vocab and embed jobs (empty: in process).
    """

    previous: str = ""
    day: int = setting(0, low=0)
    train_pattern: str = ""
    holdout_pattern: str = ""
    catalog_pattern: str = ""
    encoder_export: str = ""
    s1_export: str = ""
    export_dir: str = ""
    search_export_dir: str = ""
    margin: float = setting(0.005, low=0)
    metric: str = setting("AUC", choices=("AUC", "GAUC"))
    force: bool = False
    evict_after_days: int = setting(0, low=0)
    volume_ratio: float = setting(2.0, low=1.0)
    click_rate_ratio: float = setting(1.5, low=1.0)
    unknown_share: float = setting(0.25, low=0.0, high=1.0)
    beam_options: str = ""


def _daily_train() -> TrainConfig:
    # One day of the `moving` world at batch 512 is about 55 steps: a few passes over it.
    return TrainConfig(steps=100, global_batch_size=512, learning_rate=1e-3,
                       lr_schedule="constant", warmup_steps=0, checkpoint_interval=50)


@dataclasses.dataclass
class DailyStage(TrainingStage):
    """`daily`: yesterday's CTR model trained on with today's data, checked against the serving
    one and exported as the next version. The model's settings and features are yesterday's
    (`daily.previous`); `train` is today's budget."""

    stage: str = "daily"
    train: TrainConfig = dataclasses.field(default_factory=_daily_train)
    daily: DailyConfig = dataclasses.field(default_factory=DailyConfig)


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


@dataclasses.dataclass
class EvaluateStage(StageConfig):
    """`evaluate`: an exported CTR model judged on a day's records by the Beam evaluate job."""

    stage: str = "evaluate"
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)


def _stage_trees() -> dict[str, type[StageConfig]]:
    """Every stage's tree by its name: the subclasses of StageConfig that name a stage."""
    out: dict[str, type[StageConfig]] = {}
    todo = list(StageConfig.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo += cls.__subclasses__()
        if cls().stage:
            out[cls().stage] = cls
    return out


STAGES = _stage_trees()


def for_stage(stage: str) -> StageConfig:
    """The stage's config tree with its defaults."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'; known: {', '.join(STAGES)}")
    return STAGES[stage]()


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

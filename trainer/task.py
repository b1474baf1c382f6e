"""Command-line entry point: `python -m trainer.task --stage=NAME [--config=FILE] [--set path=value]
[shorthand flags]`, or `--experiment=NAME` for a named run of `trainer/experiments.py`.

Stages (declared in `trainer/registry.py`: their config trees are in `trainer/configs/`, their
runners in `trainer/stages/`):
{stages}

A stage's configuration is its config tree: the defaults, then a named experiment's overrides
(`--experiment=s1s2`: S2 initialised from S1; its model dir is RUNS_DIR/s1s2 and S1's is
RUNS_DIR/s1 unless `--experiment_dir=s1=PATH` says otherwise), then `--config=FILE` (YAML or
JSON, a partial tree; a model dir's config.json reruns that run), then the shorthand flags, then
each `--set path=value` (e.g. `--set train.learning_rate=5e-4`). An unknown key or a value of the
wrong type fails naming its path (a shorthand flag that does not apply to the stage is ignored
with a warning); `--print_config` prints the tree and exits. `--verbosity=0` brings the
libraries' logs back (`trainer/console.py`). Exports for TF Serving: python -m export.encoder /
python -m export.ctr.
"""
from __future__ import annotations

import os
import sys

import yaml
from absl import flags

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from trainer import configs, console, experiments, registry
from trainer.ctr import spec as ctr_spec
from trainer.data import validate
from trainer.stages import common
from trainer.train import lock

__doc__ = __doc__.format(stages=registry.describe())
FLAGS = flags.FLAGS
flags.DEFINE_enum("stage", None, list(registry.BY_NAME), "What to run.")
flags.DEFINE_string("experiment", None, "A named experiment of trainer/experiments.py (e.g. "
                    "s1s2, courier, ctr/s1s2_d): its stage and overrides, under --config, the "
                    "shorthand flags and --set.")
flags.DEFINE_string("runs_dir", "runs/experiments", "--experiment: the run set's root. The "
                    "experiment's model dir is RUNS_DIR/NAME (unless --model_dir), and those of "
                    "the experiments it builds on are looked for there.")
flags.DEFINE_multi_string("experiment_dir", [], "--experiment: NAME=MODEL_DIR of an experiment "
                          "it builds on, where it is not RUNS_DIR/NAME (e.g. "
                          "s1=runs/visual/seed0/s1; repeatable).")
flags.DEFINE_string("config", None, "YAML or JSON file with (part of) the stage's config tree.")
flags.DEFINE_multi_string("set", [], "path=value overrides of the config tree, e.g. "
                          "train.learning_rate=5e-4 (repeatable; applied last).")
flags.DEFINE_bool("print_config", False, "Print the resolved config tree (YAML) and exit.")

# Shorthand flags: flag -> (config paths, the first that the stage's tree holds; help).
SHORTHANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "data_dir": (("data_dir",), "Directory of the data set (the synthetic world or yours)."),
    "model_dir": (("model_dir",), "Directory of the stage's outputs."),
    "seed": (("seed",), "Random seed."),
    "skip_bad_records": (("skip_bad_records",), "Skip bad input records (counted and logged) "
                         "instead of stopping at the first."),
    "logical_cpus": (("logical_cpus",), "Split the CPU into this many logical devices, so "
                     "--strategy=mirrored runs that many replicas without GPUs."),
    "world": (("world",), "synth: tiny, small or medium."),
    "workers": (("workers",), "synth: processes rendering images."),
    "overwrite": (("overwrite",), "synth: replace an existing world in data_dir."),
    "inline_images": (("inline_images",), "synth: write page-view images inline (paper 002's "
                      "production layout)."),
    "ctr_spec": (("ctr.spec", "ctr_spec"), "The CTR feature spec: a built-in name (synthetic, "
                 "feed) or a YAML/JSON file."),
    "kind": (("kind",), "validate: the record kind of --file_pattern."),
    "file_pattern": (("file_pattern",), "validate: files to check."),
    "image_size": (("encoder.image_size", "image_size"), "Image side (default: the data's)."),
    "batch_size": (("train.global_batch_size", "batch_size", "embed.batch_size",
                    "evaluate.batch_size"),
                   "Global batch size over all replicas."),
    "per_replica_batch_size": (("train.per_replica_batch_size",),
                               "Batch size per replica; the global batch is this times the "
                               "replicas."),
    "strategy": (("train.strategy",), "one_device, mirrored, multi_worker_mirrored or "
                 "parameter_server (the cluster from TF_CONFIG)."),
    "train_steps": (("train.steps",), "Optimizer steps."),
    "optimizer": (("train.optimizer",), "adam, adamw, sgd, lars or adagrad."),
    "learning_rate": (("train.learning_rate",), "Peak learning rate."),
    "warmup_steps": (("train.warmup_steps",), "Warmup steps."),
    "checkpoint_interval": (("train.checkpoint_interval",), "Steps between checkpoints."),
    "log_interval": (("train.log_interval",), "Steps between progress lines and scalars."),
    "deterministic": (("train.deterministic",), "Deterministic input order and ops."),
    "profile_steps": (("train.profile_steps",), "START,END: trace global steps START+1..END."),
    "backbone": (("encoder.backbone",), "resnet, vit or vgg16."),
    "depth": (("encoder.depth",), "ResNet depth."),
    "width_multiplier": (("encoder.width_multiplier",), "ResNet channel multiplier."),
    "feature_dim": (("encoder.feature_dim",), "D, the visual feature size."),
    "mixed_precision": (("encoder.mixed_precision",), "none, float16 or bfloat16."),
    "gradient_checkpointing": (("encoder.gradient_checkpointing",),
                               "Recompute the backbone's activations in the backward pass."),
    "init_checkpoint": (("encoder.init_checkpoint",), "Warm start: a model dir or checkpoint "
                        "(e.g. S1's for S1+S2); encoder.init_scope says what it restores."),
    "temperature": (("pretrain.temperature", "finetune.temperature", "courier.temperature",
                     "clip.temperature", "ctr.debias.temperature"), "Contrastive temperature tau."),
    "pool_size": (("finetune.pool_size",), "finetune: category negative pool per global batch."),
    "courier_ablation": ((), "courier: Table 6 / App. D variants, any of "
                         f"{', '.join(configs.COURIER_ABLATIONS)}."),
    "courier_heads": (("courier.heads",), "courier: attention heads of the reconstruction."),
    "random_init": (("random_init",), "eval_search: evaluate an untrained encoder."),
    "image_features": (("images.encoder",), "ctr/debias/cluster: the encoder (its dir in "
                       "--encoders_dir) whose catalog embeddings are the image features; none."),
    "encoders_dir": (("images.encoders_dir",), "Directory holding encoder model dirs by name."),
    "image_model_dir": (("images.model_dir",), "The image-feature encoder's model dir."),
    "s1_model_dir": (("images.s1_model_dir",), "debias: the S1 encoder that mines D's "
                     "positives."),
    "image_feature_mode": (("ctr.image_feature_mode",), "vector, simscore or cluster_id."),
    "num_clusters": (("cluster.num_clusters",), "k of k-means (default: one per 500 items)."),
    "embedding_dim": (("ctr.embedding_dim",), "Id embedding size."),
    "history_pooling": (("ctr.history_pooling",), "mean or target."),
    "cross_layers": (("ctr.cross_layers",), "DCN cross layers before the tower."),
    "hash_bins": ((), "FEATURE:BINS pairs hashed instead of looked up in a vocabulary."),
    "num_similar": (("ctr.debias.num_similar",), "debias: K, similar items per anchor."),
    "debias_weight": (("ctr.debias.loss_weight",), "debias: weight of L_D in Eq. 4."),
    "export_dir": (("embed.encoder_export", "daily.export_dir", "evaluate.model_export"),
                   "embed: the encoder export; daily: the CTR model's serving base path (gated "
                   "against, exported to); evaluate: the CTR export judged."),
    "search_export_dir": (("daily.search_export_dir",), "daily: the visual search "
                          "request's serving base path (exported to with the CTR model)."),
    "previous": (("daily.previous",), "daily: yesterday's CTR model dir."),
    "day": (("daily.day",), "daily: today's day number (default: yesterday's + 1)."),
    "encoder_export": (("daily.encoder_export",), "daily: the image-feature encoder's export, "
                       "which embeds the new items."),
    "s1_export": (("daily.s1_export",), "daily with D: S1's export, for the new items' "
                  "positives."),
    "margin": (("daily.margin",), "daily: the gate's margin on the AUC difference."),
    "force": (("daily.force",), "daily: export even if the gate refuses."),
    "evict_after_days": (("daily.evict_after_days",), "daily: evict ids unseen this many days "
                         "(0: never)."),
    "centroids": (("embed.centroids",), "embed: clusters.npz to assign cluster ids with."),
    "index_type": (("embed.index",), "embed: exact or ivf."),
    "beam_options": (("embed.beam_options", "daily.beam_options", "evaluate.beam_options"),
                     "embed, daily, evaluate: Beam pipeline options (default: the in-process "
                     "DirectRunner)."),
}
_BOOLS = ("skip_bad_records", "overwrite", "inline_images", "deterministic",
          "gradient_checkpointing", "random_init", "force")
_LISTS = ("profile_steps", "courier_ablation", "hash_bins")
for _name, (_paths, _help) in SHORTHANDS.items():
    if _name in _BOOLS:
        flags.DEFINE_bool(_name, None, _help)
    elif _name in _LISTS:
        flags.DEFINE_list(_name, None, _help)
    else:  # typed by the config tree
        flags.DEFINE_string(_name, None, _help)


def _has(cfg: object, path: str) -> bool:
    node = cfg
    for key in path.split("."):
        if node is None or not hasattr(node, key):
            return False
        node = getattr(node, key)
    return True


def shorthand(cfg: configs.StageConfig, name: str, value: object) -> configs.StageConfig:
    """`cfg` with the shorthand flag `name` applied."""
    if name == "courier_ablation":
        unknown = set(value) - set(configs.COURIER_ABLATIONS)  # type: ignore[call-overload]
        if unknown or not _has(cfg, "courier"):
            raise common.UsageError(f"--courier_ablation: {sorted(unknown) or 'only'} "
                                    f"{'unknown' if unknown else 'for --stage=courier'}; "
                                    f"known: {', '.join(configs.COURIER_ABLATIONS)}")
        for ablation in value:  # type: ignore[attr-defined]
            cfg = configs.override(cfg, f"courier.{ablation}", True)
        return cfg
    if name == "hash_bins":
        bins = {}
        for pair in value:  # type: ignore[attr-defined]
            feature, _, n = pair.partition(":")
            if not feature or not n.isdigit():
                raise common.UsageError(f"--hash_bins: '{pair}' is not FEATURE:BINS")
            bins[feature] = int(n)
        paths: tuple[str, ...] = ("ctr.hash_bins",)
        value = bins
    else:
        paths = SHORTHANDS[name][0]
        if isinstance(value, list):  # START,END
            value = ",".join(value)
    path = next((p for p in paths if _has(cfg, p)), None)
    if path is None:  # as before configs were trees; --set is strict
        print(f"warning: --{name} does not apply to --stage={cfg.stage}; ignored",
              file=sys.stderr)
        return cfg
    return configs.override(cfg, path, value)


def _experiment(cfg: configs.StageConfig, exp: experiments.Experiment) -> configs.StageConfig:
    """`cfg` with the experiment's overrides, the model dirs it names resolved."""
    dirs = {}
    for item in FLAGS.experiment_dir:
        name, sep, path = item.partition("=")
        if not sep:
            raise common.UsageError(f"--experiment_dir {item}: expected NAME=MODEL_DIR")
        dirs[name.strip()] = path.strip()
    for need in exp.needs:
        dirs.setdefault(need, os.path.join(FLAGS.runs_dir, need))
    cfg = configs.override(cfg, "model_dir", os.path.join(FLAGS.runs_dir, exp.name))
    for path, value in experiments.resolved(exp, dirs):
        cfg = configs.override(cfg, path, value)
    return cfg


def build_config() -> configs.StageConfig:
    """The stage's config tree: defaults, --experiment, --config, shorthand flags, --set."""
    tree = configs.read_file(FLAGS.config) if FLAGS.config else {}
    exp = None
    if FLAGS.experiment:
        try:
            exp = experiments.get(FLAGS.experiment)
        except KeyError as e:
            raise common.UsageError(e.args[0]) from None
    stage = FLAGS.stage or (exp.stage if exp else None) or tree.get("stage")
    if not stage:
        raise common.UsageError("pass --stage or --experiment (or a --config file that names "
                                "its stage)")
    for what, other in (("--experiment", exp.stage if exp else None),
                        (FLAGS.config, tree.get("stage"))):
        if other not in (None, stage):
            raise common.UsageError(f"--stage={stage}, but {what} is a '{other}' run")
    cfg = registry.get(stage).config()
    if exp is not None:
        cfg = _experiment(cfg, exp)
    cfg = configs.apply(cfg, tree, source=FLAGS.config or "")
    if FLAGS["batch_size"].present and FLAGS["per_replica_batch_size"].present:
        raise common.UsageError("pass --batch_size (global) or --per_replica_batch_size, not "
                                "both")
    for name in SHORTHANDS:
        if FLAGS[name].present:
            cfg = shorthand(cfg, name, FLAGS[name].value)
    for item in FLAGS.set:
        path, sep, value = item.partition("=")
        if not sep:
            raise common.UsageError(f"--set {item}: expected path=value")
        cfg = configs.override(cfg, path.strip(), value.strip())
    return configs.check(cfg)


# Errors the user fixes from the message alone: printed without a traceback, exit status 2.
ERRORS = (configs.ConfigError, common.UsageError, ctr_spec.SpecError, lock.LockedError,
          validate.BadRecordError)


def main(argv) -> None:
    del argv
    try:
        cfg = build_config()
    except (*ERRORS, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if FLAGS.print_config:
        print(yaml.safe_dump(configs.to_dict(cfg), sort_keys=False), end="")
        return
    if cfg.logical_cpus:
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cfg.logical_cpus)
    try:
        registry.run(cfg)
    except ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    console.absl_run(main)

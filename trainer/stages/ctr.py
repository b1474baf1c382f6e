"""The CTR stages: `ctr` and `debias` train the CTR predictor (with D: S1+S2+D) on the train days
and evaluate it on the test day (paper 000 Table 2, paper 002 Tables 5 and B1); `cluster` fits
the Cluster-ID k-means over an encoder's catalog embeddings (paper 002 App. B)."""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time

import numpy as np
import tensorflow as tf

from trainer import configs
from trainer.ctr import debias
from trainer.ctr import spec as ctr_spec
from trainer.ctr import task as ctr_task
from trainer.ctr.model import image_statistics
from trainer.data import npz, pipeline
from trainer.eval import write_metrics
from trainer.features import clusters, embeddings
from trainer.pipelines import evaluate as evaluate_pipeline
from trainer.stages import common
from trainer.stages.encoders import queries_pattern
from trainer.train import loop


def resolve_images(cfg: configs.CtrStage | configs.ClusterStage) -> configs.ImageSourceConfig:
    """The image source with its patterns and encoder dirs filled in (none without an encoder:
    a CTR model without image features)."""
    images = cfg.images
    with_images = images.encoder != "none" or isinstance(cfg, configs.ClusterStage)
    return dataclasses.replace(
        images, catalog_pattern=common.pattern(cfg, images.catalog_pattern, "catalog"),
        queries_pattern=queries_pattern(cfg, images.queries_pattern),
        model_dir=(common.encoder_dir(cfg, images.encoder, images.model_dir) if with_images
                   else ""),
        s1_model_dir=(common.encoder_dir(cfg, "s1", images.s1_model_dir)
                      if with_images and isinstance(cfg, configs.CtrStage)
                      and cfg.ctr.debias is not None else images.s1_model_dir))


def image_table(images: configs.ImageSourceConfig, model_dir: str,
                skip_bad_records: bool = False) -> embeddings.EmbeddingTable:
    """The embedding table of the encoder in `model_dir` over the source's images (cached)."""
    return image_file(images, model_dir, skip_bad_records).load()


def image_file(images: configs.ImageSourceConfig, model_dir: str,
               skip_bad_records: bool = False) -> embeddings.TableFile:
    """`image_table`'s saved table, unread."""
    return embeddings.file_for_encoder(model_dir, images.catalog_pattern,
                                       images.queries_pattern or None,
                                       skip_bad_records=skip_bad_records)


@common.releases_lock
def run_ctr(cfg: configs.CtrStage) -> None:
    """ctr / debias: train the CTR predictor on the train days, evaluate it on the test day."""
    cfg, strategy = common.training(cfg)  # first: the strategy
    if cfg.ctr.debias is not None and cfg.images.encoder == "none":
        raise common.UsageError(f"--stage={cfg.stage} needs image features: --image_features "
                                "(images.encoder), e.g. s1s2")
    cfg = dataclasses.replace(cfg, images=resolve_images(cfg), ctr=dataclasses.replace(
        cfg.ctr, train_pattern=common.ctr_train_pattern(cfg, cfg.ctr),
        test_pattern=common.pattern(cfg, cfg.ctr.test_pattern, "ctr", "test")))
    spec = ctr_spec.load(cfg.ctr.spec)
    if cfg.ctr.hash_bins:
        spec = spec.with_hash_bins(cfg.ctr.hash_bins)
    for file_pattern in (cfg.ctr.train_pattern, cfg.ctr.test_pattern):  # before any work
        spec.check_files(pipeline.list_files(file_pattern))
    by_job = cfg.evaluation == "job" or (cfg.evaluation == "auto"
                                         and cfg.train.strategy == "parameter_server")
    images: embeddings.EmbeddingTable | embeddings.TableFile | None = None
    positives = centroids = image_stats = None
    if cfg.images.encoder != "none":
        found = image_file(cfg.images, cfg.images.model_dir, cfg.skip_bad_records)
        if loop.is_chief(strategy):
            found, image_stats = ctr_task.keep_image_table(found, cfg.model_dir,
                                                           cfg.ctr.image_feature_mode)
        else:
            image_stats = image_statistics(found, cfg.ctr.image_feature_mode)
        # The rows are read once, here, when anything in this process needs them (a feature of
        # `layout: table`, D's mining, k-means, the in-process evaluation's lookups); else
        # nothing does: a joined spec evaluated by the job never holds the catalog's vectors.
        rows_here = (not by_job or cfg.ctr.debias is not None
                     or cfg.ctr.image_feature_mode == "cluster_id"
                     or len(spec.joined) < len(spec.of_kind("image")))
        images = found.load() if rows_here else found
        if by_job:  # the job reads the impressions itself
            item_id = impressions = np.zeros([0], np.int64)
        else:
            assert isinstance(images, embeddings.EmbeddingTable)
            item_id, impressions = images.item_id, images.impressions_30d
    else:
        cols = pipeline.unique_rows(pipeline.read_columns(
            cfg.images.catalog_pattern, "catalog", ("item_id", "impressions_30d"),
            cfg.skip_bad_records), cfg.images.catalog_pattern, "item_id", cfg.skip_bad_records)
        item_id, impressions = cols["item_id"], cols["impressions_30d"]
    if cfg.ctr.debias is not None:
        assert isinstance(images, embeddings.EmbeddingTable)
        d = cfg.ctr.debias
        s1 = image_table(cfg.images, cfg.images.s1_model_dir, cfg.skip_bad_records)
        if not np.array_equal(s1.item_id, images.item_id):
            raise RuntimeError("the S1 and image-feature tables list the catalog differently")
        displayed = (debias.displayed_items(s1.item_id, cfg.ctr.train_pattern,
                                            spec.record_kind(), spec.item, cfg.skip_bad_records)
                     if d.positives == "not_displayed" else None)
        positives, report = debias.mine(s1.item_vector, s1.category_id, debias.candidates(
            d, s1.impressions_30d, displayed), d, cfg.seed)
        print(f"debias: {report['with_positives']} of {report['items']} catalog items have "
              f"positives (K={d.num_similar} of the {report['candidates']} {d.positives} items "
              f"by S1 cosine in their category, {d.index} search in {report['seconds']}s"
              + (f"; recall@{d.num_similar} {report['recall']:.3f} against exact search on "
                 f"{report['recall_anchors']} anchors)" if "recall" in report else ")"))
        if not report["with_positives"]:
            # L_D (Eq. 3) is then 0 on every step: what remains is the gated MLP branch on v^S2,
            # trained by the click loss alone (docs/results.md: when does D help).
            print(f"debias: WARNING: no item has a positive, so D's loss is zero and D is only "
                  f"its gate and MLP; the data has no long tail by ctr.debias.positives="
                  f"'{d.positives}' (low_impressions={d.low_impressions}): D's tail gain needs "
                  "items with few impressions (or positives='not_displayed' with items the "
                  "training logs never show)")
        # Kept for the daily cycle, which carries them over and mines only the new items'.
        if loop.is_chief(strategy):
            npz.write(os.path.join(cfg.model_dir, ctr_task.POSITIVES), rows=positives[0],
                      weights=positives[1])
            embeddings.save(s1, os.path.join(cfg.model_dir, ctr_task.S1_TABLE))
    if isinstance(images, embeddings.EmbeddingTable) and cfg.ctr.image_feature_mode == "cluster_id":
        centroids = clusters.load_or_fit(os.path.join(cfg.model_dir, ctr_task.CLUSTERS),
                                         images.item_vector, cfg.cluster, cfg.seed)
    common.start(cfg, strategy)
    metrics = ctr_task.train_and_evaluate(cfg.ctr, spec, cfg.train, cfg.model_dir, item_id,
                                          impressions, images, positives, centroids,
                                          cfg.skip_bad_records, strategy, cfg.seed,
                                          image_stats, evaluate_here=not by_job)
    if not loop.is_chief(strategy):
        return
    if by_job:
        metrics.update(evaluate_checkpoint(cfg))
    metrics.update(image_features=cfg.images.encoder, debias=cfg.ctr.debias is not None,
                   image_feature_mode=cfg.ctr.image_feature_mode, feature_spec=spec.name)
    write_metrics(cfg.model_dir, metrics)
    with tf.summary.create_file_writer(os.path.join(cfg.model_dir, "eval")).as_default():
        for k, v in metrics.items():
            if isinstance(v, float):
                tf.summary.scalar(f"ctr/{k}", v, step=cfg.train.steps)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))


def evaluate_checkpoint(cfg: configs.CtrStage) -> dict:
    """The test day scored by the Beam evaluate job over the model dir's latest checkpoint, into
    `model_dir/evaluation` (metrics.json, predictions/, pages/): its metrics, without the job's
    record."""
    ev = dataclasses.replace(
        cfg.evaluate, records_pattern=cfg.ctr.test_pattern,
        catalog_pattern=cfg.images.catalog_pattern, model_export="",
        checkpoint_dir=cfg.model_dir,
        out_dir=os.path.join(cfg.model_dir, evaluate_pipeline.EVALUATION))
    metrics = evaluate_pipeline.run(ev, shlex.split(ev.beam_options), cfg.skip_bad_records)
    return {**evaluate_pipeline.metrics_only(metrics), "evaluation": ev.out_dir}


def run_cluster(cfg: configs.ClusterStage) -> None:
    """k-means over an encoder's catalog embeddings into model_dir/clusters.npz (default: the
    encoder's dir), with each catalog item's cluster id (cluster_ids.npz)."""
    if cfg.images.encoder == "none" and not cfg.images.model_dir:
        raise common.UsageError("--stage=cluster needs an encoder: --image_model_dir, or "
                                "--image_features with --encoders_dir")
    images = resolve_images(cfg)
    model_dir = cfg.model_dir or images.model_dir
    table = image_table(images, images.model_dir, cfg.skip_bad_records)
    t0 = time.time()
    path = os.path.join(model_dir, ctr_task.CLUSTERS)
    if tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)  # this stage refits
    centroids = clusters.load_or_fit(path, table.item_vector, cfg.cluster, cfg.seed)
    ids = centroids.assign(table.item_vector)
    np.savez(os.path.join(model_dir, "cluster_ids.npz"), item_id=table.item_id, cluster_id=ids)
    if os.path.abspath(model_dir) != os.path.abspath(images.model_dir):
        configs.save(model_dir, dataclasses.replace(cfg, model_dir=model_dir, images=images))
    sizes = np.bincount(ids, minlength=centroids.num_clusters)
    # Category purity: share of items whose cluster's majority category is their own.
    majority = {c: np.bincount(table.category_id[ids == c]).argmax() for c in np.unique(ids)}
    purity = float(np.mean([majority[c] == k for c, k in zip(ids, table.category_id, strict=True)]))
    print(f"cluster: {centroids.num_clusters} clusters of {len(ids)} items from "
          f"{images.model_dir} in {time.time() - t0:.1f}s; sizes min {sizes.min()} median "
          f"{int(np.median(sizes))} max {sizes.max()}, {int((sizes == 0).sum())} empty; category "
          f"purity {purity:.3f}")
    print(f"wrote {path} and {os.path.join(model_dir, 'cluster_ids.npz')}")

"""`embed`: the exported encoder over the whole catalog (`trainer.features.catalog_embed`), shared
by file across worker processes."""
from __future__ import annotations

import dataclasses
import json
import os

import tensorflow as tf

from trainer import configs
from trainer.features import catalog_embed
from trainer.stages import common


def workers(cfg: configs.CatalogEmbedConfig) -> tuple[int, int]:
    """(num_workers, worker_index): the config's, else TF_CONFIG's worker list (the chief is
    worker 0), else (1, 0)."""
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    cluster = resolver.cluster_spec().as_dict()
    chiefs = len(cluster.get("chief", []))
    num = cfg.num_workers or (chiefs + len(cluster.get("worker", []))) or 1
    index = cfg.worker_index
    if index < 0:
        index = (resolver.task_id or 0) + (chiefs if resolver.task_type == "worker" else 0)
    return num, index


def run_embed(cfg: configs.EmbedStage) -> None:
    """Catalog batch encoding with the exported encoder: embeddings, faiss index, cluster ids."""
    if not cfg.embed.encoder_export:
        raise common.UsageError("--stage=embed needs the encoder export: --export_dir "
                                "(embed.encoder_export)")
    num, index = workers(cfg.embed)
    embed = dataclasses.replace(
        cfg.embed, catalog_pattern=common.pattern(cfg, cfg.embed.catalog_pattern, "catalog"),
        out_dir=cfg.embed.out_dir or cfg.model_dir or os.path.join(cfg.data_dir,
                                                                   "catalog_embeddings"),
        num_workers=num, worker_index=index)
    result = catalog_embed.run(embed)
    print(json.dumps(result, indent=1))
    if index == 0:
        configs.save(embed.out_dir, dataclasses.replace(cfg, model_dir=embed.out_dir,
                                                        embed=embed))
        print(f"embed: {result['items']} catalog items -> {embed.out_dir}/embeddings.npz, "
              f"{embed.out_dir}/catalog.faiss ({embed.index})")

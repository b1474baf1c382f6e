"""`embed`: the exported encoder over the whole catalog, as the Beam embed pipeline
(`trainer.pipelines.embed`) on the in-process DirectRunner or the runner `embed.beam_options`
names."""
from __future__ import annotations

import dataclasses
import json
import os
import shlex

from trainer import configs
from trainer.pipelines import embed as embed_pipeline
from trainer.stages import common


def run_embed(cfg: configs.EmbedStage) -> None:
    """Catalog batch encoding with the exported encoder: embeddings, faiss index, cluster ids."""
    if not cfg.embed.encoder_export:
        raise common.UsageError("--stage=embed needs the encoder export: --export_dir "
                                "(embed.encoder_export)")
    embed = dataclasses.replace(
        cfg.embed, catalog_pattern=common.pattern(cfg, cfg.embed.catalog_pattern, "catalog"),
        out_dir=cfg.embed.out_dir or cfg.model_dir or os.path.join(cfg.data_dir,
                                                                   "catalog_embeddings"))
    manifest = embed_pipeline.run(embed, "catalog", shlex.split(embed.beam_options))
    print(json.dumps(manifest, indent=1))
    configs.save(embed.out_dir, dataclasses.replace(cfg, model_dir=embed.out_dir, embed=embed))
    print(f"embed: {manifest['items']} catalog items -> {embed.out_dir}/embeddings.npz, "
          f"{embed.out_dir}/catalog.faiss ({embed.index}), {manifest['images_per_second']} "
          "images/s")

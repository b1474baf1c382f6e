"""Beam embed: the exported encoder over the catalog (or the query photos) with RunInference.

The one implementation of catalog batch encoding; `--stage=embed` runs it on the DirectRunner,
a cluster runner takes the same pipeline by Beam's options:
1. the records of the catalog files, named `<file>:<index>` and spread over the workers by file;
2. RunInference with `EncoderModelHandler`: the export's `encode_images` signature (what TF
   Serving runs, so offline and online vectors agree) on batches of `batch_size` records,
   parsed and checked by the input pipeline's parser (a bad record fails the job naming it);
3. with centroids, each vector's nearest-centroid cluster id (faiss, batched);
4. the embedding table as sharded TFRecords `table/embeddings-SSSSS-of-NNNNN.tfrecord`
   (`<id>`, `category_id`, `embedding`, `cluster_id`), the input of the join pipeline, and, for
   an 'ivf' index, a uniform sample of the vectors (`index_sample.npz`) to train it on.
Then, in the launching process, `catalog_embed.finish` writes embeddings.npz (sorted by id),
catalog.faiss and manifest.json from the table.

  python -m trainer.pipelines.embed --catalog='DATA/catalog/*.tfrecord' \\
      --export_dir=models/encoder --out_dir=catalog_embeddings [--centroids=clusters.npz] \\
      [Beam options: --runner=DataflowRunner --project=... --region=... --temp_location=gs://...]
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.metrics.metric import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference

from trainer import configs
from trainer.data import npz, parse, schema
from trainer.features import catalog_embed, versions
from trainer.features import index as index_lib
from trainer.pipelines import common

NAMESPACE = "embed"


class EncoderModelHandler(ModelHandler[tuple, dict, Any]):
    """RunInference's handler for this project's encoder export: a batch of named records of an
    image kind -> {<id>, category_id, embedding} per record. (Beam's own TensorFlow handler loads
    a Keras model; the export is a `tf.Module` with named signatures.)"""

    def __init__(self, version_dir: str, kind: str, batch_size: int):
        self.version_dir, self.kind, self.batch_size = version_dir, kind, batch_size
        self.id_name = schema.IMAGE_ID[kind]
        self._parser: common.BatchParser | None = None

    def load_model(self) -> Any:
        return tf.saved_model.load(self.version_dir)

    def run_inference(self, batch: Sequence[tuple[str, bytes]], model: Any,
                      inference_args: dict | None = None) -> Iterable[dict]:
        if self._parser is None:
            self._parser = common.BatchParser(parse.RecordParser(
                schema.get(self.kind), features=(self.id_name, "category_id", "image"),
                decode=False))
        rows, _, _ = self._parser([n for n, _ in batch], [r for _, r in batch])
        embedding = model.signatures["encode_images"](
            images=tf.constant(rows["image"]))["embedding"].numpy()
        return [{self.id_name: int(i), "category_id": int(c), "embedding": e}
                for i, c, e in zip(rows[self.id_name], rows["category_id"], embedding,
                                   strict=True)]

    def batch_elements_kwargs(self) -> dict:
        return {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}

    def get_metrics_namespace(self) -> str:
        return NAMESPACE


class SkipKnown(beam.DoFn):
    """Drops the named records whose id is in `known_ids` (an .npz's `ids`, loaded once per
    worker and searched sorted: 8 bytes an id)."""

    def __init__(self, known_ids: str, id_name: str):
        self.known_ids, self.id_name = known_ids, id_name
        self.ids = np.zeros([0], np.int64)
        self.skipped = Metrics.counter(NAMESPACE, "known records skipped")

    def setup(self) -> None:
        self.ids = np.sort(np.asarray(npz.read(self.known_ids)["ids"], np.int64))

    def process(self, named: tuple[str, bytes]) -> Iterable[tuple[str, bytes]]:
        feature = tf.train.Example.FromString(named[1]).features.feature
        value = feature[self.id_name].int64_list.value if self.id_name in feature else []
        # A record without its id is not dropped here: the parser names it.
        if len(value) == 1 and len(self.ids):
            pos = int(np.searchsorted(self.ids, value[0]))
            if pos < len(self.ids) and self.ids[pos] == value[0]:
                self.skipped.inc()
                return
        yield named


def to_example(row: dict) -> bytes:
    """A table row as a `tf.train.Example` (ids as int64, the embedding as a float list)."""
    example = tf.train.Example()
    for key, value in row.items():
        if key == "embedding":
            example.features.feature[key].float_list.value.extend(np.asarray(value).tolist())
        else:
            example.features.feature[key].int64_list.value.append(int(value))
    return example.SerializeToString(deterministic=True)


def _write_sample(sample: list, path: str) -> None:
    npz.write(path, sample=np.asarray(sample, np.float32).reshape(len(sample), -1))


def run(cfg: configs.CatalogEmbedConfig, kind: str = "catalog",
        beam_args: Sequence[str] = ()) -> dict:
    """Runs the pipeline, then `catalog_embed.finish`; returns the manifest."""
    if cfg.centroids and not tf.io.gfile.exists(cfg.centroids):
        raise FileNotFoundError(f"centroids {cfg.centroids} do not exist (a clusters.npz from "
                                "--stage=cluster or a cluster_id CTR model dir)")
    version_dir = versions.version_dir(cfg.encoder_export)  # one version for every worker
    table_dir = os.path.join(cfg.out_dir, catalog_embed.TABLE_DIR)
    if tf.io.gfile.exists(table_dir):  # a table of another export or catalog
        tf.io.gfile.rmtree(table_dir)
    handler = EncoderModelHandler(version_dir, kind, cfg.batch_size)
    images = Metrics.counter(NAMESPACE, "images")

    def build(p: beam.Pipeline) -> None:
        named = (p | "Read" >> common.ReadNamedRecords(cfg.catalog_pattern)
                 | "Progress" >> beam.ParDo(common.Progress(NAMESPACE, "records read")))
        if cfg.known_ids:
            named = named | "SkipKnown" >> beam.ParDo(SkipKnown(cfg.known_ids,
                                                                schema.IMAGE_ID[kind]))
        rows = named | "Encode" >> RunInference(handler)
        if cfg.centroids:
            rows = (rows | "ByVector" >> beam.Map(lambda row: (row, row["embedding"]))
                    | "Clusters" >> common.NearestCentroids(cfg.centroids, cfg.batch_size)
                    | "WithCluster" >> beam.Map(lambda kv: {**kv[0], "cluster_id": kv[1]}))
        _ = (rows | "Count" >> beam.Map(lambda row: (images.inc(), row)[1])
             | "ToExample" >> beam.Map(to_example)
             | "WriteTable" >> beam.io.WriteToTFRecord(
                 os.path.join(table_dir, "embeddings"), file_name_suffix=".tfrecord",
                 num_shards=cfg.num_shards, shard_name_template="-SSSSS-of-NNNNN"))
        if cfg.index == "ivf":  # the index's training points
            _ = (rows | "Vectors" >> beam.Map(lambda row: row["embedding"])
                 | "Sample" >> beam.combiners.Sample.FixedSizeGlobally(cfg.index_sample)
                 | "WriteSample" >> beam.Map(_write_sample,
                                           os.path.join(cfg.out_dir, catalog_embed.SAMPLE)))

    tf.io.gfile.makedirs(cfg.out_dir)
    t0 = time.time()
    counters = common.run(NAMESPACE, build, beam_args)
    return catalog_embed.finish(cfg, version_dir, kind,
                                {"seconds": time.time() - t0, "counters": counters})


def main(argv: Sequence[str] | None = None) -> None:
    defaults = configs.CatalogEmbedConfig()
    p = common.command_line(__doc__)
    p.add_argument("--catalog", required=True,
                   help="TFRecord files (glob, comma-separated globs) of the records to encode.")
    p.add_argument("--kind", default="catalog", choices=sorted(schema.IMAGE_ID))
    p.add_argument("--export_dir", required=True, help="The encoder export (base or version).")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--centroids", default="", help="A clusters.npz to assign cluster ids with.")
    p.add_argument("--batch_size", type=int, default=defaults.batch_size)
    p.add_argument("--num_shards", type=int, default=defaults.num_shards,
                   help=common.NUM_SHARDS_HELP)
    p.add_argument("--index", default=defaults.index, choices=index_lib.KINDS)
    args, beam_args = p.parse_known_args(argv)
    cfg = configs.CatalogEmbedConfig(
        catalog_pattern=args.catalog, encoder_export=args.export_dir, out_dir=args.out_dir,
        batch_size=args.batch_size, num_shards=args.num_shards, centroids=args.centroids,
        index=args.index)
    try:
        manifest = run(cfg, args.kind, beam_args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"embed: {manifest['items']} images -> {cfg.out_dir} ({manifest['images_per_second']} "
          "images/s)")


if __name__ == "__main__":
    main()

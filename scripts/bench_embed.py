"""Catalog encoding throughput: the Beam embed pipeline beside a plain in-process loop, one run.

Both encode the same catalog with the same encoder export (its `encode_images` signature) at the
same batch size:
- loop: tf.data over the catalog files -> the record parser -> `encode_images`, in this process:
  what `--stage=embed` did per worker before it became a Beam pipeline (issue 18), without its
  part files;
- beam: `trainer.pipelines.embed` on the in-process DirectRunner (RunInference, the table's
  TFRecords and the IVF sample written), as `--stage=embed` runs it now.
Prints images/s of each, their ratio (goal: beam >= 0.8x loop on 2 cores) and the largest
difference between the two's embeddings. The faiss index build after the pipeline is timed
separately.

  python scripts/bench_embed.py --data_dir=data/small --export_dir=runs/demo/models/encoder
"""
from __future__ import annotations

import os
import tempfile
import time

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import numpy as np
import tensorflow as tf

from trainer import configs, console
from trainer.data import parse, pipeline, records, schema, validate
from trainer.features import versions
from trainer.pipelines import embed as embed_pipeline


def loop(pattern: str, export: str, batch_size: int) -> tuple[dict, float]:
    """({item_id: embedding}, seconds) of the in-process loop, the SavedModel load included."""
    t0 = time.time()
    encode = tf.saved_model.load(versions.version_dir(export)).signatures["encode_images"]
    parser = tf.function(parse.RecordParser(schema.CATALOG, features=("item_id", "category_id",
                                                                      "image"), decode=False))
    files = pipeline.list_files(pattern)
    out: dict = {}
    for path in files:
        ds = tf.data.TFRecordDataset(path, validate.compression_of(path)).enumerate().batch(
            batch_size)
        for index, serialized in ds:
            rows = parser(parse.record_names(tf.constant(path), index), serialized)
            vectors = encode(images=rows["image"])["embedding"].numpy()
            out.update(zip(rows["item_id"].numpy().tolist(), vectors, strict=True))
    return out, time.time() - t0


def main() -> None:
    p = console.CommandLine(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default="data/small")
    p.add_argument("--export_dir", default="runs/demo/models/encoder")
    p.add_argument("--batch_size", type=int, default=256)
    args = p.parse_args()
    pattern = records.default_pattern(args.data_dir, "catalog")
    vectors, s_loop = loop(pattern, args.export_dir, args.batch_size)
    n_loop = len(vectors)
    with tempfile.TemporaryDirectory() as out:
        cfg = configs.CatalogEmbedConfig(catalog_pattern=pattern, encoder_export=args.export_dir,
                                         out_dir=os.path.join(out, "embed"),
                                         batch_size=args.batch_size)
        t0 = time.time()
        manifest = embed_pipeline.run(cfg)
        total = time.time() - t0
        table = np.load(os.path.join(cfg.out_dir, "embeddings.npz"))
        want = np.stack([vectors[i] for i in table["item_id"].tolist()])
        diff = float(np.abs(table["embedding"] - want).max())
    n_beam, s_beam = manifest["items"], manifest["pipeline_seconds"]
    r_loop, r_beam = n_loop / s_loop, n_beam / s_beam
    print(f"catalog: {n_loop} images, batch {args.batch_size}, export "
          f"{versions.version_dir(args.export_dir)}")
    print(f"  loop (in-process tf.data + encode_images): {s_loop:7.1f}s  {r_loop:7.1f} images/s")
    print(f"  beam (DirectRunner, RunInference):         {s_beam:7.1f}s  {r_beam:7.1f} images/s"
          f"   (+ {total - s_beam:.1f}s for embeddings.npz and the {cfg.index} index)")
    print(f"  ratio beam / loop: {r_beam / r_loop:.2f}x (goal >= 0.8x); the same "
          f"{len(table['item_id'])} ids, largest |beam - loop| over the embeddings: {diff:.2e}")


if __name__ == "__main__":
    main()

"""Catalog encoding throughput: the Beam embed pipeline beside a plain in-process loop, one run.

Both encode the same catalog with the same encoder export (its `encode_images` signature) at the
same batch size:
- loop: tf.data over the catalog files -> the record parser -> `encode_images`, in this process:
  what `--stage=embed` did per worker before it became a Beam pipeline (issue 18), without its
  part files;
- beam: `trainer.pipelines.embed` on the in-process DirectRunner (RunInference, the table's
  TFRecords and the IVF sample written), as `--stage=embed` runs it now;
- dask: the same pipeline on the Dask runner (`trainer.pipelines.dask_runner`), on a local
  dask.distributed cluster of 1 and of 2 worker processes (`--dask_workers`), started before the
  clock starts (its start-up is printed apart).
Prints images/s of each, the ratios to the loop (goal: beam >= 0.8x loop on 2 cores) and the
largest difference between each one's embeddings and the loop's. The faiss index build after the
pipeline is timed separately.

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
    p.add_argument("--dask_workers", type=lambda s: [int(x) for x in s.split(",") if x],
                   default=[1, 2], help="Local Dask clusters to time, by worker processes "
                                        "(comma-separated; empty: none).")
    args = p.parse_args()
    pattern = records.default_pattern(args.data_dir, "catalog")
    vectors, s_loop = loop(pattern, args.export_dir, args.batch_size)
    n_loop = len(vectors)
    r_loop = n_loop / s_loop
    print(f"catalog: {n_loop} images, batch {args.batch_size}, export "
          f"{versions.version_dir(args.export_dir)}")
    print(f"  {'loop (in-process tf.data + encode_images)':44s} {s_loop:7.1f}s  {r_loop:7.1f} "
          "images/s")
    runs: list[tuple[str, list[str], int | None]] = [
        ("beam, in-process runner (RunInference)", [], None)]
    runs += [(f"beam, Dask runner, {n} worker process{'es' if n > 1 else ''}", ["--runner=dask"],
              n) for n in args.dask_workers]
    for label, beam_args, workers in runs:
        cluster, started = None, ""
        if workers:
            from trainer.pipelines import dask_runner
            t0 = time.time()
            cluster = dask_runner.local_cluster(workers)
            beam_args = [*beam_args, f"--dask_client_address={cluster.scheduler_address}"]
            started = f", cluster start-up {time.time() - t0:.1f}s apart"
        try:
            with tempfile.TemporaryDirectory() as out:
                cfg = configs.CatalogEmbedConfig(
                    catalog_pattern=pattern, encoder_export=args.export_dir,
                    out_dir=os.path.join(out, "embed"), batch_size=args.batch_size)
                t0 = time.time()
                manifest = embed_pipeline.run(cfg, beam_args=beam_args)
                total = time.time() - t0
                table = np.load(os.path.join(cfg.out_dir, "embeddings.npz"))
                want = np.stack([vectors[i] for i in table["item_id"].tolist()])
                diff = float(np.abs(table["embedding"] - want).max())
        finally:
            if cluster is not None:
                cluster.close()
        seconds = manifest["pipeline_seconds"]
        rate = manifest["items"] / seconds
        print(f"  {label:44s} {seconds:7.1f}s  {rate:7.1f} images/s  {rate / r_loop:.2f}x loop; "
              f"{len(table['item_id'])} ids, largest |diff| to the loop {diff:.1e} "
              f"(+ {total - seconds:.1f}s for embeddings.npz and the {cfg.index} index"
              f"{started})")
    print("  goal: the in-process runner >= 0.8x loop")


if __name__ == "__main__":
    main()

"""Converts a Parquet table plus a folder of images into TFRecords of one record kind.

Parquet is read through tensorflow-io (`tfio.IODataset.from_parquet`). Columns are named after the
features of the kind (docs/data_format.md). List features are space-separated strings
("123 456 789"): tensorflow-io flattens Parquet list columns into their leaf values and loses the
row boundaries, so list columns are refused rather than converted into misaligned records. Image
features are read from files: a `<feature>_path` column (relative to --image_dir; space-separated
for image lists) or, for `catalog` / `queries`, `<image_dir>/<id>.{jpg,jpeg,png}`.

  python scripts/convert_parquet.py --kind=catalog --parquet=items.parquet --image_dir=images \
      --output_dir=DATA --split=all --num_shards=8

Then check the result: python -m trainer.task --stage=validate --data_dir=DATA
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
import numpy as np
import tensorflow_io as tfio

from trainer.data import records, schema

_ID_OF_IMAGE = {"catalog": "item_id", "queries": "query_id"}
_EXTENSIONS = (".jpg", ".jpeg", ".png")


def read_parquet(path: str, batch: int = 65536) -> dict[str, np.ndarray]:
    """All columns of a Parquet file, read through tensorflow-io."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    ds = tfio.IODataset.from_parquet(path)
    names = [k.decode() if isinstance(k, bytes) else k for k in ds.element_spec]
    nested = sorted({n.split(".")[0] for n in names if "." in n})
    if nested:
        raise ValueError(
            f"{path}: column(s) {nested} are Parquet list/nested columns. tensorflow-io's Parquet "
            "reader returns their leaf values without row boundaries, which would misalign rows; "
            "store list features as space-separated strings (e.g. '123 456 789') instead")
    parts: dict[str, list] = {n: [] for n in names}
    for b in ds.batch(batch):
        for k, v in b.items():
            parts[k.decode() if isinstance(k, bytes) else k].append(v.numpy())
    return {n: np.concatenate(v) if v else np.array([]) for n, v in parts.items()}


def _read_image(path: str, where: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{where}: cannot read image {path}: {e.strerror}") from None


def _image_by_id(image_dir: str, id_: int, where: str) -> bytes:
    for ext in _EXTENSIONS:
        path = os.path.join(image_dir, f"{id_}{ext}")
        if os.path.exists(path):
            return _read_image(path, where)
    raise ValueError(f"{where}: no image file for id {id_} in {image_dir} "
                     f"(tried {', '.join(str(id_) + e for e in _EXTENSIONS)})")


def _parse_list(text, f: schema.FeatureSpec, where: str) -> list:
    if isinstance(text, bytes):
        text = text.decode()
    if not isinstance(text, str):
        raise ValueError(f"{where}: column '{f.name}' is a list feature and must hold "
                         f"space-separated values, got {type(text).__name__}")
    try:
        cast = int if f.dtype == schema.INT64 else float
        return [cast(tok) for tok in text.split()]
    except ValueError:
        raise ValueError(f"{where}: column '{f.name}': cannot parse {text!r} as "
                         f"space-separated {f.dtype} values") from None


def _scalar(value, f: schema.FeatureSpec, where: str):
    if f.dtype == schema.INT64:
        if not np.issubdtype(np.asarray(value).dtype, np.integer):
            raise ValueError(f"{where}: column '{f.name}' must be an integer column")
        return int(value)
    if f.dtype == schema.FLOAT:
        return float(value)
    return bytes(value)


def convert(kind_name: str, parquet: str, output_dir: str, split: str, num_shards: int,
            image_dir: Optional[str] = None) -> list[str]:
    """Converts one Parquet file; returns the TFRecord paths written."""
    kind = schema.get(kind_name)
    cols = read_parquet(parquet)
    n = len(next(iter(cols.values()))) if cols else 0
    recs = []
    for row in range(n):
        where = f"{parquet}: row {row}"
        values = {}
        for f in kind.features:
            path_col = f.name + "_path"
            if f.image and path_col in cols:
                if image_dir is None:
                    raise ValueError(f"{parquet}: column '{path_col}' needs --image_dir")
                paths = cols[path_col][row]
                paths = paths.decode() if isinstance(paths, bytes) else str(paths)
                files = [os.path.join(image_dir, p) for p in paths.split()]
                imgs = [_read_image(p, where) for p in files]
                values[f.name] = imgs if f.is_list else (imgs[0] if imgs else None)
            elif f.image and f.name == "image" and kind.name in _ID_OF_IMAGE:
                if image_dir is None:
                    raise ValueError(f"{parquet}: {kind.name} images need --image_dir")
                id_col = _ID_OF_IMAGE[kind.name]
                values[f.name] = _image_by_id(image_dir, int(cols[id_col][row]), where)
            elif f.name in cols:
                v = cols[f.name][row]
                values[f.name] = _parse_list(v, f, where) if f.is_list else _scalar(v, f, where)
            elif f.required:
                raise ValueError(f"{parquet}: required column '{f.name}' of record kind "
                                 f"'{kind.name}' is missing (columns: {sorted(cols)})")
        try:
            recs.append(records.to_example(kind, values))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
    return records.write_shards(recs, output_dir, kind.name, split, num_shards)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", required=True, choices=sorted(schema.KINDS))
    p.add_argument("--parquet", required=True, help="Parquet file to convert.")
    p.add_argument("--image_dir", default=None, help="Folder the image paths are relative to.")
    p.add_argument("--output_dir", required=True, help="Data directory to write into.")
    p.add_argument("--split", default=None,
                   help="Split name of the files (default: 'all' for catalog, queries and "
                        "judgments, else 'train').")
    p.add_argument("--num_shards", type=int, default=4)
    args = p.parse_args(argv)
    split = args.split or ("all" if args.kind in ("catalog", "queries", "judgments") else "train")
    try:
        paths = convert(args.kind, args.parquet, args.output_dir, split, args.num_shards,
                        args.image_dir)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {len(paths)} files of '{args.kind}' records under "
          f"{os.path.join(args.output_dir, args.kind)}")


if __name__ == "__main__":
    main()

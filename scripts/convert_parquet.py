"""Converts Parquet tables plus a folder of images into TFRecords of one record kind.

Parquet is read with pyarrow, record batch by record batch, so memory holds one batch whatever the
size of the table; the records go to `--num_shards` files of contiguous rows (the row count comes
from the files' metadata). Columns are named after the features of the kind (docs/data_format.md;
for `ctr`, the feature spec's columns, `--ctr_spec`):

- scalars: integer columns for ids and labels, floating-point columns for values;
- lists: `list<int64>` / `list<double>` columns, or strings of space-separated values
  ("123 456 789");
- images: a binary column of encoded bytes named after the feature; or a `<feature>_path` column
  (paths relative to --image_dir; a `list<string>` or space-separated for image lists); or, for
  `catalog` / `queries`, `<image_dir>/<id>.{jpg,jpeg,png}`. A path that leaves --image_dir
  (`../x`, `/etc/x`) is refused; `--allow_absolute_image_paths` admits absolute paths and URIs
  (gs://..., anything TensorFlow's file system reads) for tables that hold them.

Columns the kind does not know are left out (a warning lists them); a required feature missing
from the table fails naming the file, the column and the record kind; a bad value or a null in a
required column (write `[]` for an empty list) fails naming the file, the row and the column.

The shards are written into a scratch dir and replace the kind's files of that split only when
the whole table converted, so a failed run leaves the old files, and a re-run with another
--num_shards leaves no old shard beside the new ones.

  python scripts/convert_parquet.py --kind=catalog --parquet=items.parquet --image_dir=images \\
      --output_dir=DATA --split=all --num_shards=8
  python scripts/convert_parquet.py --kind=ctr --ctr_spec=my_spec.yaml \\
      --parquet='logs/day=*/part-*.parquet' --output_dir=DATA --split=train

Then check the result: python -m trainer.task --stage=validate --data_dir=DATA
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from trainer import console
from trainer.ctr import spec as ctr_spec
from trainer.data import parquet


def main(argv: Sequence[str] | None = None) -> None:
    p = console.CommandLine(description=__doc__.split("\n\n")[0])
    parquet.add_flags(p)
    p.add_argument("--num_shards", type=int, default=4)
    args = p.parse_args(argv)
    try:
        paths = parquet.convert(ctr_spec.record_kind(args.kind, args.ctr_spec), args.parquet,
                                args.output_dir, parquet.split_of(args), args.num_shards,
                                args.image_dir,
                                allow_absolute_image_paths=args.allow_absolute_image_paths)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {len(paths)} files of '{args.kind}' records under "
          f"{os.path.join(args.output_dir, args.kind)}")


if __name__ == "__main__":
    main()

"""Memory and speed of the Parquet converter as the table grows, from one run.

Writes a `ctr` table of N rows and one of 4N rows (the `feed` spec's columns, a `list<int64>` click
history of up to 20 ids per row), converts each in a fresh process with
`scripts/convert_parquet.py`, and prints each one's peak resident memory, rows per second, and the
ratio of the peaks: 1.0 means memory does not grow with the table (the converter holds one record
batch, not the table).

  python scripts/bench_convert.py --rows=100000
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainer import console

HERE = os.path.dirname(os.path.abspath(__file__))
# Runs a command and prints its peak resident memory (KiB): the child's alone.
_PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def write_table(path: str, rows: int, seed: int = 0, chunk: int = 100_000) -> None:
    """A `ctr` log of `rows` rows with the feed spec's columns, written in row groups."""
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        lengths = rng.integers(0, 21, n)
        history = pa.ListArray.from_arrays(
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
            pa.array(rng.integers(0, 1_000_000, int(lengths.sum())), pa.int64()))
        ids = {k: pa.array(rng.integers(0, 10_000, n), pa.int64()) for k in (
            "user_id", "item_id", "shop_id", "brand_id", "category_id", "device", "position")}
        table = pa.table({"label": pa.array(rng.integers(0, 2, n), pa.int64()),
                          "page_id": pa.array(np.arange(start, start + n) // 10, pa.int64()),
                          "price": pa.array(rng.uniform(1, 100, n)),
                          "click_history_item_ids": history, **ids})
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()


def convert(table: str, out: str) -> tuple[int, float]:
    """(peak resident KiB, seconds) of converting `table` in a fresh process."""
    cmd = [sys.executable, os.path.join(HERE, "convert_parquet.py"), "--kind=ctr",
           "--ctr_spec=feed", f"--parquet={table}", f"--output_dir={out}", "--num_shards=4"]
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", _PEAK, *cmd], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr[-2000:])
    return int(r.stdout.strip().splitlines()[-1]), time.time() - t0


def main() -> None:
    p = console.CommandLine(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000, help="N: the smaller table's rows.")
    a = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (a.rows, 4 * a.rows):
            path = os.path.join(tmp, f"ctr_{rows}.parquet")
            write_table(path, rows)
            mb = os.path.getsize(path) / 2**20
            peak, seconds = convert(path, os.path.join(tmp, f"out_{rows}"))
            results[rows] = (peak, seconds, mb)
    print("| rows | Parquet MB | peak memory MB | rows/s (with TF start-up) |\n"
          "| ---: | ---: | ---: | ---: |")
    for rows, (peak, seconds, mb) in results.items():
        print(f"| {rows:,} | {mb:.1f} | {peak / 1024:.0f} | {rows / seconds:,.0f} |")
    small, large = (results[r][0] for r in (a.rows, 4 * a.rows))
    print(f"\npeak memory, 4N rows / N rows: {large / small:.3f} (1.0: it does not grow with the "
          "table)")


if __name__ == "__main__":
    main()

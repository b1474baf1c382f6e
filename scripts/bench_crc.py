"""Where TFRecord checksums (CRC-32C) cost time, for one or more installs, in one run:

- validate: `--stage=validate` over a data dir (TensorFlow's reader checks the frames);
- validate, corrupt frame: over a copy of the data dir's largest `ctr` file whose middle record's
  frame header is broken, where the validator walks every frame header after it and checks its
  checksum itself (`trainer.data.validate.frames_after`);
- Beam convert: the Parquet convert pipeline over a `ctr` table of --rows rows, whose TFRecord
  sink checksums every record it writes;
- start-up: the convert command's `--help` (loading TensorFlow and Beam), to read the rows above
  against.

Each command runs --repeats times in a fresh process per install; the table gives the median and
each install's time over the first's.

    python scripts/bench_crc.py --data_dir=data/small \
        --install new=.venv/bin/python --install old=../old/.venv/bin/python:../old
"""
from __future__ import annotations

import glob
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

from bench_convert import write_table

from trainer import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def corrupt_copy(data_dir: str, out_dir: str) -> tuple[str, int]:
    """A copy of the largest `ctr` file with the length field of its middle record's frame header
    overwritten; (its path, the records in the file)."""
    source = max(glob.glob(os.path.join(data_dir, "ctr", "*")), key=os.path.getsize)
    path = os.path.join(out_dir, "corrupt-" + os.path.basename(source))
    shutil.copy(source, path)
    with open(path, "r+b") as f:
        data = f.read()
        offsets, pos = [], 0
        while pos + 12 <= len(data):
            offsets.append(pos)
            pos += 16 + struct.unpack("<Q", data[pos:pos + 8])[0]
        f.seek(offsets[len(offsets) // 2])
        f.write(b"\xff" * 8)
    return path, len(offsets)


def timed(python: str, cwd: str, args: list[str], repeats: int,
          ok: tuple[int, ...] = (0,)) -> float:
    """The median seconds of `python args` run in `cwd` (its own install's package)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run([python, *args], cwd=cwd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if r.returncode not in ok:
            sys.exit(f"{python} {' '.join(args)} failed in {cwd}:\n{r.stderr[-3000:]}")
    return statistics.median(times)


def main() -> None:
    p = console.CommandLine(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default="data/small")
    p.add_argument("--rows", type=int, default=100_000, help="Rows of the Parquet table.")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--install", action="append", default=[],
                   help="NAME=PYTHON[:REPO] (repeatable; default: this one). Each install's "
                        "commands run with its python in its repo.")
    a = p.parse_args()
    installs = []
    for spec in a.install or [f"this={sys.executable}:{REPO}"]:
        name, _, rest = spec.partition("=")
        python, _, repo = rest.partition(":")
        installs.append((name, os.path.abspath(python), os.path.abspath(repo or REPO)))
    data_dir = os.path.abspath(a.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        corrupt, records = corrupt_copy(data_dir, tmp)
        table = os.path.join(tmp, "ctr.parquet")
        write_table(table, a.rows)
        jobs = {
            "start-up (convert --help)": (["-m", "trainer.pipelines.convert", "--help"], (0,)),
            f"validate {a.data_dir}": (["-m", "trainer.task", "--stage=validate",
                                        f"--data_dir={data_dir}"], (0,)),
            f"validate, corrupt frame ({records:,} records)": (
                ["-m", "trainer.task", "--stage=validate", "--kind=ctr",
                 f"--file_pattern={corrupt}"], (1,)),  # 1: it found the bad record
            f"Beam convert, {a.rows:,} rows": (
                ["-m", "trainer.pipelines.convert", "--kind=ctr", "--ctr_spec=feed",
                 f"--parquet={table}", f"--output_dir={os.path.join(tmp, 'out')}"], (0,)),
        }
        results: dict[str, list[float]] = {job: [] for job in jobs}
        for job, (args, ok) in jobs.items():
            for name, python, repo in installs:
                if "convert" in job and "--help" not in args:
                    shutil.rmtree(os.path.join(tmp, "out"), ignore_errors=True)
                took = timed(python, repo, args, a.repeats, ok)
                results[job].append(took)
                print(f"{job}: {name} {took:.2f} s", file=sys.stderr, flush=True)
    names = [n for n, _, _ in installs]
    print("| | " + " | ".join(f"{n} (s)" for n in names)
          + "".join(f" | {n} / {names[0]}" for n in names[1:]) + " |")
    print("| --- |" + " ---: |" * (2 * len(names) - 1))
    for job, seconds in results.items():
        print(f"| {job} | " + " | ".join(f"{s:.2f}" for s in seconds)
              + "".join(f" | {s / seconds[0]:.2f}" for s in seconds[1:]) + " |")


if __name__ == "__main__":
    main()

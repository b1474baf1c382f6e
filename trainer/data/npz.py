"""NumPy archives on any `tf.io.gfile` file system (local, GCS, HDFS): the vocabularies, centroids,
embedding tables and catalog parts the stages hand on.

np.savez seeks, which remote writers cannot, so the archive is built in memory; it is written
under a temporary name and renamed, so a reader (or a resumed job) sees it whole or not at all.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf


def write(path: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    tmp = f"{path}.tmp-{os.getpid()}"  # processes writing one cache do not share a scratch file
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(buf.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)


class _Reader(io.RawIOBase):
    """A `tf.io.gfile` file as the seekable binary file `np.load` and `zipfile` expect
    (GFile's own `seek` mishandles offsets from the end), so an archive is read member by member
    on any file system, never copied whole into memory."""

    def __init__(self, path: str):
        self._f = tf.io.gfile.GFile(path, "rb")
        self._size = self._f.size()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._f.tell(), io.SEEK_END: self._size}[whence]
        self._f.seek(min(max(base + offset, 0), self._size))
        return self._f.tell()

    def readinto(self, buffer) -> int:
        data = self._f.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


def _open(path: str) -> io.BufferedReader:
    return io.BufferedReader(_Reader(path), 1 << 20)


def read(path: str, keys: Sequence[str] | None = None) -> dict:
    """{name: array} of an archive written by `write` (or np.savez): every array, or only those
    named in `keys` (the others are not read)."""
    with _open(path) as f:
        data = np.load(f)
        missing = [k for k in keys or () if k not in data.files]
        if missing:
            raise ValueError(f"{path}: no {missing} array (it holds {data.files})")
        return {k: data[k] for k in (data.files if keys is None else keys)}


def _header(member) -> tuple[tuple, np.dtype]:
    version = np.lib.format.read_magic(member)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(member)
    if fortran or dtype.hasobject:
        raise ValueError("only C-ordered arrays of plain values can be read in chunks")
    return shape, dtype


def shape(path: str, key: str) -> tuple:
    """The shape of one array of an archive, read from its header alone."""
    with _open(path) as f, np.load(f) as data:
        if key not in data.files:
            raise ValueError(f"{path}: no '{key}' array (it holds {data.files})")
        with data.zip.open(key + ".npy") as member:
            return _header(member)[0]


def chunks(path: str, key: str, rows: int = 65536) -> Iterator[np.ndarray]:
    """One array of an archive, `rows` leading-axis rows at a time: memory holds one chunk,
    whatever the array's size."""
    with _open(path) as f, np.load(f) as data:
        if key not in data.files:
            raise ValueError(f"{path}: no '{key}' array (it holds {data.files})")
        with data.zip.open(key + ".npy") as member:
            full, dtype = _header(member)
            row_shape = full[1:]
            row_bytes = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
            for start in range(0, full[0] if full else 0, rows):
                n = min(rows, full[0] - start)
                buf = member.read(n * row_bytes)
                if len(buf) != n * row_bytes:
                    raise ValueError(f"{path}: '{key}' ends after {start} rows of {full[0]}")
                yield np.frombuffer(buf, dtype).reshape((n, *row_shape))

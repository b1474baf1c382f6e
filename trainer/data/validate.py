"""Bad input: find the record, name it, stop or skip it. Never silent.

Three kinds of failure reach an input pipeline, and each ends as a `BadRecordError` (or, with
`skip_bad_records`, a logged and counted `BadRecord`) naming the file, the record index and the
feature:
- errors raised on a named record by `tf.io.parse_example` or by the parser's own checks: the
  message already names the record (`parse.bad_record_message`);
- errors that carry no record (a corrupt or truncated TFRecord frame, an image whose body does not
  decode): the files are scanned to find the culprit;
- a record that is not a `tf.train.Example` at all.

The diagnosis of one record runs the same `RecordParser` on it (and, for an image that does not
decode, on each image feature alone), so the pipeline and the diagnosis cannot disagree about
what is bad.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import struct
from typing import Iterator, Optional, Sequence

import google_crc32c
import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.example import example_pb2

from trainer import tracing
from trainer.data import parse

log = logging.getLogger(__name__)
# TF raises UnicodeDecodeError instead of InvalidArgumentError when parse_example's message quotes
# a record's non-UTF-8 bytes (a record that is not an Example).
INPUT_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.DataLossError, UnicodeDecodeError)


def _message(e: Exception) -> str:
    return getattr(e, "message", None) or str(e)


def _from_input(e: Exception) -> bool:
    """Whether an error came out of a dataset iterator (else it is the model's, not the data's)."""
    return (isinstance(e, (tf.errors.DataLossError, UnicodeDecodeError))
            or "IteratorGetNext" in _message(e))


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """One bad record: where it is and what is wrong. `index` counts records from 0 in the file;
    `feature` is '<record>' when the record as a whole is unreadable."""

    path: str
    index: int
    feature: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: record {self.index}: feature '{self.feature}': {self.reason}"


class BadRecordError(ValueError):
    """A bad input record; `.bad` says which and why."""

    def __init__(self, bad: BadRecord | str, hint: str = ""):
        if isinstance(bad, str):  # re-raised as type(e)(message), as Beam's workers do
            super().__init__(bad)
            return
        self.bad = bad
        super().__init__(f"bad input record: {bad}{hint}")


SKIP_HINT = " (pass --skip_bad_records to skip bad records, counted and logged)"


class DuplicateIdError(BadRecordError):
    """A record repeats an id that must be unique (a catalog's item_id, a query_id)."""


def unique_ids(ids: np.ndarray, files: Sequence[str], feature: str,
               skip_bad_records: bool = False) -> np.ndarray:
    """Which rows of `ids` (read from `files` in order) to keep: all, when `feature` is unique.
    Otherwise raises a `DuplicateIdError` naming the record that repeats an id and where it was
    first seen; with `skip_bad_records` keeps each id's first record and logs and counts the
    others. The files are scanned only when an id repeats."""
    ids = np.asarray(ids)
    keep = np.zeros(len(ids), bool)
    keep[np.unique(ids, return_index=True)[1]] = True
    if keep.all():
        return keep
    places = _places(files, feature, set(ids[~keep].tolist()))
    repeats = sorted((p[1], v) for v, p in places.items() if len(p) > 1)
    bad = [BadRecord(place[0], place[1], feature, f"duplicate {feature} {v}, already in "
                     f"{places[v][0][0]}: record {places[v][0][1]}; ids must be unique")
           for v, p in places.items() for place in p[1:]]
    if not skip_bad_records:
        if not repeats:  # not found again in the raw files (should not happen)
            raise ValueError(f"{', '.join(files[:3])}: {feature} {ids[~keep][0]} occurs in more "
                             "than one record; ids must be unique")
        first = next(b for b in bad if (b.path, b.index) == repeats[0][0])
        raise DuplicateIdError(first, f" ({int((~keep).sum())} records repeat an id; pass "
                                      "--skip_bad_records to keep the first record of each)")
    for b in bad:
        log.warning("skipping bad record: %s", b)
    log.warning("skip_bad_records: %d records with a duplicate %s in %d files: skipped (the "
                "first record of each id is kept)", int((~keep).sum()), feature, len(files))
    return keep


def _places(files: Sequence[str], feature: str, wanted: set) -> dict:
    """{id: [(file, record index), ...]} of the records whose `feature` is one of `wanted`."""
    found: dict = {}
    for path in files:
        for index, records, _ in read_batches(path, batch=1024):
            for i, rec in enumerate(records):
                try:
                    value = list(example_pb2.Example.FromString(rec).features.feature[
                        feature].int64_list.value)
                except DecodeError:
                    continue
                if len(value) == 1 and value[0] in wanted:
                    found.setdefault(value[0], []).append((path, index + i))
    return found


def compression_of(path: str) -> str:
    """TFRecord compression of a file: GZIP for `*.gz`, else none."""
    return "GZIP" if path.endswith(".gz") else ""


def _short(message: str) -> str:
    """The useful part of a TF error message (without node and function names, or the Python
    stack of a graph execution error)."""
    message = message.split("[[", 1)[0].split(" [Op:", 1)[0]
    if "}}" in message:
        message = message.rsplit("}}", 1)[1]
    if "Detected at node" in message:  # "...(most recent call last):\n<stack>\n<reason>\n"
        message = [line for line in message.splitlines() if line.strip()][-1]
    return " ".join(message.split())


def _image_reason(message: str) -> str:
    """'not a decodable PNG (<TensorFlow's reason>)' for an image body that does not decode."""
    reason = _short(message)
    fmt = next((f for f in ("PNG", "JPEG", "GIF", "BMP") if f.lower() in reason.lower()),
               "image")
    return f"not a decodable {fmt} ({reason})"


class Diagnoser:
    """Finds what is wrong with single records, reusing the pipeline's parser."""

    def __init__(self, parser: parse.RecordParser):
        self.parser = parser
        self._fns: dict = {}
        kind = parser.kind
        self.everything = tuple(f.name for f in parser.specs)
        # Images, one at a time (with the id list a joined image needs): an image body that does
        # not decode is the one error TensorFlow reports without the record's name.
        self.image_subsets = []
        for f in parser.specs:
            if f.image:
                id_name = kind.joinable_images.get(f.name)
                self.image_subsets.append((id_name, f.name) if id_name else (f.name,))

    def _error(self, subset, names: Sequence[str], serialized: Sequence[bytes]) -> Optional[str]:
        """The error message of parsing `serialized` with `subset` of the features, or None."""
        if subset not in self._fns:
            p = self.parser
            sub = p if subset == self.everything else parse.RecordParser(
                p.kind, p.image_size, p.image_store, subset, decode=p.decode)
            spec = tf.TensorSpec([None], tf.string)
            # Graph mode, as in the pipeline: assertion messages have the same form there.
            self._fns[subset] = tracing.function(sub, input_signature=[spec, spec])
        try:
            self._fns[subset](tf.constant(list(names)), tf.constant(list(serialized)))
            return None
        except INPUT_ERRORS as e:
            return _message(e)

    def check_batch(self, names: Sequence[str], serialized: Sequence[bytes]) -> bool:
        """True if the whole batch parses cleanly (the fast path)."""
        return self._error(self.everything, names, serialized) is None

    def diagnose(self, name: str, serialized: bytes) -> Optional[BadRecord]:
        path, index = parse.split_record_name(name)
        try:
            example_pb2.Example.FromString(serialized)
        except DecodeError as e:
            return BadRecord(path, index, "<record>", f"not a serialized tf.train.Example ({e})")
        error = self._error(self.everything, [name], [serialized])
        if error is None:
            return None
        named = parse.bad_record_message(error)
        if named:
            return BadRecord(path, index, named[1], named[2])
        for subset in self.image_subsets:
            image_error = self._error(subset, [name], [serialized])
            if image_error:
                return BadRecord(path, index, subset[-1], _image_reason(image_error))
        return BadRecord(path, index, "<record>", _short(error))


def read_batches(path: str, start: int = 0, batch: int = 1
                 ) -> Iterator[tuple[int, list, Optional[str]]]:
    """Yields (first index, records, framing error or None) in batches from record `start`."""
    ds = tf.data.TFRecordDataset(path, compression_type=compression_of(path)).skip(start)
    it = iter(ds.batch(batch))
    index = start
    while True:
        try:
            recs = [r for r in next(it).numpy()]
        except StopIteration:
            return
        except tf.errors.DataLossError as e:
            yield index, [], _short(e.message)
            return
        yield index, recs, None
        index += len(recs)


def _masked_crc32c(data: bytes) -> int:
    """The TFRecord framing checksum: CRC-32C (native, google-crc32c), rotated right by 15 and
    offset."""
    c = google_crc32c.value(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _gzip_records(path: str) -> int | None:
    """The records of a GZIP TFRecord file read as one (None if it does not read as one)."""
    try:
        return sum(1 for _ in tf.data.TFRecordDataset(path, compression_type="GZIP"))
    except tf.errors.OpError:
        return None


def _starts_like_gzip(path: str) -> bool:
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


RESYNC_BYTES = 64 << 20  # how far past a corrupt frame header the next valid one is looked for
_WINDOW = 1 << 20  # bytes read at a time while looking for it


def frames_after(path: str, index: int) -> int | None:
    """How many records follow record `index` (a corrupt or truncated frame) in an uncompressed
    TFRecord file: the records lost with it, since TensorFlow's reader stops there. Walks the
    frame headers (length and its checksum; memory does not grow with the file); past a corrupt
    header, the next valid one is searched for byte by byte. None for a compressed file, or when
    no valid header follows within `RESYNC_BYTES`."""
    if compression_of(path):
        return None
    size = tf.io.gfile.stat(path).length
    with tf.io.gfile.GFile(path, "rb") as f:

        def frame_end(at: int, head: bytes) -> int | None:
            """The end of the frame whose 12-byte header is `head` at `at`, if it is valid."""
            if len(head) < 12 or struct.unpack("<I", head[8:])[0] != _masked_crc32c(head[:8]):
                return None
            end = at + 16 + struct.unpack("<Q", head[:8])[0]
            return end if end <= size else None

        def resync(start: int) -> int | None:
            """The offset of the first valid frame header after `start`, if any."""
            at = start
            while at < min(size, start + RESYNC_BYTES):
                f.seek(at)
                window = f.read(_WINDOW + 11)
                for k in range(max(len(window) - 11, 0)):
                    if frame_end(at + k, window[k:k + 12]) is not None:
                        return at + k
                at += _WINDOW
            return None

        pos, i, after = 0, 0, 0
        while pos + 12 <= size:
            f.seek(pos)
            end = frame_end(pos, f.read(12))
            if end is None:
                if i > index:
                    return None  # a second corruption: the count is unknown
                found = resync(pos + 1)
                if found is None:
                    return after if pos + 1 + RESYNC_BYTES >= size else None
                pos, i = found, index + 1
                continue
            if i > index:
                after += 1
            pos, i = end, i + 1
        return after


@dataclasses.dataclass
class ScanReport:
    """Result of scanning files: the bad records and, per file with a corrupt frame, how many
    records before it are readable and how many after it are lost with it (TensorFlow's reader
    cannot go past it; None: not countable, a compressed file)."""

    bad: list
    readable: dict
    records: int = 0
    lost: dict = dataclasses.field(default_factory=dict)

    @property
    def lost_records(self) -> int:
        """The countable records lost after corrupt frames."""
        return sum(n for n in self.lost.values() if n)

    @property
    def skipped(self) -> int:
        """Records left out: the bad ones and the countable ones lost after corrupt frames."""
        return len(self.bad) + self.lost_records

    def summary(self, files: int) -> str:
        """E.g. '8 records in 1 files, 1 bad, 4 unreadable after a corrupt frame'."""
        lost = self.lost_records
        uncounted = sum(n is None for n in self.lost.values())
        return (f"{self.records + lost} records in {files} files, {len(self.bad)} bad"
                + (f", {lost} unreadable after a corrupt frame" if lost else "")
                + (f", and the rest of {uncounted} files after a corrupt frame (not countable)"
                   if uncounted else ""))


def corrupt_frame(path: str, index: int, err: str) -> tuple[BadRecord, int | None]:
    """The bad record of a TFRecord frame that does not read (record `index`, TensorFlow's error
    `err`) and how many records after it are lost with it (None: not countable)."""
    if not compression_of(path) and _starts_like_gzip(path):
        lost = _gzip_records(path)
        lost = None if lost is None else max(0, lost - 1)  # beside this one
        reason = (f"not readable as an uncompressed TFRecord file ({err}), and it starts like a "
                  "GZIP file: name it *.gz (TFRecord files are read as GZIP by their suffix)")
    else:
        lost = frames_after(path, index)
        rest = ("not countable: compressed" if lost is None and compression_of(path)
                else "not countable" if lost is None else f"{lost} records")
        reason = (f"corrupt or truncated TFRecord frame ({err}); the rest of the file ({rest}) "
                  "is unreadable")
    return BadRecord(path, index, "<record>", reason), lost


def scan_file(path: str, diagnoser: Diagnoser, report: ScanReport, stop_at_first: bool = False,
              batch: int = 512) -> None:
    """Scans one file into `report`: fast batched check, per-record diagnosis where it fails."""
    for start, recs, framing in read_batches(path, batch=batch):
        if framing:
            # The frame error is somewhere in this batch: find the exact record one by one.
            for index, one, err in read_batches(path, start, batch=1):
                if err:
                    bad, lost = corrupt_frame(path, index, err)
                    report.bad.append(bad)
                    report.readable[path] = index
                    report.lost[path] = lost
                    report.records += 1  # the corrupt one
                    return
                if _diagnose_batch(path, index, one, diagnoser, report, stop_at_first):
                    return
            return
        if _diagnose_batch(path, start, recs, diagnoser, report, stop_at_first):
            return


def _diagnose_batch(path, start, recs, diagnoser, report, stop_at_first) -> bool:
    """Adds the batch's bad records to the report; True if scanning should stop."""
    report.records += len(recs)
    names = [f"{path}:{start + i}" for i in range(len(recs))]
    if diagnoser.check_batch(names, recs):
        return False
    for name, rec in zip(names, recs):
        bad = diagnoser.diagnose(name, rec)
        if bad:
            report.bad.append(bad)
            if stop_at_first:
                return True
    return False


def scan(files: Sequence[str], parser: parse.RecordParser, stop_at_first: bool = False) -> ScanReport:
    """Scans files for bad records (all of them, or up to the first)."""
    report = ScanReport(bad=[], readable={})
    diagnoser = Diagnoser(parser)
    for path in files:
        scan_file(path, diagnoser, report, stop_at_first)
        if stop_at_first and report.bad:
            break
    return report


@contextlib.contextmanager
def named_input_errors(files: Sequence[str], parser: parse.RecordParser, hint: str = SKIP_HINT):
    """Re-raises input-pipeline errors raised in the block as `BadRecordError`s naming the record.

    Wrap the loop that iterates a dataset built from `files` with `parser`. Errors that do not come
    from a bad record (no record can be blamed) propagate unchanged.
    """
    try:
        yield
    except INPUT_ERRORS as e:
        named = parse.bad_record_message(_message(e))
        if named:
            path, index = parse.split_record_name(named[0])
            raise BadRecordError(BadRecord(path, index, named[1], named[2]), hint) from e
        if not _from_input(e):
            raise
        log.warning("input error without a record name (%s); scanning %d files to find it",
                    _short(_message(e)), len(files))
        report = scan(files, parser, stop_at_first=True)
        if report.bad:
            raise BadRecordError(report.bad[0], hint) from e
        raise

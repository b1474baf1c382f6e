"""Bad input: find the record, name it, stop or skip it. Never silent.

Three kinds of failure reach an input pipeline, and each ends as a `BadRecordError` (or, with
`skip_bad_records`, a logged and counted `BadRecord`) naming the file, the record index and the
feature:
- errors raised on a named record by `tf.io.parse_example` or by the parser's own checks: the
  message already names the record (`parse.bad_record_message`);
- errors that carry no record (a corrupt or truncated TFRecord frame, an image whose body does not
  decode): the files are scanned to find the culprit;
- a record that is not a `tf.train.Example` at all.

The diagnosis of one record runs the same `RecordParser` on it, one feature at a time, so the
pipeline and the diagnosis cannot disagree about what is bad.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator, Optional, Sequence

import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.example import example_pb2

from trainer.data import parse

log = logging.getLogger(__name__)
_INPUT_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.DataLossError)


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

    def __init__(self, bad: BadRecord, hint: str = ""):
        self.bad = bad
        super().__init__(f"bad input record: {bad}{hint}")


SKIP_HINT = " (pass --skip_bad_records to skip bad records, counted and logged)"


def compression_of(path: str) -> str:
    return "GZIP" if path.endswith(".gz") else ""


def _short(message: str) -> str:
    """The useful part of a TF error message (without node and function names)."""
    message = message.split("[[", 1)[0].split(" [Op:", 1)[0]
    if "}}" in message:
        message = message.rsplit("}}", 1)[1]
    return " ".join(message.split())


class Diagnoser:
    """Finds what is wrong with single records, reusing the pipeline's parser."""

    def __init__(self, parser: parse.RecordParser):
        self.parser = parser
        self._fns: dict = {}
        kind = parser.kind
        names = [f.name for f in parser.specs]
        # One feature at a time (an image feature with the id list it is joined by), then all.
        self.subsets = []
        for f in parser.specs:
            sub = [f.name]
            id_name = kind.joinable_images.get(f.name)
            if f.image and id_name:
                sub = [id_name, f.name]
            self.subsets.append(tuple(sub))
        self.subsets.append(tuple(names))

    def _fn(self, subset):
        if subset not in self._fns:
            p = self.parser
            sub = parse.RecordParser(p.kind, p.image_size, p.image_store, subset, decode=p.decode)
            spec = tf.TensorSpec([None], tf.string)
            # Graph mode, as in the pipeline: assertion messages have the same form there.
            self._fns[subset] = tf.function(sub, input_signature=[spec, spec])
        return self._fns[subset]

    def check_batch(self, names: Sequence[str], serialized: Sequence[bytes]) -> bool:
        """True if the whole batch parses cleanly (the fast path)."""
        try:
            self._fn(self.subsets[-1])(tf.constant(list(names)), tf.constant(list(serialized)))
            return True
        except _INPUT_ERRORS:
            return False

    def diagnose(self, name: str, serialized: bytes) -> Optional[BadRecord]:
        path, index = parse.split_record_name(name)
        try:
            example_pb2.Example.FromString(serialized)
        except DecodeError as e:
            return BadRecord(path, index, "<record>", f"not a serialized tf.train.Example ({e})")
        for subset in self.subsets:
            try:
                self._fn(subset)(tf.constant([name]), tf.constant([serialized]))
            except _INPUT_ERRORS as e:
                named = parse.bad_record_message(e.message)
                if named:
                    return BadRecord(path, index, named[1], named[2])
                feature = subset[-1] if len(subset) <= 2 else "<record>"
                return BadRecord(path, index, feature, _short(e.message))
        return None


def _read(path: str, start: int = 0, batch: int = 1) -> Iterator[tuple[int, list, Optional[str]]]:
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


@dataclasses.dataclass
class ScanReport:
    """Result of scanning files: the bad records and, per file with a corrupt frame, how many
    records before it are readable (the rest of that file cannot be read)."""

    bad: list
    readable: dict
    records: int = 0

    @property
    def skipped(self) -> int:
        return len(self.bad)


def scan_file(path: str, diagnoser: Diagnoser, report: ScanReport, stop_at_first: bool = False,
              batch: int = 512) -> None:
    """Scans one file into `report`: fast batched check, per-record diagnosis where it fails."""
    for start, recs, framing in _read(path, batch=batch):
        if framing:
            # The frame error is somewhere in this batch: find the exact record one by one.
            for index, one, err in _read(path, start, batch=1):
                if err:
                    report.bad.append(BadRecord(path, index, "<record>",
                                                f"corrupt or truncated TFRecord frame ({err}); "
                                                "the rest of the file is unreadable"))
                    report.readable[path] = index
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
    except _INPUT_ERRORS as e:
        named = parse.bad_record_message(e.message)
        if named:
            path, index = parse.split_record_name(named[0])
            raise BadRecordError(BadRecord(path, index, named[1], named[2]), hint) from e
        log.warning("input error without a record name (%s); scanning %d files to find it",
                    _short(e.message), len(files))
        report = scan(files, parser, stop_at_first=True)
        if report.bad:
            raise BadRecordError(report.bad[0], hint) from e
        raise

"""What the Beam pipelines share: running with standard pipeline options, counters, progress, and
reading TFRecords as named records parsed by the input pipeline's own parser.

Every record travels with its name `<file>:<index>` (as in `trainer.data.parse`), so a bad
record fails a pipeline naming the file, the record and the feature, whichever worker reads it.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.metrics.metric import Metrics, MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.portability.fn_api_runner import fn_runner

from trainer import console, tracing
from trainer.data import parse, pipeline, validate
from trainer.features import clusters as clusters_lib

log = logging.getLogger(__name__)
# Output files: a fixed count makes Beam shuffle every record to its file, which the DirectRunner
# holds in memory (8.5 GB for the join of 40,000 small-world records; 0.8 GB without).
NUM_SHARDS_HELP = ("Output files; 0: the runner's choice, written as the records stream (one "
                   "file per bundle on the DirectRunner). A fixed count shuffles every record "
                   "to its file, in memory on the DirectRunner.")


def command_line(doc: str) -> console.CommandLine:
    """A pipeline command's parser (the module docstring's first paragraph as its description);
    what it does not know are Beam's pipeline options (`parse_known_args`)."""
    return console.CommandLine(description=doc.split("\n\n")[0])


def _runner(opts: PipelineOptions):
    """The runner `--runner` names, else the in-process one: the FnApiRunner, which is where
    Beam's DirectRunner ends up here, without its first try of the Prism runner (it downloads a
    binary at run time, not reachable from every machine, and runs the pipeline out of
    process). `--runner=dask` is the project's Dask runner (`dask_runner`)."""
    runner = opts.view_as(StandardOptions).runner
    if runner:
        from trainer.pipelines import dask_runner  # dask is imported only when asked for
        return dask_runner.DaskRunner() if dask_runner.is_dask(runner) else None
    return fn_runner.FnApiRunner()


def run(name: str, build: Callable[[beam.Pipeline], None], beam_args: Sequence[str] = ()
        ) -> dict[str, int]:
    """Builds the pipeline with `build`, runs it to the end and returns (and prints) its counters
    of namespace `name`. `beam_args` are Beam's standard pipeline options (`--runner=
    DataflowRunner --project=...`, `--runner=FlinkRunner --flink_master=...`, `--runner=
    SparkRunner ...`, `--direct_num_workers=N`) or the Dask runner's (`--runner=dask
    --dask_client_address=HOST:8786`, `--runner=dask --dask_workers=N`)."""
    t0 = time.time()
    opts = PipelineOptions(list(beam_args))
    p = beam.Pipeline(runner=_runner(opts), options=opts)
    build(p)
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: int(c.committed if c.committed is not None else c.attempted)
                for c in result.metrics().query(MetricsFilter().with_namespace(name))["counters"]}
    print(f"{name}: done in {time.time() - t0:.1f}s; counters: "
          + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())), flush=True)
    return counters


class Progress(beam.DoFn):
    """Passes elements on, counting them in `<namespace>:<what>` and logging the count and rate
    of this worker every `seconds`."""

    def __init__(self, namespace: str, what: str, seconds: float = 10.0):
        self.namespace, self.what, self.seconds = namespace, what, seconds
        self.counter = Metrics.counter(namespace, what)

    def setup(self) -> None:
        self.seen, self.start = 0, time.time()
        self.last = self.start

    def process(self, element):
        self.counter.inc()
        self.seen += 1
        now = time.time()
        if now - self.last >= self.seconds:
            self.last = now
            print(f"{self.namespace}: {self.seen} {self.what} on this worker "
                  f"({self.seen / (now - self.start):.0f}/s)", flush=True)
        yield element


class _ReadFile(beam.DoFn):
    """A TFRecord file -> its records as (`<file>:<index>`, serialized); a frame that does not
    read fails naming its record (`validate.corrupt_frame`)."""

    def process(self, path: str) -> Iterator[tuple[str, bytes]]:
        for start, records, framing in validate.read_batches(path, batch=1024):
            if framing:  # the records before the bad frame, one by one, then the bad one
                for index, one, err in validate.read_batches(path, start, batch=1):
                    if err:
                        raise validate.BadRecordError(validate.corrupt_frame(path, index, err)[0])
                    yield f"{path}:{index}", one[0]
            for i, record in enumerate(records):
                yield f"{path}:{start + i}", record


class ReadNamedRecords(beam.PTransform):
    """TFRecord files of a pattern (comma-separated globs) -> (record name, serialized record).
    Files are the unit of work (a TFRecord file cannot be split without reading it), spread over
    the workers; the names are what the parsers' errors quote."""

    def __init__(self, pattern: str):
        super().__init__()
        self.files = pipeline.list_files(pattern)

    def expand(self, p):
        return (p | beam.Create(self.files) | "SpreadFiles" >> beam.Reshuffle()
                | beam.ParDo(_ReadFile()))


class _NearestCentroid(beam.DoFn):
    def __init__(self, centroids: str):
        self.centroids = centroids

    def setup(self) -> None:
        self.clusters = clusters_lib.Clusters.load(self.centroids)

    def process(self, batch: list) -> Iterator[tuple]:
        ids = self.clusters.assign(np.stack([v for _, v in batch]))
        for (key, _), cluster in zip(batch, ids, strict=True):
            yield key, int(cluster)


class NearestCentroids(beam.PTransform):
    """(key, vector) -> (key, id of the vector's nearest centroid), by `Clusters.assign` (faiss)
    on batches of `batch_size`: the Cluster-ID of paper 002 App. B."""

    def __init__(self, centroids: str, batch_size: int):
        super().__init__()
        self.centroids, self.batch_size = centroids, batch_size

    def expand(self, pairs):
        return (pairs | beam.BatchElements(min_batch_size=self.batch_size,
                                           max_batch_size=self.batch_size)
                | beam.ParDo(_NearestCentroid(self.centroids)))


class BatchParser:
    """`RecordParser` over batches of named records in graph mode, with numpy output. A batch that
    fails is diagnosed record by record (`validate.Diagnoser`, the pipeline's own checks): the bad
    records raise a `BadRecordError` naming the record and feature, or with `skip` are returned
    beside the parsed good ones."""

    def __init__(self, parser: parse.RecordParser, skip: bool = False):
        spec = tf.TensorSpec([None], tf.string)
        self.fn = tracing.function(parser, input_signature=[spec, spec])
        self.diagnoser = validate.Diagnoser(parser)
        self.skip = skip

    def __call__(self, names: Sequence[str], serialized: Sequence[bytes]
                 ) -> tuple[dict, list[int], list[validate.BadRecord]]:
        """(parsed columns of the good records, their positions in the batch, bad records)."""
        try:
            return self._parse(names, serialized), list(range(len(names))), []
        except validate.INPUT_ERRORS:
            pass
        bad, keep = [], []
        for i, (name, record) in enumerate(zip(names, serialized, strict=True)):
            found = self.diagnoser.diagnose(name, record)
            if found is None:
                keep.append(i)
            elif not self.skip:
                raise validate.BadRecordError(found)
            else:
                bad.append(found)
        if not bad:  # the batch fails, no record alone does: not the data's fault
            self._parse(names, serialized)
        parsed = (self._parse([names[i] for i in keep], [serialized[i] for i in keep])
                  if keep else {})
        return parsed, keep, bad

    def _parse(self, names: Sequence[str], serialized: Sequence[bytes]) -> dict:
        out = self.fn(tf.constant(list(names)), tf.constant(list(serialized)))
        return {k: v.numpy() for k, v in out.items()}

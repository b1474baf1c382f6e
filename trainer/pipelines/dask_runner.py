"""The Beam pipelines on dask.distributed: a runner that ships each bundle to a Dask worker process.

`--runner=dask` (or `DaskRunner`) selects it; `--dask_client_address=HOST:8786` (or
`--dask_scheduler_file=F`) runs on an existing cluster, else the job starts a local cluster of
`--dask_workers` worker processes (default: one per core) and stops it at the end.

Beam ships a DaskRunner (`apache_beam.runners.dask`), which this one keeps the transform
substitutions (`dask_overrides`) and the options (`DaskOptions`) of. Its execution, in Beam 2.77,
gives wrong results for these pipelines, so the translation to Dask bags is the project's:

- it computes the last transform's bag only: a pipeline with two sinks (records and dead letters,
  the table and the index sample) writes one of them. Here every leaf is computed, in one graph,
  so what two sinks share is computed once.
- it hands every output of a multi-output ParDo to every consumer (the dead letters arrive with
  the records). Here a bag carries (tag, value) pairs and each consumer takes its own tag.
- it drops what a DoFn emits in `finish_bundle`: `BatchElements`' last batch, and the results of
  every file sink's writer, whose finaliser then commits an empty file. Here `DoFnRunner` (what
  Beam's own bundle runner uses) runs start, process and finish for each bundle and keeps every
  output; a DoFn is set up once per worker process and job, as on Beam's own workers.
- it reads a side input by computing the side input's bag again inside each task, which repeats
  the upstream work (a sink's writes among it). Here a side input is one node of the graph that
  every consumer task depends on.
- it collects no metrics (`metrics()` raises). Here each bundle returns its counters beside its
  outputs, and the job sums them over the bundles whose results the job used (a bundle re-run
  after a worker died counts once), as `committed` counters.

Work is spread as Dask spreads a bag's partitions: a `Create` is cut into `--dask_npartitions`
partitions (default: 4 per worker thread of the cluster, at most one per element), and everything
downstream of it keeps that partitioning until a GroupByKey shuffles by key (Dask's task-based
shuffle). The pipelines read files as `Create(files)`, so a file is a unit of work, as on the
other runners. `Reshuffle` keeps the partitions (Beam's substitution). Windowing is global only,
as these batch pipelines are; an unknown primitive raises instead of passing its input through.
"""
from __future__ import annotations

import argparse
import os
import threading
import uuid
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
import dask.bag as db
from apache_beam.metrics.execution import MetricKey, MetricResult, MetricsContainer
from apache_beam.metrics.metric import MetricResults
from apache_beam.metrics.metricbase import MetricName
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pipeline import AppliedPTransform, PipelineVisitor
from apache_beam.runners.common import DoFnRunner, Receiver
from apache_beam.runners.dask.dask_runner import DaskOptions
from apache_beam.runners.dask.overrides import (
    _Create,
    _Flatten,
    _GroupByKeyOnly,
    _Reshuffle,
    dask_overrides,
)
from apache_beam.runners.runner import PipelineResult, PipelineRunner, PipelineState
from apache_beam.runners.worker import statesampler
from apache_beam.transforms.sideinputs import SideInputMap
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils import counters
from apache_beam.utils.windowed_value import WindowedValue
from dask import distributed
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from trainer import console

NAMES = ("dask", "DaskRunner")
# A Create's partitions by default, per worker thread of the cluster: enough to even out uneven
# files, few enough that a bundle's fixed cost (a DoFn's setup, a task) stays small.
PARTITIONS_PER_SLOT = 4


class ClusterOptions(PipelineOptions):
    """The local cluster's size, when no scheduler is given."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--dask_workers", type=int, default=0,
                            help="Worker processes of the local cluster the job starts when no "
                                 "--dask_client_address or --dask_scheduler_file is given "
                                 "(0: one per core).")


class _Metrics:
    """A bundle's counters, carried in its output partition beside its (tag, value) pairs."""

    def __init__(self, counts: dict[tuple[str, str, str], int]):
        self.counts = counts


class _Receivers(dict):
    """Every output tag of a ParDo appends (tag, value) to `out`, the current bundle's list."""

    def __init__(self):
        super().__init__()
        self.out: list = []

    def __missing__(self, tag):
        self[tag] = _Collect(self, tag)
        return self[tag]


class _Collect(Receiver):
    def __init__(self, receivers: _Receivers, tag: str | None):
        self.receivers, self.tag = receivers, tag

    def receive(self, windowed_value: WindowedValue) -> None:
        self.receivers.out.append((self.tag, windowed_value))


# The ParDos set up in this worker process, by (job, step, thread), for the current job only: as
# Beam's own workers do, a DoFn instance is set up once and serves bundle after bundle (a parser's
# tf.function, a SavedModel: seconds each; the DoFnRunner's inspection of the DoFn: milliseconds
# each), never two threads at once. A side input is the same for every bundle of a job (global
# window). Teardown is best effort in Beam's contract; these are dropped when the worker's next
# job starts.
_set_up: dict[tuple[str, str, int], tuple[DoFnRunner, _Receivers]] = {}


def _run_bundle(items: Iterable[WindowedValue], fn: beam.DoFn, job: str, label: str, args: list,
                kwargs: dict, windowing: Any, views: list, *side_values: list) -> list:
    """One partition through the DoFn, as a bundle (start, process, finish; setup on the DoFn's
    first bundle in this process and thread), with the bundle's metrics container current.
    Returns its (tag, value) pairs and its `_Metrics`."""
    sampler = statesampler.StateSampler("dask", counters.CounterFactory())
    statesampler.set_current_tracker(sampler)
    container = MetricsContainer(label)
    key = (job, label, threading.get_ident())
    try:
        with sampler.scoped_state(label, "process", metrics_container=container):
            if key not in _set_up:
                for other in [k for k in _set_up if k[0] != job]:
                    del _set_up[other]
                sides = [SideInputMap(view_class, options, values) for (view_class, options),
                         values in zip(views, side_values, strict=True)]
                receivers = _Receivers()
                runner = DoFnRunner(fn, args, kwargs, sides, windowing,
                                    tagged_receivers=receivers, step_name=label)
                runner.setup()
                _set_up[key] = runner, receivers
            runner, receivers = _set_up[key]
            out: list = []
            receivers.out = out
            runner.start()
            for item in items:
                runner.process(item)
            runner.finish()
    finally:
        statesampler.set_current_tracker(None)
    counts = {(key.step, key.metric.namespace, key.metric.name): int(value)
              for key, value in container.get_cumulative().counters.items()}
    return [*out, _Metrics(counts)]


def _select(partition: Iterable, tag: str | None) -> list[WindowedValue]:
    return [x[1] for x in partition if not isinstance(x, _Metrics) and x[0] == tag]


def _metrics_only(partition: Iterable) -> list[_Metrics]:
    return [x for x in partition if isinstance(x, _Metrics)]


def _drain(partition: Iterable) -> list:
    for _ in partition:
        pass
    return []


def _concat(parts: Iterable[list]) -> list:
    return [x for part in parts for x in part]


def _whole(bag: db.Bag) -> Delayed:
    """One task that depends on every partition of `bag` and returns their elements as a list:
    a side input, computed once for all its consumers. (A Bag or Item passed to map_partitions is
    fused into a copy of its upstream tasks, which then run twice; a Delayed per partition costs
    a walk of the whole graph each.)"""
    name = f"side-input-{tokenize(bag.name)}"
    layer: dict = {name: (_concat, [(bag.name, i) for i in range(bag.npartitions)])}
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[bag])  # type: ignore[list-item]
    return Delayed(name, graph)


def _key(windowed: WindowedValue) -> Any:
    return windowed.value[0]


def _grouped(group: tuple) -> WindowedValue:
    key, members = group
    return GlobalWindows.windowed_value((key, [w.value[1] for w in members]))


class _Translator(PipelineVisitor):
    """Each primitive transform -> a Dask bag. A ParDo's bag holds (tag, value) pairs and
    `_Metrics`; every other bag holds windowed values."""

    def __init__(self, npartitions: int, partition_size: int | None):
        self.npartitions, self.partition_size = npartitions, partition_size
        self.job = uuid.uuid4().hex
        self.bags: dict[AppliedPTransform, db.Bag] = {}
        self.tagged: set[AppliedPTransform] = set()
        self.consumed: set[AppliedPTransform] = set()

    def input_bag(self, pcoll: beam.PCollection) -> db.Bag:
        producer = pcoll.producer
        assert producer is not None, pcoll  # every PCollection of a built pipeline has one
        self.consumed.add(producer)
        bag = self.bags[producer]
        return bag.map_partitions(_select, pcoll.tag) if producer in self.tagged else bag

    def visit_transform(self, node: AppliedPTransform) -> None:
        t = node.transform
        inputs = [self.input_bag(p) for p in node.inputs if isinstance(p, beam.PCollection)]
        if isinstance(t, _Create):
            values = [GlobalWindows.windowed_value(v) for v in t.values]
            if self.partition_size:
                bag = db.from_sequence(values, partition_size=self.partition_size)
            else:
                bag = db.from_sequence(values, npartitions=min(max(len(values), 1),
                                                               self.npartitions))
        elif isinstance(t, beam.ParDo):
            views, sides = [], []
            for si in node.side_inputs:
                views.append((type(si), si._view_options()))
                sides.append(_whole(self.input_bag(si.pvalue)))
            windowing = node.inputs[0].windowing
            bag = inputs[0].map_partitions(_run_bundle, t.fn, self.job, node.full_label,
                                           list(t.args),
                                           dict(t.kwargs), windowing, views, *sides)
            self.tagged.add(node)
        elif isinstance(t, _GroupByKeyOnly):
            bag = inputs[0].groupby(_key, shuffle="tasks").map(_grouped)
        elif isinstance(t, _Flatten):
            bag = db.concat(inputs) if inputs else db.from_sequence([], npartitions=1)
        elif isinstance(t, _Reshuffle):
            bag = inputs[0]
        else:
            raise NotImplementedError(
                f"the Dask runner has no translation of {type(t).__name__} "
                f"('{node.full_label}')")
        self.bags[node] = bag

    def graph(self) -> tuple[list[db.Bag], db.Bag]:
        """The leaves' bags, drained (their values are not brought back), and the bag of every
        bundle's `_Metrics`."""
        leaves = [b.map_partitions(_drain) for n, b in self.bags.items() if n not in self.consumed]
        metrics = [self.bags[n].map_partitions(_metrics_only) for n in self.tagged]
        return leaves, (db.concat(metrics) if metrics else db.from_sequence([], npartitions=1))


class _MetricResults(MetricResults):
    def __init__(self, counts: dict[tuple[str, str, str], int]):
        self.counts = counts

    def query(self, filter=None):  # noqa: A002  (Beam's signature)
        results = []
        for (step, namespace, name), value in sorted(self.counts.items()):
            key = MetricKey(step, MetricName(namespace, name))
            if self.matches(filter, key):
                results.append(MetricResult(key, value, value))
        return {self.COUNTERS: results, self.DISTRIBUTIONS: [], self.GAUGES: [],
                self.STRINGSETS: [], self.BOUNDED_TRIES: []}


class DaskResult(PipelineResult):
    def __init__(self, client: Any, cluster: Any, futures: list):
        super().__init__(PipelineState.RUNNING)
        self.client, self.cluster, self.futures = client, cluster, futures
        self.counts: dict[tuple[str, str, str], int] = {}

    def wait_until_finish(self, duration=None) -> str:
        try:
            results = self.client.gather(self.futures)  # raises a failed task's error
            for m in results[-1]:
                for k, v in m.counts.items():
                    self.counts[k] = self.counts.get(k, 0) + v
            self._state = PipelineState.DONE
        except BaseException:
            self._state = PipelineState.FAILED
            raise
        finally:
            self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        return self._state

    def metrics(self) -> MetricResults:
        return _MetricResults(self.counts)

    def cancel(self) -> str:
        self.client.cancel(self.futures)
        self._state = PipelineState.CANCELLED
        return self._state


def start(options: PipelineOptions) -> tuple[Any, Any]:
    """(client, local cluster or None): the scheduler the options name, else a new local cluster
    of worker processes (one thread each: TensorFlow uses the cores within a process)."""
    dask_opts = options.view_as(DaskOptions)
    if dask_opts.address or dask_opts.scheduler_file:
        timeout = {} if dask_opts.timeout is None else {"timeout": dask_opts.timeout}
        return distributed.Client(address=dask_opts.address,
                                  scheduler_file=dask_opts.scheduler_file,
                                  set_as_default=False, **timeout), None
    cluster = local_cluster(options.view_as(ClusterOptions).dask_workers or os.cpu_count() or 1)
    return distributed.Client(cluster, set_as_default=False), cluster


def local_cluster(workers: int) -> distributed.LocalCluster:
    """A dask.distributed cluster of `workers` processes on this machine, one thread each; in a
    quiet command, its workers print as the command does (`_QuietWorker`)."""
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    if console.is_quiet():
        with distributed.Client(cluster, set_as_default=False) as client:
            client.register_plugin(_QuietWorker())  # kept by the scheduler for new workers too
    return cluster


class _QuietWorker(distributed.WorkerPlugin):
    """A worker plugin: the worker's console set as a quiet command's (`console.setup`),
    TensorFlow's device probe included, before it runs a task."""

    def setup(self, worker: Any) -> None:
        import tensorflow  # noqa: F401  (trainer set its environment first)

        console.setup()


class DaskRunner(PipelineRunner):
    """Runs a Beam pipeline as one Dask graph on a dask.distributed cluster (module docstring)."""

    def run_pipeline(self, pipeline: beam.Pipeline, options: PipelineOptions) -> DaskResult:
        dask_opts = options.view_as(DaskOptions)
        pipeline.replace_all(dask_overrides())
        client, cluster = start(options)
        try:
            slots = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
            translator = _Translator(dask_opts.npartitions or PARTITIONS_PER_SLOT * max(slots, 1),
                                     dask_opts.partition_size)
            pipeline.visit(translator)
            leaves, metrics = translator.graph()
            futures = client.compute([*leaves, metrics])
        except BaseException:
            client.close()
            if cluster is not None:
                cluster.close()
            raise
        return DaskResult(client, cluster, futures)


def is_dask(runner: str | None) -> bool:
    return runner in NAMES


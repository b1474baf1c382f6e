"""Beam vocab: the CTR model's vocabularies (with counts), bucket boundaries and normalisation
moments over training data of any size, written as the `vocabularies.npz` the model loads.

Each worker parses batches of `ctr` records with the input pipeline's parser (a bad record fails
the job naming it) and reduces them as `Vocabularies.batch_values` does in one process; Beam's
combiners merge the workers' parts:
- ids: a count per (table, id), summed across the data set (`CombinePerKey`), then the ids seen
  at least `min_count` times, sorted, with their counts;
- bucket boundaries: the quantiles of a uniform sample of at most `QUANTILE_SAMPLE` values per
  feature (`Sample.FixedSizePerKey`; every value while they fit, as in one process);
- moments: count, sum and sum of squares per value (summed).
The result equals `Vocabularies.from_training_data` on the same records. Put the file in a CTR
model dir before training (`<model_dir>/vocabularies.npz`) and the `ctr` stage uses it instead of
reading the training data itself.

  python -m trainer.pipelines.vocab --records='DATA/ctr/train-*' --ctr_spec=synthetic \\
      --output=MODEL_DIR/vocabularies.npz [--min_count=1] BEAM_OPTIONS...
"""
from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import apache_beam as beam
import numpy as np
from apache_beam.metrics.metric import Metrics

from trainer.ctr import spec as ctr_spec
from trainer.ctr import tables
from trainer.data import parse
from trainer.pipelines import common

NAMESPACE = "vocab"
BATCH = 4096


class _Statistics(beam.DoFn):
    """A batch of named records -> tagged parts: ((table, id), count), (feature, value) and
    (feature, [3, length] sums)."""

    def __init__(self, spec: ctr_spec.CtrSpec):
        self.spec = spec
        self.records = Metrics.counter(NAMESPACE, "records")

    def setup(self) -> None:
        self.parser = common.BatchParser(parse.RecordParser(
            self.spec.record_kind(), features=tables.Vocabularies.columns(self.spec),
            decode=False))

    def process(self, batch: Sequence[tuple[str, bytes]]) -> Iterator:
        parsed, _, _ = self.parser([n for n, _ in batch], [r for _, r in batch])
        self.records.inc(len(batch))
        ids, samples, sums = tables.Vocabularies.batch_values(self.spec, parsed)
        for table, values in ids.items():
            v, c = np.unique(values, return_counts=True)
            for value, count in zip(v.tolist(), c.tolist(), strict=True):
                yield beam.pvalue.TaggedOutput("ids", ((table, value), count))
        for name, values in samples.items():
            for x in values.tolist():
                yield beam.pvalue.TaggedOutput("samples", (name, x))
        for name, m in sums.items():
            yield beam.pvalue.TaggedOutput("sums", (name, m))


def _sorted(kv) -> tuple[str, tuple[np.ndarray, np.ndarray]]:
    table, pairs = kv
    pairs = sorted(pairs)
    return table, (np.array([v for v, _ in pairs], np.int64),
                   np.array([c for _, c in pairs], np.int64))


def _write(_, spec: ctr_spec.CtrSpec, output: str, min_count: int, source: str,
           ids: dict, samples: dict, sums: dict) -> int:
    vocabularies = tables.Vocabularies.from_statistics(spec, ids, samples, sums, min_count,
                                                       source)
    vocabularies.save(output)
    return sum(len(v) for v in vocabularies.ids.values())


def run(records: str, spec: ctr_spec.CtrSpec, output: str, min_count: int = 1,
        beam_args: Sequence[str] = ()) -> tables.Vocabularies:
    """Runs the pipeline; returns the vocabularies it wrote to `output`."""
    def build(p: beam.Pipeline) -> None:
        parts = (p | "Read" >> common.ReadNamedRecords(records)
                 | "Progress" >> beam.ParDo(common.Progress(NAMESPACE, "records read"))
                 | "Batch" >> beam.BatchElements(min_batch_size=BATCH, max_batch_size=BATCH)
                 | "Statistics" >> beam.ParDo(_Statistics(spec)).with_outputs(
                     "ids", "samples", "sums"))
        ids = (parts.ids | "CountIds" >> beam.CombinePerKey(sum)
               | "ByTable" >> beam.Map(lambda kv: (kv[0][0], (kv[0][1], kv[1])))
               | "GroupTables" >> beam.GroupByKey() | "Sort" >> beam.Map(_sorted))
        samples = (parts.samples
                   | "Sample" >> beam.combiners.Sample.FixedSizePerKey(tables.QUANTILE_SAMPLE))
        sums = parts.sums | "Sums" >> beam.CombinePerKey(sum)
        _ = (p | "One" >> beam.Create([None])
             | "Write" >> beam.Map(_write, spec, output, min_count, records,
                                   beam.pvalue.AsDict(ids), beam.pvalue.AsDict(samples),
                                   beam.pvalue.AsDict(sums)))

    common.run(NAMESPACE, build, beam_args)
    return tables.Vocabularies.load(output)


def main(argv: Sequence[str] | None = None) -> None:
    p = common.command_line(__doc__)
    p.add_argument("--records", required=True, help="The `ctr` training records (globs).")
    p.add_argument("--ctr_spec", default=ctr_spec.DEFAULT)
    p.add_argument("--output", required=True, help="The vocabularies.npz to write.")
    p.add_argument("--min_count", type=int, default=1,
                   help="Ids seen fewer times share the out-of-vocabulary row.")
    args, beam_args = p.parse_known_args(argv)
    try:
        vocabularies = run(args.records, ctr_spec.load(args.ctr_spec), args.output,
                           args.min_count, beam_args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"vocab: {args.output}: " + ", ".join(f"{t} {len(v)} ids"
                                                 for t, v in vocabularies.ids.items()))


if __name__ == "__main__":
    main()

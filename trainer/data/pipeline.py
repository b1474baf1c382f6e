"""tf.data input pipelines over sharded TFRecord files.

files -> (per-worker shard) -> shuffle files -> interleave readers -> shuffle records -> repeat ->
batch -> parse + check + decode (parallel) -> optional transform (e.g. S1 augmentation) -> prefetch.

Files are sharded per input pipeline by `tf.distribute.InputContext` (file-level, as
tf-models-official's readers do) and tf.data's auto-sharding is switched off, so every worker of a
multi-worker job reads a disjoint set of files. `deterministic=True` fixes the element order and
seeds every shuffle and transform for tests and reproducible runs; it also shards by batch instead
(every pipeline reads the same seeded stream of raw records and keeps its replicas' batches, before
parsing), so the global batch of a step is the same whatever the number of workers, and a resumed
run (`start_step`) reads on exactly where the interrupted one stopped.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf

from trainer import tracing
from trainer.data import parse, schema, validate

log = logging.getLogger(__name__)
AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass
class InputConfig:
    """How to read one record kind.

    Attributes:
      file_pattern: Glob of TFRecord files; several globs may be joined by commas. Files ending
        in `.gz` are read as GZIP.
      kind: Record kind: a name of `schema.KIND_NAMES` (`ctr`: the default feature spec's) or a
        `schema.RecordKind` (e.g. another feature spec's `ctr` kind).
      global_batch_size: Batch size across all replicas; each replica's input pipeline produces
        global_batch_size / num_replicas_in_sync.
      image_size: Side length images are decoded (and if needed resized) to.
      decode_images: Decode image features; False leaves the encoded bytes.
      catalog_pattern: Catalog files to join images from when records carry only item ids (the
        compact layout). None: records must carry their images inline.
      shuffle: Shuffle files and records.
      shuffle_buffer: Records in the shuffle buffer.
      repeat: Repeat indefinitely (training); False gives one pass (evaluation).
      drop_remainder: Drop a last partial batch (static batch shapes for training).
      deterministic: Fixed element order and seeded randomness.
      seed: Seed of shuffles and transforms.
      cycle_length: Files read concurrently by the interleave.
      skip_bad_records: Scan the files first and leave out bad records, logging each and their
        count. By default the first bad record stops the job with an error that names it.
      group_by: An int64 scalar feature; when set, every global batch holds records that share
        its value (e.g. S2's single-category batches), formed from the shuffled stream. Every
        input pipeline then reads the whole stream in a fixed order and keeps its replicas' rows
        of each global batch, so a step's global batch, and the value its replicas share, is the
        same on 1 or R replicas; the transform gets the replica's part (`InputPipeline`).
      start_step: Global steps already taken; with `deterministic`, the pipeline skips their
        batches (raw records only, before parsing) so a resumed run sees what an uninterrupted
        one would.
      features: Parse (and check) only these features of the kind; None for all.
    """

    file_pattern: str
    kind: str | schema.RecordKind
    global_batch_size: int = 256
    image_size: int = 64
    decode_images: bool = True
    catalog_pattern: Optional[str] = None
    shuffle: bool = True
    shuffle_buffer: int = 4096
    repeat: bool = True
    drop_remainder: bool = True
    deterministic: bool = False
    seed: int = 0
    cycle_length: int = 8
    skip_bad_records: bool = False
    group_by: Optional[str] = None
    start_step: int = 0
    features: Optional[tuple[str, ...]] = None


def list_files(pattern: str) -> list[str]:
    """Sorted files matching a glob (or comma-separated globs); raises if none match."""
    files = sorted({f for p in pattern.split(",") if p.strip()
                    for f in tf.io.gfile.glob(p.strip())})
    if not files:
        raise FileNotFoundError(f"no files match '{pattern}'")
    return files


def shard_files(files: Sequence[str], input_context: Optional[tf.distribute.InputContext]) -> list:
    """This input pipeline's share of the files (every num_input_pipelines-th file)."""
    if input_context is None or input_context.num_input_pipelines == 1:
        return list(files)
    n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
    if len(files) < n:
        raise ValueError(f"{len(files)} files cannot be sharded across {n} input pipelines: "
                         f"write at least {n} shards")
    return list(files[i::n])


def iter_columns(pattern: str, kind: str | schema.RecordKind, columns: Sequence[str],
                 skip_bad_records: bool = False, batch_size: int = 1024) -> Iterator[dict]:
    """One ordered pass over every record in batches of {column: numpy array}, images left
    encoded. Only the columns asked for are parsed (a list's `<name>_mask` comes with it); bad
    records fail named, or are skipped (counted and logged) with `skip_bad_records`."""
    parsed = tuple(dict.fromkeys(c[:-len("_mask")] if c.endswith("_mask") else c
                                 for c in columns))
    cfg = InputConfig(pattern, kind, global_batch_size=batch_size, decode_images=False,
                      shuffle=False, repeat=False, drop_remainder=False, deterministic=True,
                      features=parsed, skip_bad_records=skip_bad_records)
    pipe = InputPipeline(cfg)
    with pipe.errors_named():
        for batch in pipe.dataset():
            yield {c: batch[c].numpy() for c in columns}


def read_columns(pattern: str, kind: str | schema.RecordKind, columns: Sequence[str],
                 skip_bad_records: bool = False) -> dict:
    """`iter_columns`' batches joined: {column: numpy array} of every record, in file order."""
    parts: dict = {c: [] for c in columns}
    for batch in iter_columns(pattern, kind, columns, skip_bad_records):
        for c in columns:
            parts[c].append(batch[c])
    return {c: np.concatenate(v) if v else np.zeros([0]) for c, v in parts.items()}


def unique_rows(columns: dict, pattern: str, feature: str,
                skip_bad_records: bool = False) -> dict:
    """`columns` (read from `pattern`'s records in file order) if `feature` is unique; a repeat
    fails named, or with `skip_bad_records` its rows are dropped, logged and counted
    (`validate.unique_ids`)."""
    keep = validate.unique_ids(columns[feature], list_files(pattern), feature, skip_bad_records)
    return columns if keep.all() else {k: v[keep] for k, v in columns.items()}


def _catalog_column(catalog_pattern: str, column: str, skip_bad_records: bool
                    ) -> tuple[np.ndarray, list]:
    """Every catalog record's item id and `column` (bad catalog records and repeated ids fail
    named, or are skipped with `skip_bad_records`)."""
    cols = unique_rows(read_columns(catalog_pattern, "catalog", ("item_id", column),
                                    skip_bad_records), catalog_pattern, "item_id", skip_bad_records)
    log.info("%s store: %d catalog items", column, len(cols["item_id"]))
    return cols["item_id"], cols[column].tolist()


def load_image_store(catalog_pattern: str, skip_bad_records: bool = False) -> parse.ImageStore:
    """Every catalog record's encoded image by item id."""
    return parse.ImageStore(*_catalog_column(catalog_pattern, "image", skip_bad_records))


def load_title_store(catalog_pattern: str, skip_bad_records: bool = False) -> parse.BytesStore:
    """Every catalog record's title by item id."""
    return parse.BytesStore(*_catalog_column(catalog_pattern, "title", skip_bad_records))


class InputPipeline:
    """Datasets of one record kind, and the error context that names bad records.

    Usage:
      pipe = InputPipeline(cfg)
      dist = strategy.distribute_datasets_from_function(pipe.dataset)
      with pipe.errors_named():
          for batch in dist: ...
    """

    def __init__(self, cfg: InputConfig, image_store: Optional[parse.ImageStore] = None,
                 transform: Optional[Callable[..., dict]] = None):
        """`transform(seed, batch) -> batch` runs after parsing; `seed` is a stateless-RNG seed
        [2] int64 unique to the batch (and to the input pipeline). With `group_by` it is
        `transform(seed, batch, part)`: `seed` is that of the global batch (the same on every
        replica) and `part` [2] int64 is (this replica's index in it, replicas)."""
        self.cfg = cfg
        self.kind = schema.get(cfg.kind)
        self.files = list_files(cfg.file_pattern)
        if image_store is None and cfg.catalog_pattern and cfg.decode_images and any(
                self.kind.feature(n).image for n in self.kind.joinable_images):
            image_store = load_image_store(cfg.catalog_pattern, cfg.skip_bad_records)
        self.image_store = image_store
        self.parser = parse.RecordParser(self.kind, cfg.image_size, image_store,
                                         features=cfg.features, decode=cfg.decode_images)
        self.transform = transform
        self.scan_reports: dict = {}

    def errors_named(self):
        """Context manager: input errors raised inside become `BadRecordError`s naming the record."""
        return validate.named_input_errors(self.files, self.parser)

    def bad_records(self, files: Sequence[str]) -> validate.ScanReport:
        """Scan (once per file set) for skip_bad_records; logs every bad record and the count."""
        key = tuple(files)
        if key not in self.scan_reports:
            report = validate.scan(files, self.parser)
            for bad in report.bad:
                log.warning("skipping bad record: %s", bad)
            log.warning("skip_bad_records: %s: skipped", report.summary(len(files)))
            self.scan_reports[key] = report
        return self.scan_reports[key]

    @property
    def skipped(self) -> int:
        """Bad records left out so far (skip_bad_records)."""
        return sum(r.skipped for r in self.scan_reports.values())

    def dataset(self, input_context: Optional[tf.distribute.InputContext] = None,
                worker_shard: Optional[tuple] = None) -> tf.data.Dataset:
        """Batches of this pipeline's share of the records. `worker_shard`: (workers, index, the
        index maybe a tensor) of a parameter-server worker, which reads its own part: its files
        when there are at least as many files as workers, else every workers-th record."""
        cfg = self.cfg
        pipelines = input_context.num_input_pipelines if input_context else 1
        pipeline_id = input_context.input_pipeline_id if input_context else 0
        # Replicas this pipeline feeds; their per-replica batches are consecutive in its stream.
        local = input_context.num_replicas_in_sync // pipelines if input_context else 1
        replicas = input_context.num_replicas_in_sync if input_context else 1
        grouped = bool(cfg.group_by)
        # A grouped global batch is formed alike in every pipeline: same files, order and seeds.
        ordered = cfg.deterministic or grouped
        by_batch = ordered and pipelines > 1
        files = self.files if by_batch else shard_files(self.files, input_context)
        batch_size = (input_context.get_per_replica_batch_size(cfg.global_batch_size)
                      if input_context else cfg.global_batch_size)
        seed = cfg.seed * 1009 + (0 if ordered else pipeline_id)

        exclude = readable = None
        if cfg.skip_bad_records:
            report = self.bad_records(files)
            if report.bad:
                exclude = _string_set([f"{b.path}:{b.index}" for b in report.bad])
            if report.readable:
                readable = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
                    list(report.readable), list(report.readable.values()), tf.string, tf.int64),
                    default_value=-1)

        def read_file(path, compression):
            ds = tf.data.TFRecordDataset(path, compression_type=compression, buffer_size=1 << 20)
            if readable is not None:  # stop before a corrupt frame
                ds = ds.take(readable.lookup(path))
            ds = ds.enumerate().map(tracing.plain(lambda i, r: (parse.record_names(path, i), r)))
            if exclude is not None:
                ds = ds.filter(tracing.plain(lambda name, r: exclude.lookup(name) == 0))
            return ds

        ds = tf.data.Dataset.from_tensor_slices((files, [validate.compression_of(f) for f in files]))
        by_file = worker_shard is not None and len(files) >= worker_shard[0]
        if worker_shard is not None and by_file:
            ds = ds.shard(*worker_shard)
        if cfg.shuffle:
            ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        ds = ds.interleave(tracing.plain(read_file), cycle_length=min(cfg.cycle_length, len(files)),
                           block_length=1, num_parallel_calls=AUTOTUNE,
                           deterministic=ordered)
        if worker_shard is not None and not by_file:
            ds = ds.shard(*worker_shard)
        if cfg.shuffle:
            ds = ds.shuffle(cfg.shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=True)
        if cfg.repeat:
            # After the shuffle, so epochs do not blend: a record seen twice in one batch would be
            # its own negative in a contrastive loss.
            ds = ds.repeat()
        if cfg.group_by:
            spec = self.kind.feature(cfg.group_by)
            lo = -np.inf if spec.min_value is None else spec.min_value
            hi = np.inf if spec.max_value is None else spec.max_value

            def key_of(name, r):
                value = tf.io.parse_single_example(
                    r, {spec.name: tf.io.FixedLenFeature([], tf.int64)})[spec.name]
                # Checked here: a value that breaks the rules would form a window of its own,
                # which waits for a full batch and so may never be read (or named).
                bad = tf.reshape((tf.cast(value, tf.float64) < lo) |
                                 (tf.cast(value, tf.float64) > hi), [1])
                with tf.control_dependencies([parse.fail_if(
                        bad, tf.reshape(name, [1]), spec.name,
                        f"must be between {lo} and {hi} (the batches are grouped by it)",
                        tf.reshape(value, [1]))]):
                    return tf.identity(value)

            whole = batch_size * replicas
            ds = ds.group_by_window(
                key_func=tracing.plain(key_of), window_size=whole,
                reduce_func=lambda _, w: w.batch(
                    whole, drop_remainder=cfg.drop_remainder or replicas > 1))
            ds = ds.enumerate()  # global step t: seeds the transform of all its replicas' parts
            if cfg.start_step and cfg.deterministic:
                ds = ds.skip(cfg.start_step)
            first = pipeline_id * local  # this pipeline's replicas: first .. first + local - 1

            def parts(t, raw):
                mine = tf.nest.map_structure(
                    lambda x: tf.reshape(x[first * batch_size:(first + local) * batch_size],
                                         [local, -1]), raw)
                return tf.data.Dataset.from_tensor_slices((
                    tf.fill([local], t), tf.range(first, first + local, dtype=tf.int64), mine))

            ds = ds.flat_map(tracing.plain(parts))
        else:
            ds = ds.batch(batch_size, drop_remainder=cfg.drop_remainder)
            # Index of the per-replica batch in the global stream: seeds its transform.
            ds = ds.enumerate()
            if by_batch:  # global batch t is batches t*R .. t*R+R-1, replica order = pipeline's
                ds = ds.batch(local).shard(pipelines, pipeline_id).unbatch()
            if cfg.start_step and cfg.deterministic:
                ds = ds.skip(cfg.start_step * local)
        parser, transform = self.parser, self.transform

        def parse_batch(i, *rest):
            batch = parser(*rest[-1])
            if transform is None:
                return batch
            batch_seed = tf.stack([tf.constant(seed, tf.int64), i])
            if grouped:
                return transform(batch_seed, batch,
                                 tf.stack([rest[0], tf.constant(replicas, tf.int64)]))
            return transform(batch_seed, batch)

        # In order when grouped: each replica takes its consecutive element of the stream.
        ds = ds.map(tracing.plain(parse_batch), num_parallel_calls=AUTOTUNE, deterministic=ordered)
        ds = ds.prefetch(AUTOTUNE)
        options = tf.data.Options()
        options.deterministic = ordered
        # Files are sharded above; tf.data's own auto-sharding would shard them again.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return ds.with_options(options)


def _string_set(keys: Sequence[str]) -> tf.lookup.StaticHashTable:
    return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(list(keys)), tf.ones([len(keys)], tf.int64)), default_value=0)

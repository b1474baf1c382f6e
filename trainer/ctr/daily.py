"""The daily cycle's library (docs/daily.md): yesterday's CTR model trained on with today's data.

An ads CTR model is never trained once. Each day the cycle (`python -m trainer.task
--stage=daily`, run by `export/daily.py`) takes yesterday's model dir and today's data and makes
today's model dir from them:

- Vocabularies grow (`grow_vocabularies`): today's ids (counted by the Beam vocab job over
  today's records) join yesterday's, their counts summed and the day each id was last seen kept;
  ids unseen for `evict_after_days` days are evicted (their rows dropped). Bucket boundaries and
  normalisation moments stay yesterday's: a bucket means the same values every day, so its
  trained embedding keeps its meaning.
- The image table grows (`grow_table`): the items new today get their vectors from the catalog
  embedding of today's new items (the fixed encoder's export, the Beam embed job), appended to
  yesterday's table, whose rows stay where they are; their Cluster-IDs come from the trained
  centroids (stable ids), and D's positives are mined for them (`mine_new_positives`). The image
  normalisation (Vector mode's centre, SimScore's scale) stays the one the model was trained
  with (`image_statistics`).
- The weights carry over (`warm_start`): every id embedding row by id, not by position (tf-keras'
  `warmstart_embedding_matrix`): a known id keeps its row, a new id gets the fresh row a new
  model would give it, the out-of-vocabulary row carries over; every other weight as it is.
  Optimizer slots start afresh: each day is a run of its own with its own learning-rate
  schedule, Adam's bias correction makes fresh moments unbiased from the first step, and the
  moments of rows not seen today would be stale by a day anyway.
- The gate (`gate`): today's model and the serving one are scored on today's held-out pages;
  the paired bootstrap over pages gives the AUC difference and its 95% interval, and today's
  model may replace the serving one only if the interval's low end is above -margin (not worse
  beyond the margin).

The encoder stays fixed in the cycle: retraining it is a separate, rarer job. A CTR model follows
a new encoder by a full retrain on it (`--stage=ctr` with the new encoder's features), after which
the cycle goes on from that model: the image vectors of an old and a new encoder are not
comparable, so rows cannot be carried across.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf
import tf_keras

from trainer.configs import DebiasConfig
from trainer.ctr import debias
from trainer.ctr.model import CtrModel
from trainer.ctr.tables import Vocabularies
from trainer.data import jsonfile
from trainer.eval import significance
from trainer.features import embeddings as embeddings_lib

NEVER = -1  # last_seen of an id the logs have not shown (a model trained before the cycle)


def grow_vocabularies(previous: Vocabularies, today: Vocabularies, day: int,
                      evict_after_days: int = 0) -> tuple[Vocabularies, dict]:
    """Yesterday's vocabularies with today's ids: {table: sorted union of ids, summed counts, the
    day each was last seen}; with `evict_after_days` > 0, ids last seen more than that many days
    before `day` are dropped. Boundaries and moments are yesterday's. Returns the vocabularies
    and {table: {"kept", "new", "evicted", "size"}}."""
    ids, counts, last_seen, report = {}, {}, {}, {}
    for table, old_ids in previous.ids.items():
        old_ids = np.asarray(old_ids, np.int64)
        old_counts = np.asarray(previous.counts.get(table, np.zeros(len(old_ids))), np.int64)
        old_seen = np.asarray(previous.last_seen.get(table, np.full(len(old_ids), NEVER)),
                              np.int64)
        new_ids = np.asarray(today.ids.get(table, np.zeros([0], np.int64)), np.int64)
        new_counts = np.asarray(today.counts.get(table, np.zeros(len(new_ids))), np.int64)
        merged = np.union1d(old_ids, new_ids)
        c = np.zeros(len(merged), np.int64)
        c[np.searchsorted(merged, old_ids)] += old_counts
        c[np.searchsorted(merged, new_ids)] += new_counts
        seen = np.full(len(merged), NEVER, np.int64)
        seen[np.searchsorted(merged, old_ids)] = old_seen
        seen[np.searchsorted(merged, new_ids)] = day
        # An id a model knew before the cycle counts as seen on the cycle's first day.
        seen = np.where(seen == NEVER, day - 1, seen)
        keep = (np.ones(len(merged), bool) if evict_after_days <= 0
                else seen >= day - evict_after_days)
        ids[table], counts[table], last_seen[table] = merged[keep], c[keep], seen[keep]
        report[table] = {"kept": int(np.isin(old_ids, merged[keep]).sum()),
                         "new": int((~np.isin(new_ids, old_ids)).sum()),
                         "evicted": int((~keep).sum()), "size": int(keep.sum())}
    grown = dataclasses.replace(previous, ids=ids, counts=counts, last_seen=last_seen)
    return grown, report


def grow_table(previous: embeddings_lib.EmbeddingTable, item_id: np.ndarray,
               category_id: np.ndarray, impressions_30d: np.ndarray, vectors: np.ndarray,
               source: str) -> tuple[embeddings_lib.EmbeddingTable, np.ndarray]:
    """Yesterday's image table with the items of `item_id` that it lacks appended (their rows
    after every old row, so the old rows keep their numbers); returns the table and the new
    rows' numbers."""
    new = ~np.isin(item_id, previous.item_id)
    vectors = np.asarray(vectors, np.float32)[new]
    if len(vectors) and vectors.shape[1] != previous.dim:
        raise ValueError(f"{source}: vectors of dimension {vectors.shape[1]}; the model's table "
                         f"has {previous.dim}: another encoder")
    rows = np.arange(len(previous.item_id), len(previous.item_id) + int(new.sum()))
    table = dataclasses.replace(
        previous, item_id=np.concatenate([previous.item_id, np.asarray(item_id)[new]]),
        category_id=np.concatenate([previous.category_id, np.asarray(category_id)[new]]),
        impressions_30d=np.concatenate([previous.impressions_30d,
                                        np.asarray(impressions_30d)[new]]),
        item_vector=np.concatenate([previous.item_vector, vectors]).astype(np.float32),
        source=f"{previous.source}; + {source}")
    return table, rows


def mine_new_positives(previous: tuple[np.ndarray, np.ndarray], s1: embeddings_lib.EmbeddingTable,
                       new_rows: np.ndarray, cfg: DebiasConfig, candidate: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """D's positives (rows, weights) of the grown table: yesterday's for the old rows, mined for
    the new rows (`new_rows`) among the `candidate` rows of the grown table
    (`debias.candidates`)."""
    rows, weights = previous
    n = len(s1.item_id)
    out_rows = np.full([n, rows.shape[1]], -1, np.int64)
    out_weights = np.zeros([n, rows.shape[1]], np.float32)
    out_rows[:len(rows)], out_weights[:len(rows)] = rows, weights
    if len(new_rows):
        mined = debias.mine_positives(
            s1.item_vector, s1.category_id, candidate, cfg.num_similar, cfg.index, cfg.nprobe,
            anchors=new_rows)
        out_rows[new_rows], out_weights[new_rows] = mined[0][new_rows], mined[1][new_rows]
    return out_rows, out_weights


def warm_start(new: CtrModel, old: CtrModel) -> dict:
    """Sets `new`'s weights (both models built, `new` with grown vocabularies) from `old`'s: each
    id embedding row by id, every other trainable weight as it is (they are the same shapes);
    the frozen image and cluster tables are `new`'s own. Returns {table: rows carried over}."""
    carried = {}
    skip = set()
    for name, layer in new.id_embeddings.items():
        if name not in new.vocabularies.ids:  # hashed: the bins are the same every day
            continue
        old_layer = old.id_embeddings[name]
        base = np.concatenate([[-1], old.vocabularies.ids[name]])  # row 0: out of vocabulary
        grown = np.concatenate([[-1], new.vocabularies.ids[name]])
        fresh = tf.convert_to_tensor(layer.embeddings)  # what a new model gives a new id
        layer.embeddings.assign(tf_keras.utils.warmstart_embedding_matrix(
            base.tolist(), grown.tolist(), tf.convert_to_tensor(old_layer.embeddings),
            tf_keras.initializers.Constant(fresh.numpy())))
        carried[name] = int(np.isin(grown, base).sum())
        skip |= {id(layer.embeddings), id(old_layer.embeddings)}
    pairs = [(a, b) for a, b in zip(_weights(new, skip), _weights(old, skip), strict=True)]
    for a, b in pairs:
        if a.shape != b.shape:
            raise ValueError(f"cannot carry {b.name} {b.shape} over to {a.name} {a.shape}: the "
                             "model's settings changed since yesterday")
        a.assign(b)
    return carried


def _weights(model: CtrModel, skip: set) -> list:
    """The trainable weights other than `skip`, in the model's (deterministic) build order."""
    return [v for v in model.trainable_variables if id(v) not in skip]


@dataclasses.dataclass(frozen=True)
class GateDecision:
    """Today's model against the serving one on today's held-out pages."""

    passed: bool
    forced: bool
    metric: str
    margin: float
    candidate: float
    serving: float
    difference: float
    low: float
    high: float
    samples: int

    def __str__(self) -> str:
        verdict = ("passes" if self.passed else "forced through" if self.forced
                   else "refused")
        text = (f"gate {verdict}: {self.metric} {self.candidate:.4f} vs serving "
                f"{self.serving:.4f}, difference {self.difference:+.4f} [{self.low:+.4f}, "
                f"{self.high:+.4f}] over {self.samples} held-out samples; a new version needs "
                f"the interval's low end above -{self.margin}")
        half = (self.high - self.low) / 2
        if not self.passed and half > self.margin:
            # Not evidence that the model is worse: the holdout cannot show it is not.
            text += (f" (the held-out pages are too few to resolve that margin: the interval's "
                     f"half-width is {half:.4f}; hold out more pages or widen --margin)")
        return text


def gate(candidate: str, serving: str, margin: float, metric: str = "AUC",
         force: bool = False, seed: int = 0) -> GateDecision:
    """Whether the candidate's predictions of the held-out samples are not worse than the
    serving model's beyond `margin` (the paired bootstrap's 95% interval of the difference over
    pages lies above -margin), from the two evaluate jobs' output dirs, streamed
    (`significance.stream_compare_ctr`: any size). `force` exports anyway (the decision records
    that it was forced)."""
    c = significance.stream_compare_ctr(candidate, serving, metric, seed=seed)
    d = c.difference
    passed = d.low > -margin
    samples = jsonfile.read(os.path.join(candidate, "metrics.json")) or {}
    return GateDecision(passed, force and not passed, metric, margin, c.a.value, c.b.value,
                        d.value, d.low, d.high, int(samples.get("samples", 0)))


@dataclasses.dataclass(frozen=True)
class DayStatistics:
    """What a day's data looks like before training on it."""

    samples: int
    click_rate: float
    unknown_items: float  # share of samples whose item is new to yesterday's vocabulary
    unknown_users: float

    @classmethod
    def of(cls, labels: np.ndarray, items: np.ndarray, users: np.ndarray,
           vocabularies: Vocabularies, item_table: str, user_table: str | None
           ) -> DayStatistics:
        known_items = np.isin(items, vocabularies.ids.get(item_table, []))
        known_users = (np.isin(users, vocabularies.ids[user_table]) if user_table
                       in vocabularies.ids else np.ones(len(users), bool))
        return cls(int(len(labels)), float(np.mean(labels)) if len(labels) else 0.0,
                   float(1 - known_items.mean()) if len(items) else 0.0,
                   float(1 - known_users.mean()) if len(users) else 0.0)


def sharp_changes(today: DayStatistics, yesterday: DayStatistics | None, volume_ratio: float,
                  click_rate_ratio: float, unknown_share: float) -> list[str]:
    """What in today's data differs sharply from yesterday's: the volume or the click rate by
    more than the ratios (either way), or a share of unknown items or users above
    `unknown_share`. Each a sentence; none when the day looks like the last."""
    out = []
    if yesterday is not None and yesterday.samples:
        for what, a, b, limit in (("samples", today.samples, yesterday.samples, volume_ratio),
                                  ("click rate", today.click_rate, yesterday.click_rate,
                                   click_rate_ratio)):
            ratio = a / b if b else float("inf")
            if ratio > limit or ratio < 1 / limit:
                out.append(f"{what} {a:.4g} against {b:.4g} yesterday ({ratio:.2f}x; limit "
                           f"{limit}x either way)")
    for what, share in (("items", today.unknown_items), ("users", today.unknown_users)):
        if share > unknown_share:
            out.append(f"{share:.1%} of today's samples show {what} new to the model (limit "
                       f"{unknown_share:.0%})")
    return out


"""TensorFlow graphs traced without AutoGraph.

Every function this project traces (the record parsers, the augmentations, the models, the
training and evaluation steps, the serving signatures) branches and loops on tensors with
TensorFlow's own control flow (`tf.cond`, `tf.where`, `tf.map_fn`, `tf.while_loop`), never with
a Python `if` or `for` over a tensor, so AutoGraph has nothing to rewrite in it. Left on, it
rewrites the source of every function they reach, Keras', TFRS' and Model Garden's layers
included, before each trace: 9 of the 26 seconds of a small CTR run in a profile, paid again
by every process that traces (trainers, Beam workers, exports); docs/stack.md has the figures.
Off, a Python `if` on a tensor fails where it is traced, naming its line, rather than being
rewritten.
"""
from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf


def function(fn: Callable | None = None, **kwargs):
    """`tf.function` without AutoGraph (a decorator, or applied to `fn`)."""
    return tf.function(fn, autograph=False, **kwargs)


def plain(fn: Callable) -> Callable:
    """`fn` traced as written wherever TensorFlow traces it (a tf.data transformation, a step
    that Orbit's loop calls): AutoGraph converts neither it nor anything it calls."""
    return tf.autograph.experimental.do_not_convert(fn)

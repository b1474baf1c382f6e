"""Batched parsing of schema records into dense tensors, with checks that name the bad record.

Every record travels with its name `<file>:<record index>`. `tf.io.parse_example` puts that name
into its own errors (missing feature, wrong dtype, wrong length); the checks added here (value
bounds, list lengths, image headers, catalog joins) fail with a `BAD_RECORD` assertion carrying the
name, the feature and the reason. `validate.named_input_errors` turns both into `BadRecordError`.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

import numpy as np
import tensorflow as tf

from trainer.data import schema

BAD_RECORD_TAG = "BAD_RECORD"
# JPEG, PNG, GIF, BMP magic numbers: what tf.io.decode_image accepts.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")
_NOT_AN_IMAGE = "is empty or not a JPEG/PNG/GIF/BMP image (first bytes shown)"
_TF = {schema.INT64: tf.int64, schema.FLOAT: tf.float32, schema.BYTES: tf.string}


def record_names(path: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """'<file>:<index>' names of records (index counts from 0 within the file)."""
    return tf.strings.join([path, tf.strings.as_string(index)], separator=":")


def split_record_name(name: str) -> tuple[str, int]:
    path, _, index = name.rpartition(":")
    return path, int(index)


def fail_if(bad: tf.Tensor, names: tf.Tensor, feature: str, reason: str,
            values: Optional[tf.Tensor] = None) -> tf.Operation:
    """Asserts that no row of `bad` [B] is set; the message names the first bad record. B may be
    0 (an empty request)."""
    first = tf.argmax(tf.concat([tf.cast(bad, tf.int32), [0]], 0))  # 0 when B = 0
    data = [BAD_RECORD_TAG, tf.concat([names, [""]], 0)[first], f"feature '{feature}':", reason]
    if values is not None:
        data += ["got", values]
    return tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), data, summarize=6)


def _first_bad_value(bad_values: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
    return tf.boolean_mask(values, bad_values)[:1]


def bad_record_message(error_message: str) -> Optional[tuple[str, str, str]]:
    """(record name, feature, reason) parsed from a BAD_RECORD assertion or a parse_example error
    raised on named records; None if the message is neither."""
    m = re.search(r"\[%s\] \[(.+?)\] \[feature \\?'(.+?)\\?':\] \[(.+?)\]"
                  r"(?: \[got\] \[(.*?)\])?(?=\s*\n|\s*$)" % BAD_RECORD_TAG, error_message)
    if m:
        reason = m.group(3) + (f" (got {m.group(4)})" if m.group(4) else "")
        return m.group(1), m.group(2), reason.replace("\\'", "'")
    m = re.search(r"Name: ([^,]+:\d+), Feature: (\S+) \(data type: (\w+)\) is required", error_message)
    if m:
        return m.group(1), m.group(2), f"required feature is missing (expected {m.group(3)})"
    m = re.search(r"Name: ([^,]+:\d+), Key: ([^,]+), Index: \d+\.\s+(.+?)(?: \[Op|\n|$)",
                  error_message)
    if m:
        return m.group(1), m.group(2), m.group(3).strip()
    return None


class BytesStore:
    """A bytes column of the catalog by item id, in a hash table: joined to records that carry
    item ids only (images: `ImageStore`; titles: COURIER + CLIP's page views)."""

    def __init__(self, item_ids: Sequence[int] | np.ndarray, values: Sequence[bytes]):
        ids = np.asarray(item_ids, np.int64)
        if len(np.unique(ids)) != len(ids):
            dup = ids[np.flatnonzero(np.bincount(np.unique(ids, return_inverse=True)[1]) > 1)[0]]
            raise ValueError(f"catalog has duplicate item_id {dup}")
        self.size = len(ids)
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(ids), tf.constant(list(values),
                                                                            tf.string)),
            default_value=b"")

    def lookup(self, item_ids: tf.Tensor) -> tf.Tensor:
        """The value of each id; b'' for an unknown id."""
        return self.table.lookup(item_ids)


class ImageStore(BytesStore):
    """Encoded catalog images by item id: the join of the compact layout.

    The production layout of paper 002 carries images inline in each record; the compact layout
    (the synthetic world's default) carries item ids only and joins the images here. The store
    keeps encoded bytes (a few KB per item) in a hash table, so it suits catalogs that fit in host
    memory; larger catalogs should use the inline layout.
    """


def is_image(encoded: tf.Tensor) -> tf.Tensor:
    """Whether each of `encoded` [N] starts as a JPEG, PNG, GIF or BMP does."""
    known = tf.zeros_like(encoded, tf.bool)
    for magic in _IMAGE_MAGIC:
        known |= tf.strings.substr(encoded, 0, len(magic)) == magic
    return known


def is_truncated(encoded: tf.Tensor) -> tf.Tensor:
    """Whether a PNG lacks its closing IEND chunk or a GIF its trailer byte: a file cut short,
    which the decoder would reject without naming the request row. (A JPEG may carry data after
    its end marker, such as a phone's motion photo, so its end is not checked.)"""
    n = tf.strings.length(encoded)
    png = tf.strings.substr(encoded, 0, 4) == b"\x89PNG"
    gif = tf.strings.substr(encoded, 0, 4) == b"GIF8"
    ones = tf.ones_like(n)  # substr takes positions and lengths of one shape
    png_end = tf.strings.substr(encoded, tf.maximum(n - 8, 0), 4 * ones) == b"IEND"
    gif_end = tf.strings.substr(encoded, tf.maximum(n - 1, 0), ones) == b"\x3b"
    return (png & ~png_end) | (gif & ~gif_end)


def checked_images(encoded: tf.Tensor, names: tf.Tensor, feature: str,
                   max_pixels: int) -> tf.Tensor:
    """`encoded` [N] once each is known to be an image (magic bytes), complete (`is_truncated`)
    and at most `max_pixels` (height x width, from its header): what a server checks before it
    decodes request images. A failure names the row and `feature`."""
    bad = ~is_image(encoded)
    checks = [fail_if(bad, names, feature, _NOT_AN_IMAGE,
                      tf.strings.substr(_first_bad_value(bad, encoded), 0, 8))]
    with tf.control_dependencies(checks):
        sizes = declared_image_sizes(encoded)
    too_big = sizes[:, 0] * sizes[:, 1] > max_pixels
    with tf.control_dependencies([fail_if(
            too_big, names, feature, f"is larger than max_image_pixels = {max_pixels} "
            "(height x width)", tf.boolean_mask(sizes, too_big)[:1])]):
        cut = is_truncated(encoded)
    with tf.control_dependencies([
            fail_if(cut, names, feature, "is not a complete image (cut short or corrupt)")]):
        return tf.identity(encoded)


def declared_image_sizes(encoded: tf.Tensor) -> tf.Tensor:
    """[N] encoded images -> [N, 2] int64 (height, width) as their headers declare them, without
    decoding: what decoding would allocate. 0 for bytes of no known format."""
    head = tf.io.decode_raw(tf.strings.substr(
        tf.strings.join([encoded, tf.constant(bytes(32))]), 0, 32), tf.uint8)
    b = tf.reshape(tf.cast(head, tf.int64), [-1, 32])  # [0, 32] for an empty request

    def big(i: int, n: int) -> tf.Tensor:
        return sum(b[:, i + k] * (256 ** (n - 1 - k)) for k in range(n))

    def little(i: int, n: int) -> tf.Tensor:
        return sum(b[:, i + k] * (256 ** k) for k in range(n))

    def is_(magic: bytes) -> tf.Tensor:
        return tf.strings.substr(encoded, 0, len(magic)) == magic

    def jpeg(x):
        return tf.cond(tf.strings.substr(x, 0, 3) == b"\xff\xd8\xff",
                       lambda: tf.cast(tf.image.extract_jpeg_shape(x)[:2], tf.int64),
                       lambda: tf.zeros([2], tf.int64))

    bmp_height = little(22, 4)
    bmp_height = tf.abs(tf.where(bmp_height >= 2 ** 31, bmp_height - 2 ** 32, bmp_height))
    sizes = tf.map_fn(jpeg, encoded, fn_output_signature=tf.TensorSpec([2], tf.int64))
    sizes = tf.where(is_(b"\x89PNG")[:, None], tf.stack([big(20, 4), big(16, 4)], 1), sizes)
    sizes = tf.where(is_(b"GIF8")[:, None], tf.stack([little(8, 2), little(6, 2)], 1), sizes)
    return tf.where(is_(b"BM")[:, None], tf.stack([bmp_height, little(18, 4)], 1), sizes)


def decode_images(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """[N] encoded JPEG/PNG/GIF/BMP -> [N, image_size, image_size, 3] float32 in [0, 1].

    Images are resized (antialiased bilinear) when their size differs from `image_size`.
    """
    def one(b):
        img = tf.io.decode_image(b, channels=3, expand_animations=False)
        img = tf.image.convert_image_dtype(img, tf.float32)
        same = tf.reduce_all(tf.equal(tf.shape(img)[:2], image_size))
        img = tf.cond(same, lambda: img,
                      lambda: tf.image.resize(img, [image_size, image_size], antialias=True))
        return tf.ensure_shape(img, [image_size, image_size, 3])

    # Decodes run 16 at a time in a graph (tf.data, tf.function); eagerly, map_fn runs one by one.
    return tf.map_fn(one, encoded, fn_output_signature=tf.TensorSpec(
        [image_size, image_size, 3], tf.float32),
        parallel_iterations=None if tf.executing_eagerly() else 16)


class RecordParser:
    """Parses a batch of serialized records of one kind into dense tensors.

    Output, per feature of the schema:
      scalar -> [B]; list -> [B, max_len] padded with `spec.pad`, plus `<name>_mask` [B, max_len];
      image -> [B, S, S, 3] float32 in [0, 1]; image list -> [B, max_len, S, S, 3] (zeros where
      masked by the mask of its id list). Joinable images absent from a record are looked up in
      `image_store` by item id.
    """

    def __init__(self, kind: schema.RecordKind, image_size: int = 64,
                 image_store: Optional[ImageStore] = None,
                 features: Optional[Iterable[str]] = None, decode: bool = True):
        self.kind = kind
        self.image_size = image_size
        self.image_store = image_store
        self.decode = decode
        names = list(features) if features is not None else kind.names
        for n in names:
            kind.feature(n)  # raises on an unknown name
        self.specs = [kind.feature(n) for n in names]

    def parse_spec(self) -> dict:
        spec = {}
        for f in self.specs:
            if f.is_list:
                spec[f.name] = tf.io.RaggedFeature(_TF[f.dtype])
            elif f.required:
                spec[f.name] = tf.io.FixedLenFeature([], _TF[f.dtype])
            else:
                spec[f.name] = tf.io.FixedLenFeature([], _TF[f.dtype], default_value=f.default)
        return spec

    def __call__(self, names: tf.Tensor, serialized: tf.Tensor) -> dict:
        return self.from_raw(names, tf.io.parse_example(serialized, self.parse_spec(),
                                                        example_names=names))

    def from_raw(self, names: tf.Tensor, raw: dict) -> dict:
        """Checks and densifies parsed values: scalars [B], lists as `tf.RaggedTensor` [B, None]
        (what `parse_example` gives; also how a serving signature passes raw request values)."""
        checks = []
        for f in self.specs:
            checks += self._check_values(f, raw[f.name], names)
        present = {f.name for f in self.specs}
        for f in self.specs:
            if f.same_length_as and f.same_length_as in present:
                a, b = raw[f.name].row_lengths(), raw[f.same_length_as].row_lengths()
                bad = tf.not_equal(a, b)
                if not f.required:  # an absent optional list is not a mismatch
                    bad &= a > 0
                checks.append(fail_if(bad, names, f.name,
                                      f"length differs from '{f.same_length_as}'"))
        with tf.control_dependencies(checks):
            out = {}
            for f in self.specs:
                if f.max_len is not None:  # a list
                    value = raw[f.name]
                    value = value[:, -f.max_len:] if f.keep == "tail" else value[:, :f.max_len]
                    out[f.name] = value.to_tensor(f.pad, shape=[None, f.max_len])
                    out[f.name + "_mask"] = tf.sequence_mask(value.row_lengths(), f.max_len)
                else:
                    out[f.name] = tf.identity(raw[f.name])
        if self.decode:
            for f in self.specs:
                if f.image:
                    out[f.name] = self._images(f, raw, out, names)
        return out

    def _check_values(self, f: schema.FeatureSpec, value, names) -> list:
        checks = []
        if f.is_list:
            lengths = value.row_lengths()
            if f.min_len:
                bad = lengths < f.min_len
                checks.append(fail_if(bad, names, f.name, f"needs at least {f.min_len} values",
                                      _first_bad_value(bad, lengths)))
            if f.keep == "reject":
                bad = lengths > f.max_len
                checks.append(fail_if(bad, names, f.name, f"holds more than {f.max_len} values",
                                      _first_bad_value(bad, lengths)))
            flat, rows = value.values, value.value_rowids()
            batch = tf.shape(names, out_type=tf.int64)[0]

            def per_row(bad_values):  # any bad value in the row
                return tf.math.unsorted_segment_max(tf.cast(bad_values, tf.int32), rows, batch) > 0
        else:
            flat = value

            def per_row(bad_values):
                return bad_values

        if f.dtype == schema.FLOAT:
            bad = ~tf.math.is_finite(flat)
            checks.append(fail_if(per_row(bad), names, f.name, "is not finite",
                                  _first_bad_value(bad, flat)))
        if f.min_value is not None or f.max_value is not None:
            lo = -np.inf if f.min_value is None else f.min_value
            hi = np.inf if f.max_value is None else f.max_value
            as_float = tf.cast(flat, tf.float64)
            bad = (as_float < lo) | (as_float > hi)
            span = (f"must be >= {f.min_value}" if f.max_value is None
                    else f"must be between {f.min_value} and {f.max_value}")
            checks.append(fail_if(per_row(bad), names, f.name, span, _first_bad_value(bad, flat)))
        if f.image:
            bad = ~is_image(flat)
            if not f.required and not f.is_list:  # the default b'' means absent: joined later
                bad &= flat != b""
            checks.append(fail_if(per_row(bad), names, f.name, _NOT_AN_IMAGE,
                                  tf.strings.substr(_first_bad_value(bad, flat), 0, 8)))
        return checks

    def _images(self, f: schema.FeatureSpec, raw: dict, out: dict, names) -> tf.Tensor:
        size = self.image_size
        id_name = self.kind.joinable_images.get(f.name)
        if not f.is_list:
            encoded = out[f.name]
            if id_name:
                encoded = self._join(f, encoded == b"", out[id_name][:, None], encoded[:, None],
                                     names)[:, 0]
            return decode_images(encoded, size)
        # A list of images: inline where the record has them, else joined by the id list.
        inline_rows = raw[f.name].row_lengths() > 0
        dense = out[f.name]
        mask = out.pop(f.name + "_mask")  # an image list shares the mask of its id list
        if id_name:
            mask = out[id_name + "_mask"]
            dense = self._join(f, ~inline_rows, out[id_name], dense, names)
        where = tf.where(mask)
        pixels = decode_images(tf.gather_nd(dense, where), size)
        shape = tf.concat([tf.shape(mask, out_type=tf.int64), [size, size, 3]], 0)
        return tf.scatter_nd(where, pixels, shape)

    def _join(self, f, needs_join, ids, inline, names) -> tf.Tensor:
        """Fills the rows that need a join with catalog images of `ids`; checks they exist."""
        if self.image_store is None:
            with tf.control_dependencies([fail_if(
                    needs_join, names, f.name,
                    "is absent and no catalog was given to join images from")]):
                return tf.identity(inline)
        joined = self.image_store.lookup(ids)
        missing = needs_join[:, None] & (ids != -1) & (joined == b"")
        check = fail_if(tf.reduce_any(missing, 1), names, f.name,
                        "needs a catalog image of an item id the catalog lacks",
                        _first_bad_value(missing, ids))
        with tf.control_dependencies([check]):
            return tf.where(needs_join[:, None], joined, inline)

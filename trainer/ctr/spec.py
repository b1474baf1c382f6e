"""The declared CTR feature spec: which columns a `ctr` record holds, how the CTR model uses each.

A spec is a YAML or JSON file. The CTR model (`trainer.ctr`), the checks applied to `ctr` records,
the vocabularies, the exported serving signature and its warmup requests are all derived from it;
no other code names a CTR feature. It is copied into every CTR model dir and export, so a model is
served with the features it was trained with. Built-in specs (`trainer/ctr/specs/`):
`synthetic` (the synthetic marketplace's visual-search setting, paper 000 §3.2) and `feed`
(paper 002's feed: no query photo, no demographics, no preferred categories).

    name: feed
    label: label                  # the click label column: int64, 0 or 1
    group: page_id                # the page-view column that GAUC groups by
    item: item_id                 # the displayed item's id column (impression slices, D, SimScore)
    features:
      - {name: user_id, kind: categorical}
      - {name: price, kind: numeric, transform: bucketize, buckets: 16}
      - {name: click_history_item_ids, kind: sequence, max_length: 20, order: oldest_first,
         pooling: attention, shared_table: item_id}
      - {name: item_image, kind: image, ids: item_id, table: items}

Every feature may say its `scope`: `request` (one value per ranking request: the user, the page,
the query photo) or `candidate` (one per candidate item, the default, except for a `queries`
image). Only serving reads it: the `rank` signature (`export.ctr`) takes request features once per
page and candidate features once per candidate.

Kinds, and the keys each takes besides `name`, `kind`, `required` (default true), `doc` and
`scope`:

  categorical  an int64 id, looked up in a vocabulary built from the training data (ids seen
               fewer than `min_count` times and unseen ids share an out-of-vocabulary row) or
               hashed (`hash_bins`), then embedded: `embedding_dim` (default: the model's),
               `hash_bins`, `shared_table` (use another id feature's lookup and embedding),
               `default` (the id of an absent optional value; -1, unknown, if unset).
  numeric      float32 values: `transform` bucketize (quantile boundaries of the training data,
               `buckets` of them, then embedded) or normalize (standardised by the training
               data's mean and spread; `log` takes log(1 + x) first), `length` (values per record,
               default 1), `min_value`, `max_value`, `default`.
  sequence     an int64 id list: `max_length`, `order` (oldest_first: the list is in time order and
               its latest `max_length` values are kept; newest_first and ranked: the first are
               kept), `pooling` (mean: the masked mean of its embeddings; attention: self-attention,
               then the model's `history_pooling`, paper 002 App. A), `embedding_dim`,
               `hash_bins`, `shared_table`.
  image        which id maps to image vectors: `ids` (a categorical or sequence feature, or an
               int64 id column that is no other feature: a key only, e.g. the query photo's id)
               and `table` (items: the catalog's image vectors; queries: the query photos'). The
               image of `item` is the displayed item's, v_p; how images enter the model is the
               model's `image_feature_mode` (paper 002 App. B). `layout`: where training reads
               the feature's table entries: `table` (default: looked up in the model's frozen
               image table, a variable the parameter-server strategy shards) or `joined` (from
               the records' `joined_column`, written by the Beam join pipeline: the trainer holds
               no image table, so it does not grow with the catalog). Serving looks ids up in the
               table either way, or encodes the request's images.

A record's other columns are ignored. A required feature missing from a record is a bad record,
named with its file, index and feature (`trainer.data.validate`); `check_files` says so before a
job starts when the files lack it altogether.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any

import tensorflow as tf
import yaml
from tensorflow.core.example import example_pb2

from trainer import configs
from trainer.data import schema

SPECS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "specs")
DEFAULT = "synthetic"
FILE = "feature_spec.yaml"  # its name in a model dir and in an export's assets.extra
KINDS = ("categorical", "numeric", "sequence", "image")
_COMMON = {"name", "kind", "required", "doc", "scope"}
KEYS = {
    "categorical": _COMMON | {"embedding_dim", "hash_bins", "shared_table", "default"},
    "numeric": _COMMON | {"transform", "buckets", "log", "length", "min_value", "max_value",
                          "default"},
    "sequence": _COMMON | {"max_length", "order", "pooling", "embedding_dim", "hash_bins",
                           "shared_table"},
    "image": _COMMON | {"ids", "table", "layout"},
}
ORDERS = ("oldest_first", "newest_first", "ranked")
POOLINGS = ("mean", "attention")
TRANSFORMS = ("bucketize", "normalize")
TABLES = ("items", "queries")
LAYOUTS = ("table", "joined")
SCOPES = ("request", "candidate")


def joined_column(image_feature: str, mode: str) -> str:
    """The column of `ctr` records that carries an image feature's table entry, as the join
    pipeline (`trainer.pipelines.join`) writes it: `<feature>_vector` (the vector the Vector or
    SimScore table holds; zeros for an unknown or padding id) or `<feature>_cluster_id` (cluster
    id + 1; 0 for an unknown or padding id). A sequence's entries are concatenated in its
    order, `max_length` of them."""
    return f"{image_feature}_cluster_id" if mode == "cluster_id" else f"{image_feature}_vector"


class SpecError(ValueError):
    """A spec that cannot be used; the message names the file and the feature or key."""


@dataclasses.dataclass(frozen=True)
class CtrFeature:
    """One declared feature (the module docstring lists which keys each kind takes)."""

    name: str
    kind: str
    required: bool = True
    doc: str = ""
    embedding_dim: int = 0
    hash_bins: int = 0
    shared_table: str = ""
    default: float | None = None
    transform: str = "bucketize"
    buckets: int = 16
    log: bool = False
    length: int = 1
    min_value: float | None = None
    max_value: float | None = None
    max_length: int = 0
    order: str = "oldest_first"
    pooling: str = "mean"
    ids: str = ""
    table: str = "items"
    layout: str = "table"
    scope: str = ""  # "" = the derived default (`CtrSpec.scope`)

    @property
    def is_id(self) -> bool:
        """An embedded id (categorical or sequence)."""
        return self.kind in ("categorical", "sequence")

    @property
    def table_name(self) -> str:
        """The lookup and embedding table of an id feature: its own, or the shared one."""
        return self.shared_table or self.name


@dataclasses.dataclass(frozen=True)
class CtrSpec:
    """A parsed, checked spec. `source` is the file it came from (for error messages)."""

    name: str
    label: str
    group: str
    item: str
    features: tuple[CtrFeature, ...]
    doc: str = ""
    source: str = ""

    def feature(self, name: str) -> CtrFeature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"{self.source}: the spec has no feature '{name}'")

    def of_kind(self, kind: str) -> list[CtrFeature]:
        return [f for f in self.features if f.kind == kind]

    @property
    def inputs(self) -> list[str]:
        """The input columns, in spec order: every non-image feature, and each image feature's
        `ids` that is no other feature. The serving signature's inputs are exactly these."""
        names = [f.name for f in self.features if f.kind != "image"]
        for f in self.of_kind("image"):
            if f.ids not in names:
                names.append(f.ids)
        return names

    @property
    def tables(self) -> list[CtrFeature]:
        """The id features that own a lookup table (the others share one of these)."""
        return [f for f in self.features if f.is_id and not f.shared_table]

    def sharing(self, table: str) -> list[CtrFeature]:
        """The id features looked up in `table` (its owner first)."""
        return [f for f in self.features if f.is_id and f.table_name == table]

    def image_of(self, column: str) -> CtrFeature | None:
        """The image feature keyed by `column`, if any."""
        return next((f for f in self.of_kind("image") if f.ids == column), None)

    @property
    def target_image(self) -> CtrFeature | None:
        """The displayed item's image feature (v_p), if the spec has one."""
        f = self.image_of(self.item)
        return f if f is not None and f.table == "items" else None

    def scope(self, column: str) -> str:
        """'request' (one value per ranking request: the user, the page, the query photo) or
        'candidate' (one value per candidate item) of an input column or image feature: what
        the `rank` serving signature takes once per page or once per candidate. Declared with
        `scope`; by default 'candidate' (a request value repeated on every candidate is always
        right, only larger), except a `queries` image (the request's photo). An image feature
        keyed by a feature has that feature's scope; a key-only column its image feature's."""
        declared = {f.name: f for f in self.features}
        f = declared.get(column)
        if f is None:
            image = self.image_of(column)
            if image is None:
                raise KeyError(f"{self.source}: the spec has no input column '{column}'")
            return self.scope(image.name)
        if f.kind == "image":
            if f.ids in declared:
                return self.scope(f.ids)
            return f.scope or ("request" if f.table == "queries" else "candidate")
        return f.scope or "candidate"

    @property
    def photos(self) -> list[CtrFeature]:
        """The image features of the request's photos (`queries` table): the `rank` signature
        takes their encoded images instead of looking their ids up."""
        return [f for f in self.of_kind("image") if f.table == "queries"]

    @property
    def photo_keys(self) -> set[str]:
        """The id columns that are only keys of a photo (no feature of their own): the `rank`
        signature takes the photo instead."""
        return {f.ids for f in self.photos} - {f.name for f in self.features}

    def training_dict(self) -> dict:
        """`to_dict` without what only serving reads (`scope`): two specs with equal training
        dicts train the same model."""
        d = self.to_dict()
        d["features"] = [{k: v for k, v in f.items() if k != "scope"} for f in d["features"]]
        return d

    def is_sequence(self, column: str) -> bool:
        return any(f.name == column and f.kind == "sequence" for f in self.features)

    def with_hash_bins(self, bins: dict) -> CtrSpec:
        """The spec with these id features hashed into this many bins instead."""
        for name in bins:
            f = self.feature(name) if name in {x.name for x in self.features} else None
            if f is None or not f.is_id or f.shared_table:
                owners = [x.name for x in self.tables]
                raise SpecError(f"{self.source}: hash_bins: '{name}' is not an id feature that "
                                f"owns its table (those are: {', '.join(owners)})")
        return dataclasses.replace(self, features=tuple(
            dataclasses.replace(f, hash_bins=int(bins[f.name])) if f.name in bins else f
            for f in self.features))

    @property
    def joined(self) -> list[CtrFeature]:
        """The image features training reads from joined columns (`layout: joined`)."""
        return [f for f in self.of_kind("image") if f.layout == "joined"]

    def joined_columns(self, mode: str, dim: int) -> list[schema.FeatureSpec]:
        """The columns of the `joined` image features in records of the join pipeline, for the
        model's `image_feature_mode` and image dimension: a vector (a sequence's, all of its
        `max_length` entries in its order) or cluster id(s) + 1."""
        out = []
        for f in self.joined:
            length = self.feature(f.ids).max_length if self.is_sequence(f.ids) else 0
            column = joined_column(f.name, mode)
            doc = f"'{f.name}' as the join pipeline writes it (`trainer.pipelines.join`)."
            if mode == "cluster_id":
                out.append(schema.FeatureSpec(column, schema.INT64, doc, min_value=0,
                                              max_len=length or None, min_len=length,
                                              keep="reject" if length else "head"))
            else:
                n = dim * max(length, 1)
                out.append(schema.FeatureSpec(column, schema.FLOAT, doc, max_len=n, min_len=n,
                                              keep="reject"))
        return out

    def record_kind(self, serving: bool = False, joined: tuple[str, int] | None = None
                    ) -> schema.RecordKind:
        """The `ctr` record kind this spec reads: the label and group columns (training and
        evaluation; not `serving`) and the input columns; with `joined` (image_feature_mode,
        image dimension), also the joined image columns training reads."""
        specs = []
        if not serving:
            specs += [schema.FeatureSpec(self.label, schema.INT64, "1 if the displayed item was "
                                         "clicked, else 0.", min_value=0, max_value=1),
                      schema.FeatureSpec(self.group, schema.INT64, "Page view (request) id; "
                                         "GAUC groups by it.", min_value=0)]
        for name in self.inputs:
            specs.append(self._column(name))
        if joined is not None:
            specs += self.joined_columns(*joined)
        doc = (f"One displayed item with its click label (paper 000 §3.2; paper 002 App. A), as "
               f"the feature spec '{self.name}' declares it"
               + (f": {self.doc.strip().rstrip('.')}" if self.doc.strip() else ""))
        return schema.RecordKind(name="ctr", doc=doc + ".", features=specs)

    def _column(self, name: str) -> schema.FeatureSpec:
        declared = {f.name: f for f in self.features if f.kind != "image"}
        if name not in declared:  # an image feature's key column
            image = self.image_of(name)
            assert image is not None
            return schema.FeatureSpec(name, schema.INT64, image.doc or f"Id of the {image.table} "
                                      "image vector.", required=image.required, min_value=0)
        f = declared[name]
        if f.kind == "categorical":
            default = None if f.required else int(-1 if f.default is None else f.default)
            return schema.FeatureSpec(name, schema.INT64, f.doc or "Id.", required=f.required,
                                      default=default,
                                      min_value=-1 if default == -1 else 0)
        if f.kind == "sequence":
            return schema.FeatureSpec(name, schema.INT64, f.doc or "Id list.",
                                      max_len=f.max_length,
                                      keep="tail" if f.order == "oldest_first" else "head",
                                      required=f.required, min_value=0)
        # numeric
        if f.length > 1:
            return schema.FeatureSpec(name, schema.FLOAT, f.doc or "Values.", max_len=f.length,
                                      min_len=f.length if f.required else 0, keep="reject",
                                      required=f.required, min_value=f.min_value,
                                      max_value=f.max_value)
        value = None if f.required else float(0.0 if f.default is None else f.default)
        return schema.FeatureSpec(name, schema.FLOAT, f.doc or "Value.", required=f.required,
                                  default=value, min_value=f.min_value, max_value=f.max_value)

    def to_dict(self) -> dict:
        fields = {f.name: f for f in dataclasses.fields(CtrFeature)}
        out: dict[str, Any] = {"name": self.name}
        if self.doc:
            out["doc"] = self.doc
        out.update(label=self.label, group=self.group, item=self.item, features=[])
        for feat in self.features:
            d = {"name": feat.name, "kind": feat.kind}
            for key in sorted(KEYS[feat.kind] - {"name", "kind"}):
                value = getattr(feat, key)
                if value != fields[key].default:
                    d[key] = value
            out["features"].append(d)
        return out

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=100)

    def save(self, path: str) -> None:
        tf.io.gfile.makedirs(os.path.dirname(path) or ".")
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(self.dump())

    def check_files(self, files: list[str], records: int = 64) -> None:
        """Raises `SpecError` naming the feature, the file and the record kind when a required
        input column is absent from all of the first `records` records of a file: the files
        were written for another spec."""
        kind = self.record_kind()
        for path in files[:1]:
            seen = _columns(path, records)
            if not seen:
                return
            missing = [f.name for f in kind.features if f.required and f.name not in seen]
            if missing:
                raise SpecError(
                    f"{path}: the '{kind.name}' records lack the feature(s) {missing} that the "
                    f"feature spec {self.source or self.name} requires (their columns: "
                    f"{sorted(seen)}); use the spec the records were written for, or declare "
                    "those features `required: false`")

    def carries_joined(self, files: list[str], mode: str, records: int = 64) -> bool:
        """Whether records hold the `joined` image features' columns for `mode` (the join
        pipeline's output) or none of them (raw records); raises `SpecError` naming the file
        when they hold some only."""
        columns = [joined_column(f.name, mode) for f in self.joined]
        seen = _columns(files[0], records) if files and columns else set()
        held = [c for c in columns if c in seen]
        if held and len(held) < len(columns):
            raise SpecError(f"{files[0]}: the records hold the joined columns {held} but not "
                            f"{sorted(set(columns) - set(held))}: join them with the spec "
                            f"{self.source or self.name} (trainer.pipelines.join)")
        return bool(held)


def _columns(path: str, records: int) -> set:
    """The columns of the first `records` records of a TFRecord file (empty when it has none or
    cannot be read: the input pipeline names that)."""
    seen: set = set()
    compression = "GZIP" if path.endswith(".gz") else ""
    try:
        for raw in tf.data.TFRecordDataset(path, compression).take(records):
            example = example_pb2.Example()
            try:
                example.ParseFromString(raw.numpy())
            except Exception:  # noqa: BLE001  (protobuf's DecodeError) named later
                return seen
            seen |= set(example.features.feature)
    except tf.errors.OpError:  # a corrupt frame
        pass
    return seen


def load(name_or_path: str) -> CtrSpec:
    """A built-in spec by name, or a spec file."""
    path = name_or_path
    if not os.path.splitext(path)[1] and not tf.io.gfile.exists(path):
        path = os.path.join(SPECS_DIR, f"{name_or_path}.yaml")
        if not os.path.exists(path):
            known = sorted(os.path.splitext(f)[0] for f in os.listdir(SPECS_DIR))
            raise SpecError(f"no feature spec '{name_or_path}': neither a file nor a built-in "
                            f"spec ({', '.join(known)})")
    try:
        return parse(configs.read_file(path, "feature spec"), path)
    except configs.ConfigError as e:  # not YAML, or not a mapping
        raise SpecError(str(e)) from None


def record_kind(kind: str, spec: str | None = None) -> schema.RecordKind:
    """A record kind by name: `ctr` as the spec `spec` (a built-in name or a file; default:
    DEFAULT) declares it, the others as `schema` fixes them."""
    return load(spec or DEFAULT).record_kind() if kind == "ctr" else schema.get(kind)


def parse(d: Any, source: str = "<spec>") -> CtrSpec:
    """Checks a spec given as a mapping; errors name `source` and the feature or key."""
    if not isinstance(d, dict):
        raise SpecError(f"{source}: a feature spec is a mapping with 'features'")
    top = {"name", "doc", "label", "group", "item", "features"}
    unknown = set(d) - top
    if unknown:
        raise SpecError(f"{source}: unknown key(s) {sorted(unknown)}; a spec has "
                        f"{', '.join(sorted(top))}")
    for key in ("label", "group", "item", "features"):
        if key not in d:
            raise SpecError(f"{source}: '{key}' is missing")
    if not isinstance(d["features"], list) or not d["features"]:
        raise SpecError(f"{source}: 'features' must be a non-empty list")
    features = tuple(_feature(x, i, source) for i, x in enumerate(d["features"]))
    spec = CtrSpec(name=str(d.get("name") or os.path.splitext(os.path.basename(source))[0]),
                   label=_str(d["label"], "label", source), group=_str(d["group"], "group", source),
                   item=_str(d["item"], "item", source), features=features,
                   doc=str(d.get("doc", "")), source=source)
    _check(spec)
    return spec


def _str(v: Any, key: str, source: str) -> str:
    if not isinstance(v, str) or not v:
        raise SpecError(f"{source}: '{key}' must be a column name, got {v!r}")
    return v


def _feature(x: Any, i: int, source: str) -> CtrFeature:
    if not isinstance(x, dict) or "name" not in x:
        raise SpecError(f"{source}: features[{i}] must be a mapping with a 'name'")
    name = x["name"]
    where = f"{source}: feature '{name}'"
    kind = x.get("kind")
    if kind not in KINDS:
        raise SpecError(f"{where}: unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
    unknown = set(x) - KEYS[kind]
    if unknown:
        raise SpecError(f"{where} ({kind}): unknown key(s) {sorted(unknown)}; it takes "
                        f"{', '.join(sorted(KEYS[kind]))}")
    hints = typing.get_type_hints(CtrFeature)
    values = {}
    for key, value in x.items():
        want = hints[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = (isinstance(value, bool) if want is bool
              else isinstance(value, int) and not isinstance(value, bool) if want is int
              else isinstance(value, str) if want is str
              else value is None or number)  # an optional number
        if not ok:
            kind = want.__name__ if want in (bool, int, str) else "a number or null"
            raise SpecError(f"{where}: '{key}' must be {kind}, got {value!r}")
        values[key] = value
    return CtrFeature(**values)


def _check(spec: CtrSpec) -> None:
    src = spec.source
    names = [f.name for f in spec.features]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecError(f"{src}: feature(s) {dup} declared twice")
    for col in (spec.label, spec.group):
        if col in names:
            raise SpecError(f"{src}: '{col}' is the label or group column, not a feature")
    by_name = {f.name: f for f in spec.features}
    for f in spec.features:
        where = f"{src}: feature '{f.name}'"
        if f.kind in ("categorical", "sequence"):
            if f.embedding_dim < 0 or f.hash_bins < 0:
                raise SpecError(f"{where}: embedding_dim and hash_bins must be >= 0")
            if f.shared_table:
                owner = by_name.get(f.shared_table)
                if owner is None or not owner.is_id or owner.shared_table:
                    raise SpecError(f"{where}: shared_table '{f.shared_table}' is not an id "
                                    "feature with a table of its own")
                if f.hash_bins or f.embedding_dim:
                    raise SpecError(f"{where}: a feature with a shared_table takes its "
                                    "hashing and embedding size from the table's owner")
        if f.kind == "sequence":
            if f.max_length < 1:
                raise SpecError(f"{where}: max_length must be at least 1")
            if f.order not in ORDERS:
                raise SpecError(f"{where}: order must be one of {', '.join(ORDERS)}")
            if f.pooling not in POOLINGS:
                raise SpecError(f"{where}: pooling must be one of {', '.join(POOLINGS)}")
        if f.kind == "numeric":
            if f.transform not in TRANSFORMS:
                raise SpecError(f"{where}: transform must be one of {', '.join(TRANSFORMS)}")
            if f.transform == "bucketize" and (f.buckets < 2 or f.length != 1):
                raise SpecError(f"{where}: bucketize needs buckets >= 2 and length 1")
            if f.length < 1:
                raise SpecError(f"{where}: length must be at least 1")
        if f.kind == "image":
            if f.table not in TABLES:
                raise SpecError(f"{where}: table must be one of {', '.join(TABLES)}")
            if f.layout not in LAYOUTS:
                raise SpecError(f"{where}: layout must be one of {', '.join(LAYOUTS)}")
            if not f.ids:
                raise SpecError(f"{where}: 'ids' names the id column its vectors are looked up by")
            source = by_name.get(f.ids)
            if source is not None and not source.is_id:
                raise SpecError(f"{where}: ids '{f.ids}' is a {source.kind} feature, not an id")
            if f.ids in (spec.label, spec.group):
                raise SpecError(f"{where}: ids '{f.ids}' is the label or group column")
    for f in spec.features:
        if f.scope and f.scope not in SCOPES:
            raise SpecError(f"{src}: feature '{f.name}': scope must be one of "
                            f"{', '.join(SCOPES)}, got {f.scope!r}")
        if f.kind == "image" and f.scope and f.ids in by_name and \
                spec.scope(f.ids) != f.scope:
            raise SpecError(f"{src}: feature '{f.name}': scope '{f.scope}' differs from that of "
                            f"its ids '{f.ids}' ({spec.scope(f.ids)})")
        if f.kind == "image" and f.table == "queries" and spec.scope(f.name) != "request":
            raise SpecError(f"{src}: feature '{f.name}': a queries image is the request's "
                            "photo; its scope must be 'request'")
    images = [f.ids for f in spec.of_kind("image")]
    dup = sorted({n for n in images if images.count(n) > 1})
    if dup:
        raise SpecError(f"{src}: more than one image feature keyed by {dup}")
    if spec.item not in spec.inputs:
        raise SpecError(f"{src}: item '{spec.item}' is not an input column of the spec")
    item = by_name.get(spec.item)
    if item is not None and item.kind != "categorical" and item.kind != "image":
        raise SpecError(f"{src}: item '{spec.item}' must be a categorical id, not {item.kind}")
    if spec.scope(spec.item) != "candidate":
        raise SpecError(f"{src}: item '{spec.item}' is the candidate; its scope must be "
                        "'candidate'")

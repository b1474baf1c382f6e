"""TFRecord (`tf.train.Example`) schemas: one per record kind, the single source of truth.

The generator writes these records, the input pipeline parses them, the validator checks them,
and `docs/data_format.md` is rendered from them (a test keeps the document in sync). Users who
bring their own data write the same records (see `scripts/convert_parquet.py`).

Record kinds and the papers' data they stand for:
- `catalog`: item images and metadata (paper 000 §3, §4.1; impressions define low-impression items).
- `queries`: visual-search query images, joined into CTR samples by `query_id` (paper 000 §3.2).
- `search_sessions`: (query image, clicked item) pairs for S2 (paper 000 Eq. 2).
- `pageviews`: COURIER samples (paper 002 §3.1, §4.2.1): a page of `l_pv` items with click labels and
  the user's latest `l_click` clicks in click-time order (oldest first, latest last).
- `ctr`: one displayed item with its click label (paper 000 §3.2, paper 002 Appendix A); its
  columns are declared by a CTR feature spec (`trainer.ctr.spec`).
- `judgments`: visual-search relevance judgments (paper 000 §4.1).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

INT64 = "int64"
FLOAT = "float32"
BYTES = "bytes"


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One feature of a `tf.train.Example`.

    Attributes:
      name: Feature key in the Example.
      dtype: One of `int64`, `float32`, `bytes`.
      doc: What the value means.
      max_len: None for a scalar (exactly one value). Otherwise the feature is a list of at most
        `max_len` values after truncation (longer lists are truncated, see `keep`), padded to
        `max_len` in the batch with `pad` and accompanied by a boolean `<name>_mask`.
      min_len: Fewest values a list feature may hold (0: may be empty or absent).
      keep: Which end of an over-long list to keep: `head` (first values) or `tail` (latest
        values); `reject` makes an over-long list a bad record (where truncation would bias
        results, e.g. relevance judgments).
      required: A missing required feature is a bad record; an optional one gets `default`.
      default: Value of an absent optional scalar.
      image: Encoded JPEG/PNG bytes, decoded by the pipeline.
      min_value / max_value: Inclusive bounds checked on every value (None: unchecked).
      same_length_as: Name of a list feature this list must match in length.
    """

    name: str
    dtype: str
    doc: str
    max_len: Optional[int] = None
    min_len: int = 0
    keep: str = "head"
    required: bool = True
    default: object = None
    image: bool = False
    min_value: Optional[float] = None
    max_value: Optional[float] = None
    same_length_as: Optional[str] = None

    @property
    def is_list(self) -> bool:
        return self.max_len is not None

    @property
    def pad(self):
        """Padding of list features in batches: -1 for ids/labels, 0.0 for floats, b'' for bytes."""
        return {INT64: -1, FLOAT: 0.0, BYTES: b""}[self.dtype]


@dataclasses.dataclass(frozen=True)
class RecordKind:
    """A record kind: its features and where its files live under a data directory."""

    name: str
    doc: str
    features: Sequence[FeatureSpec]
    # Image features that, when absent from the record, are joined from the catalog by item id:
    # image feature name -> id feature name (the compact layout).
    joinable_images: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def feature(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"record kind '{self.name}' has no feature '{name}'")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]


# Paper 002 §4.2.1: l_pv = l_click = 5 in all of its experiments.
L_PV = 5
L_CLICK = 5
# Latest clicks the synthetic world keeps per user (a spec's click history may use up to these).
L_CTR_HISTORY = 20


def _id(name: str, doc: str, **kw) -> FeatureSpec:
    return FeatureSpec(name, INT64, doc, min_value=0, **kw)


CATALOG = RecordKind(
    name="catalog",
    doc="One item of the catalog: its image and metadata.",
    features=[
        _id("item_id", "Item id (any non-negative int64; need not be dense)."),
        FeatureSpec("image", BYTES, "The item's cover image, encoded JPEG or PNG.", image=True),
        _id("category_id", "Leaf category id."),
        _id("shop_id", "Shop (seller) id."),
        _id("brand_id", "Brand id."),
        FeatureSpec("price", FLOAT, "Price in currency units.", min_value=0.0),
        _id("impressions_30d", "Times the item was displayed in the last 30 days (paper 000 §4.1: "
            "'low impression' means fewer than 5)."),
        FeatureSpec("bid", FLOAT, "The advertiser's bid per click, in currency units (optional: "
                    "only the served search request reads it, ranking its ads by pCTR x bid; "
                    "absent means 1.0, ranking by pCTR alone).", required=False, default=1.0,
                    min_value=0.0),
        FeatureSpec("title", BYTES, "The item's title, UTF-8 text (optional: only the CLIP-style "
                    "stages read it, paper 002 Tables 5 and 8; absent means empty).",
                    required=False, default=b""),
    ],
)

QUERIES = RecordKind(
    name="queries",
    doc="A visual-search query image (a user's photo), referenced by `ctr.query_id`.",
    features=[
        _id("query_id", "Query id."),
        FeatureSpec("image", BYTES, "The query image, encoded JPEG or PNG.", image=True),
        _id("category_id", "Category the query was issued in (the search's category filter)."),
    ],
)

SEARCH_SESSIONS = RecordKind(
    name="search_sessions",
    doc="A visual-search click for S2 (paper 000 Eq. 2): the query image and one clicked item.",
    features=[
        _id("query_id", "Query id."),
        FeatureSpec("query_image", BYTES, "The query image, encoded JPEG or PNG.", image=True),
        _id("clicked_item_id", "The clicked item (S2's positive)."),
        _id("clicked_category_id", "Category of the clicked item (S2's negative pool)."),
        FeatureSpec("clicked_image", BYTES, "Clicked item's image; joined from the catalog by "
                    "`clicked_item_id` when absent.", image=True, required=False, default=b""),
        _id("day", "Day index of the session.", required=False, default=0),
    ],
    joinable_images={"clicked_image": "clicked_item_id"},
)

PAGEVIEWS = RecordKind(
    name="pageviews",
    doc=("A COURIER sample (paper 002 §3.1): one page view of up to l_pv items with click labels "
         "(clicked items listed first, §4.2.1) and the user's latest l_click clicks before the page "
         "view, oldest first. Images travel inline (production layout, up to 10 images per record) "
         "or are joined from the catalog by item id (compact layout) when `pv_images` / "
         "`click_images` are absent."),
    features=[
        _id("user_id", "User id."),
        _id("pv_item_ids", "Items shown on the page.", max_len=L_PV, min_len=1),
        FeatureSpec("pv_labels", INT64, "Click label of each page item (1 clicked, 0 not).",
                    max_len=L_PV, min_len=1, min_value=0, max_value=1,
                    same_length_as="pv_item_ids"),
        _id("click_item_ids", "The user's click history, oldest first, latest last.",
            max_len=L_CLICK, keep="tail"),
        FeatureSpec("pv_images", BYTES, "Inline images of the page items (optional).",
                    max_len=L_PV, image=True, required=False, same_length_as="pv_item_ids"),
        FeatureSpec("click_images", BYTES, "Inline images of the click history (optional).",
                    max_len=L_CLICK, keep="tail", image=True, required=False,
                    same_length_as="click_item_ids"),
        _id("day", "Day index of the page view.", required=False, default=0),
    ],
    joinable_images={"pv_images": "pv_item_ids", "click_images": "click_item_ids"},
)

JUDGMENTS = RecordKind(
    name="judgments",
    doc="Visual-search relevance judgments (paper 000 §4.1): relevant catalog items per query item.",
    features=[
        _id("query_item_id", "The catalog item used as the query image."),
        _id("relevant_item_ids", "Catalog items judged relevant (same category, same style).",
            max_len=4096, min_len=1, keep="reject"),
    ],
)

# The id of the record kinds that are one image each (what an embedding table is keyed by).
IMAGE_ID = {"catalog": "item_id", "queries": "query_id"}

FIXED_KINDS: dict[str, RecordKind] = {k.name: k for k in
                                      (CATALOG, QUERIES, SEARCH_SESSIONS, PAGEVIEWS, JUDGMENTS)}
# Every record kind's name. `ctr` records are declared by a feature spec (`trainer.ctr.spec`):
# which columns they hold is the data set's, not this module's.
KIND_NAMES = ("catalog", "queries", "search_sessions", "pageviews", "ctr", "judgments")


def get(kind: str | RecordKind) -> RecordKind:
    """A record kind by name, or the given kind itself (e.g. a feature spec's `ctr` kind). `ctr`
    has no kind of its own here: its columns are a feature spec's, and the data layer takes the
    spec's `RecordKind` from the caller (`trainer.ctr.spec.record_kind('ctr', SPEC)`)."""
    if isinstance(kind, RecordKind):
        return kind
    if kind in FIXED_KINDS:
        return FIXED_KINDS[kind]
    if kind == "ctr":
        raise ValueError("`ctr` records are declared by a CTR feature spec: pass its record "
                         "kind, trainer.ctr.spec.record_kind('ctr', SPEC)")
    raise ValueError(f"unknown record kind '{kind}'; known: {', '.join(KIND_NAMES)}")

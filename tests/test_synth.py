"""The synthetic marketplace: determinism, manifest, and the planted mechanisms (world.md)."""
import filecmp
import glob
import os
import re

import numpy as np
import pytest

from conftest import REPO, generate_tiny, raw_records, read_all
from trainer.data import records
from trainer.synth import config, marketplace, truth


def two_proportion_z(a: np.ndarray, b: np.ndarray) -> float:
    """z statistic of mean(a) > mean(b) for boolean samples a, b."""
    p = np.concatenate([a, b]).mean()
    se = np.sqrt(p * (1 - p) * (1 / len(a) + 1 / len(b)))
    return float((a.mean() - b.mean()) / se)


def _all_files(d):
    return sorted(os.path.relpath(p, d) for p in glob.glob(os.path.join(d, "**", "*"),
                                                            recursive=True) if os.path.isfile(p))


def test_same_seed_same_bytes_regardless_of_workers(tiny_world, tmp_path):
    other = str(tmp_path / "again")
    generate_tiny(other, seed=0, workers=2)
    files = _all_files(tiny_world)
    assert files == _all_files(other)
    _, mismatch, errors = filecmp.cmpfiles(tiny_world, other, files, shallow=False)
    assert not mismatch and not errors


def test_different_seed_different_world(tiny_world, tmp_path):
    other = str(tmp_path / "seed1")
    generate_tiny(other, seed=1)
    assert raw_records(records.default_pattern(other, "catalog")) != \
        raw_records(records.default_pattern(tiny_world, "catalog"))


def test_refuses_to_overwrite_without_flag(tiny_world):
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_tiny(tiny_world, seed=0)


def test_overwrite_leaves_no_stale_shards(tmp_path):
    d = str(tmp_path / "w")
    generate_tiny(d, seed=0)
    stale = os.path.join(d, "catalog", "all-00007-of-00008.tfrecord")
    open(stale, "wb").write(b"old world")
    generate_tiny(d, seed=1, overwrite=True)
    assert not os.path.exists(stale)
    assert marketplace.load_manifest(d)["seed"] == 1


def test_manifest_matches_files(tiny_world):
    m = marketplace.load_manifest(tiny_world)
    assert m["seed"] == 0 and m["world"]["name"] == "tiny"
    cfg = config.get_world("tiny")
    assert m["days"] == {"train": list(range(cfg.train_days)),
                         "test": [cfg.train_days + i for i in range(cfg.test_days)],
                         "early": list(range(cfg.early_days))}
    for kind, splits in m["files"].items():
        for split, entry in splits.items():
            recs = raw_records(",".join(os.path.join(tiny_world, f) for f in entry["files"]))
            assert len(recs) == entry["records"], (kind, split)
    assert m["files"]["catalog"]["all"]["records"] == cfg.num_items
    assert m["files"]["ctr"]["test"]["records"] == cfg.sessions_per_day * cfg.page_size


def test_the_early_and_late_splits_partition_the_train_days(tiny_world):
    """Supervised pre-trains on the early train days, the equal-protocol Table 5's CTR models
    on the late ones: together they are the train split, record for record, and apart."""
    def recs(split: str) -> list[bytes]:
        return raw_records(records.default_pattern(tiny_world, "ctr", split))
    early, late, train = recs("early"), recs("late"), recs("train")
    assert early and late and len(early) + len(late) == len(train)
    assert sorted(early + late) == sorted(train)
    assert not set(early) & set(late)


def test_a_dosed_world_keeps_the_catalog_and_scales_one_property(tmp_path):
    """The dose-response study's worlds: the same items and images at every strength, only the
    named property of the behaviour scaled (0: absent)."""
    tiny = config.get_world("tiny")
    none = config.dosed(tiny, "style", 0.0)
    assert none.click.query_style == 0 and none.click.user_style == 0
    assert none.click.quality == tiny.click.quality and none.name == "tiny-style0"
    assert config.dosed(tiny, "popularity", 0.5).display_popularity_power == pytest.approx(
        0.5 * tiny.display_popularity_power)
    half = config.dosed(tiny, "intention", 0.5)
    assert half.query_from_interest == pytest.approx(0.5 * tiny.query_from_interest)
    assert half.click.user_style == pytest.approx(0.5 * tiny.click.user_style)
    assert half.click.query_style == tiny.click.query_style
    with pytest.raises(ValueError, match="unknown dose"):
        config.dosed(tiny, "colour", 1.0)
    with pytest.raises(ValueError, match="strength"):
        config.dosed(tiny, "style", 1.5)
    kind = marketplace.schema.CATALOG.name
    base, dosed = str(tmp_path / "base"), str(tmp_path / "dosed")
    from trainer.ctr import spec as ctr_spec
    for world, d in ((tiny, base), (config.dosed(tiny, "popularity", 0.0), dosed)):
        marketplace.generate(world, d, seed=0, ctr_kind=ctr_spec.record_kind("ctr"))
    from trainer.data import pipeline
    columns = ("item_id", "image", "category_id", "title", "price")  # impressions_30d follows
    same = [pipeline.read_columns(records.default_pattern(d, kind), kind, columns)  # the display
            for d in (base, dosed)]
    for c in columns:
        assert np.array_equal(same[0][c], same[1][c]), c
    assert raw_records(records.default_pattern(base, "ctr", "test")) != raw_records(
        records.default_pattern(dosed, "ctr", "test"))


@pytest.fixture(scope="module")
def logs(tiny_world):
    t = truth.load(tiny_world)
    ctr = read_all(tiny_world, "ctr")
    cat = read_all(tiny_world, "catalog", decode_images=False)
    items, queries, users = t["items"], t["queries"], t["users"]
    ii = truth.index_of(ctr["item_id"], items["item_id"])
    qi = truth.index_of(ctr["query_id"], queries["query_id"])
    ui = truth.index_of(ctr["user_id"], users["user_id"])
    return dict(t=t, ctr=ctr, cat=cat, item_style=items["style"][ii],
                query_style=queries["style"][qi], interests=users["interests"][ui], ii=ii)


def test_impressions_are_skewed_with_a_long_tail(logs):
    imp = logs["cat"]["impressions_30d"]
    top10 = imp >= np.quantile(imp, 0.9)
    assert imp[top10].sum() / imp.sum() > 0.5  # a tenth of the items get most impressions
    assert 0.25 < (imp < 5).mean() < 0.7  # a realistic share of low-impression items
    # Logged clicks concentrate on head items (S2's positives under-represent the tail).
    ctr = logs["ctr"]
    by_id = dict(zip(logs["cat"]["item_id"].tolist(), imp.tolist(), strict=True))
    clicked_imp = np.array([by_id[i] for i in ctr["item_id"][ctr["label"] == 1]])
    assert (clicked_imp >= np.quantile(imp, 0.9)).mean() > 0.4
    assert (clicked_imp < 5).mean() < 0.1


def test_click_rate_is_realistic(logs):
    assert 0.04 < logs["ctr"]["label"].mean() < 0.2


def test_clicks_follow_style_not_just_category(logs):
    ctr, s_item, s_query = logs["ctr"], logs["item_style"], logs["query_style"]
    label = ctr["label"]
    # Every displayed item is in the query's category, so style match is a within-category effect.
    same = s_item == s_query
    sim = logs["t"]["style_similarity"][s_item, s_query]
    assert label[same].mean() > 2.0 * label[sim == 0].mean()
    # The user's own style interests matter too, beyond the query.
    interest = (logs["interests"] == s_item[:, None]).any(1)
    base = sim == 0
    assert label[base & interest].mean() > 1.5 * label[base & ~interest].mean()


def test_style_is_not_determined_by_ids(logs, tiny_world):
    t, cat = logs["t"], logs["cat"]
    styles = t["items"]["style"]
    cfg = config.get_world("tiny")
    for c in np.unique(cat["category_id"]):
        assert len(np.unique(styles[cat["category_id"] == c])) == cfg.num_styles
    # Brands are not style labels: big brands carry several styles.
    brands, counts = np.unique(cat["brand_id"], return_counts=True)
    for b in brands[counts >= 10]:
        assert len(np.unique(styles[cat["brand_id"] == b])) >= 3


def test_visually_similar_items_exist_across_popularity(logs):
    """Each (category, style) has both head and tail items: the debiasing network's pairs."""
    t, cat = logs["t"], logs["cat"]
    imp = cat["impressions_30d"]
    key = t["items"]["category"] * 1000 + t["items"]["style"]
    both = [((imp[key == k] < 5).any() and (imp[key == k] >= 20).any()) for k in np.unique(key)]
    assert np.mean(both) > 0.8


def test_next_click_resembles_some_history_click(tiny_world, logs):
    """COURIER's assumption (paper 002 §3): clicked page items share a style with a history
    click more often than unclicked ones do."""
    pv = read_all(tiny_world, "pageviews", decode_images=False)
    items = logs["t"]["items"]
    def style(ids):
        return np.where(ids >= 0, items["style"][truth.index_of(
            np.where(ids >= 0, ids, items["item_id"][0]), items["item_id"])], -1)

    pv_style, hist_style = style(pv["pv_item_ids"]), style(pv["click_item_ids"])
    match = (pv_style[:, :, None] == hist_style[:, None, :]).any(-1) & pv["pv_item_ids_mask"]
    clicked = (pv["pv_labels"] == 1) & pv["pv_item_ids_mask"]
    unclicked = (pv["pv_labels"] == 0) & pv["pv_item_ids_mask"]
    # With few styles the base rate is high, so test the difference for significance.
    assert two_proportion_z(match[clicked], match[unclicked]) > 4.0
    # Every page has a click, listed first, and a non-empty history (paper 002 §4.2.1).
    assert (pv["pv_labels"][:, 0] == 1).all() and pv["click_item_ids_mask"][:, 0].all()


def test_histories_are_the_latest_earlier_clicks_in_time_order():
    """With no warm-up days every click is logged: each page's history must be exactly the
    user's latest clicks before the page's block, oldest first (no future clicks leak in)."""
    import dataclasses
    cfg = dataclasses.replace(config.get_world("tiny"), history_days=0, num_users=60)
    w = marketplace.build(cfg, seed=3)
    ss, im = w.sessions, w.impressions
    clicks: dict = {}
    L = marketplace.schema.L_CTR_HISTORY
    n_sessions = len(ss["day"])
    checked = 0
    for key in sorted(set(zip(ss["day"].tolist(), ss["block"].tolist(), strict=True))):
        in_block = np.flatnonzero((ss["day"] == key[0]) & (ss["block"] == key[1]))
        for s_ in in_block:
            expected = clicks.get(ss["user"][s_], [])[-L:]
            np.testing.assert_array_equal(ss["history"][s_], expected)
            checked += len(expected) > 0
        for s_ in in_block:  # clicks join the histories after the block, in page order
            row = np.flatnonzero(im["session"] == s_)
            for i in im["item"][row][im["label"][row] == 1]:
                clicks.setdefault(ss["user"][s_], []).append(i)
    assert checked > n_sessions // 2


def test_training_code_never_reads_the_planted_truth():
    # The projector labels embeddings by the planted style for people to look at; it never trains.
    allowed = {"trainer/synth/marketplace.py", "trainer/synth/truth.py",
               "trainer/eval/projector.py"}
    offenders = []
    for path in glob.glob(os.path.join(REPO, "trainer", "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, REPO)
        with open(path) as f:
            src = f.read()
        if rel not in allowed and re.search(r"synth\.truth|import truth|truth\.json", src):
            offenders.append(rel)
    assert not offenders, f"training code reads the planted truth: {offenders}"


def test_scale_world_streams_valid_records_in_chunks(tmp_path, monkeypatch):
    from trainer.ctr import spec as ctr_spec
    from trainer.data import parse, pipeline, validate
    from trainer.features import embeddings
    from trainer.synth import scale

    monkeypatch.setattr(scale, "CHUNK", 700)  # several chunks, the last one partial
    out = str(tmp_path / "scale")
    m = scale.generate(out, items=3000, users=2000, samples=2500, test_samples=300, shards=2)
    table = embeddings.load(os.path.join(out, embeddings.FILE))
    assert len(table.item_id) == 3000 and table.item_vector.shape == (3000, 64)
    np.testing.assert_allclose(np.linalg.norm(table.item_vector, axis=1), 1, rtol=1e-5)
    kind = ctr_spec.load("synthetic").record_kind()
    rows = read_all(out, kind, "train")
    assert len(rows["label"]) == 2500 and len(m["files"]["train"]) == 2
    assert set(np.unique(rows["item_id"])) <= set(table.item_id.tolist())
    report = validate.scan(pipeline.list_files(records.default_pattern(out, "ctr")),
                           parse.RecordParser(kind, decode=False))
    assert report.bad == [] and report.records == 2800


def test_a_missing_early_or_late_split_fails_naming_what_writes_it(tmp_path):
    from trainer import configs
    from trainer.stages import common
    os.makedirs(tmp_path / "ctr")
    (tmp_path / "ctr" / "train-00000-of-00001.tfrecord").write_bytes(b"")
    cfg = configs.CtrStage(data_dir=str(tmp_path))
    assert common.ctr_train_pattern(cfg, cfg.ctr).endswith("train-*.tfrecord*")
    late = configs.CtrConfig(train_split="late")
    with pytest.raises(FileNotFoundError, match="'late'.*early_days"):
        common.ctr_train_pattern(cfg, late)
    given = configs.CtrConfig(train_split="late", train_pattern="mine-*.tfrecord")
    assert common.ctr_train_pattern(cfg, given) == "mine-*.tfrecord"

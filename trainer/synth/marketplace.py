"""The synthetic marketplace: a visual-search ads platform whose planted structure makes the
papers' claims testable (see `../shared/notes/world.md` and docs/synthetic_world.md).

Mechanisms, each with the claim it serves:
- Items have a category (silhouette) and a style (pattern x palette, shared across categories,
  independent of shop and brand); style is finer than category (paper 000 Table 1).
- Popularity is Zipf-like within each category and the display policy is popularity-driven, so
  impressions and clicks concentrate on head items and most of the catalog is rarely shown
  (paper 000 §1: sample selection bias; low impression = fewer than 5 in 30 days).
- Users hold 2-3 style interests and category preferences; a visual-search session's query photo
  shows one category and (mostly) one of the user's styles. Click probability rises with the
  item's style similarity to the query and to the user's interests (graded: sharing the pattern
  or the palette counts partly), with latent item and shop quality, price sensitivity, device and
  position bias, and noise. Style is not recoverable from ids or categories; some users are not
  visual (paper 002 §1).
- Click histories accumulate in time order and mix the user's styles with noise clicks, so a new
  click resembles some history clicks (paper 002 §3).
- Visually similar items exist at every popularity level of a category (paper 000 §3.2, D).

Nothing a model trains on carries the planted truth: styles, qualities, interests and popularity
ranks go only to `<data_dir>/truth/`, for evaluation and tests.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import time

import numpy as np

from trainer.data import jsonfile, records, schema
from trainer.synth import render, titles
from trainer.synth.config import WorldConfig

FORMAT_VERSION = 1
BLOCKS_PER_DAY = 8  # click histories are refreshed between blocks of a day's sessions
LOW_IMPRESSIONS = 5  # paper 000 §4.1
MAX_PREFERRED_CATEGORIES = 3  # a user's preferred categories (a demographic-style feature)
log = logging.getLogger(__name__)
MANIFEST = "manifest.json"  # what the world is: its config, seed, files and statistics


def _unique_ids(rng: np.random.Generator, n: int, low: int, high: int) -> np.ndarray:
    """n distinct random int64 ids in [low, high): real ids are sparse, not 0..n-1."""
    ids = np.unique(rng.integers(low, high, size=2 * n + 16))
    if len(ids) < n:
        raise ValueError(f"id range [{low}, {high}) too small for {n} distinct ids")
    return rng.permutation(ids)[:n].astype(np.int64)


def _zipf_probs(n: int, a: float) -> np.ndarray:
    p = np.arange(1, n + 1, dtype=np.float64) ** -a
    return p / p.sum()


@dataclasses.dataclass
class World:
    """All entities and the simulated log (indices into the entity arrays)."""

    cfg: WorldConfig
    items: dict
    users: dict
    queries: dict
    category_ids: np.ndarray
    style_similarity: np.ndarray
    sessions: dict = dataclasses.field(default_factory=dict)
    impressions: dict = dataclasses.field(default_factory=dict)


def style_similarity(cfg: WorldConfig) -> np.ndarray:
    """[S, S] graded style similarity: 1 same style, 0.3 same pattern or same palette, else 0."""
    s = np.arange(cfg.num_styles)
    pat, pal = s // cfg.num_palettes, s % cfg.num_palettes
    same_pat = pat[:, None] == pat[None]
    same_pal = pal[:, None] == pal[None]
    return np.where(same_pat & same_pal, 1.0, np.where(same_pat | same_pal, 0.3, 0.0))


def make_items(cfg: WorldConfig, rng: np.random.Generator) -> dict:
    n, c = cfg.total_items, cfg.num_categories
    cat_share = rng.dirichlet(np.full(c, 20.0))
    category = rng.choice(c, size=n, p=cat_share)
    pattern = rng.integers(0, cfg.num_patterns, n)
    palette = rng.integers(0, cfg.num_palettes, n)
    shop = rng.choice(cfg.num_shops, size=n, p=_zipf_probs(cfg.num_shops, 0.8))
    brand = rng.choice(cfg.num_brands, size=n, p=_zipf_probs(cfg.num_brands, 0.8))
    shop_level = rng.normal(0, 0.3, cfg.num_shops)
    cat_mu = rng.uniform(2.5, 5.0, c)
    price = np.exp(cat_mu[category] + shop_level[shop] + rng.normal(0, 0.35, n))
    quality = rng.normal(0, 1, n)
    # Popularity: Zipf over the within-category rank of a latent that partly tracks quality.
    rho = cfg.quality_popularity_corr
    latent = rho * quality + np.sqrt(1 - rho * rho) * rng.normal(0, 1, n)
    rank = np.empty(n, np.int64)
    for k in range(c):
        idx = np.flatnonzero(category == k)
        rank[idx[np.argsort(-latent[idx])]] = np.arange(1, len(idx) + 1)
    popularity = rank.astype(np.float64) ** -cfg.zipf_exponent
    # Standardised log price within the category (what price-sensitive users react to).
    logp = np.log(price)
    z_price = np.zeros(n)
    for k in range(c):
        idx = category == k
        z_price[idx] = (logp[idx] - logp[idx].mean()) / (logp[idx].std() + 1e-9)
    return dict(
        item_id=_unique_ids(rng, n, 10**9, 10**12), category=category, pattern=pattern,
        palette=palette, style=pattern * cfg.num_palettes + palette, shop=shop, brand=brand,
        shop_id=_unique_ids(rng, cfg.num_shops, 10**6, 10**8)[shop],
        brand_id=_unique_ids(rng, cfg.num_brands, 10**4, 10**6)[brand],
        price=np.round(price, 2).astype(np.float32), quality=quality,
        shop_quality=rng.normal(0, 1, cfg.num_shops)[shop], popularity_rank=rank,
        popularity=popularity, z_price=z_price, popularity_latent=latent)


def make_users(cfg: WorldConfig, rng: np.random.Generator) -> dict:
    n, c, s = cfg.total_users, cfg.num_categories, cfg.num_styles
    gender = rng.choice(3, size=n, p=[0.1, 0.55, 0.35])
    age = rng.choice(7, size=n, p=[0.05, 0.2, 0.28, 0.22, 0.13, 0.08, 0.04])
    gender_base = rng.dirichlet(np.ones(c), size=3)
    cat_pref = 0.7 * rng.dirichlet(np.full(c, 0.5), size=n) + 0.3 * gender_base[gender]
    style_pop = _zipf_probs(s, 0.6)[rng.permutation(s)]
    k = rng.integers(cfg.styles_per_user[0], cfg.styles_per_user[1] + 1, n)
    interests = np.full((n, cfg.styles_per_user[1]), -1, np.int64)
    for u in range(n):
        interests[u, :k[u]] = rng.choice(s, size=k[u], replace=False, p=style_pop)
    visual = rng.random(n) < cfg.click.visual_user_share
    return dict(
        user_id=_unique_ids(rng, n, 10**8, 10**11), gender=gender, age_bucket=age,
        category_pref=cat_pref, interests=interests, num_interests=k, visual=visual,
        price_sensitivity=rng.normal(0.6, 0.4, n) + 0.1 * (3 - age) / 3,
        activity=rng.lognormal(0, 0.8, n), device=rng.choice(3, size=n, p=[0.45, 0.45, 0.1]),
        style_popularity=style_pop)


def make_queries(cfg: WorldConfig, rng: np.random.Generator) -> dict:
    """A pool of query photos covering every (category, style) pair."""
    combos = cfg.num_categories * cfg.num_styles
    n = max(cfg.num_queries, combos)
    combo = np.concatenate([np.arange(combos), rng.integers(0, combos, n - combos)])
    combo = np.sort(combo)
    return dict(query_id=_unique_ids(rng, n, 10**9, 10**12), category=combo // cfg.num_styles,
                style=combo % cfg.num_styles, combo=combo)


def _gumbel_top_k(log_w: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Row-wise sample of k columns without replacement, proportional to exp(log_w), ranked."""
    keys = log_w - np.log(-np.log(rng.random(log_w.shape)))
    top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(keys, top, 1), axis=1)
    return np.take_along_axis(top, order, 1)


def click_logits(cfg: WorldConfig, world: World, user: np.ndarray, item: np.ndarray,
                 query_style: np.ndarray, position: np.ndarray, device: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """Click logit of displayed (user, item) pairs; all arguments are aligned index arrays."""
    it, us, cm = world.items, world.users, cfg.click
    sim = world.style_similarity
    style = it["style"][item]
    interests = us["interests"][user]
    user_sim = np.where(interests >= 0, sim[style[:, None], np.maximum(interests, 0)], 0.0).max(1)
    visual = np.where(us["visual"][user], 1.0, cm.non_visual_factor)
    return (cm.base
            + visual * (cm.query_style * sim[style, query_style] + cm.user_style * user_sim)
            + cm.quality * it["quality"][item] + cm.shop_quality * it["shop_quality"][item]
            - cm.position_decay * position
            - cm.price * us["price_sensitivity"][user] * it["z_price"][item]
            + np.asarray(cm.device)[device] + rng.normal(0, cm.noise, len(item)))


def _moving_day(world: World, day: int, rng: np.random.Generator
                ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """A moving world's state on emitted day `day` (the warm-up days are day 0's): (the items on
    display by category, their display weights, the users' activity weights). Moves the world
    first: the popularity latents take a random-walk step and users' tastes drift (emitted days
    after the first only)."""
    cfg, it, us, m = world.cfg, world.items, world.users, world.cfg.movement
    if day > 0:
        it["popularity_latent"] = it["popularity_latent"] + rng.normal(
            0, m.popularity_drift, len(it["item_id"]))
        drifting = np.flatnonzero((us["arrival_day"] <= day)
                                  & (rng.random(len(us["user_id"])) < m.taste_drift))
        slot = (rng.random(len(drifting)) * us["num_interests"][drifting]).astype(int)
        us["interests"][drifting, slot] = rng.choice(
            cfg.num_styles, size=len(drifting), p=us["style_popularity"])
    alive = it["added_day"] <= day
    rank = np.zeros(len(alive), np.int64)
    by_cat = []
    for k in range(cfg.num_categories):
        idx = np.flatnonzero(alive & (it["category"] == k))
        rank[idx[np.argsort(-it["popularity_latent"][idx])]] = np.arange(1, len(idx) + 1)
        by_cat.append(idx)
    it["popularity_rank"] = rank
    popularity = np.where(alive, np.maximum(rank, 1).astype(np.float64) ** -cfg.zipf_exponent, 0)
    act = np.where(us["arrival_day"] <= day, us["activity"], 0.0)
    return by_cat, popularity ** cfg.display_popularity_power, act / act.sum()


def simulate(world: World, rng: np.random.Generator,
             move_rng: np.random.Generator | None = None) -> None:
    """Simulates all days; fills `world.sessions` and `world.impressions` (emitted days only)
    and each user's preferred categories from the warm-up days. A moving world moves each day
    with `move_rng` (`_moving_day`)."""
    cfg, it, us, qs = world.cfg, world.items, world.users, world.queries
    moving = cfg.movement.days > 0
    move_rng = move_rng if move_rng is not None else np.random.default_rng(0)
    n_days = cfg.history_days + cfg.emitted_days
    by_cat = [np.flatnonzero(it["category"] == k) for k in range(cfg.num_categories)]
    w_display = it["popularity"] ** cfg.display_popularity_power
    # Queries are sorted by (category, style) combo: a combo's photos are a contiguous run.
    combo_count = np.bincount(qs["combo"], minlength=cfg.num_categories * cfg.num_styles)
    combo_start = np.concatenate([[0], np.cumsum(combo_count)[:-1]])
    cat_cdf = np.cumsum(us["category_pref"], axis=1)
    act = us["activity"] / us["activity"].sum()
    if moving:
        by_cat, w_display, act = _moving_day(world, 0, move_rng)
    by_cat_0, w_display_0 = by_cat, w_display  # the platform's 30-day view: as of the first day
    history: list[list[int]] = [[] for _ in range(len(us["user_id"]))]
    warmup_cat_counts = np.zeros((len(us["user_id"]), cfg.num_categories), np.int64)
    sess_cols: dict[str, list] = {k: [] for k in
                                  ("day", "block", "user", "query", "query_style", "device",
                                   "history")}
    imp_cols: dict[str, list] = {k: [] for k in ("session", "item", "position", "label")}
    n_sessions_emitted = 0
    cat_sessions = np.zeros(cfg.num_categories, np.int64)

    for day in range(n_days):
        emitted = day >= cfg.history_days
        if moving and day > cfg.history_days:
            by_cat, w_display, act = _moving_day(world, day - cfg.history_days, move_rng)
        n = cfg.sessions_per_day
        user = rng.choice(len(act), size=n, p=act)  # i.i.d. draws: already in random order
        cat = (cat_cdf[user] < rng.random(n)[:, None]).sum(1).clip(max=cfg.num_categories - 1)
        from_interest = rng.random(n) < cfg.query_from_interest
        pick = (rng.random(n) * us["num_interests"][user]).astype(int)
        q_style = np.where(from_interest, us["interests"][user, pick],
                           rng.integers(0, cfg.num_styles, n))
        combo = cat * cfg.num_styles + q_style
        query = combo_start[combo] + (rng.random(n) * combo_count[combo]).astype(np.int64)
        device = np.where(rng.random(n) < 0.85, us["device"][user], rng.integers(0, 3, n))
        np.add.at(cat_sessions, cat, 1)
        if not emitted:
            np.add.at(warmup_cat_counts, (user, cat), 1)

        block_of = (np.arange(n) * BLOCKS_PER_DAY) // n
        for b in range(BLOCKS_PER_DAY):
            sb = np.flatnonzero(block_of == b)
            shown = np.empty((len(sb), cfg.page_size), np.int64)
            for k in range(cfg.num_categories):
                rows = np.flatnonzero(cat[sb] == k)
                if not len(rows):
                    continue
                cand = by_cat[k]
                w = w_display[cand][None, :] * np.where(
                    it["style"][cand][None, :] == q_style[sb[rows]][:, None],
                    cfg.display_style_boost, 1.0)
                p = ((1 - cfg.exploration) * w / w.sum(1, keepdims=True)
                     + cfg.exploration / len(cand))
                shown[rows] = cand[_gumbel_top_k(np.log(p), cfg.page_size, rng)]
            s_rep = np.repeat(sb, cfg.page_size)
            pos = np.tile(np.arange(cfg.page_size), len(sb))
            logit = click_logits(cfg, world, user[s_rep], shown.ravel(), q_style[s_rep], pos,
                                 device[s_rep], rng)
            label = (rng.random(len(logit)) < 1 / (1 + np.exp(-logit))).astype(np.int64)
            if emitted:
                for i in sb:
                    h = history[user[i]]
                    sess_cols["history"].append(np.array(h[-schema.L_CTR_HISTORY:], np.int64))
                for key, arr in (("day", np.full(len(sb), day - cfg.history_days)),
                                 ("block", np.full(len(sb), b)), ("user", user[sb]),
                                 ("query", query[sb]), ("query_style", q_style[sb]),
                                 ("device", device[sb])):
                    sess_cols[key].append(arr)
                imp_cols["session"].append(n_sessions_emitted + np.repeat(
                    np.arange(len(sb)), cfg.page_size))
                imp_cols["item"].append(shown.ravel())
                imp_cols["position"].append(pos)
                imp_cols["label"].append(label)
                n_sessions_emitted += len(sb)
            # Clicks join the histories after the block, in arrival order then position.
            for flat in np.flatnonzero(label):
                history[user[s_rep[flat]]].append(int(shown.ravel()[flat]))
            for u in np.unique(user[sb]):
                if len(history[u]) > 4 * schema.L_CTR_HISTORY:
                    del history[u][:-schema.L_CTR_HISTORY]

    history_col = sess_cols.pop("history")
    world.sessions = {k: np.concatenate(v) for k, v in sess_cols.items()}
    world.sessions["history"] = history_col
    world.impressions = {k: np.concatenate(v) for k, v in imp_cols.items()}
    # Preferred categories: the user's top categories by warm-up searches (observable behaviour).
    prefs = []
    for u in range(len(us["user_id"])):
        counts = warmup_cat_counts[u]
        top = np.argsort(-counts, kind="stable")[:MAX_PREFERRED_CATEGORIES]
        prefs.append(top[counts[top] > 0])
    us["preferred_categories"] = prefs
    us["category_traffic"] = cat_sessions / cat_sessions.sum()
    # Platform impressions over 30 days: the emitted logs sample this traffic. Expected exposure
    # follows the display policy (popularity^power within the category, plus exploration).
    # A moving world's later items enter with none.
    expo = np.zeros(len(it["item_id"]))
    for k, idx in enumerate(by_cat_0):
        w = w_display_0[idx]
        expo[idx] = us["category_traffic"][k] * (
            (1 - cfg.exploration) * w / w.sum() + cfg.exploration / len(idx))
    total = cfg.impressions_per_item_30d * cfg.num_items
    it["impressions_30d"] = rng.poisson(total * expo).astype(np.int64)


def build(cfg: WorldConfig, seed: int) -> World:
    """Entities and simulated log of a world; deterministic in (cfg, seed). A moving world's
    later items and users get the day they arrive (`added_day`, `arrival_day`; 0 for the
    initial ones), and its new items start `cold_start` below in popularity."""
    cfg.validate()
    # Children of a SeedSequence do not depend on how many are spawned: a world that does not
    # move draws exactly what it drew before the sixth stream (the movement's) existed.
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)]
    items = make_items(cfg, streams[0])
    users = make_users(cfg, streams[1])
    new_items, new_users = cfg.added_per_day()
    items["added_day"] = _arrivals(cfg.num_items, new_items, cfg.movement.days)
    users["arrival_day"] = _arrivals(cfg.num_users, new_users, cfg.movement.days)
    items["popularity_latent"] = np.where(items["added_day"] > 0, items["popularity_latent"]
                                          - cfg.movement.cold_start,
                                          items["popularity_latent"])
    queries = make_queries(cfg, streams[2])
    category_ids = _unique_ids(streams[3], cfg.num_categories, 1000, 60000)
    world = World(cfg, items, users, queries, category_ids, style_similarity(cfg))
    simulate(world, streams[4], streams[5])
    return world


def _arrivals(initial: int, per_day: int, days: int) -> np.ndarray:
    """The day each of `initial` + `per_day` x (days - 1) entities arrives: 0 for the first
    `initial`, then `per_day` a day from day 1."""
    return np.concatenate([np.zeros(initial, np.int64),
                           np.repeat(np.arange(1, max(days, 1), dtype=np.int64), per_day)])


# ---------------------------------------------------------------------------------------------
# Emission


def _shape_of_category(cfg: WorldConfig, seed: int) -> np.ndarray:
    """Which silhouette each category gets (a fixed random subset of the 12 shapes)."""
    return np.random.default_rng([seed, 77]).permutation(render.NUM_SHAPES)[:cfg.num_categories]


def _pattern_ids(cfg: WorldConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Which of the renderer's patterns and palettes the world's style indices map to: a random
    subset of the patterns, and the first palettes (they come in near pairs, render.py)."""
    rng = np.random.default_rng([seed, 78])
    pats = np.sort(rng.permutation(render.NUM_PATTERNS)[:cfg.num_patterns])
    return pats, np.arange(cfg.num_palettes)


def write(world: World, data_dir: str, seed: int, workers: int = 1,
          inline_images: bool = False, *, ctr_kind: schema.RecordKind) -> dict:
    """Writes every record kind, the planted truth and `manifest.json`; returns the manifest.
    `ctr` records hold the columns of `ctr_kind` (a feature spec's, `trainer.ctr.spec`) of those
    the world logs, so a spec without e.g. demographics gives records without them.

    A world that does not move is one data dir: the catalog, the query photos, the train days'
    `ctr` records (`train`) and the test day's (`test`), the train days' page views and S2
    pairs, the judgments. A moving world writes one data dir per day, `day=NN/`: the items added
    that day (day 0: the initial catalog), the day's `ctr` records split by page into `train`
    and `holdout`, its page views and S2 pairs; the query photos and judgments in day 0's."""
    cfg = world.cfg
    t0 = time.time()
    images = _render(world, seed, workers)
    log.info("rendered %d item and %d query images in %.1fs", len(images[0]), len(images[1]),
             time.time() - t0)
    ss, it = world.sessions, world.items
    manifest = dict(format_version=FORMAT_VERSION, generator="trainer.synth.marketplace",
                    seed=seed, world=dataclasses.asdict(cfg),
                    layout="inline" if inline_images else "join", ctr_columns=ctr_kind.names)
    if not cfg.movement.days:
        train = ss["day"] < cfg.train_days
        splits = {"train": train, "test": ~train}
        if cfg.early_days:
            splits.update(early=ss["day"] < cfg.early_days,
                          late=train & (ss["day"] >= cfg.early_days))
        files = _write_data_dir(world, data_dir, seed, images, inline_images, ctr_kind,
                                np.arange(len(it["item_id"])), splits, train, first=True)
        manifest.update(days=dict(train=list(range(cfg.train_days)),
                                  test=list(range(cfg.train_days, cfg.emitted_days)),
                                  early=list(range(cfg.early_days))),
                        files=files, stats=observable_stats(world))
    else:
        holdout = np.random.default_rng([seed, 6]).random(len(ss["day"])) < \
            cfg.movement.holdout_share
        per_day = {}
        for day in range(cfg.movement.days):
            today = ss["day"] == day
            per_day[day_dir_name(day)] = dict(
                files=_write_data_dir(
                    world, os.path.join(data_dir, day_dir_name(day)), seed, images,
                    inline_images, ctr_kind, np.flatnonzero(it["added_day"] == day),
                    {"train": today & ~holdout, "holdout": today & holdout}, today,
                    first=day == 0),
                stats=day_stats(world, day))
        manifest.update(days=per_day, stats=observable_stats(world))
    _write_truth(world, data_dir, _shape_of_category(cfg, seed))
    with open(os.path.join(data_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True, default=_json_default)
    return manifest


def day_dir_name(day: int) -> str:
    """A moving world's data dir of one day, under the world's dir: `day=NN`."""
    return f"day={day:02d}"


def _render(world: World, seed: int, workers: int) -> tuple[list[bytes], list[bytes]]:
    """(every item's image, every query photo) as encoded bytes."""
    cfg, it, qs = world.cfg, world.items, world.queries
    shapes = _shape_of_category(cfg, seed)
    pats, pals = _pattern_ids(cfg, seed)
    item_images = render.render_encoded(shapes[it["category"]], pats[it["pattern"]],
                                        pals[it["palette"]], cfg.image_size, (seed, 1),
                                        workers=workers)
    q_pattern, q_palette = qs["style"] // cfg.num_palettes, qs["style"] % cfg.num_palettes
    query_images = render.render_encoded(shapes[qs["category"]], pats[q_pattern], pals[q_palette],
                                         cfg.image_size, (seed, 2), photo=True, workers=workers)
    return item_images, query_images


def _bids(price: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each item's bid per click: log-normal around 2% of its price (dearer items earn more per
    sale, so their sellers bid more), at least 0.01. Clicks do not depend on it; a stream of its
    own, so the rest of the world is what it was before bids existed."""
    bid = 0.02 * price * np.exp(rng.normal(0.0, 0.5, len(price)))
    return np.maximum(np.round(bid, 2), 0.01).astype(np.float32)


def _write_data_dir(world: World, data_dir: str, seed: int,
                    images: tuple[list[bytes], list[bytes]], inline_images: bool,
                    ctr_kind: schema.RecordKind, catalog_rows: np.ndarray,
                    ctr_splits: dict[str, np.ndarray], behaviour: np.ndarray, first: bool
                    ) -> dict:
    """One data dir: the catalog records of `catalog_rows`, the `ctr` records of each split's
    sessions (a mask over `world.sessions`), the page views and S2 pairs of the `behaviour`
    sessions, and with `first` the query photos and the judgments. Returns its files."""
    cfg, it, us, qs = world.cfg, world.items, world.users, world.queries
    ss, im = world.sessions, world.impressions
    item_images, query_images = images
    pats, pals = _pattern_ids(cfg, seed)
    files: dict = {}

    def emit(kind: schema.RecordKind, split: str, columns: dict, num_shards: int) -> None:
        recs = list(records.columns_to_examples(kind, columns))
        paths = records.write_shards(recs, data_dir, kind.name, split, num_shards)
        files.setdefault(kind.name, {})[split] = {
            "files": [os.path.relpath(p, data_dir) for p in paths], "records": len(recs)}

    title = titles.make_titles(it["category"], pats[it["pattern"]], pals[it["palette"]],
                               it["brand"], cfg.num_categories, np.random.default_rng([seed, 5]),
                               cfg.titles)
    bid = _bids(it["price"], np.random.default_rng([seed, 7]))
    c = catalog_rows
    emit(schema.CATALOG, "all", dict(
        item_id=it["item_id"][c], image=[item_images[i] for i in c],
        category_id=world.category_ids[it["category"][c]], shop_id=it["shop_id"][c],
        brand_id=it["brand_id"][c], price=it["price"][c],
        impressions_30d=it["impressions_30d"][c], bid=bid[c], title=[title[i] for i in c]),
        cfg.shards)
    if first:
        emit(schema.QUERIES, "all", dict(
            query_id=qs["query_id"], image=query_images,
            category_id=world.category_ids[qs["category"]]), cfg.shards)

    sess_item = im["item"]
    session = im["session"]
    s_user = ss["user"][session]
    day = ss["day"][session]
    page_ids = _unique_ids(np.random.default_rng([seed, 3]), len(ss["day"]), 10**10, 10**13)
    prefs = [world.category_ids[p] for p in us["preferred_categories"]]
    history_ids = [it["item_id"][h] for h in ss["history"]]
    for split, sessions in ctr_splits.items():
        rows = np.flatnonzero(sessions[session])
        emit(ctr_kind, split, dict(
            label=im["label"][rows], user_id=us["user_id"][s_user[rows]],
            age_bucket=us["age_bucket"][s_user[rows]], gender=us["gender"][s_user[rows]],
            preferred_category_ids=[prefs[u] for u in s_user[rows]],
            click_history_item_ids=[history_ids[s] for s in session[rows]],
            item_id=it["item_id"][sess_item[rows]], shop_id=it["shop_id"][sess_item[rows]],
            brand_id=it["brand_id"][sess_item[rows]],
            category_id=world.category_ids[it["category"][sess_item[rows]]],
            price=it["price"][sess_item[rows]], query_id=qs["query_id"][ss["query"][session[rows]]],
            device=ss["device"][session[rows]], position=im["position"][rows],
            page_id=page_ids[session[rows]], day=day[rows]),
            cfg.shards * (2 if split == "train" else 1))

    # COURIER page views: clicked pages of users with a history; clicked items first.
    pv: dict[str, list] = dict(user_id=[], pv_item_ids=[], pv_labels=[], click_item_ids=[],
                               day=[])
    if inline_images:
        pv.update(pv_images=[], click_images=[])
    ps = cfg.page_size
    lab = im["label"].reshape(-1, ps)
    items_2d = im["item"].reshape(-1, ps)
    for s in np.flatnonzero(behaviour):
        h = ss["history"][s][-schema.L_CLICK:]
        if not lab[s].any() or not len(h):
            continue
        order = np.lexsort((np.arange(ps), -lab[s]))[:schema.L_PV]
        pv["user_id"].append(us["user_id"][ss["user"][s]])
        pv["pv_item_ids"].append(it["item_id"][items_2d[s, order]])
        pv["pv_labels"].append(lab[s, order])
        pv["click_item_ids"].append(it["item_id"][h])
        pv["day"].append(ss["day"][s])
        if inline_images:
            pv["pv_images"].append([item_images[i] for i in items_2d[s, order]])
            pv["click_images"].append([item_images[i] for i in h])
    emit(schema.PAGEVIEWS, "train", pv, cfg.shards)

    # S2 pairs: every click of a visual-search page, with the query photo inline.
    clicks = np.flatnonzero((im["label"] == 1) & behaviour[session])
    emit(schema.SEARCH_SESSIONS, "train", dict(
        query_id=qs["query_id"][ss["query"][session[clicks]]],
        query_image=[query_images[q] for q in ss["query"][session[clicks]]],
        clicked_item_id=it["item_id"][sess_item[clicks]],
        clicked_category_id=world.category_ids[it["category"][sess_item[clicks]]],
        day=day[clicks]), cfg.shards)

    if first:  # judgments: relevant = same category and style (the annotators' view), among
        # the initial catalog
        jrng = np.random.default_rng([seed, 4])
        key = it["category"] * cfg.num_styles + it["style"]
        n = cfg.num_items
        jq, jrel = [], []
        for q in jrng.choice(n, size=min(cfg.judgment_queries, n), replace=False):
            rel = np.flatnonzero((key[:n] == key[q]) & (np.arange(n) != q))
            if len(rel):
                jq.append(it["item_id"][q])
                jrel.append(it["item_id"][rel])
        emit(schema.JUDGMENTS, "all", dict(query_item_id=jq, relevant_item_ids=jrel), 1)
    return files


def day_stats(world: World, day: int) -> dict:
    """What a moving world's day holds, as its logs show it: samples, click rate, and the items
    and users that are new that day."""
    ss, im, it, us = world.sessions, world.impressions, world.items, world.users
    rows = ss["day"][im["session"]] == day
    return dict(samples=int(rows.sum()), click_rate=float(im["label"][rows].mean()),
                new_items=int((it["added_day"] == day).sum()) if day else 0,
                new_users=int((us["arrival_day"] == day).sum()) if day else 0,
                catalog=int((it["added_day"] <= day).sum()))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def observable_stats(world: World) -> dict:
    """Statistics any platform could compute from its own logs (no planted truth)."""
    it, im, cfg = world.items, world.impressions, world.cfg
    imp = it["impressions_30d"]
    top10 = imp >= np.quantile(imp, 0.9)
    shown_counts = np.bincount(im["item"], minlength=cfg.num_items)
    click_counts = np.bincount(im["item"], weights=im["label"], minlength=cfg.num_items)
    return dict(
        items=cfg.num_items, users=cfg.num_users, queries=len(world.queries["query_id"]),
        impressions_logged=int(len(im["label"])), click_rate=float(im["label"].mean()),
        share_items_under_5_impressions_30d=float((imp < LOW_IMPRESSIONS).mean()),
        share_items_zero_impressions_30d=float((imp == 0).mean()),
        share_impressions_30d_on_top10pct_items=float(imp[top10].sum() / max(imp.sum(), 1)),
        share_logged_impressions_on_top10pct_items=float(
            shown_counts[top10].sum() / max(shown_counts.sum(), 1)),
        share_logged_clicks_on_top10pct_items=float(
            click_counts[top10].sum() / max(click_counts.sum(), 1)),
        share_logged_clicks_on_low_impression_items=float(
            click_counts[imp < LOW_IMPRESSIONS].sum() / max(click_counts.sum(), 1)),
    )


def _write_truth(world: World, data_dir: str, shapes: np.ndarray) -> None:
    """Planted truth for evaluation and tests only; training code must never read it."""
    it, us, qs, cfg = world.items, world.users, world.queries, world.cfg
    d = os.path.join(data_dir, "truth")
    os.makedirs(d, exist_ok=True)
    truth = dict(
        readme="Planted truth of the synthetic world. For evaluation and tests only; never a "
               "training feature.",
        num_styles=cfg.num_styles, num_palettes=cfg.num_palettes,
        category_ids=world.category_ids, category_shapes=shapes,
        style_similarity=world.style_similarity,
        items=dict(item_id=it["item_id"], category=it["category"], style=it["style"],
                   pattern=it["pattern"], palette=it["palette"],
                   quality=np.round(it["quality"], 4),
                   popularity_rank=it["popularity_rank"]),
        users=dict(user_id=us["user_id"], interests=us["interests"], visual=us["visual"]),
        queries=dict(query_id=qs["query_id"], category=qs["category"], style=qs["style"]),
    )
    with open(os.path.join(d, "truth.json"), "w") as f:
        json.dump(truth, f, sort_keys=True, default=_json_default)


def generate(cfg: WorldConfig, data_dir: str, seed: int, workers: int = 1,
             inline_images: bool = False, overwrite: bool = False, *,
             ctr_kind: schema.RecordKind) -> dict:
    """Builds and writes a world into `data_dir` (which must be empty unless `overwrite`)."""
    ours = [os.path.join(data_dir, d) for d in (*schema.KIND_NAMES, "truth", MANIFEST)]
    ours += sorted(glob.glob(os.path.join(data_dir, day_dir_name(0).replace("00", "*"))))
    existing = [p for p in ours if os.path.exists(p)]
    if existing and not overwrite:
        names = ", ".join(map(os.path.basename, existing))
        raise FileExistsError(f"{data_dir} already holds data ({names}); "
                              "pass overwrite=True (--overwrite) to replace it")
    for p in existing:  # stale shards of an earlier world would match the readers' patterns
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    os.makedirs(data_dir, exist_ok=True)
    t0 = time.time()
    world = build(cfg, seed)
    log.info("simulated %d days in %.1fs", cfg.history_days + cfg.emitted_days, time.time() - t0)
    manifest = write(world, data_dir, seed, workers=workers, inline_images=inline_images,
                     ctr_kind=ctr_kind)
    log.info("wrote world '%s' to %s in %.1fs", cfg.name, data_dir, time.time() - t0)
    return manifest


def load_manifest(data_dir: str) -> dict | None:
    """The manifest of the world in `data_dir` (for a moving world's day dir, `day=NN`, its
    world's), or None (other data)."""
    manifest = jsonfile.read(os.path.join(data_dir, MANIFEST))
    parent, name = os.path.split(os.path.normpath(data_dir))
    if manifest is None and re.fullmatch(r"day=\d+", name):
        manifest = jsonfile.read(os.path.join(parent, MANIFEST))
    return manifest


def image_size(data_dir: str, default: int = 64) -> int:
    """Image side of the world in `data_dir` (its manifest), else `default` for other data."""
    manifest = load_manifest(data_dir)
    return manifest["world"]["image_size"] if manifest else default

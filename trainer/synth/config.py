"""Configuration of the synthetic marketplace and the named worlds (`tiny`, `small`, `medium`;
`tiny_moving`, `moving`: worlds whose catalog, users and tastes move day by day)."""
from __future__ import annotations

import dataclasses

from trainer.data import schema


@dataclasses.dataclass(frozen=True)
class ClickModel:
    """Logit of a click on a displayed item (see `marketplace.click_logits`).

    Attributes:
      base: Intercept; sets the overall click rate.
      query_style: Weight of the item's style similarity to the query's style (visual search:
        users click items that look like their photo).
      user_style: Weight of the item's similarity to the user's own style interests.
      visual_user_share: Share of users whose clicks are driven by style; the others weigh style
        by `non_visual_factor` only.
      non_visual_factor: Style weight multiplier of non-visual users.
      quality: Weight of the item's latent quality (learnable through its item ID).
      shop_quality: Weight of the shop's latent quality (learnable through its shop ID).
      position_decay: Logit lost per display position (position bias).
      price: Weight of the user's price sensitivity times the item's standardised log price.
      device: Logit offset per device code.
      noise: Std of a per-impression logit noise (unobservable taste, mood).
    """

    base: float = -3.4
    query_style: float = 1.6
    user_style: float = 1.2
    visual_user_share: float = 0.7
    non_visual_factor: float = 0.25
    quality: float = 0.45
    shop_quality: float = 0.25
    position_decay: float = 0.1
    price: float = 0.3
    device: tuple = (0.0, 0.15, -0.2)
    noise: float = 0.3


@dataclasses.dataclass(frozen=True)
class TitleConfig:
    """How sellers write item titles (`titles.make_titles`).

    Attributes:
      category: Probability that the title names the item's category.
      wrong_category: Probability that it (also) names another category.
      pattern: Probability that it names the item's pattern.
      palette: Probability that it names the item's colour.
      wrong_style: Probability, per style word written, that it is another pattern's (colour's).
      brand: Probability that it starts with the brand word.
      generic: Inclusive range of generic words per title.
    """

    category: float = 0.85
    wrong_category: float = 0.08
    pattern: float = 0.5
    palette: float = 0.6
    wrong_style: float = 0.15
    brand: float = 0.6
    generic: tuple = (1, 4)


@dataclasses.dataclass(frozen=True)
class Movement:
    """How a world moves from one day to the next (the daily cycle's data: docs/daily.md).
    `days` = 0 is a world that does not move (its train and test days are one data set).

    Attributes:
      days: Emitted days, each written as its own data dir `day=NN/` (after the warm-up days).
      new_item_share: Items added to the catalog each day after the first, as a share of the
        initial catalog, with their images.
      new_user_share: Users who arrive each day after the first, as a share of the initial users.
      taste_drift: Probability per user and day that one of their style interests is replaced
        by another (tastes drift slowly).
      popularity_drift: Std of a daily random walk of each item's popularity latent (popularity
        shifts); the display ranks follow it.
      cold_start: How far below an established item's popularity latent a new item's starts, in
        standard deviations (a new item is shown little until its latent drifts up).
      holdout_share: Share of each day's pages written as the day's `holdout` split instead of
        `train` (what a day's model is checked on before it is served).
    """

    days: int = 0
    new_item_share: float = 0.03
    new_user_share: float = 0.02
    taste_drift: float = 0.02
    popularity_drift: float = 0.15
    cold_start: float = 1.0
    holdout_share: float = 0.1


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Sizes and parameters of one synthetic world. Same config and seed give the same bytes.

    Attributes:
      name: World name.
      num_categories: Categories; each has its own silhouette (at most 12).
      num_patterns: Texture patterns (at most 8). A style is a (pattern, palette) pair.
      num_palettes: Colour palettes (at most 8).
      num_items: Catalog size.
      num_shops, num_brands: Seller and brand counts (neither determines style).
      num_users: Users.
      num_queries: Pool of query photos (user photos of a category and style).
      image_size: Side of the square rendered images, pixels.
      history_days: Simulated warm-up days that build click histories and preferred categories
        but are not emitted as samples.
      train_days, test_days: Emitted days; the test day follows the train days.
      early_days: The first this many train days' `ctr` records are also written as the split
        `early`, the other train days' as `late` (a pre-training window before the CTR model's,
        as paper 002 §4.2.1 keeps them apart; 0: neither split is written).
      sessions_per_day: Visual-search page views per day.
      page_size: Items displayed per page view (CTR samples per page).
      styles_per_user: (min, max) number of style interests of a user.
      query_from_interest: Probability that a session's query style is one of the user's interests.
      zipf_exponent: Popularity of the item at within-category rank r is r^-zipf_exponent.
      quality_popularity_corr: Correlation of popularity rank with latent quality.
      display_popularity_power: Display policy weight is popularity^power (rich get richer).
      display_style_boost: Multiplier of the display weight of items matching the query style (the
        incumbent ranking partially sees style).
      exploration: Share of display slots filled uniformly within the category (cold start).
      impressions_per_item_30d: Mean platform impressions per item over 30 days; the emitted logs
        are a sample of that traffic. Sets the long-tail share below 5 impressions.
      judgment_queries: Catalog items used as visual-search judgment queries.
      shards: Files per record kind (more shards than workers lets every worker read).
      click: Click model.
      titles: How item titles are written (the catalog's `title`).
      movement: How the world moves day by day (`days` > 0: written one data dir per day).
    """

    name: str
    num_categories: int
    num_patterns: int
    num_palettes: int
    num_items: int
    num_shops: int
    num_brands: int
    num_users: int
    num_queries: int
    image_size: int
    history_days: int
    train_days: int
    test_days: int
    sessions_per_day: int
    early_days: int = 0
    page_size: int = 10
    styles_per_user: tuple = (2, 3)
    query_from_interest: float = 0.7
    zipf_exponent: float = 1.25
    quality_popularity_corr: float = 0.3
    display_popularity_power: float = 1.0
    display_style_boost: float = 2.0
    exploration: float = 0.05
    impressions_per_item_30d: float = 28.0
    judgment_queries: int = 400
    shards: int = 4
    click: ClickModel = ClickModel()
    titles: TitleConfig = TitleConfig()
    movement: Movement = Movement()

    @property
    def num_styles(self) -> int:
        return self.num_patterns * self.num_palettes

    @property
    def emitted_days(self) -> int:
        """Days written as samples: the train and test days, or a moving world's days."""
        return self.movement.days or self.train_days + self.test_days

    def added_per_day(self) -> tuple[int, int]:
        """(items, users) that a moving world adds on each day after the first."""
        m = self.movement
        if not m.days:
            return 0, 0
        return round(m.new_item_share * self.num_items), round(m.new_user_share * self.num_users)

    @property
    def total_items(self) -> int:
        """The catalog at the end: the initial items and every day's additions."""
        return self.num_items + self.added_per_day()[0] * max(self.movement.days - 1, 0)

    @property
    def total_users(self) -> int:
        return self.num_users + self.added_per_day()[1] * max(self.movement.days - 1, 0)

    def validate(self) -> None:
        if not 1 <= self.num_categories <= 12:
            raise ValueError(f"num_categories must be in [1, 12], got {self.num_categories}")
        if not 1 <= self.num_patterns <= 8 or not 1 <= self.num_palettes <= 8:
            raise ValueError("num_patterns and num_palettes must be in [1, 8]")
        if self.page_size < schema.L_PV:
            raise ValueError(f"page_size must be >= l_pv={schema.L_PV}")
        if self.image_size < 16:
            raise ValueError("image_size must be >= 16")
        if not 0 <= self.early_days < max(self.train_days, 1):
            raise ValueError(f"early_days must be in [0, train_days), got {self.early_days}")


WORLDS: dict[str, WorldConfig] = {
    # Tests: seconds to generate, 32x32 images.
    "tiny": WorldConfig(
        name="tiny", num_categories=4, num_patterns=2, num_palettes=2, num_items=480,
        num_shops=24, num_brands=16, num_users=240, num_queries=160, image_size=32,
        history_days=4, train_days=3, test_days=1, sessions_per_day=400, early_days=1,
        impressions_per_item_30d=20.0, judgment_queries=60, shards=2),
    # `make demo`: under a minute to generate on 2 cores.
    "small": WorldConfig(
        name="small", num_categories=8, num_patterns=4, num_palettes=4, num_items=8000,
        num_shops=200, num_brands=120, num_users=4000, num_queries=2400, image_size=64,
        history_days=14, train_days=6, test_days=1, sessions_per_day=4000, early_days=3,
        judgment_queries=400, shards=4),
    # The daily cycle's tests: 6 days of 400 sessions.
    "tiny_moving": WorldConfig(
        name="tiny_moving", num_categories=4, num_patterns=2, num_palettes=2, num_items=480,
        num_shops=24, num_brands=16, num_users=240, num_queries=160, image_size=32,
        history_days=4, train_days=1, test_days=1, sessions_per_day=400,
        impressions_per_item_30d=20.0, judgment_queries=60, shards=2,
        movement=Movement(days=6, new_item_share=0.05, new_user_share=0.05)),
    # `make daily`: two weeks of a `small`-sized marketplace that moves (about 3% new items a
    # day).
    "moving": WorldConfig(
        name="moving", num_categories=8, num_patterns=4, num_palettes=4, num_items=6000,
        num_shops=200, num_brands=120, num_users=4000, num_queries=2400, image_size=64,
        history_days=14, train_days=1, test_days=1, sessions_per_day=3000,
        judgment_queries=400, shards=2, movement=Movement(days=14)),
    # Reproductions.
    "medium": WorldConfig(
        name="medium", num_categories=12, num_patterns=6, num_palettes=6, num_items=48000,
        num_shops=1000, num_brands=600, num_users=30000, num_queries=12000, image_size=64,
        history_days=14, train_days=13, test_days=1, sessions_per_day=20000, early_days=6,
        impressions_per_item_30d=36.0, judgment_queries=1000, shards=16),
    # The dose-response study (`DOSES`, `make repro-dose`): half of `small`'s catalog and
    # users, four train days.
    "dose": WorldConfig(
        name="dose", num_categories=8, num_patterns=4, num_palettes=4, num_items=4000,
        num_shops=100, num_brands=60, num_users=2000, num_queries=1200, image_size=64,
        history_days=14, train_days=4, test_days=1, sessions_per_day=3000,
        judgment_queries=200, shards=4),
}


# The dose-response study (`scripts/repro_dose.py`, docs/results.md): each of the three
# properties of the data that the papers' claims rest on, scaled by a strength in [0, 1] (1: the
# world as named, 0: the property absent). The catalog (items, styles, images) is the same at
# every strength; only the users' behaviour changes.
DOSES = {
    # Fine-grained visual style drives clicks (why learned image features help: S1, S2,
    # COURIER): the click logit's style terms, towards the query's and the user's own styles.
    "style": "click.query_style and click.user_style x strength",
    # Impressions are biased by popularity (why D helps the long tail): the display policy's
    # popularity exponent (0: items shown uniformly within their category).
    "popularity": "display_popularity_power x strength",
    # The user's intention is visible in their history's images (why COURIER beats S1): how
    # often a search is for one of the user's own styles, and how much their own styles drive
    # their clicks (0: the history's styles say nothing of the next page's clicks).
    "intention": "query_from_interest and click.user_style x strength",
}


def dosed(world: WorldConfig, dose: str, strength: float) -> WorldConfig:
    """`world` with the property `dose` (`DOSES`) scaled by `strength` in [0, 1]."""
    if dose not in DOSES:
        raise ValueError(f"unknown dose '{dose}'; known: {sorted(DOSES)}")
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    c = world.click
    if dose == "style":
        out = dataclasses.replace(world, click=dataclasses.replace(
            c, query_style=c.query_style * strength, user_style=c.user_style * strength))
    elif dose == "popularity":
        out = dataclasses.replace(
            world, display_popularity_power=world.display_popularity_power * strength)
    else:
        out = dataclasses.replace(world, query_from_interest=world.query_from_interest * strength,
                                  click=dataclasses.replace(c, user_style=c.user_style * strength))
    return dataclasses.replace(out, name=f"{world.name}-{dose}{strength:g}")


def get_world(name: str) -> WorldConfig:
    try:
        return WORLDS[name]
    except KeyError:
        raise ValueError(f"unknown world '{name}'; known: {sorted(WORLDS)}") from None

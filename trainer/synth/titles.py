"""Item titles of the synthetic marketplace (paper 002 Table 5's CLIP and MaskCLIP baselines, and
Table 8's COURIER + CLIP, learn from an item's cover image and its title).

A title is built the way sellers write them: a brand word, words for what the image shows (the
category's noun, the pattern, the colour) and generic selling words, with the noise of real
listings. Text therefore carries some but not all of what the image shows, and something it does
not:

- the category noun is usually present, sometimes missing, sometimes another category's
  (keyword stuffing);
- the pattern and colour words are often missing (sellers rarely describe texture) and sometimes
  wrong (a near colour, or a stock phrase copied from another listing);
- the palette pairs the renderer draws close in hue (red/vermilion, ...) get distinct words, so a
  title can separate what S1's colour jitter erases;
- the brand word is in the title only (no image shows it);
- generic words ("new", "sale", ...) carry nothing.

Titles come from their own random stream: adding them changed no other byte of a world.
"""
from __future__ import annotations

import numpy as np

from trainer.synth import render
from trainer.synth.config import TitleConfig

# One noun per category index (the world's categories are the first `num_categories`).
CATEGORY_WORDS = ("dress", "shirt", "boots", "handbag", "hat", "scarf", "coat", "skirt",
                  "sneakers", "watch", "lamp", "mug")
# The renderer's patterns and palettes, in its order (render._pattern, render._PALETTE_HUES).
PATTERN_WORDS = ("plain", "striped", "pinstripe", "diagonal", "checked", "polka", "wavy",
                 "ringed")
PALETTE_WORDS = ("red", "vermilion", "azure", "blue", "green", "jade", "violet", "magenta")
GENERIC_WORDS = ("new", "sale", "hot", "2026", "fashion", "premium", "classic", "gift", "free",
                 "shipping", "original", "quality", "trendy", "best", "seller", "women", "men",
                 "casual", "style", "deal")
assert len(PATTERN_WORDS) == render.NUM_PATTERNS and len(PALETTE_WORDS) == render.NUM_PALETTES
assert len(CATEGORY_WORDS) == render.NUM_SHAPES


def make_titles(category: np.ndarray, pattern: np.ndarray, palette: np.ndarray,
                brand: np.ndarray, num_categories: int, rng: np.random.Generator,
                cfg: TitleConfig) -> list[bytes]:
    """UTF-8 titles of items. category: [N] category indices (< num_categories); pattern,
    palette: [N] the renderer's pattern and palette ids; brand: [N] brand indices."""
    n = len(category)

    def maybe_wrong(true: np.ndarray, choices: int, p: float) -> np.ndarray:
        wrong = (true + rng.integers(1, max(choices, 2), n)) % max(choices, 1)
        return np.where(rng.random(n) < p, wrong, true)

    has = {k: rng.random(n) < getattr(cfg, k) for k in ("category", "wrong_category", "pattern",
                                                        "palette", "brand")}
    other_category = (category + rng.integers(1, max(num_categories, 2), n)) % num_categories
    pat = maybe_wrong(pattern, render.NUM_PATTERNS, cfg.wrong_style)
    pal = maybe_wrong(palette, render.NUM_PALETTES, cfg.wrong_style)
    generic = rng.integers(cfg.generic[0], cfg.generic[1] + 1, n)
    titles = []
    for i in range(n):
        attrs = [w for w, keep in ((PALETTE_WORDS[pal[i]], has["palette"][i]),
                                   (PATTERN_WORDS[pat[i]], has["pattern"][i])) if keep]
        if rng.random() < 0.5:  # sellers write the attributes in either order
            attrs.reverse()
        nouns = [CATEGORY_WORDS[category[i]]] if has["category"][i] else []
        if has["wrong_category"][i]:
            nouns.append(CATEGORY_WORDS[other_category[i]])
        words = ([f"brand{brand[i]}"] if has["brand"][i] else []) + attrs + nouns + [
            GENERIC_WORDS[j] for j in rng.choice(len(GENERIC_WORDS), generic[i], replace=False)]
        titles.append(" ".join(words).encode())
    return titles

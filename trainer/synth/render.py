"""Procedural item images: the category sets the silhouette, the style sets texture and palette.

A style is a (pattern, palette) pair shared by many items across categories. Its cues are
deliberately finer than the silhouette: a category classifier can ignore them (paper 000 Table 1,
ResNet-C), S1's colour jitter and greyscale erase the palette but not the pattern (paper 002 §2.2),
and only click supervision tells which of them users care about. Every image also carries
nuisance (scale, rotation, offset, background tint, shading, colour drift, noise) so that no two
items look identical; query photos get more of it (clutter, blur, lighting) than catalog shots.
"""
from __future__ import annotations

import colorsys
import io
import multiprocessing
from collections.abc import Sequence

import numpy as np
from PIL import Image

NUM_SHAPES = 12
NUM_PATTERNS = 8
NUM_PALETTES = 8

# Primary hues of the palettes, in near pairs (red/vermilion, blue/azure, ...): a style difference
# can be a shift of about 25 degrees of hue, which S1's hue jitter (up to +-0.2 turns) erases. The
# secondary colour is a light tint of the same hue, so patterns survive greyscale.
_PALETTE_HUES = (0.0, 0.07, 0.58, 0.65, 0.3, 0.37, 0.8, 0.87)
_PATTERN_FREQ = (0.0, 2.2, 2.2, 2.0, 1.6, 2.2, 1.8, 2.0)  # cycles per object radius


def palette_colors(palette: int) -> tuple[np.ndarray, np.ndarray]:
    """(primary, secondary) RGB in [0, 1] of a palette."""
    h = _PALETTE_HUES[palette]
    primary = np.array(colorsys.hsv_to_rgb(h, 0.7, 0.72), np.float32)
    secondary = np.array(colorsys.hsv_to_rgb(h, 0.22, 0.97), np.float32)
    return primary, secondary


def _shape_distance(shape: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Distance-like field per image whose level 1 is the silhouette boundary.

    shape: [N] ints; u, v: [N, H, W] object coordinates (radius 1 ~ object size).
    """
    rho = np.sqrt(u * u + v * v)
    au, av = np.abs(u), np.abs(v)
    phi = np.arctan2(v, u)
    rho2 = np.sqrt((u - 0.45) ** 2 + (v + 0.2) ** 2)
    fields = [
        lambda: rho,                                                        # 0 circle
        lambda: np.maximum(au, av) / 0.82,                                  # 1 square
        lambda: (au + av) / 1.15,                                           # 2 diamond
        lambda: np.maximum(au * 0.866 + v * 0.5, -v) / 0.55,                # 3 triangle
        lambda: np.abs(rho - 0.66) / 0.34,                                  # 4 ring
        lambda: np.minimum(np.maximum(au / 0.38, av), np.maximum(au, av / 0.38)),  # 5 cross
        lambda: np.sqrt(u * u + (v / 0.55) ** 2),                           # 6 wide ellipse
        lambda: np.maximum(au * 0.866 + av * 0.5, av) / 0.9,                # 7 hexagon
        lambda: np.maximum(au / 0.5, av),                                   # 8 tall bar
        lambda: rho / (0.64 + 0.36 * np.cos(5 * phi)),                      # 9 star
        lambda: np.maximum(rho, 0.75 / np.maximum(rho2, 1e-3)),             # 10 crescent
        lambda: np.minimum(np.maximum(au / 0.45, np.abs(v - 0.15) / 0.85),  # 11 tee
                           np.maximum(au, np.abs(v + 0.6) / 0.3)),
    ]
    out = np.empty_like(u)
    for s in np.unique(shape):
        idx = shape == s
        out[idx] = fields[int(s)]()[idx]
    return out


def _pattern(pattern: np.ndarray, u: np.ndarray, v: np.ndarray, freq: np.ndarray,
             phase: np.ndarray) -> np.ndarray:
    """Secondary-colour weight t in [0, 1] of each pixel. pattern/freq/phase: [N]."""
    k = (2 * np.pi * freq)[:, None, None]
    ph = phase[:, None, None]
    rho = np.sqrt(u * u + v * v)

    def soft(x):  # smooth square wave: crisp at 64 px, still visible at 32 px
        return 1.0 / (1.0 + np.exp(-4.0 * x))

    fields = [
        lambda: np.zeros_like(u),                                               # 0 solid
        lambda: soft(np.sin(k * v + ph)),                                       # 1 h-stripes
        lambda: soft(np.sin(k * u + ph)),                                       # 2 v-stripes
        lambda: soft(np.sin(k * (u + v) * 0.7071 + ph)),                        # 3 diagonal
        lambda: soft(np.sin(k * u + ph) * np.sin(k * v + ph) * 2.0),            # 4 checker
        lambda: soft(3.0 * (0.55 - np.sqrt(np.sin(k * u / 2 + ph) ** 2          # 5 dots
                                           + np.sin(k * v / 2 + ph) ** 2))),
        lambda: soft(np.sin(k * v + 1.6 * np.sin(k * u * 0.5) + ph)),           # 6 waves
        lambda: soft(np.sin(k * rho + ph)),                                     # 7 rings
    ]
    out = np.empty_like(u)
    for p in np.unique(pattern):
        idx = pattern == p
        out[idx] = fields[int(p)]()[idx]
    return out


def _box_blur(img: np.ndarray) -> np.ndarray:
    """3x3 box blur of [N, H, W, C] (edge-padded)."""
    p = np.pad(img, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = img.shape[1:3]
    total = np.zeros_like(img)
    for i in range(3):
        for j in range(3):
            total = total + p[:, i:i + h, j:j + w]
    return total / 9.0


def render(shape: np.ndarray, pattern: np.ndarray, palette: np.ndarray, size: int,
           rng: np.random.Generator, photo: bool = False) -> np.ndarray:
    """Renders N images as uint8 [N, size, size, 3].

    shape, pattern, palette: [N] int arrays. `photo=True` renders a user's query photo: off-centre,
    rotated, on a cluttered background, blurred and unevenly lit.
    """
    n = len(shape)
    f32 = np.float32
    lin = (np.arange(size, dtype=f32) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(lin, lin, indexing="ij")
    x, y = x[None], y[None]

    scale = (rng.uniform(0.55, 0.8, n) if not photo else rng.uniform(0.45, 0.8, n)).astype(f32)
    angle = (rng.uniform(-0.3, 0.3, n) if not photo else rng.uniform(-0.8, 0.8, n)).astype(f32)
    shift = (rng.uniform(-0.12, 0.12, (n, 2)) if not photo
             else rng.uniform(-0.25, 0.25, (n, 2))).astype(f32)
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    xs, ys = x - shift[:, 0, None, None], y - shift[:, 1, None, None]
    sc = scale[:, None, None]
    u = (xs * c + ys * s) / sc
    v = (-xs * s + ys * c) / sc

    d = _shape_distance(shape, u, v)
    px = sc * size / 2  # pixels per object unit: antialias over about one pixel
    mask = np.clip((1.0 - d) * px + 0.5, 0.0, 1.0)[..., None]

    freq = np.array([_PATTERN_FREQ[p] for p in pattern], f32) * rng.uniform(0.9, 1.1, n).astype(f32)
    phase = rng.uniform(0, 2 * np.pi, n).astype(f32)
    t = _pattern(pattern, u, v, freq, phase)[..., None]

    prim = np.stack([palette_colors(p)[0] for p in palette])
    sec = np.stack([palette_colors(p)[1] for p in palette])
    drift = rng.normal(0, 0.035, (n, 3)).astype(f32)  # per-item colour drift (dye lots, lighting)
    prim = np.clip(prim + drift, 0, 1)[:, None, None]
    sec = np.clip(sec + drift * 0.5, 0, 1)[:, None, None]
    obj = prim * (1 - t) + sec * t

    # Shading: a soft directional light across the object.
    light_dir = rng.uniform(0, 2 * np.pi, n).astype(f32)
    grad = (np.cos(light_dir)[:, None, None] * u + np.sin(light_dir)[:, None, None] * v)[..., None]
    obj = obj * (1.0 - 0.08 * np.clip(grad, -1.5, 1.5))

    bg_tint = (rng.uniform(0.86, 0.97, (n, 1, 1, 1)).astype(f32)
               + rng.normal(0, 0.015, (n, 1, 1, 3)).astype(f32))
    bg = np.broadcast_to(bg_tint, (n, size, size, 3)).copy()
    if photo:
        # Clutter: a few soft blobs of random colour behind the object.
        for _ in range(3):
            cx, cy = rng.uniform(-1, 1, (2, n, 1, 1)).astype(f32)
            r = rng.uniform(0.2, 0.5, (n, 1, 1)).astype(f32)
            col = rng.uniform(0.4, 0.95, (n, 1, 1, 3)).astype(f32)
            blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None] * 0.6
            bg = bg * (1 - blob) + col * blob
    img = bg * (1 - mask) + obj * mask

    if photo:
        gain = rng.uniform(0.75, 1.15, (n, 1, 1, 1)).astype(f32)
        img = _box_blur(img) * gain
    img = img + rng.normal(0, 0.03 if photo else 0.015, img.shape).astype(f32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def encode_jpeg(img: np.ndarray, quality: int = 92) -> bytes:
    """JPEG bytes of one uint8 [H, W, 3] image (4:4:4 so that fine colour texture survives)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _render_chunk(task) -> list[bytes]:
    shape, pattern, palette, size, seed, photo = task
    imgs = render(shape, pattern, palette, size, np.random.default_rng(seed), photo=photo)
    return [encode_jpeg(im) for im in imgs]


def render_encoded(shape: np.ndarray, pattern: np.ndarray, palette: np.ndarray, size: int,
                   seed: Sequence[int], photo: bool = False, chunk: int = 256,
                   workers: int = 1) -> list[bytes]:
    """Renders and JPEG-encodes images chunk by chunk (bounded memory).

    Chunk i draws its nuisance from `default_rng([*seed, i])`, so the bytes do not depend on
    `workers` (processes rendering chunks in parallel).
    """
    tasks = [(np.asarray(shape[lo:lo + chunk]), np.asarray(pattern[lo:lo + chunk]),
              np.asarray(palette[lo:lo + chunk]), size, [*seed, i], photo)
             for i, lo in enumerate(range(0, len(shape), chunk))]
    if workers > 1 and len(tasks) > 1:
        # spawn, not fork: the parent may hold TensorFlow's threads.
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            parts = pool.map(_render_chunk, tasks)
    else:
        parts = [_render_chunk(t) for t in tasks]
    return [b for part in parts for b in part]

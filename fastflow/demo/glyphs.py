"""Procedural 32x32 RGB glyph data set for the demo model.

Every image shows one character out of :data:`CHARS` (digits 0-9 then capital
letters A-Z, so label ``i`` is ``CHARS[i]``) drawn with Pillow's bundled
scalable font (Aileron, available offline on every Pillow >= 10.1 install), with
a random font size, stroke weight, small rotation, position jitter, glyph colour
and background (flat colour, linear gradient or light noise).  Glyph and
background always differ in luminance by at least :data:`MIN_CONTRAST`.

Rendering is deterministic: image ``k`` of a call with seed ``s`` is drawn from
``numpy.random.default_rng([s, k])`` only, so the result does not depend on
batch size, chunking or the machine (no system fonts are used unless asked
for with ``fonts="system"``).

Seed ranges used by the project (kept disjoint on purpose):

* ``FLOW_TRAIN_SEED + s`` (0, 1, ...): training data of the flow model trained
  with ``--seed s``;
* ``CLASSIFIER_TRAIN_SEED`` (10_000): training data of the evaluation classifier;
* ``CLASSIFIER_VAL_SEED`` (20_000): held-out data to measure the classifier;
* ``EVAL_SEED`` (30_000): real reference images for Frechet distances.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import CHARS, NUM_CLASSES  # the one alphabet

IMAGE_SIZE = 32

FLOW_TRAIN_SEED = 0
CLASSIFIER_TRAIN_SEED = 10_000
CLASSIFIER_VAL_SEED = 20_000
EVAL_SEED = 30_000

#: minimum luminance difference (0..1) between glyph and background
MIN_CONTRAST = 0.35

_SS = 2  # supersampling factor: glyphs are drawn at 64x64 and reduced
_SYSTEM_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
)


def label_to_char(label: int) -> str:
    return CHARS[int(label)]


def char_to_label(ch: str) -> int:
    idx = CHARS.find(ch.upper())
    if idx < 0 or len(ch) != 1:
        raise ValueError(f"not a glyph character: {ch!r} (expected one of {CHARS})")
    return idx


@functools.lru_cache(maxsize=256)
def _font(size: int, path: str | None = None) -> ImageFont.FreeTypeFont:
    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(path, size=size)


def available_system_fonts() -> list[str]:
    """System TrueType fonts that ``fonts="system"`` would add (may be empty)."""
    return [p for p in _SYSTEM_FONTS if os.path.exists(p)]


def _luma(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    while True:
        fg = rng.random(3)
        bg = rng.random(3)
        if abs(_luma(fg) - _luma(bg)) >= MIN_CONTRAST:
            return fg, bg


def _background(rng: np.random.Generator, bg: np.ndarray, fg: np.ndarray) -> np.ndarray:
    n = IMAGE_SIZE
    kind = rng.random()
    if kind < 0.4:  # flat
        return np.broadcast_to(bg, (n, n, 3)).copy()
    if kind < 0.7:  # linear gradient between bg and a nearby colour of the same side of fg
        bg2 = np.clip(bg + rng.uniform(-0.3, 0.3, 3), 0.0, 1.0)
        if abs(_luma(bg2) - _luma(fg)) < MIN_CONTRAST or (_luma(bg2) - _luma(fg)) * (_luma(bg) - _luma(fg)) < 0:
            bg2 = bg
        ang = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) / (n - 1) - 0.5
        w = (np.cos(ang) * xx + np.sin(ang) * yy) / np.sqrt(0.5) + 0.5  # 0..1 roughly
        w = np.clip(w, 0.0, 1.0)[..., None]
        return bg * (1 - w) + bg2 * w
    # light noise: per-pixel, either grey or coloured
    sigma = rng.uniform(0.02, 0.06)
    if rng.random() < 0.5:
        noise = rng.normal(0.0, sigma, (n, n, 1))
    else:
        noise = rng.normal(0.0, sigma, (n, n, 3))
    return np.clip(bg + noise, 0.0, 1.0)


def _glyph_mask(ch: str, rng: np.random.Generator, font_paths: tuple[str | None, ...]) -> np.ndarray:
    """Anti-aliased coverage (32, 32) float in [0, 1] of one randomly placed glyph."""
    big = IMAGE_SIZE * _SS
    size = int(rng.integers(18, 29)) * _SS  # font size in output pixels: 18..28
    stroke = int(rng.choice([0, 0, 1, 2]))  # thin / regular / bold
    angle = float(rng.uniform(-15.0, 15.0))
    dx = float(rng.uniform(-3.0, 3.0)) * _SS
    dy = float(rng.uniform(-3.0, 3.0)) * _SS
    path = font_paths[int(rng.integers(len(font_paths)))] if len(font_paths) > 1 else font_paths[0]
    font = _font(size, path)
    l, t, r, b = font.getbbox(ch, stroke_width=stroke)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    x = big / 2 - (l + r) / 2
    y = big / 2 - (t + b) / 2
    draw.text((x, y), ch, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    mask = mask.rotate(angle, resample=Image.BICUBIC, translate=(dx, dy))
    mask = mask.reduce(_SS)
    return np.asarray(mask, dtype=np.float64) / 255.0


def render_batch(labels, seed: int, *, start_index: int = 0, fonts: str = "default") -> np.ndarray:
    """Render glyph images for ``labels``.

    Image ``k`` uses ``numpy.random.default_rng([seed, start_index + k])``.
    ``fonts`` is ``"default"`` (Pillow's bundled font only: reproducible
    everywhere) or ``"system"`` (also DejaVu fonts where installed).

    Returns a uint8 array of shape (N, 32, 32, 3).
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be in [0, {NUM_CLASSES}), got min {labels.min()} max {labels.max()}")
    if fonts == "default":
        font_paths: tuple[str | None, ...] = (None,)
    elif fonts == "system":
        font_paths = (None, *available_system_fonts())
    else:
        raise ValueError(f"fonts must be 'default' or 'system', got {fonts!r}")
    out = np.empty((labels.size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for k, lab in enumerate(labels):
        rng = np.random.default_rng([int(seed), int(start_index) + k])
        fg, bg = _colours(rng)
        back = _background(rng, bg, fg)
        a = _glyph_mask(CHARS[lab], rng, font_paths)[..., None]
        img = back * (1.0 - a) + fg * a
        out[k] = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return out


def balanced_labels(n: int, seed: int) -> np.ndarray:
    """``n`` labels cycling over all classes, shuffled deterministically by ``seed``."""
    labels = np.arange(n, dtype=np.int64) % NUM_CLASSES
    rng = np.random.default_rng([int(seed), 2**31 - 1])
    rng.shuffle(labels)
    return labels


def _render_chunk(args) -> np.ndarray:
    labels, seed, start, fonts = args
    return render_batch(labels, seed, start_index=start, fonts=fonts)


def make_dataset(n: int, seed: int, *, fonts: str = "default", workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``n`` class-balanced glyphs: (uint8 images (n, 32, 32, 3), int64 labels (n,)).

    ``workers > 1`` renders in that many processes; the result is identical (image ``k``
    depends on ``(seed, k)`` alone)."""
    labels = balanced_labels(n, seed)
    if workers <= 1 or n < 4096:
        return render_batch(labels, seed, fonts=fonts), labels
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    bounds = np.linspace(0, n, 4 * workers + 1).astype(int)
    jobs = [(labels[a:b], seed, int(a), fonts) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        chunks = list(ex.map(_render_chunk, jobs))
    return np.concatenate(chunks), labels


def to_tensor(images: np.ndarray):
    """uint8 (N, H, W, 3) -> float32 torch tensor (N, 3, H, W) in [-1, 1]."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x) -> np.ndarray:
    """float tensor (N, 3, H, W) in [-1, 1] -> uint8 array (N, H, W, 3)."""
    import torch

    x = torch.as_tensor(x).detach().float().clamp(-1, 1)
    x = ((x + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()

"""A comparison sheet a person can read without the README: what ran, how fast, and
each accelerated sample above its all-steps twin, with the requested class under it."""

from __future__ import annotations

import math

import numpy as np


def _tiles(x, scale: int) -> list[np.ndarray]:
    """Images in [-1, 1], (N, C, H, W) → uint8 (H·s, W·s, 3) tiles."""
    arr = ((np.asarray(x.detach().cpu().float()).clip(-1, 1) + 1) * 127.5).round().astype(np.uint8)
    if arr.shape[1] == 1:
        arr = np.repeat(arr, 3, axis=1)
    arr = arr.transpose(0, 2, 3, 1)
    return [a.repeat(scale, axis=0).repeat(scale, axis=1) for a in arr]


def comparison_sheet(path: str, samples, reference=None, *, title: str, row_labels: tuple[str, str],
                     captions: list[str] | None = None, columns: int = 12, scale: int = 2) -> str:
    """Write ``path``: a title, then for every group of ``columns`` samples a row of
    accelerated samples, a row of the same seeds with every step computed (when
    ``reference`` is given) and the requested class under each column. Every sample
    is shown."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    acc = _tiles(samples, scale)
    ref = _tiles(reference, scale) if reference is not None else None
    n = len(acc)
    cols = max(1, min(columns, n))
    groups = math.ceil(n / cols)
    th, tw = acc[0].shape[:2]
    pad, label_w, cap_h, title_h = 4, 150, 18, 30
    rows_per_group = 2 if ref is not None else 1
    group_h = rows_per_group * (th + pad) + cap_h + pad
    width = label_w + cols * (tw + pad) + pad
    height = title_h + groups * group_h + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 8), title, fill=(0, 0, 0), font=font)
    for g in range(groups):
        top = title_h + g * group_h
        for r, (tiles, label) in enumerate([(acc, row_labels[0])] + ([(ref, row_labels[1])] if ref else [])):
            y = top + r * (th + pad)
            draw.text((pad, y + th // 2 - 7), label, fill=(0, 0, 0) if r == 0 else (90, 90, 90), font=small)
            for c in range(cols):
                i = g * cols + c
                if i < n:
                    sheet.paste(Image.fromarray(tiles[i]), (label_w + c * (tw + pad), y))
        if captions:
            y = top + rows_per_group * (th + pad)
            if g == 0:
                draw.text((pad, y + 1), "requested:", fill=(90, 90, 90), font=small, anchor="lt")
            for c in range(cols):
                i = g * cols + c
                if i < n:
                    cx = label_w + c * (tw + pad) + tw // 2
                    draw.text((cx, y + 1), captions[i], fill=(0, 0, 0), font=small, anchor="mt")
    sheet.save(path)
    return path

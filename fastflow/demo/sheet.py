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
    title_w = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font))
    width = max(label_w + cols * (tw + pad) + pad, title_w + 2 * pad)  # a narrow sheet keeps its whole title
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


def clip_strips(clips, gap: int = 1):
    """Clips (N, C, F, H, W) in [-1, 1] → images (N, C, H, F·(W + gap) − gap): the frames
    left to right, a white line between them, so a clip reads as one tile of a sheet."""
    import torch

    n, c, f, h, w = clips.shape
    frames = clips.detach().cpu().float()
    line = torch.ones(n, c, h, gap)
    parts = []
    for i in range(f):
        parts.append(frames[:, :, i])
        if i < f - 1:
            parts.append(line)
    return torch.cat(parts, dim=3)


def points_sheet(path: str, samples, reference=None, *, title: str, labels: tuple[str, str],
                 size: int = 520) -> str:
    """Write ``path``: 2-D samples as dots (blue) and their all-steps twins (grey), a
    line joining each pair, axes through the origin, the title and a legend."""
    from PIL import Image, ImageDraw, ImageFont

    pts = np.asarray(samples.detach().cpu().float())
    ref = np.asarray(reference.detach().cpu().float()) if reference is not None else None
    both = pts if ref is None else np.concatenate([pts, ref])
    span = float(np.abs(both).max()) * 1.1 or 1.0
    top, margin = 56, 24
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=12)
    width = max(size, int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font)) + 2 * margin)
    left = (width - size) // 2  # the square plot, centred under a wider title
    img = Image.new("RGB", (width, size + top), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((margin, 8), title, fill=(0, 0, 0), font=font)

    def xy(p):
        half = (size - 2 * margin) / 2
        return left + margin + half + p[0] / span * half, top + margin + half - p[1] / span * half

    o = xy((0.0, 0.0))
    draw.line([(left + margin, o[1]), (left + size - margin, o[1])], fill=(225, 225, 225))
    draw.line([(o[0], top + margin), (o[0], size + top - margin)], fill=(225, 225, 225))
    blue, grey = (31, 90, 200), (150, 150, 150)
    if ref is not None:
        for a, b in zip(pts, ref):
            draw.line([xy(a), xy(b)], fill=(230, 120, 120))
        for b in ref:
            x, y = xy(b)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=grey)
    for a in pts:
        x, y = xy(a)
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=blue)
    legend = [(blue, labels[0])] + ([(grey, labels[1]), ((230, 120, 120), "a line joins each pair (same seed)")]
                                     if ref is not None else [])
    x = margin
    for colour, text in legend:
        draw.rectangle([x, 33, x + 8, 41], fill=colour)
        draw.text((x + 12, 31), text, fill=(60, 60, 60), font=small)
        x += 20 + int(draw.textlength(text, font=small))
    img.save(path)
    return path

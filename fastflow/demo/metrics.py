"""Image-quality metrics for the demo model (torch, batch friendly).

* :func:`class_accuracy` / :func:`predict` / :func:`features` use the shipped
  evaluation classifier (:mod:`fastflow.demo.classifier`), loaded once lazily;
* :func:`frechet_distance` between two feature sets (Frechet "FID-style"
  distance on the classifier's penultimate features, *not* Inception FID);
* :func:`psnr` and :func:`ssim` compare images in [-1, 1];
* :func:`save_image_grid` writes a PNG grid.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

_CLASSIFIER = None


def _default_classifier():
    global _CLASSIFIER
    if _CLASSIFIER is None:
        from .classifier import load_classifier

        _CLASSIFIER = load_classifier()
    return _CLASSIFIER


def _as_images(images) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:  # (N, H, W, 3) uint8 from the renderer
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
    return x.float()


@torch.no_grad()
def _run(images, classifier, batch_size: int, fn):
    clf = classifier if classifier is not None else _default_classifier()
    x = _as_images(images)
    outs = [fn(clf, x[i:i + batch_size].to(next(clf.parameters()).device)).cpu()
            for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def logits(images, *, classifier=None, batch_size: int = 512) -> torch.Tensor:
    return _run(images, classifier, batch_size, lambda c, x: c(x))


def predict(images, *, classifier=None, batch_size: int = 512) -> torch.Tensor:
    """Predicted class (N,) long."""
    return logits(images, classifier=classifier, batch_size=batch_size).argmax(1)


def class_accuracy(images, labels, *, classifier=None, batch_size: int = 512) -> float:
    """Fraction of ``images`` (N, 3, 32, 32) in [-1, 1] that the classifier assigns to ``labels``."""
    labels = torch.as_tensor(labels).long().reshape(-1)
    pred = predict(images, classifier=classifier, batch_size=batch_size)
    if pred.numel() != labels.numel():
        raise ValueError(f"{pred.numel()} images but {labels.numel()} labels")
    return float((pred == labels).float().mean()) if labels.numel() else float("nan")


def features(images, *, classifier=None, batch_size: int = 512) -> torch.Tensor:
    """Penultimate-layer features (N, D) float64 of the evaluation classifier."""
    return _run(images, classifier, batch_size, lambda c, x: c.features(x)).double()


def _stats(feats) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(torch.as_tensor(feats).double().cpu().numpy(), dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need a (N >= 2, D) feature array, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D):
    ``|mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2)``.

    The matrix square-root trace is computed from the eigenvalues of the
    symmetric PSD matrix ``Sa^1/2 Sb Sa^1/2`` (symmetric eigendecompositions
    only, negative round-off eigenvalues clipped), which is numerically stable
    for rank-deficient covariances.  Identical sets give ~0.
    """
    mu_a, sa = _stats(feats_a)
    mu_b, sb = _stats(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    w, v = np.linalg.eigh((sa + sa.T) / 2)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_a @ sb @ sqrt_a
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
    d = float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2.0 * tr_covmean)
    return max(d, 0.0)


def _image_pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """Two image batches as float64 (N, C, H, W) of the same shape (a single image gets N = 1)."""
    a = torch.as_tensor(a).double()
    b = torch.as_tensor(b).double()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    return a, b


def psnr(a, b, data_range: float = 2.0, reduction: str = "mean"):
    """PSNR in dB between image batches (N, C, H, W); ``inf`` for identical images.

    ``reduction="none"`` returns the per-sample tensor (N,), ``"mean"`` the mean
    over samples as a float (inf if any pair is identical)."""
    from fastflow.metrics import psnr_per_sample

    per = psnr_per_sample(*_image_pair(a, b), data_range)
    if reduction == "none":
        return per.float()
    if reduction == "mean":
        return float(per.mean())
    raise ValueError("reduction must be 'mean' or 'none'")


def _gaussian_window(size: int, sigma: float, channels: int, dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    w2 = g[:, None] * g[None, :]
    return w2.expand(channels, 1, size, size).contiguous()


def ssim(a, b, data_range: float = 2.0, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03, reduction: str = "mean"):
    """Structural similarity (Wang et al. 2004) with an ``win_size`` Gaussian
    window (sigma 1.5), computed per channel over the valid region and averaged;
    images (N, C, H, W) in [-1, 1] (``data_range`` 2).  Identical images -> 1.0.

    ``reduction="none"`` gives per-sample values (N,), ``"mean"`` a float."""
    a, b = _image_pair(a, b)
    c = a.shape[1]
    win_size = min(win_size, a.shape[-1], a.shape[-2])
    w = _gaussian_window(win_size, sigma, c, a.dtype)
    conv = lambda x: F.conv2d(x, w, groups=c)  # noqa: E731
    mu_a, mu_b = conv(a), conv(b)
    s_aa = conv(a * a) - mu_a**2
    s_bb = conv(b * b) - mu_b**2
    s_ab = conv(a * b) - mu_a * mu_b
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))
    per = smap.flatten(1).mean(1)
    if reduction == "none":
        return per.float()
    if reduction == "mean":
        return float(per.mean())
    raise ValueError("reduction must be 'mean' or 'none'")


def image_grid(images, nrow: int = 8, padding: int = 2, scale: int = 1, pad_value: int = 255) -> np.ndarray:
    """uint8 (H, W, 3) grid of ``images`` ((N, 3, h, w) in [-1, 1] or uint8 (N, h, w, 3)), ``nrow`` per row."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        arr = x.numpy()
    else:
        x = x.detach().float().clamp(-1, 1)
        arr = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    n, h, w, _ = arr.shape
    if scale > 1:
        arr = arr.repeat(scale, 1).repeat(scale, 2)
        h, w = h * scale, w * scale
    ncol = max(1, min(nrow, n))
    rows = max(1, math.ceil(n / ncol))
    grid = np.full((rows * (h + padding) + padding, ncol * (w + padding) + padding, 3), pad_value, np.uint8)
    for i in range(n):
        r, cidx = divmod(i, ncol)
        y0, x0 = padding + r * (h + padding), padding + cidx * (w + padding)
        grid[y0:y0 + h, x0:x0 + w] = arr[i]
    return grid


def save_image_grid(images, path: str, nrow: int = 8, labels=None, scale: int = 2, padding: int = 2) -> str:
    """Write a PNG grid of ``images`` to ``path`` (``nrow`` images per row,
    enlarged ``scale`` times).  With ``labels`` (ints or strings) each image gets
    its caption (the glyph character for int labels) drawn above it."""
    from PIL import Image, ImageDraw, ImageFont

    grid = image_grid(images, nrow=nrow, padding=padding, scale=scale)
    img = Image.fromarray(grid)
    if labels is not None:
        from .glyphs import CHARS

        x = torch.as_tensor(images)
        h = (x.shape[1] if x.dtype == torch.uint8 else x.shape[2]) * scale
        w = (x.shape[2] if x.dtype == torch.uint8 else x.shape[3]) * scale
        cap = 12
        n = len(labels)
        ncol = max(1, min(nrow, n))
        rows = max(1, math.ceil(n / ncol))
        canvas = Image.new("RGB", (img.width, rows * (h + padding + cap) + padding), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default(size=10)
        for i, lab in enumerate(labels):
            r, cidx = divmod(i, ncol)
            sx, sy = padding + cidx * (w + padding), padding + r * (h + padding)
            tile = img.crop((sx, sy, sx + w, sy + h))
            dy = padding + r * (h + padding + cap)
            text = CHARS[int(lab)] if isinstance(lab, (int, np.integer)) or torch.is_tensor(lab) else str(lab)
            draw.text((sx, dy), text, fill=(0, 0, 0), font=font)
            canvas.paste(tile, (sx, dy + cap))
        img = canvas
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    img.save(path)
    return path

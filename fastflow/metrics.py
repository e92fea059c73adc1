"""Small comparisons between two outputs for the same seeds."""

from __future__ import annotations

import math


def psnr(a, b, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio of ``a`` against reference ``b`` in dB, over all elements.

    ``data_range`` defaults to the reference's peak-to-peak range (images in [-1, 1]
    should pass 2.0). Identical inputs give ``inf``.
    """
    import torch

    a, b = a.double(), b.double()
    mse = torch.mean((a - b) ** 2).item()
    if data_range is None:
        data_range = (b.max() - b.min()).item() or 1.0
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def psnr_per_sample(a, b, data_range: float):
    """PSNR of each sample (rows of the batch) in dB, a float64 tensor (N,); ``inf``
    where a sample equals its reference."""
    import torch

    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def max_abs_error(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()

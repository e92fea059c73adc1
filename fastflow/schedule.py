"""Timestep schedules in the diffusers flow-matching convention.

t = 1 is pure noise, t = 0 is data; x_t = t·noise + (1 − t)·data and the model
predicts v = noise − data, so an Euler step is x ← x + (t_next − t)·v.
"""

from __future__ import annotations

import math
import numbers

from .errors import OptionError

#: More steps than any flow sampler needs; a larger count is a typo, refused before any work.
MAX_STEPS = 10_000


def timesteps(steps: int, shift: float | None = None) -> list[float]:
    """The ``steps + 1`` times from 1 down to 0 that a ``steps``-step sampler visits.

    ``shift`` applies the FLUX/SD3 time shift t' = s·t / (1 + (s − 1)·t), which spends
    more steps at high noise for s > 1. ``None`` or 1 is the uniform schedule.

    >>> timesteps(4)
    [1.0, 0.75, 0.5, 0.25, 0.0]
    >>> [round(t, 3) for t in timesteps(2, shift=3.0)]
    [1.0, 0.75, 0.0]
    """
    if hasattr(steps, "item") and getattr(steps, "ndim", 1) == 0 and not getattr(steps, "is_floating_point",
                                                                                 lambda: False)():
        steps = steps.item()  # a numpy or torch integer scalar
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
        raise OptionError(f"steps must be a positive integer, got {steps!r}")
    if steps > MAX_STEPS:
        raise OptionError(f"steps={steps} is above {MAX_STEPS}: flow samplers converge long before that "
                          f"(50 is typical); pass fewer steps")
    steps = int(steps)
    if shift is not None:
        try:
            shift = float(shift)
        except (TypeError, ValueError):
            raise OptionError(f"shift must be a positive number, got {shift!r}") from None
        if not math.isfinite(shift):
            raise OptionError(f"shift must be a finite positive number, got {shift!r}")
    if shift is not None and not shift > 0:
        raise OptionError(f"shift must be a positive number, got {shift!r}")
    ts = [1.0 - k / steps for k in range(steps + 1)]
    if shift is not None and shift != 1.0:
        ts = [shift * t / (1.0 + (shift - 1.0) * t) for t in ts]
    ts[-1] = 0.0
    return ts

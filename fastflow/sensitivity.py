"""How much an error made at time t grows by the end of the sample: the sensitivity A(t).

A skip run adds an error e to the state at the step j where the model is next
consulted. What reaches the output is not e: the rest of the trajectory can shrink it
(late, where the sample is settled) or blow it up (early, where it decides what the
sample becomes). On the shipped glyph model a skip at t = 0.96 costs the output 50-120
times its own squared size, one at t = 0.3 about 0.6 times (docs/policies.md). Pricing
every step's error alike, as the paper's rewards do, spends skips where they hurt most.

A(t_j) is measured in the calibration sample, which computes every step anyway: at a
few probe steps j the model is also evaluated at x_j + e_j, where e_j is the error a
two-step skip run ending at j would have added (from the recorded true velocities).
The one-step look-ahead to the output, x̂₀ = x − t·v, changes by
d = e_j − t_j·(v(x_j + e_j) − v(x_j)), and A(t_j) = ‖d‖² / ‖e_j‖². Between probes A is
interpolated in log space; it is a property of the model and schedule, kept with what
a policy learned. Each probe is one extra model evaluation of the calibration rows:
12 on a 50-step schedule, one per 4 steps on shorter ones.
"""

from __future__ import annotations

import math
from typing import Any

from . import estimator

PROBE_RUN = 2  # the skip run whose error probes the sensitivity (steps j−2, j−1 skipped)
PROBES = 12  # most probe steps per calibration (one per 4 steps below 48 steps, at least 3)


def probe_steps(steps: int, room: list[int], count: int | None = None) -> list[int]:
    """About ``count`` steps j, spread evenly over the steps a skip run can end at,
    where the error of a two-step run from (j−4, j−3) can be formed."""
    if count is None:
        count = max(3, min(PROBES, steps // 4))
    first = PROBE_RUN + 2
    ends = [j for j in range(first, steps) if any(room[i] for i in range(j - PROBE_RUN, j))]
    if len(ends) <= count:
        return ends
    return sorted({ends[round(i * (len(ends) - 1) / (count - 1))] for i in range(count)})


def perturbation(vs: list[Any], ts: list[float], j: int) -> Any:
    """e_j = Σ h_i (v̂_i − v_i) over i = j−2, j−1, extrapolating from the true
    velocities at j−4 and j−3 (``vs`` must hold steps 0..j−1)."""
    return estimator.state_error(vs, ts, j - PROBE_RUN - 2, j - PROBE_RUN - 1, j - PROBE_RUN, j)


def amplification(e: Any, v_probe: Any, v: Any, t: float) -> Any:
    """‖e − t·(v_probe − v)‖² / ‖e‖² as a 0-d float32 tensor on the device."""
    d = e - (v_probe.float() - v.float()) * t
    return d.square().mean() / e.square().mean().clamp_min(1e-30)


def profile(points: dict[int, float], steps: int) -> list[float] | None:
    """A(t_j) for j = 0..steps from probe values (log-linear between probes, flat
    beyond them); None when no probe gave a finite positive value."""
    good = sorted((j, math.log(a)) for j, a in points.items() if math.isfinite(a) and a > 0)
    if not good:
        return None
    out = []
    for j in range(steps + 1):
        if j <= good[0][0]:
            out.append(math.exp(good[0][1]))
        elif j >= good[-1][0]:
            out.append(math.exp(good[-1][1]))
        else:
            for (j0, a0), (j1, a1) in zip(good, good[1:]):
                if j0 <= j <= j1:
                    out.append(math.exp(a0 + (a1 - a0) * (j - j0) / (j1 - j0)))
                    break
    return out


class Probe:
    """The sensitivity probes of one calibration sample: the controller asks
    :meth:`request` at each computed step (a perturbation, or None), evaluates the model
    at x + e and hands the result to :meth:`result`; :meth:`values` reads them in one
    transfer when the sample ends."""

    def __init__(self, ts: list[float], room: list[int], vs: list[Any]):
        self.ts, self.vs = ts, vs
        self.steps = set(probe_steps(len(ts) - 1, room))
        self.pending: tuple[int, Any] | None = None
        self.found: dict[int, Any] = {}

    def request(self, k: int) -> Any:
        if k not in self.steps or len(self.vs) < k:
            return None
        e = perturbation(self.vs, self.ts, k)
        self.pending = (k, e)
        return e

    def cancel(self) -> None:
        """The requested evaluation could not be made: no value at that step."""
        self.pending = None

    def result(self, k: int, v_probe: Any, v: Any) -> None:
        j, e = self.pending
        self.pending = None
        self.found[j] = amplification(e, v_probe, v, self.ts[j])

    def values(self) -> dict[int, float]:
        if not self.found:
            return {}
        import torch

        keys = sorted(self.found)
        host = torch.stack([self.found[j] for j in keys]).double().tolist()
        return dict(zip(keys, host))

"""``threshold``: TeaCache-style — skip while the accumulated relative change stays small.

After each evaluation the relative change of the velocity per step,
r = ‖v_k − v_p‖₁ / ‖v_p‖₁ / (k − p), estimates how fast the path is turning. The policy
then skips n steps, the largest n with n·r below ``threshold`` (capped by
``max_skip``): the accumulated change TeaCache thresholds, measured on the output
instead of a modulated input. Reading r costs one device→host transfer per evaluation;
``ucb`` and ``fixed`` need none.
"""

from __future__ import annotations

from fastflow.hookspecs import hookimpl
from fastflow.policy import Policy, PolicyRun, opt_float, opt_int


class _ThresholdRun(PolicyRun):
    def __init__(self, threshold: float, max_skip: int, order: int):
        self.threshold, self.max_skip, self.order = threshold, max_skip, order

    def decide(self, k, hist):
        delta = (hist.v_cur - hist.v_prev).abs().mean()
        scale = hist.v_prev.abs().mean().clamp_min(1e-12)
        rate = float(delta / scale) / max(hist.k_cur - hist.k_prev, 1)
        if not rate > 0:  # zero change (or NaN, which the engine reports)
            return self.max_skip if rate == 0 else 0
        n = 0
        while n < self.max_skip and (n + 1) * rate < self.threshold:
            n += 1
        return n


class ThresholdPolicy(Policy):
    """Options:
        threshold: accumulated relative velocity change allowed while skipping (default 0.1).
        max_skip: most steps skipped in a row (default 6).
        order: extrapolation order of the skipped steps, 1 (the last two true
            velocities) or 2 (the quadratic through the last three; default 1).
    """

    name = "threshold"

    def __init__(self, *, threshold: float = 0.1, max_skip: int = 6, order: int = 1, **common):
        super().__init__(**common)
        self.order = opt_int("order", order, lo=1, hi=2)
        self.threshold = opt_float("threshold", threshold, lo=0.0)
        self.max_skip = opt_int("max_skip", max_skip, lo=0)

    def start(self, ctx):
        return _ThresholdRun(self.threshold, self.max_skip, self.order)

    def options(self):
        return {"threshold": self.threshold, "max_skip": self.max_skip, "order": self.order, **super().options()}


@hookimpl
def register_policies(register):
    register("threshold", ThresholdPolicy, description="TeaCache-style: skip while relative change is small")

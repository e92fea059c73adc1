"""``threshold``: TeaCache-style — skip while the accumulated relative change stays small.

After each evaluation the relative change of the velocity per step,
r = ‖v_k − v_p‖₁ / ‖v_p‖₁ / (k − p), estimates how fast the path is turning. The policy
then skips n steps, the largest n with n·r below ``threshold`` (capped by
``max_skip``): the accumulated change TeaCache thresholds, measured on the output
instead of a modulated input. Reading r costs one device→host transfer per evaluation;
``ucb`` and ``fixed`` need none.

With ``per_sample=true`` every row measures its own r and skips on its own
(:mod:`fastflow.rows`, and the diffusers hook); the default decides per batch: measured
on two models, with skip runs corrected, per-sample decisions are level or behind at
matched NFE, even on batches mixing generations and edits (docs/benchmarks.md).
"""

from __future__ import annotations

from fastflow.hookspecs import hookimpl
from fastflow.errors import OptionError
from fastflow.policy import Policy, PolicyRun, opt_bool, opt_float, opt_int


class _ThresholdRun(PolicyRun):
    def __init__(self, threshold: float, max_skip: int, order: int):
        self.threshold, self.max_skip, self.order = threshold, max_skip, order

    def decide(self, k, hist):
        delta = (hist.v_cur - hist.v_prev).abs().mean()
        scale = hist.v_prev.abs().mean().clamp_min(1e-12)
        return _skips(float(delta / scale) / max(hist.k_cur - hist.k_prev, 1), self.threshold, self.max_skip)


class _ThresholdRowsRun(PolicyRun):
    """Per-sample: r per row, from each row's own last two true velocities."""

    per_sample_decisions = True

    def __init__(self, threshold: float, max_skip: int):
        self.threshold, self.max_skip = threshold, max_skip

    def decide_rows(self, k, rows, hist):
        import torch

        if len(rows) == len(hist.k_cur):
            v_cur, v_prev = hist.v_cur, hist.v_prev
        else:
            index = torch.tensor(rows, device=hist.v_cur.device)
            v_cur, v_prev = hist.v_cur.index_select(0, index), hist.v_prev.index_select(0, index)
        delta = (v_cur - v_prev).abs().flatten(1).mean(1)
        scale = v_prev.abs().flatten(1).mean(1).clamp_min(1e-12)
        ratios = (delta / scale).tolist()  # the one read of the step
        return [_skips(q / max(hist.k_cur[r] - hist.k_prev[r], 1), self.threshold, self.max_skip)
                for q, r in zip(ratios, rows)]


def _skips(rate: float, threshold: float, max_skip: int) -> int:
    """The largest n ≤ max_skip with n·rate below the threshold (NaN: 0)."""
    if not rate > 0:  # zero change (or NaN, which the engine reports)
        return max_skip if rate == 0 else 0
    n = 0
    while n < max_skip and (n + 1) * rate < threshold:
        n += 1
    return n


class ThresholdPolicy(Policy):
    """Options:
        threshold: accumulated relative velocity change allowed while skipping (default 0.1).
        max_skip: most steps skipped in a row (default 6).
        order: extrapolation order of the skipped steps, 1 (the last two true
            velocities) or 2 (the quadratic through the last three; default 1).
        per_sample: true (every row decides on its own change, and the model runs on
            the rows that compute) or false (one decision per batch; the default).
    """

    name = "threshold"

    def __init__(self, *, threshold: float = 0.1, max_skip: int = 6, order: int = 1, per_sample=False, **common):
        super().__init__(**common)
        self.order = opt_int("order", order, lo=1, hi=2)
        self.threshold = opt_float("threshold", threshold, lo=0.0)
        self.max_skip = opt_int("max_skip", max_skip, lo=0)
        self.per_sample_mode = opt_bool("per_sample", per_sample)
        if self.per_sample_mode and self.order != 1:
            raise OptionError("option per_sample=true extrapolates to first order; drop order=2 or use per_sample=false")

    def per_sample(self, ctx):
        return self.per_sample_mode

    def start(self, ctx):
        if self.per_sample(ctx) and ctx.split_rows:
            return _ThresholdRowsRun(self.threshold, self.max_skip)
        return _ThresholdRun(self.threshold, self.max_skip, self.order)

    def options(self):
        return {"threshold": self.threshold, "max_skip": self.max_skip, "order": self.order,
                "per_sample": self.per_sample_mode, **super().options()}


@hookimpl
def register_policies(register):
    register("threshold", ThresholdPolicy, description="TeaCache-style: skip while relative change is small")

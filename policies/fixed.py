"""``fixed``: a fixed skip schedule, or an explicit list of steps to compute."""

from __future__ import annotations

from fastflow.errors import OptionError
from fastflow.hookspecs import hookimpl
from fastflow.policy import PlannedRun, Policy, opt_int, opt_int_list, skips_until_computed


class FixedPolicy(Policy):
    """Skip ``skip`` steps after every computed step (after the warm-up).

    Options:
        skip: steps extrapolated between two model evaluations (default 2).
        compute: instead of ``skip``, the step indices to compute (comma-separated);
            every other step in the skippable window is extrapolated.
        order: extrapolation order, 1 (from the last two true velocities, FastFlow's)
            or 2 (the quadratic through the last three; default 1). With an evenly
            spaced pattern 2 errs less on every model measured (docs/benchmarks.md).
    """

    name = "fixed"

    def __init__(self, *, skip: int = 2, compute=None, order: int = 1, **common):
        super().__init__(**common)
        self.skip = opt_int("skip", skip, lo=0)
        self.order = opt_int("order", order, lo=1, hi=2)
        self.compute = None if compute is None else sorted(set(opt_int_list("compute", compute)))
        self._plans: dict[int, list[int]] = {}

    def _plan(self, steps: int) -> list[int]:
        plan = self._plans.get(steps)
        if plan is None:
            if self.compute is None:
                plan = [self.skip] * (steps + 1)
            else:
                bad = [c for c in self.compute if c >= steps]
                if bad:
                    raise OptionError(f"option compute lists step {bad[0]}, but the schedule has steps 0..{steps - 1}")
                plan = skips_until_computed(self.compute, steps)
            self._plans[steps] = plan
        return plan

    def start(self, ctx):
        return PlannedRun(self._plan(ctx.steps), self.order)

    def options(self):
        extra = {"skip": self.skip} if self.compute is None else {"compute": self.compute}
        return {**extra, "order": self.order, **super().options()}


@hookimpl
def register_policies(register):
    register("fixed", FixedPolicy, description="skip a fixed number of steps between evaluations")

"""``planned``: calibrate once, then follow the least-error skip plan for a budget.

The bandit of the paper learns, per timestep, how far to skip. It ends up as a fixed
timestep-dependent schedule, but reaches it through many noisy samples because raw
MSE rewards are tiny next to its exploration bonus. ``planned`` gets such a schedule
directly:

1. The first ``calibrate`` samples compute every step and keep the true velocities
   (the first rows of the first batch; the rest of that batch already follows the plan).
2. For every candidate skip run — computed steps p < c, then L skipped steps — it
   measures what extrapolating from (v_p, v_c) would do to the final sample,
   e = Σ_j h_j (v̂_j − v_j), and scores the run by mean(e²).
3. Dynamic programming over (previous computed, last computed) picks the set of
   computed steps with exactly ``nfe`` evaluations (default T / ``speedup``) and the
   least total score, subject to the same rules as every policy (warm-up, window,
   last step computed).

After calibration it costs what ``fixed`` costs: a table look-up per decision, no
device→host transfer. Like ``ucb`` it can persist what it learned (``state``).
"""

from __future__ import annotations

import math

from fastflow import estimator
from fastflow.errors import OptionError, StateFileError
from fastflow.hookspecs import hookimpl
from fastflow.sensitivity import Probe, profile
from fastflow.policy import PlannedRun, Policy, PolicyRun, opt_bool, opt_float, opt_int, skips_until_computed
from fastflow.state import read_state, write_state


class _Calibration(PolicyRun):
    wants_velocities = True
    calibrating = True

    def __init__(self, policy: "PlannedPolicy", timesteps):
        self.policy, self.ts, self.vs = policy, timesteps, []
        self.probe = None if not policy.probe_sensitivity else Probe(timesteps, policy.run_lengths(len(timesteps) - 1), self.vs)

    def record(self, k, v):
        self.vs.append(v)

    def close(self, ok=True):
        if ok and len(self.vs) == len(self.ts) - 1:
            sens = profile((self.probe.values() if self.probe is not None else {}), len(self.ts) - 1)
            rows = self.vs[0].shape[0] if self.vs[0].dim() else 1
            self.policy._add_calibration(run_costs(self.vs, self.ts, self.policy.max_skip, sens), rows)


def run_costs(vs, ts, max_skip: int, sensitivity: list[float] | None = None) -> dict:
    """(p, c, L) → mean squared effect on the final sample of extrapolating L steps
    after computed steps p < c from their true velocities: the run's error in the state,
    grown by the sensitivity where it lands (step c + L + 1; :mod:`fastflow.sensitivity`,
    1 without it). One transfer at the end."""
    T = len(vs)
    # skipping c+1..c+L (the last step is always computed), consulted again at c + L + 1
    keys = [(p, c, L) for c in range(1, T - 1) for p in range(max(0, c - max_skip - 1), c)
            for L in range(1, min(max_skip, T - 2 - c) + 1)]
    runs = [(p, c, c + 1, c + L + 1) for p, c, L in keys]
    values = estimator.run_errors(vs, ts, runs)[0].mean(1).tolist()  # one transfer
    if sensitivity is not None:
        values = [v * sensitivity[c + L + 1] for (p, c, L), v in zip(keys, values)]
    return dict(zip(keys, values))


def solve_plan(costs: dict, steps: int, room: list[int], warmup: int, nfe: int, max_skip: int) -> list[int]:
    """The computed steps, with exactly ``nfe`` evaluations where feasible (else the
    fewest feasible above it), that minimise the summed run costs."""
    if steps <= warmup:
        return list(range(steps))
    start = (warmup - 2, warmup - 1)
    layer = {start: (0.0, None)}
    layers = [layer]
    finals: dict[int, tuple] = {}  # evaluations → cheapest final state with that many
    count = warmup
    while layer and not any(c >= nfe for c in finals):
        nxt: dict = {}
        for (p, c), (cost, _) in layer.items():
            if c == steps - 1:
                continue
            limit = min(max_skip, room[c + 1], steps - 2 - c)
            for L in range(0, limit + 1):
                n = c + L + 1
                total = cost + (0.0 if L == 0 else costs.get((p, c, L), math.inf))
                if total < nxt.get((c, n), (math.inf,))[0]:
                    nxt[(c, n)] = (total, (p, c))
        count += 1
        layers.append(nxt)
        layer = nxt
        done = [s for s, v in nxt.items() if s[1] == steps - 1 and math.isfinite(v[0])]
        if done:
            finals[count] = (min(done, key=lambda s: nxt[s][0]), len(layers) - 1)
    if not finals:
        raise OptionError(f"no skip plan reaches the last of {steps} steps")
    above = [c for c in finals if c >= nfe]
    end, depth = finals[min(above) if above else max(finals)]
    layers = layers[: depth + 1]
    computed = [end[1]]
    state = end
    for lay in reversed(layers[1:]):
        state = lay[state][1]
        computed.append(state[1])
        if state == start:
            break
    return sorted(set(computed) | set(range(warmup)))


class PlannedPolicy(Policy):
    """Options:
        nfe: model evaluations per sample to plan for (default: steps / speedup).
        speedup: used when ``nfe`` is not given (default 3.0).
        max_skip: longest run of extrapolated steps (default 8).
        calibrate: samples that compute every step before planning (default 1: the first
            of the first batch, whose other rows already follow the plan).
        sensitivity: probe how much an error at each time grows by the end and weigh
            the run costs by it (default true; 12 extra evaluations (on 50 steps) of each calibration
            row, :mod:`fastflow.sensitivity`).
        state: JSON file to load the plan from (if it exists) and save it to.
    """

    name = "planned"

    def __init__(self, *, nfe=None, speedup: float = 3.0, max_skip: int = 8, calibrate: int = 1,
                 sensitivity=True, state=None, **common):
        super().__init__(**common)
        self.probe_sensitivity = opt_bool("sensitivity", sensitivity)
        self.nfe = None if nfe is None else opt_int("nfe", nfe, lo=1)
        self.speedup = opt_float("speedup", speedup, lo=1.0)
        self.max_skip = opt_int("max_skip", max_skip, lo=1)
        self.calibrate = opt_int("calibrate", calibrate, lo=1)
        self.state_path = state
        self.key = None
        self.costs: dict = {}
        self.calibrated = 0
        self.computed: list[int] | None = None
        self._skips: list[int] | None = None
        self._loaded = read_state(state, self.name) if state is not None else None

    def budget(self, steps: int) -> int:
        return self.nfe if self.nfe is not None else max(self.warmup + 1, round(steps / self.speedup))

    def _bind(self, ctx) -> None:
        key = {"model": ctx.model_key, "schedule": ctx.schedule_key, "steps": ctx.steps}
        if self.key is None:
            self.key = key
            if self._loaded is not None:
                self._load(self._loaded, key)
        elif key != self.key:
            raise OptionError(f"this planned policy was calibrated for {self.key}; the new sample uses "
                              f"{key}. Use a fresh policy for another model or schedule.")

    def calibration_rows(self, ctx) -> int:
        """The rows of a batch that still calibrate (the first ones); the rest of the batch
        already follows the plan they make."""
        self._bind(ctx)
        return 0 if self._skips is not None else max(1, self.calibrate - self.calibrated)

    def start(self, ctx):
        self._bind(ctx)
        if self._skips is None:
            return _Calibration(self, ctx.timesteps)
        return PlannedRun(self._skips)

    def _add_calibration(self, costs: dict, rows: int = 1) -> None:
        """Costs averaged over ``rows`` calibration samples, weighed by them."""
        for k, v in costs.items():
            self.costs[k] = self.costs.get(k, 0.0) + v * rows
        self.calibrated += rows
        if self.calibrated >= self.calibrate:
            self._make_plan()

    def _make_plan(self) -> None:
        steps = self.key["steps"]
        room = self.run_lengths(steps)
        self.computed = solve_plan(self.costs, steps, room, self.warmup, self.budget(steps), self.max_skip)
        self._skips = skips_until_computed(self.computed, steps)

    def _load(self, data: dict, key: dict) -> None:
        if data.get("key") != key:
            raise StateFileError(f"state file {self.state_path} was calibrated for {data.get('key')}, but this "
                                 f"run is {key}. Pass another --state path for this model and schedule.")
        opts = data.get("options", {})
        if opts != self._plan_options(key["steps"]):
            raise StateFileError(f"state file {self.state_path} holds a plan for {opts}, not "
                                 f"{self._plan_options(key['steps'])}. Pass another --state path.")
        try:
            computed = [int(k) for k in data["computed"]]
            if computed and not (0 <= min(computed) and max(computed) < key["steps"]):
                raise ValueError("step out of range")
        except (KeyError, TypeError, ValueError) as exc:
            raise StateFileError(f"state file {self.state_path} is damaged ({exc}); it was left untouched.") from None
        self.calibrated = int(data.get("calibrated", 0))
        if computed:
            self.computed = computed
            self._skips = skips_until_computed(computed, key["steps"])

    def _plan_options(self, steps: int) -> dict:
        return {"nfe": self.budget(steps), "max_skip": self.max_skip, "sensitivity": self.probe_sensitivity,
                "warmup": self.warmup,
                "window_start": self.window_start, "window_end": self.window_end}

    def save(self, path=None) -> None:
        path = path if path is not None else self.state_path
        if path is None:
            raise OptionError("no state path: pass state=PATH to the policy or a path to save()")
        if self.key is None:
            return
        write_state(path, self.name, {"key": self.key, "options": self._plan_options(self.key["steps"]),
                                      "calibrated": self.calibrated, "computed": self.computed or []})

    def options(self):
        return {"nfe": self.nfe, "speedup": self.speedup, "max_skip": self.max_skip,
                "calibrate": self.calibrate, "sensitivity": self.probe_sensitivity, **super().options()}


@hookimpl
def register_policies(register):
    register("planned", PlannedPolicy, description="calibrate once, then the least-error skip plan for an NFE budget")

"""``ucb``: the FastFlow bandit that learns in one batch, with one default for every model.

The decision is the paper's: one UCB1 bandit per step index k, whose arms are how many
following steps to extrapolate instead of computing. What the bandit is taught differs
(``ucb-paper`` keeps the paper's rule; docs/policies.md measures both):

* **Scale-free rewards, priced in the sample.** The velocity error of a skip run is
  measured where the model is next consulted (step j), relative to the model's own
  velocity scale σ² (the mean squared velocity of the calibration run):
  ρ² = MSE(v̂_j, v_j) / σ². :func:`run_weight` turns it into the share w that the skipped
  steps add to the sample (Σ h_i times each step's error, which grows like d·(d + s) with
  the distance d from the last true velocity). The reward of skipping n steps is
  ``n − (w·ρ / tolerance)²`` (0 for arm 0): a run is worth its steps while the relative
  error it adds to the sample stays below ``tolerance``·sqrt(n). ``tolerance`` is the one
  fidelity knob, and its meaning does not depend on the model's units.
* **Every sample is a pull.** The error is taken per sample, so a batch of 16 teaches
  the bandits 16 rewards per decision, not one.
* **Calibration that costs one sample.** The first sample of the first batch computes
  every step alone; the rest of that batch is already accelerated. Its trajectory holds
  every arm's counterfactual error at every step (the history pair k−2, k−1 extrapolated
  to k + n), which seeds every bandit with one pull per arm: the first decisions are
  informed, and UCB1's exploration starts from there.

Decisions depend on the bandits' statistics, which change when a sample ends: the loop
keeps the errors on the device and reads them in one transfer at the end.
"""

from __future__ import annotations

import math

from fastflow import estimator
from fastflow.bandit import BanditPolicy
from fastflow.sensitivity import Probe, profile
from fastflow.hookspecs import hookimpl
from fastflow.policy import PolicyRun, opt_bool, opt_float, opt_int


def run_weight(ts, t_prev: float, t_cur: float, k: int, n: int) -> float:
    """How much of the velocity error seen at step j = k + n lands in the sample.

    Skipping steps k..j−1 adds Σ_i h_i·(v̂_i − v_i) to the sample. A first-order
    extrapolation from t_cur (history spacing s = t_prev − t_cur) errs like
    d·(d + s) at distance d = t_cur − t, so each skipped step's error is that of step j
    scaled by d_i(d_i + s) / (d_j(d_j + s)); their h-weighted sum is returned."""
    s = t_prev - t_cur
    dj = t_cur - ts[k + n]
    norm = dj * (dj + s)
    if not norm > 0:
        return 0.0
    return sum((ts[i] - ts[i + 1]) * (t_cur - ts[i]) * (t_cur - ts[i] + s) for i in range(k, k + n)) / norm


class _Calibration(PolicyRun):
    """Every step computed; the true velocities seed σ² and every bandit."""

    wants_velocities = True
    calibrating = True

    def __init__(self, policy: "UCBPolicy", ctx):
        self.policy, self.ts, self.vs = policy, ctx.timesteps, []
        self.probe = None if not policy.probe_sensitivity else Probe(self.ts, policy.run_lengths(ctx.steps), self.vs)

    def record(self, k, v):
        self.vs.append(v)

    def close(self, ok=True):
        if ok and len(self.vs) == len(self.ts) - 1:
            self.policy._calibrate(self.vs, self.ts, (self.probe.values() if self.probe is not None else {}))


class _Bandits(PolicyRun):
    needs_error = True
    per_sample_error = True

    def __init__(self, policy: "UCBPolicy", room, ts):
        self.policy, self.room, self.ts = policy, room, ts
        self.arms = policy.arms
        self.decisions: list[tuple[int, int, int]] = []  # (k, arm index, steps skipped)
        self.errors = []

    def decide(self, k, hist):
        policy = self.policy
        index = policy.bandit_index(k, hist.k_prev)
        bandit = policy.bandits[index]
        arm = bandit.choose()
        skip = self.arms[arm]
        n = min(skip, self.room[k])
        self.decisions.append((bandit, arm, n, policy.cost_factor(index, arm, self.ts, hist.t_prev, hist.t_cur, k, n)
                               if n else 0.0))
        return skip

    def observe(self, k, err):
        self.errors.append(err.reshape(-1))

    def close(self, ok=True):
        if not ok or not self.errors:
            return
        import torch

        sizes = [e.numel() for e in self.errors]
        flat = torch.cat(self.errors).double().tolist()  # the sample's one transfer
        price = self.policy._price
        i = 0
        for (bandit, arm, skipped, factor), n in zip(self.decisions, sizes):
            errs = [e for e in flat[i:i + n] if math.isfinite(e)]
            i += n
            if errs:
                reward = 0.0 if skipped == 0 else skipped - price * factor * sum(errs) / len(errs)
                bandit.update(arm, reward, len(errs))
        for bandit, arm, skipped, _ in self.decisions[len(sizes):]:  # a run that reached the end:
            if skipped and bandit.counts[arm]:  # nothing measured it; its calibrated mean stands,
                bandit.update(arm, bandit.sums[arm] / bandit.counts[arm], max(sizes))  # pulled once more
        self.policy.samples += max(sizes)


class UCBPolicy(BanditPolicy):
    """fastflow's bandit: scale-free rewards, a pull per sample, calibration on one sample.

    Options:
        tolerance: the relative RMS error (against the model's velocity RMS) that one
            skipped step may add to the output, after the sensitivity (default 0.01).
            Smaller: closer to the full output, fewer skips. Independent of the model's units.
            Runs are priced as extrapolated; the correction at a run's end (``correct``)
            then removes part of that error, which is why the default is 0.01, not 0.005
            (docs/benchmarks.md: the same fidelity as 0.005 before, more skipped).
        arms: skip counts the bandits choose among (default ``0,1,2,3,4,6,8``).
        gamma: UCB1 exploration constant, in skipped steps (default 0.5).
        calibrate: samples that compute every step to calibrate (default 1, the first
            sample of the first batch; the rest of that batch is accelerated).
        sensitivity: probe, in the calibration, how much an error at each time grows by
            the end, and price errors by it (default true; :mod:`fastflow.sensitivity`, 12
            extra evaluations of the calibration sample on 50 steps). False prices every
            step's error alike, as the paper does.
        skip_last: a skip run may reach the end of the schedule, the last steps
            extrapolated. Nothing measures such a run afterwards: its cost is the
            calibration's exact one, which later samples keep. Default false: the last
            step is always computed, as in the paper (docs/benchmarks.md measures both:
            one evaluation fewer per sample for 1-1.7 dB on the trained models, better on
            both counts on the GMM).
        state: JSON file to load learning from and save it to (merged under a lock with
            what other processes saved meanwhile). ``fastflow run`` keeps one per model
            and schedule in the user cache unless told ``--state`` or ``--no-state``.
    """

    name = "ucb"

    def __init__(self, *, tolerance: float = 0.01, arms="0,1,2,3,4,6,8", gamma: float = 0.5,
                 calibrate: int = 1, sensitivity=True, skip_last=False, state=None, **common):
        self.tolerance = opt_float("tolerance", tolerance, lo=0.0, lo_open=True)
        self.skip_last = opt_bool("skip_last", skip_last)
        self.probe_sensitivity = opt_bool("sensitivity", sensitivity)
        self.calibrate = opt_int("calibrate", calibrate, lo=1)
        self.scale: float | None = None  # σ², the calibration's mean squared velocity
        self.sensitivity: list[float] | None = None  # A(t_j), fastflow.sensitivity
        self.correction: list[list[float]] | None = None  # per bandit and arm: actual / estimated run error
        super().__init__(arms=arms, gamma=gamma, state=state, **common)

    @property
    def _price(self) -> float:
        """Reward lost per unit of w²·MSE: 1 / (σ² · tolerance²)."""
        return 1.0 / (self.scale * self.tolerance ** 2)

    def cost_factor(self, index: int, arm: int, ts, t_prev: float, t_cur: float, k: int, n: int) -> float:
        """What turns the velocity error measured at step j = k + n into the run's cost in
        the output: A(t_j) · c · w², with w from :func:`run_weight` and c the calibration's
        ratio of the run's actual state error to that estimate (1 before calibration)."""
        w = run_weight(ts, t_prev, t_cur, k, n)
        a = self.sensitivity[k + n] if self.sensitivity else 1.0
        c = self.correction[index][arm] if self.correction else 1.0
        return a * c * w * w

    @property
    def contexts(self) -> int:
        """A bandit per (step, gap of the history pair) for gaps 1 .. longest skip + 1:
        after a skip the pair is wider and extrapolates worse, and the calibration can
        price every gap."""
        return max(self.arms) + 1

    def calibration_rows(self, ctx) -> int:
        if self.key is None:
            self._bind_key(ctx)
        return self.calibrate if self.scale is None else 0

    def start(self, ctx):
        self._bind_key(ctx)
        if self.scale is None:
            return _Calibration(self, ctx)
        return _Bandits(self, self.run_lengths(ctx.steps), ctx.timesteps)

    def _calibrate(self, vs, ts, probes: dict | None = None) -> None:
        """σ², the sensitivity, the estimate's correction and one prior pull per arm and
        sample at every bandit, from a full trajectory.

        For every cell (step k, history pair g apart, arm n) the trajectory gives the
        run's actual error in the state, E = Σ_{i<k+n} h_i (v̂_i − v_i), and the error the
        bandits can measure after it, MSE(v̂_j, v_j) at j = k + n. The prior pull prices E
        (times A(t_j)); the ratio mean(E²) / (w² · MSE) corrects what later pulls measure."""
        import torch

        T = len(vs)
        room = self.run_lengths(T)
        if self.sensitivity is None and probes:
            self.sensitivity = profile(probes, T)
        cells, runs = [], []
        for k in range(2, T):
            if not room[k]:
                continue
            for g in range(1, min(self.contexts, k - 1) + 1):  # history pair (k−1−g, k−1)
                p, c = k - 1 - g, k - 1
                index = self.bandit_index(k, p)
                for arm, a in enumerate(self.arms):
                    n = min(a, room[k])
                    if n:
                        cells.append((index, arm, n, run_weight(ts, ts[p], ts[c], k, n), self.sensitivity[k + n]
                                      if self.sensitivity else 1.0))
                        runs.append((p, c, k, k + n))
        # (cells, rows) each: the run's E² in the state, and the MSE at k + n it is measured by
        actual, errs = estimator.run_errors(vs, ts, runs)
        rows = errs.shape[1]
        scale_t = torch.stack([v.float().square().mean() for v in vs]).mean()
        host = torch.cat([scale_t.reshape(1).double(), errs.double().flatten(),
                          actual.double().flatten()]).tolist()  # one transfer
        scale = host[0]
        if not (math.isfinite(scale) and scale > 0):
            return  # an all-zero or broken model: stay uncalibrated (every step computed)
        self.scale = scale
        measured, real = host[1:1 + len(cells) * rows], host[1 + len(cells) * rows:]
        correction = [[1.0] * len(self.arms) for _ in self.bandits]
        for i, (index, arm, n, w, a) in enumerate(cells):
            m = [x for x in measured[i * rows:(i + 1) * rows] if math.isfinite(x)]
            r = [x for x in real[i * rows:(i + 1) * rows] if math.isfinite(x)]
            if m and r and sum(m) * w * w > 0:
                correction[index][arm] = sum(r) / (sum(m) * w * w)
            for e in r:
                self.bandits[index].update(arm, n - self._price * a * e)
        if self.correction is None:
            self.correction = correction
        for k in range(2, T):  # arm 0 (and arms the room clamps to 0) cost nothing
            if room[k]:
                for g in range(1, min(self.contexts, k - 1) + 1):
                    bandit = self.bandit(k, k - 1 - g)
                    for arm, a in enumerate(self.arms):
                        if min(a, room[k]) == 0:
                            bandit.update(arm, 0.0, rows)
        self.samples += rows

    # -- state ------------------------------------------------------------------------------
    def _check_stored(self, data, path):
        stored = data.get("options")
        if isinstance(stored, dict) and "skip_last" not in stored:  # saved before the option: the last
            data = {**data, "options": {**stored, "skip_last": False}}  # step was always computed
        if "mu" in data and "scale" not in data:
            from fastflow.errors import StateFileError

            raise StateFileError(f"state file {path} was learned by the paper's rule, which is now "
                                 f"'ucb-paper' (use --policy ucb-paper with it), or pass another --state path")
        stored = data.get("options")
        if isinstance(stored, dict) and stored.get("rewards") != self.STATE_FORMAT:
            from fastflow.errors import StateFileError

            raise StateFileError(f"state file {path} was learned by an older ucb whose rewards did not weigh "
                                 f"errors by the model's sensitivity; it was left untouched. Pass another "
                                 f"--state path (or delete it to learn again).")
        super()._check_stored(data, path)

    STATE_FORMAT = "sensitivity-1"  # how rewards are priced: state learned otherwise is kept apart

    def _stored_options(self):
        return {"rewards": self.STATE_FORMAT, "sensitivity": self.probe_sensitivity, "arms": self.arms,
                "skip_last": self.skip_last,
                "tolerance": self.tolerance, "window_start": self.window_start,
                "window_end": self.window_end, "warmup": self.warmup}

    def _extra_state(self):
        return {"scale": self.scale, "sensitivity": self.sensitivity, "correction": self.correction}

    def _load_extra(self, data):
        scale = data.get("scale")
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"'scale' is {scale!r}; it must be a finite number > 0")
            self.scale = float(scale)
        sens = data.get("sensitivity")
        if sens is not None:
            steps = self.key["steps"] if self.key else None
            if (not isinstance(sens, list) or (steps is not None and len(sens) != steps + 1)
                    or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and a > 0
                               for a in sens)):
                raise ValueError("'sensitivity' must list one finite number > 0 per step and the end")
            self.sensitivity = [float(a) for a in sens]
        corr = data.get("correction")
        if corr is not None:
            if (not isinstance(corr, list) or len(corr) != len(self.bandits)
                    or not all(isinstance(row, list) and len(row) == len(self.arms) for row in corr)
                    or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c >= 0
                               for row in corr for c in row)):
                raise ValueError(f"'correction' must hold {len(self.bandits)} rows of {len(self.arms)} finite "
                                 f"numbers >= 0 (one per bandit and arm)")
            self.correction = [[float(c) for c in row] for row in corr]

    def _merge_extra(self, disk):
        if self.scale is None and disk.get("scale") is not None:
            self.scale = float(disk["scale"])
        if self.sensitivity is None and disk.get("sensitivity") is not None:
            self.sensitivity = [float(a) for a in disk["sensitivity"]]
        if self.correction is None and disk.get("correction") is not None:
            self.correction = [[float(c) for c in row] for row in disk["correction"]]

    def options(self):
        return {"tolerance": self.tolerance, "arms": self.arms, "gamma": self.gamma,
                "calibrate": self.calibrate, "sensitivity": self.probe_sensitivity, "skip_last": self.skip_last,
                **super().options()}


@hookimpl
def register_policies(register):
    register("ucb", UCBPolicy, description="FastFlow bandit: scale-free rewards (tolerance), a pull per sample, "
                                           "calibrates on one sample")

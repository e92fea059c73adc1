"""``ucb-paper``: the FastFlow bandit exactly as the paper describes it (and ``ucb-norm``).

One UCB1 bandit per timestep index k. Its arms are how many following steps to skip
(default 0-4; the public fork uses 0, 2, 4, 6). At step k the bandit picks
argmax_a Q(a) + γ·sqrt(ln n / N(a)) (each arm once first). The reward, seen at the next
model evaluation after the decision (step j), is

    r = μ · skipped − MSE(v̂_j, v_j)

the speed gained against the error the extrapolation makes where the model is next
consulted; for arm 0 that is the step right after k. It is credited to the bandit of k.
μ is given, or calibrated from the first generation (run with every step computed) as
max_j MSE(v̂_j, v_j) / T, as in the paper. One pull per batch.

fastflow's default bandit is ``ucb`` (policies/ucb.py); this one is kept to measure the
paper's rule against it (docs/policies.md gives the difference).

Decisions depend on Q and N only, which change at the end of a sample: every bandit
is consulted at most once per sample, so the rewards stay on the device during the
loop and are read in one transfer when the sample ends.
"""

from __future__ import annotations

import math

from fastflow.bandit import BanditPolicy
from fastflow.errors import OptionError
from fastflow.hookspecs import hookimpl
from fastflow.policy import PolicyRun, opt_float


class _CalibrationRun(PolicyRun):
    """First generation: compute everything, record every extrapolation error."""

    needs_error = True
    calibrating = True

    def __init__(self, policy: "PaperUCBPolicy"):
        self.policy = policy
        self.errors = []

    def decide(self, k, hist):
        return 0

    def observe(self, k, err):
        self.errors.append(err)

    def close(self, ok=True):
        if ok and self.errors:
            import torch

            errs = torch.stack(self.errors).double().tolist()
            self.policy.mu = self.policy.mu_scale * max(errs) / self.policy._steps
            self.policy.samples += 1


class _BanditRun(PolicyRun):
    needs_error = True

    def __init__(self, policy: "PaperUCBPolicy", bandits, room):
        self.policy, self.bandits, self.room = policy, bandits, room
        self.decisions: list[tuple[int, int, int]] = []  # (k, arm index, steps skipped)
        self.errors = []

    def decide(self, k, hist):
        arm = self.bandits[k].choose()
        skip = self.policy.arms[arm]
        self.decisions.append((k, arm, min(skip, self.room[k])))
        return skip

    def observe(self, k, err):
        self.errors.append(err)

    def close(self, ok=True):
        if not ok or not self.errors:
            return
        import torch

        errs = torch.stack(self.errors).double().tolist()  # the sample's one transfer
        mu = self.policy.mu
        scale = 1.0 / mu if self.policy.normalized and mu > 0 else 1.0
        for (k, arm, skipped), err in zip(self.decisions, errs):
            if math.isfinite(err):
                self.bandits[k].update(arm, (mu * skipped - err) * scale)
        self.policy.samples += 1


class PaperUCBPolicy(BanditPolicy):
    """The paper's per-timestep UCB1 bandit.

    Options:
        arms: skip counts the bandits choose among (default ``0,1,2,3,4``; the fork: ``0,2,4,6``).
        gamma: exploration constant γ (default 2.0).
        mu: reward per skipped step; default: calibrated from the first generation as
            mu_scale · max_t MSE(v̂_t, v_t) / T.
        mu_scale: factor on the calibrated μ (default 1.0, the paper's rule); smaller
            prices errors higher (fewer skips). Only with a calibrated μ.
        state: JSON file to load learning from (if it exists) and save to
            (:meth:`save`; the CLI saves after ``run``).
    """

    name = "ucb-paper"
    normalized = False  # rewards in raw MSE units, as in the paper

    default_mu_scale = 1.0

    def __init__(self, *, arms="0,1,2,3,4", gamma: float = 2.0, mu=None, mu_scale=None, state=None, **common):
        self.mu = None if mu is None else opt_float("mu", mu, lo=0.0)
        if mu is not None and mu_scale is not None:
            raise OptionError("options mu and mu_scale exclude each other: mu_scale scales the "
                              "calibrated mu; give one of them")
        self.mu_scale = self.default_mu_scale if mu_scale is None else opt_float(
            "mu_scale", mu_scale, lo=0.0, lo_open=True)
        self._fixed_mu = mu is not None
        common.setdefault("correct", False)  # the paper's sampler extrapolates, nothing more
        super().__init__(arms=arms, gamma=gamma, state=state, **common)

    def start(self, ctx):
        self._bind_key(ctx)
        if self.mu is None:
            return _CalibrationRun(self)
        return _BanditRun(self, self.bandits, self.run_lengths(ctx.steps))

    def _stored_options(self):
        out = {"arms": self.arms}
        if not self._fixed_mu:
            out["mu_scale"] = self.mu_scale
        return out

    def _extra_state(self):
        return {"mu": self.mu}

    def _load_extra(self, data):
        mu = data.get("mu")
        if mu is not None:
            if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
                raise ValueError(f"'mu' is {mu!r}; it must be a finite number >= 0")
            if self.mu is None:
                self.mu = float(mu)

    def _merge_extra(self, disk):
        if self.mu is None and disk.get("mu") is not None:
            self.mu = float(disk["mu"])

    def options(self):
        return {"arms": self.arms, "gamma": self.gamma, "mu": self.mu, "mu_scale": self.mu_scale,
                **super().options()}


class NormalizedUCBPolicy(PaperUCBPolicy):
    """``ucb-norm``: the paper's bandit with rewards measured in units of μ,
    r/μ = skipped − MSE/μ, so they are O(1) like the exploration bonus γ·sqrt(ln n/N),
    and μ priced 50 times higher than the paper's (``mu_scale`` 50).

    Superseded by ``ucb``, whose rewards are scale-free without a per-model μ factor; kept
    because the published benchmarks measured it.
    """

    name = "ucb-norm"
    normalized = True
    #: μ = 50 × the paper's calibration; tuned on the glyph model (docs/policies.md)
    default_mu_scale = 50.0


@hookimpl
def register_policies(register):
    register("ucb-paper", PaperUCBPolicy,
             description="the paper's FastFlow bandit: raw-MSE rewards, one pull per batch (mu_scale 1)")
    register("ucb-norm", NormalizedUCBPolicy,
             description="the paper's bandit with rewards in units of mu (mu_scale 50; superseded by ucb)")

"""An example fastflow plugin: an epsilon-greedy bandit over skip counts.

Copy this folder to start a plugin of your own: rename the module, the distribution
and the entry point in pyproject.toml, then ``pip install -e .`` and check that
``fastflow plugins`` lists it.

Like the built-in ``ucb`` it keeps one bandit per timestep, but it explores with
probability ``epsilon`` and otherwise exploits the best mean reward. Rewards have the
same form, ``mu · skipped − MSE(extrapolated, true velocity)``.
"""

from __future__ import annotations

import random

import fastflow
from fastflow.policy import Policy, PolicyRun, opt_float, opt_int, opt_int_list


class EpsilonGreedyPolicy(Policy):
    """Options:
        arms: skip counts to choose among (default ``0,1,2,3``).
        epsilon: probability of a random arm (default 0.1).
        mu: reward per skipped step (default 0.001).
        seed: seed of the exploration (default 0).
    """

    name = "egreedy"

    def __init__(self, *, arms="0,1,2,3", epsilon: float = 0.1, mu: float = 1e-3, seed: int = 0, **common):
        super().__init__(**common)  # window_start, window_end, warmup
        self.arms = opt_int_list("arms", arms)
        self.epsilon = opt_float("epsilon", epsilon, lo=0.0, hi=1.0)
        self.mu = opt_float("mu", mu, lo=0.0)
        self.rng = random.Random(opt_int("seed", seed))
        self.counts: list[list[int]] = []
        self.values: list[list[float]] = []

    def start(self, ctx):
        if len(self.counts) != ctx.steps + 1:
            self.counts = [[0] * len(self.arms) for _ in range(ctx.steps + 1)]
            self.values = [[0.0] * len(self.arms) for _ in range(ctx.steps + 1)]
        return _Run(self)

    def options(self):
        return {"arms": self.arms, "epsilon": self.epsilon, "mu": self.mu, **super().options()}


class _Run(PolicyRun):
    needs_error = True  # ask the engine for the extrapolation error after each decision

    def __init__(self, policy: EpsilonGreedyPolicy):
        self.p = policy
        self.decisions: list[tuple[int, int]] = []
        self.errors = []

    def decide(self, k, hist):
        p = self.p
        if p.rng.random() < p.epsilon or 0 in p.counts[k]:
            arm = p.rng.randrange(len(p.arms))
        else:
            arm = max(range(len(p.arms)), key=p.values[k].__getitem__)
        self.decisions.append((k, arm))
        return p.arms[arm]

    def observe(self, k, err):
        self.errors.append(err)  # a 0-d tensor, still on the device

    def close(self, ok=True):
        if not ok or not self.errors:
            return
        import torch

        errors = torch.stack(self.errors).tolist()  # one device→host transfer per sample
        for (k, arm), err in zip(self.decisions, errors):
            n = self.p.counts[k][arm] = self.p.counts[k][arm] + 1
            reward = self.p.mu * self.p.arms[arm] - err
            self.p.values[k][arm] += (reward - self.p.values[k][arm]) / n


@fastflow.hookimpl
def register_policies(register):
    register("egreedy", EpsilonGreedyPolicy, description="epsilon-greedy bandit over skip counts (example plugin)")

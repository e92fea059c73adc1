"""Per-sample skip decisions (fastflow.rows): each row decides on its own, the model runs
on the rows that compute, and no row is corrupted by another."""

from __future__ import annotations

import pytest
import torch

import fastflow
from fastflow.errors import OptionError
from fastflow.policy import Policy, PolicyRun


def two_flows(x, t, kind):
    """Rows of kind 0: a straight-line flow (constant velocity, extrapolation exact);
    kind 1: a curved one (velocity sin(6t), the same in every element)."""
    shape = (-1, *([1] * (x.dim() - 1)))
    k = kind.view(shape).to(x.dtype)
    return torch.ones_like(x) * (1 - k) + torch.sin(6 * t).view(shape) * torch.ones_like(x) * k


def euler_curved(x0, ts, computed, correct=True):
    """The exact Euler answer of the curved flow for a given set of computed steps.
    Skipped steps extrapolate the last two true velocities to first order; with
    ``correct`` (the default) a run, once it ends at a computed step, counts the line
    between its two computed neighbours instead."""
    import math

    x, hist = x0.clone(), []
    steps = len(ts) - 1
    for k in range(steps):
        t, h = ts[k], ts[k + 1] - ts[k]
        if k in computed:
            v = math.sin(6 * t)
            hist = (hist + [(t, v)])[-2:]
        elif correct:
            c = max(j for j in computed if j < k)
            n = min(j for j in computed if j > k)
            vc, vn = math.sin(6 * ts[c]), math.sin(6 * ts[n])
            v = vc + (t - ts[c]) * (vn - vc) / (ts[n] - ts[c])
        else:
            (tp, vp), (tc, vc) = hist
            v = vc + (t - tc) * (vc - vp) / (tc - tp)
        x = x + h * v
    return x


class RowPlans(Policy):
    """A per-sample policy following a fixed plan per row: plans[r][k] steps skipped."""

    name = "row-plans"

    def __init__(self, plans, **common):
        super().__init__(**common)
        self.plans = plans

    def per_sample(self, ctx):
        return True

    def start(self, ctx):
        plans = self.plans

        class Run(PolicyRun):
            per_sample_decisions = True

            def decide_rows(self, k, rows, hist):
                return [plans[r][k] for r in rows]

        return Run()


@pytest.mark.parametrize("correct", [True, False])
def test_straight_rows_skip_more_and_both_halves_are_exact(correct):
    noise = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    kind = torch.tensor([0, 1, 0, 1, 0, 1])
    opts = {"per_sample": "true", "threshold": 0.1, "max_skip": 6, "correct": correct}
    res = fastflow.sample(two_flows, noise, steps=50, policy="threshold", policy_options=opts, kind=kind)
    straight, curved = res.nfe_per_sample[0::2], res.nfe_per_sample[1::2]
    # straight rows: steps 0, 1, then every 7th (6 skipped) until the last: 0,1,8,15,22,29,36,43,49
    assert straight == [9, 9, 9]
    assert max(straight) < min(curved)
    # constant velocity: Euler with any skips is exact, x(0) = x(1) − 1
    assert torch.allclose(res.x[0::2], noise[0::2] - 1, atol=1e-6)
    # curved rows: exactly the Euler answer of the steps they computed (their own decisions)
    ts = res.timesteps
    trace_rows = fastflow.sample(two_flows, noise[1:2], steps=50, policy="threshold", policy_options=opts,
                                 kind=kind[1:2])
    computed = {s.k for s in trace_rows.trace if s.computed}
    assert len(computed) == curved[0]
    want = euler_curved(noise[1], ts, computed, correct)
    assert torch.allclose(res.x[1], want, atol=1e-5)
    # the model ran on the rows that computed only: fewer calls than the curved rows' steps
    # plus the straight ones', more than either alone
    assert max(curved) <= res.model_calls < sum(res.nfe_per_sample)


def test_per_batch_decides_for_all_rows_together():
    noise = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    kind = torch.tensor([0, 1, 0, 1])
    res = fastflow.sample(two_flows, noise, steps=50, policy="threshold", policy_options={"per_sample": "false"}, kind=kind)
    assert len(set(res.nfe_per_sample)) == 1 and res.model_calls == res.nfe_per_sample[0]


@pytest.mark.parametrize("guided", [False, True])
def test_a_row_is_never_corrupted_by_another(guided):
    """Each row of a batch run per sample equals that sample run alone, bit for bit."""
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(5, 2, 16, generator=gen)
    kind = torch.tensor([0, 1, 1, 0, 1])
    plans = [[(r + k) % 3 for k in range(21)] for r in range(5)]
    kw = dict(guidance=torch.tensor([1.0, 2.0, 3.0, 1.5, 0.5]), uncond={"kind": 1 - kind}) if guided else {}
    res = fastflow.sample(two_flows, noise, steps=20, policy=RowPlans(plans), kind=kind, **kw)
    for r in range(5):
        kw_r = dict(guidance=kw["guidance"][r:r + 1], uncond={"kind": 1 - kind[r:r + 1]}) if guided else {}
        alone = fastflow.sample(two_flows, noise[r:r + 1], steps=20, policy=RowPlans([plans[r]]),
                                kind=kind[r:r + 1], **kw_r)
        assert torch.equal(res.x[r], alone.x[0])
        assert res.nfe_per_sample[r] == alone.nfe
    assert len(set(res.nfe_per_sample)) > 1


def test_per_sample_equals_per_batch_when_decisions_agree():
    """The same plan for every row: the per-row loop gives the per-batch loop's answer."""
    noise = torch.randn(3, 16, generator=torch.Generator().manual_seed(3))
    kind = torch.tensor([1, 1, 1])
    plan = [k % 3 for k in range(31)]
    rows = fastflow.sample(two_flows, noise, steps=30, policy=RowPlans([plan] * 3), kind=kind)
    from fastflow.policy import PlannedRun

    class Batch(Policy):
        name = "batch-plan"

        def start(self, ctx):
            return PlannedRun(plan)

    batch = fastflow.sample(two_flows, noise, steps=30, policy=Batch(), kind=kind)
    assert torch.equal(rows.x, batch.x) and rows.nfe == batch.nfe


def test_a_batch_mixing_edit_strengths():
    """Generations and edits at two strengths in one batch: per-sample threshold runs it
    whole (each row from its own step), a per-batch policy one part per strength; both
    give each row what it gets in a batch of its own kind."""
    gen = torch.Generator().manual_seed(4)
    noise, init = torch.randn(4, 16, generator=gen), torch.randn(4, 16, generator=gen)
    kind = torch.tensor([1, 1, 1, 1])
    strength = [1.0, 0.6, 1.0, 0.3]
    for policy in ("threshold", "fixed"):
        opts = {"per_sample": "true"} if policy == "threshold" else None
        mixed = fastflow.sample(two_flows, noise, steps=50, policy=policy, policy_options=opts, init=init,
                                strength=strength, kind=kind)
        for rows, s in (([0, 2], 1.0), ([1], 0.6), ([3], 0.3)):
            kw = {} if s == 1.0 else dict(init=init[rows], strength=s)
            own = fastflow.sample(two_flows, noise[rows], steps=50, policy=policy, policy_options=opts,
                                  kind=kind[rows], **kw)
            assert torch.allclose(mixed.x[rows], own.x, atol=1e-6), (policy, s)
            assert [mixed.nfe_per_sample[r] for r in rows] == own.nfe_per_sample
    # per-sample threshold: one batch, so fewer model calls than one batch per strength
    assert mixed.nfe_per_sample[3] < mixed.nfe_per_sample[0]


def test_per_sample_errors_are_usage_errors():
    noise = torch.randn(2, 16)
    with pytest.raises(OptionError, match="euler"):
        fastflow.sample(two_flows, noise, steps=10, policy="threshold", policy_options={"per_sample": "true"},
                        solver="unipc", kind=torch.tensor([0, 1]))
    with pytest.raises(OptionError, match="per_sample"):
        fastflow.get_policy("threshold", per_sample="maybe")
    with pytest.raises(OptionError, match="order"):
        fastflow.get_policy("threshold", per_sample=True, order=2)
    with pytest.raises(OptionError, match="strength has 3 values"):
        fastflow.sample(two_flows, noise, steps=10, policy="threshold", init=noise, strength=[1.0, 0.5, 0.2],
                        kind=torch.tensor([0, 1]))
    with pytest.raises(OptionError, match="guidance has 3 values"):
        fastflow.sample(two_flows, noise, steps=10, policy="none", guidance=[1.0, 2.0, 3.0],
                        uncond={"kind": torch.tensor([0, 1])}, kind=torch.tensor([0, 1]))


@pytest.mark.parametrize("correct", [True, False])
def test_per_batch_runs_are_corrected_as_the_analytic_answer(correct):
    """The per-batch loop on the curved flow with a fixed pattern: with ``correct`` each
    skip run, once it ends, counts the line between its computed neighbours (else the
    extrapolation); both the per-batch and the per-row loop give that answer."""
    noise = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    kind = torch.ones(3, dtype=torch.long)
    res = fastflow.sample(two_flows, noise, steps=30, policy="fixed", policy_options={"skip": 3, "correct": correct},
                          kind=kind)
    computed = {s.k for s in res.trace if s.computed}
    assert len(computed) == res.nfe < 30
    want = euler_curved(noise, res.timesteps, computed, correct)
    assert torch.allclose(res.x, want, atol=1e-5)
    assert not torch.allclose(want, euler_curved(noise, res.timesteps, computed, not correct), atol=1e-3)
    plan = fastflow.get_policy("fixed", skip=3)._plan(30)
    rows = fastflow.sample(two_flows, noise, steps=30, kind=kind, policy=RowPlans([plan] * 3, correct=correct))
    assert rows.nfe_per_sample == res.nfe_per_sample
    assert torch.allclose(rows.x, want, atol=1e-5)

"""Second-order extrapolation (``order=2`` of ``fixed`` and ``threshold``): exact where
the velocity is quadratic in t, the same decisions and NFE as first order, and checked
options."""

import pytest
import torch
from click.testing import CliRunner

import fastflow
from fastflow.cli import cli
from fastflow.estimator import estimate, quadratic_weights
from fastflow.policy import History


def quadratic_in_t(x, t):
    """v(x, t) = 1 + 2t − 3t² per row: first order cannot follow it, second order can."""
    return (1 + 2 * t - 3 * t * t).view(-1, *[1] * (x.dim() - 1)).expand_as(x)


def test_quadratic_weights_reproduce_a_quadratic_and_sum_to_one():
    ta, tb, tc = 0.9, 0.7, 0.6
    f = lambda t: 4 - t + 5 * t * t  # noqa: E731
    for t in (0.55, 0.3, 0.0):
        w = quadratic_weights(t, ta, tb, tc)
        assert sum(w) == pytest.approx(1.0)
        assert w[0] * f(ta) + w[1] * f(tb) + w[2] * f(tc) == pytest.approx(f(t))


def test_estimate_falls_back_to_first_order_with_two_velocities():
    h = History()
    h.push(0, 1.0, torch.tensor([1.0]))
    h.push(1, 0.8, torch.tensor([2.0]))
    assert estimate(h, 0.6, 2).item() == pytest.approx(3.0)  # the line through both
    h.push(2, 0.6, torch.tensor([2.0]))  # now three: the parabola through (1,1), (.8,2), (.6,2)
    assert estimate(h, 0.4, 2).item() == pytest.approx(1.0)
    assert estimate(h, 0.4, 1).item() == pytest.approx(2.0)


@pytest.mark.parametrize("policy,opts", [("fixed", {"skip": 3}), ("fixed", {"compute": "0,1,2,5,6,11,19"}),
                                         ("threshold", {"threshold": 0.5})])
def test_second_order_is_exact_on_a_velocity_quadratic_in_t(policy, opts):
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    full = fastflow.sample(quadratic_in_t, noise, steps=20, policy="none").x
    runs = {order: fastflow.sample(quadratic_in_t, noise, steps=20,
                                   policy=fastflow.get_policy(policy, order=order, warmup=3, **opts))
            for order in (1, 2)}
    assert runs[1].nfe == runs[2].nfe < 20  # the same decisions: only the estimate differs
    assert [s.computed for s in runs[1].trace] == [s.computed for s in runs[2].trace]
    assert (runs[1].x - full).abs().max() > 1e-3
    assert torch.allclose(runs[2].x, full, atol=2e-6)


def test_second_order_composes_with_a_multistep_solver():
    pytest.importorskip("diffusers")
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    full = fastflow.sample(quadratic_in_t, noise, steps=20, policy="none", solver="unipc").x
    out = fastflow.sample(quadratic_in_t, noise, steps=20, solver="unipc",
                          policy=fastflow.get_policy("fixed", skip=2, order=2, warmup=3))
    assert out.nfe < 20 and torch.allclose(out.x, full, atol=1e-5)


@pytest.mark.parametrize("policy", ["fixed", "threshold"])
def test_order_is_checked(policy):
    with pytest.raises(fastflow.OptionError, match="option order must be an integer in \\[1, 2\\]"):
        fastflow.get_policy(policy, order=3)
    result = CliRunner().invoke(cli, ["run", "--model", "gmm", "--policy", policy, "--option", "order=3",
                                       "--samples", "2", "--steps", "6", "--no-compare"])
    assert result.exit_code == 2 and "order" in result.output


def test_order_is_listed_among_the_options():
    assert fastflow.get_policy("fixed", order=2).options()["order"] == 2
    assert fastflow.get_policy("threshold").options()["order"] == 1

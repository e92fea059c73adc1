"""fastflow.estimator.run_errors: the errors of many skip runs at once, against the direct sums."""

import pytest
import torch

from fastflow import estimator
from fastflow.schedule import timesteps


def _runs(T):
    return [(p, c, c + 1, e) for c in range(1, T - 2) for p in range(max(0, c - 3), c)
            for e in range(c + 2, min(T, c + 8))]


def _direct(vs, ts, runs):
    """The definitions, one run at a time, in float64."""
    vs = [v.double() for v in vs]
    state, nxt = [], []
    for p, c, k, e in runs:
        s = (vs[c] - vs[p]) / (ts[c] - ts[p])
        E = sum((vs[c] + (ts[i] - ts[c]) * s - vs[i]) * (ts[i + 1] - ts[i]) for i in range(k, e))
        state.append(E.flatten(1).square().mean(1))
        nxt.append((vs[e] - vs[c] - (ts[e] - ts[c]) * s).flatten(1).square().mean(1))
    return torch.stack(state), torch.stack(nxt)


@pytest.mark.parametrize("budget", [1 << 22, 50])  # one piece, and many pieces over the features
def test_run_errors_are_the_direct_sums_for_every_row(budget):
    g = torch.Generator().manual_seed(0)
    T, ts = 20, timesteps(20, shift=3.0)
    vs = [torch.randn(3, 2, 5, 5, generator=g) + 0.2 * i for i in range(T)]
    runs = _runs(T)
    state, nxt = estimator.run_errors(vs, ts, runs, budget=budget)
    want_state, want_nxt = _direct(vs, ts, runs)
    assert state.shape == nxt.shape == (len(runs), 3) and state.dtype == torch.float64
    torch.testing.assert_close(state, want_state, rtol=1e-9, atol=0)
    torch.testing.assert_close(nxt, want_nxt, rtol=1e-9, atol=0)
    # the single run of the sensitivity probe is the same sum
    p, c, k, e = runs[7]
    single = estimator.state_error(vs, ts, p, c, k, e)
    assert single.dtype == torch.float32 and single.shape == vs[0].shape
    torch.testing.assert_close(single.double().flatten(1).square().mean(1), want_state[7], rtol=1e-5, atol=0)


def test_small_errors_on_a_smooth_path_keep_their_precision():
    # a velocity nearly quadratic in t, far from zero: the runs' errors are about 1e-11 of
    # the velocities' mean square, where the Gram forms cancel most
    g = torch.Generator().manual_seed(1)
    T, ts = 50, timesteps(50)
    a, b, c = torch.randn(3, 2, 3072, generator=g)
    vs = [(a + 3 + b * t + 0.05 * c * t * t + 1e-4 * torch.randn(2, 3072, generator=g)).float() for t in ts[:T]]
    runs = _runs(T)
    state, nxt = estimator.run_errors(vs, ts, runs)
    want_state, want_nxt = _direct(vs, ts, runs)
    assert (want_state / vs[0].double().square().mean()).min() < 1e-10
    assert ((state - want_state).abs() / want_state).max() < 1e-4
    assert ((nxt - want_nxt).abs() / want_nxt).max() < 1e-4


def test_a_velocity_linear_in_t_is_extrapolated_exactly():
    T, ts = 12, timesteps(12)
    a, b = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(2))
    vs = [a + b * t for t in ts[:T]]
    state, nxt = estimator.run_errors(vs, ts, _runs(T))
    scale = vs[0].double().square().mean()
    assert (state >= 0).all() and state.max() < 1e-12 * scale and nxt.max() < 1e-12 * scale


def test_a_run_out_of_order_is_an_error_naming_it():
    vs, ts = [torch.zeros(1, 4)] * 6, timesteps(6)
    with pytest.raises(ValueError, match=r"run \(2, 1, 3, 4\)"):
        estimator.run_errors(vs, ts, [(0, 1, 2, 3), (2, 1, 3, 4)])
    with pytest.raises(ValueError, match="<= 6"):
        estimator.run_errors(vs, ts, [(0, 1, 2, 7)])


def test_a_run_to_the_end_has_its_state_error_and_no_next_error():
    g = torch.Generator().manual_seed(3)
    T, ts = 10, timesteps(10)
    vs = [torch.randn(2, 8, generator=g) for _ in range(T)]
    state, nxt = estimator.run_errors(vs, ts, [(6, 7, 8, 10), (5, 6, 7, 9)])
    E = estimator.state_error(vs, ts, 6, 7, 8, 10).double().square().mean(1)
    torch.testing.assert_close(state[0], E, rtol=1e-5, atol=0)
    assert torch.isnan(nxt[0]).all() and torch.isfinite(nxt[1]).all()

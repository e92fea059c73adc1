"""The sampling engine against closed-form answers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastflow
from fastflow.errors import NonFiniteError, OptionError
from fastflow.schedule import timesteps

from conftest import linear_velocity


def test_uniform_and_shifted_schedules():
    assert timesteps(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    s = 3.0
    ts = timesteps(10, shift=s)
    for t, u in zip(ts, timesteps(10)):
        assert t == pytest.approx(s * u / (1 + (s - 1) * u))
    assert ts[0] == 1.0 and ts[-1] == 0.0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    with pytest.raises(OptionError, match="steps"):
        timesteps(0)
    with pytest.raises(OptionError, match="shift"):
        timesteps(5, shift=-1.0)


def test_euler_matches_the_textbook_update():
    x0 = torch.tensor([[1.0, -2.0]])
    out = fastflow.sample(lambda x, t: x * t.view(-1, 1), x0, steps=3, policy="none")
    x = x0.clone()
    for t, tn in zip(timesteps(3), timesteps(3)[1:]):
        x = x + (tn - t) * x * t
    assert torch.allclose(out.x, x)
    assert out.nfe == 3


@pytest.mark.parametrize("shift", [None, 3.0])
def test_velocity_linear_in_t_is_extrapolated_exactly(shift):
    a = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[1.5, 0.25, -3.0]], dtype=torch.float64)
    model = linear_velocity(a, b)
    noise = torch.zeros(1, 3, dtype=torch.float64)
    full = fastflow.sample(model, noise, steps=40, policy="none", shift=shift)
    for skip in (1, 3, 7):
        fast = fastflow.sample(model, noise, steps=40, policy="fixed", shift=shift,
                               policy_options={"skip": skip})
        assert fast.nfe < full.nfe
        assert torch.allclose(fast.x, full.x, atol=1e-12, rtol=0)


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(3, 40), data=st.data())
def test_constant_velocity_gives_the_exact_endpoint_under_any_skip_pattern(steps, data):
    compute = data.draw(st.lists(st.integers(0, steps - 1), max_size=steps))
    c = torch.tensor([[0.3, -1.7]], dtype=torch.float64)
    noise = torch.tensor([[2.0, 5.0]], dtype=torch.float64)
    out = fastflow.sample(lambda x, t: c.expand_as(x), noise, steps=steps, policy="fixed",
                          policy_options={"compute": compute} if compute else {"skip": 5})
    assert torch.allclose(out.x, noise - c, atol=1e-12)  # x_0 = x_1 - v


def _fixed_nfe(steps, skip, warmup=2):
    """Independent count: warm-up steps, then runs of `skip` extrapolated steps each
    followed by one computed step; a run never covers the last step."""
    n, k = min(warmup, steps), warmup
    while k < steps:
        k += min(skip, max(steps - 1 - k, 0))
        n += 1
        k += 1
    return n


@pytest.mark.parametrize("steps,skip", [(50, 0), (50, 1), (50, 2), (50, 6), (10, 3), (7, 10), (3, 2)])
def test_fixed_policy_nfe_is_exact(steps, skip):
    out = fastflow.sample(lambda x, t: -x, torch.ones(1, 2), steps=steps, policy="fixed",
                          policy_options={"skip": skip})
    assert out.nfe == _fixed_nfe(steps, skip)
    assert sum(s.computed for s in out.trace) == out.nfe
    assert [s.k for s in out.trace] == list(range(steps))


def test_fixed_skip_2_on_50_steps_by_hand():
    out = fastflow.sample(lambda x, t: -x, torch.ones(1, 2), steps=50, policy="fixed")
    computed = [s.k for s in out.trace if s.computed]
    # 0, 1 (warm-up), then every third step from 4, and the last step 49
    assert computed == [0, 1] + list(range(4, 49, 3)) + [49]
    assert out.nfe == 2 + 15 + 1


def test_trace_records_decisions():
    out = fastflow.sample(lambda x, t: -x, torch.ones(1, 2), steps=8, policy="fixed")
    assert out.trace[1].decision == 2 and out.trace[1].computed
    assert [s.computed for s in out.trace] == [True, True, False, False, True, False, False, True]
    assert [s.t for s in out.trace] == timesteps(8)[:-1]


def test_classifier_free_guidance_combines_branches():
    def model(x, t, label):
        return x * 0 + label.view(-1, 1).to(x.dtype)  # v = label

    noise = torch.zeros(3, 2)
    label = torch.tensor([1.0, 2.0, 3.0])
    out = fastflow.sample(model, noise, steps=4, policy="none", guidance=2.5,
                          uncond={"label": torch.zeros(3)}, label=label)
    # guided v = 0 + 2.5·(label − 0); integrated from t=1 to 0: x = −v
    assert torch.allclose(out.x, -2.5 * label.view(-1, 1).expand(3, 2))
    assert out.nfe == 4
    with pytest.raises(OptionError, match="uncond"):
        fastflow.sample(model, noise, steps=4, policy="none", guidance=2.0, label=label)


def test_no_sample_is_corrupted_by_another_in_its_batch():
    gmm = fastflow.get_model("gmm").build()
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(6)
    together = fastflow.sample(gmm, noise, steps=30, policy="fixed", label=labels)
    for i in range(6):
        alone = fastflow.sample(gmm, noise[i:i + 1], steps=30, policy="fixed", label=labels[i:i + 1])
        assert torch.allclose(alone.x, together.x[i:i + 1], atol=1e-6)


def test_nan_velocity_fails_naming_the_step():
    def model(x, t):
        return torch.where(t.view(-1, 1) < 0.55, torch.full_like(x, math.nan), -x)

    with pytest.raises(NonFiniteError, match=r"step 5 \(t=0\.5000\)"):
        fastflow.sample(model, torch.ones(2, 2), steps=10, policy="none")


def test_nan_failure_teaches_the_policy_nothing():
    pol = fastflow.get_policy("ucb-paper", mu=0.1)

    def model(x, t):
        return torch.full_like(x, math.nan)

    with pytest.raises(NonFiniteError):
        fastflow.sample(model, torch.ones(1, 2), steps=10, policy=pol)
    assert pol.samples == 0
    assert all(sum(b.counts) == 0 for b in pol.bandits)


def test_the_input_noise_is_not_modified():
    noise = torch.randn(2, 3)
    before = noise.clone()
    fastflow.sample(lambda x, t: -x, noise, steps=5, policy="fixed")
    assert torch.equal(noise, before)


def test_an_nn_module_works_and_runs_without_grad():
    net = torch.nn.Linear(2, 2)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            return self.net(x) * t.view(-1, 1)

    out = fastflow.sample(Wrapped(), torch.ones(3, 2), steps=6, policy="none")
    assert not out.x.requires_grad and out.x.shape == (3, 2)


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_multistep_base_solvers(solver):
    pytest.importorskip("diffusers")
    c = torch.tensor([[0.3, -1.7]], dtype=torch.float32)
    noise = torch.tensor([[2.0, 5.0]])
    for policy in ("none", "fixed"):
        out = fastflow.sample(lambda x, t: c.expand_as(x), noise, steps=12, policy=policy, solver=solver)
        assert torch.allclose(out.x, noise - c, atol=2e-3)  # constant velocity: exact endpoint
    assert out.nfe < 12
    gmm = fastflow.get_model("gmm").build()
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    label = torch.full((8,), 8)
    exact = fastflow.sample(gmm, noise, steps=400, policy="none", label=label).x
    euler = fastflow.sample(gmm, noise, steps=10, policy="none", label=label).x
    multi = fastflow.sample(gmm, noise, steps=10, policy="none", label=label, solver=solver).x
    assert (multi - exact).abs().max() < (euler - exact).abs().max()  # higher order wins
    with pytest.raises(fastflow.UnknownNameError, match="solver 'rk9'"):
        fastflow.sample(gmm, noise, steps=10, policy="none", solver="rk9")


def test_editing_starts_from_the_noised_image():
    img = torch.full((2, 3), 0.5, dtype=torch.float64)
    noise = torch.randn(2, 3, dtype=torch.float64)
    # the exact velocity of a point-mass target at img: v = noise − img (constant on the path)
    out = fastflow.sample(lambda x, t: noise - img, noise, steps=20, policy="fixed", init=img, strength=0.4)
    assert len(out.trace) == 8 and out.trace[0].t == pytest.approx(0.4)
    assert torch.allclose(out.x, img, atol=1e-12)
    for bad in (0, 1.5):
        with pytest.raises(OptionError, match="strength must be in"):
            fastflow.sample(lambda x, t: -x, noise, steps=20, policy="none", init=img, strength=bad)
    with pytest.raises(OptionError, match="shape"):
        fastflow.sample(lambda x, t: -x, noise, steps=20, policy="none", init=img[:1], strength=0.5)


@pytest.mark.parametrize("policy", ["none", "fixed", "ucb", "ucb-paper", "planned"])
def test_no_host_reads_per_step_in_the_sample_loop(host_reads, policy):
    """Host reads (the CPU stand-in for device→host syncs) per sample do not grow with
    the step count: the loop reads nothing per step; errors are read once at the end."""
    gmm = fastflow.get_model("gmm").build()
    counter = host_reads

    def reads(steps):
        pol = fastflow.get_policy(policy, **({"mu": 1e-3} if policy == "ucb-paper" else {}))
        noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
        label = torch.arange(4) % 8
        fastflow.sample(gmm, noise, steps=steps, policy=pol, label=label, model_key="g")  # calibrates / arm 0
        counter["n"] = 0
        out = fastflow.sample(gmm, noise, steps=steps, policy=pol, label=label, model_key="g")
        return counter["n"], out

    (r10, o10), (r30, o30) = reads(10), reads(30)
    # per sample: the finite check (2 reads), the policy's one transfer (1), the label check (2, once per
    # label tensor); none of them per step
    assert r10 == r30 <= 5, (r10, r30)
    if policy != "none":
        assert o30.nfe < 30  # it really skipped while reading nothing per step

"""The sensitivity A(t) that prices a skip's error by how much of it reaches the output:
analytic answers on linear fields, exact probe counts, and what the policies do with it."""

import math

import pytest
import torch

import fastflow
from fastflow import sensitivity
from fastflow.schedule import timesteps


def test_amplification_of_a_linear_field_is_one_minus_t_a_squared():
    # v(x) = a·x: the look-ahead x − t·v moves by (1 − t·a)·e for a state error e
    e = torch.randn(3, 5)
    x = torch.randn(3, 5)
    for a, t in ((-1.0, 0.9), (2.0, 0.3), (0.0, 0.5)):
        got = sensitivity.amplification(e, a * (x + e), a * x, t)
        assert got.item() == pytest.approx((1 - t * a) ** 2, rel=1e-5)


def test_profile_interpolates_in_log_space_and_holds_flat_outside_the_probes():
    prof = sensitivity.profile({2: 1.0, 6: 16.0, 9: float("nan")}, steps=8)
    assert len(prof) == 9
    assert prof[0] == prof[1] == prof[2] == 1.0 and prof[6] == prof[7] == prof[8] == pytest.approx(16.0)
    assert prof[4] == pytest.approx(4.0)  # halfway in log space
    assert sensitivity.profile({3: 0.0, 4: float("inf")}, 5) is None


def test_probe_steps_are_spread_over_where_runs_can_end():
    room = [0, 0] + [1] * 47 + [0]  # the default window of 50 steps
    steps = sensitivity.probe_steps(50, room)
    assert len(steps) == sensitivity.PROBES and steps[0] == 4 and steps[-1] == 49
    assert steps == sorted(set(steps))
    assert sensitivity.probe_steps(8, [0, 0, 1, 1, 1, 1, 1, 0], count=5) == [4, 5, 6, 7]
    assert len(sensitivity.probe_steps(20, [0, 0] + [1] * 17 + [0])) == 5  # one per 4 steps below 48


def test_ucb_calibration_measures_the_sensitivity_of_a_linear_field_and_counts_its_probes():
    # v = −x: J = −I, so every probe reads A(t_j) = (1 + t_j)² exactly
    pol = fastflow.get_policy("ucb")
    out = fastflow.sample(lambda x, t: -x, torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
                          steps=20, policy=pol, model_key="decay")
    ts = timesteps(20)
    probes = sensitivity.probe_steps(20, pol.run_lengths(20))
    assert out.nfe_per_sample[0] == 20 + len(probes)  # every step, plus one evaluation per probe
    # each probe rides in its step's call (the batch doubled), and rows 1-2 share calls
    assert out.model_calls == 20 + out.nfe_per_sample[1]
    for j in probes:
        assert pol.sensitivity[j] == pytest.approx((1 + ts[j]) ** 2, rel=1e-4)


def test_a_probe_is_evaluated_in_its_steps_own_call_with_the_rows_conditioning_and_guidance():
    # the calibration row's call at a probe step carries x and x + e, each with the row's
    # label on both guidance branches: 4 rows, labels (2, 2, null, null)
    seen = []

    def model(x, t, label):
        assert label.shape[0] == x.shape[0] == t.shape[0]
        seen.append(label.tolist())
        return -x * (1.0 + 0.1 * label.view(-1, 1).float())

    pol = fastflow.get_policy("ucb")
    labels = torch.tensor([2, 1, 0])
    out = fastflow.sample(model, torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), steps=20,
                          policy=pol, model_key="probe-call", label=labels, guidance=2.0,
                          uncond={"label": torch.full_like(labels, 9)})
    probes = sensitivity.probe_steps(20, pol.run_lengths(20))
    calibration = seen[:20]  # row 0 calibrates alone, first
    assert [len(c) for c in calibration].count(4) == len(probes) and all(len(c) in (2, 4) for c in calibration)
    assert [c for c in calibration if len(c) == 4] == [[2, 2, 9, 9]] * len(probes)
    assert out.nfe_per_sample[0] == 20 + len(probes) and out.model_calls == 20 + out.nfe_per_sample[1]
    # v = −(1 + 0.1·label)x guided at 2: v = −(1.9 + 2·(1.2 − 1.9))x = −0.5x, so A = (1 + 0.5t)²
    # (float32 differences of nearby velocities: to 0.2 %)
    for k in probes:
        assert pol.sensitivity[k] == pytest.approx((1 + 0.5 * timesteps(20)[k]) ** 2, rel=2e-3)


def test_ucb_skips_less_where_errors_grow():
    # v = −3x + sin(6t): A(t) = (1 + 3t)², up to 16 early; the same field priced as if
    # every step's error reached the output alike (A = 1) is skipped more
    def field(x, t):
        return -3.0 * x + torch.sin(6.0 * t).view(-1, 1)

    weighted = fastflow.get_policy("ucb", tolerance=0.005)  # a budget where the pricing shows
    fastflow.sample(field, torch.randn(8, 4), steps=30, policy=weighted, model_key="field")
    flat = fastflow.get_policy("ucb", tolerance=0.005)
    flat.sensitivity = [1.0] * 31  # what the rewards were before: every step's error alike
    fastflow.sample(field, torch.randn(8, 4), steps=30, policy=flat, model_key="field")
    assert weighted.sensitivity[4] == pytest.approx((1 + 3 * timesteps(30)[4]) ** 2, rel=1e-3)
    assert len(weighted.greedy_path()) > len(flat.greedy_path())


def test_planned_weighs_its_run_costs_by_the_sensitivity():
    from fastflow.policies.planned import run_costs

    ts = timesteps(10)
    vs = [torch.full((2, 3), math.sin(3 * t)) for t in ts[:-1]]
    plain = run_costs(vs, ts, 3)
    grown = run_costs(vs, ts, 3, [float(j + 1) for j in range(11)])
    assert plain.keys() == grown.keys()
    for (p, c, L), v in plain.items():
        assert grown[(p, c, L)] == pytest.approx(v * (c + L + 2))


def test_what_the_calibration_measured_survives_a_state_file_and_old_learning_is_refused(tmp_path):
    import json

    from fastflow.errors import StateFileError

    path = tmp_path / "ucb.json"
    pol = fastflow.get_policy("ucb", state=str(path))
    fastflow.sample(lambda x, t: -x, torch.randn(2, 4), steps=20, policy=pol, model_key="decay")
    pol.save()
    again = fastflow.get_policy("ucb", state=str(path))
    fastflow.sample(lambda x, t: -x, torch.randn(2, 4), steps=20, policy=again, model_key="decay")
    assert again.sensitivity == pol.sensitivity and again.correction == pol.correction
    assert again.scale == pol.scale

    data = json.loads(path.read_text())
    data["sensitivity"] = data["sensitivity"][:-1]  # one short
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(StateFileError, match="sensitivity"):
        fastflow.sample(lambda x, t: -x, torch.randn(2, 4), steps=20,
                        policy=fastflow.get_policy("ucb", state=str(bad)), model_key="decay")
    assert bad.read_text() == json.dumps(data)  # left untouched

    old = tmp_path / "old.json"  # learned before errors were weighed by the sensitivity
    data = json.loads(path.read_text())
    del data["options"]["rewards"]
    old.write_text(json.dumps(data))
    with pytest.raises(StateFileError, match="older ucb.*another --state path"):
        fastflow.get_policy("ucb", state=str(old))

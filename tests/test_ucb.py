"""The default bandit ``ucb``: exact rewards, calibration on one sample, scale-free
decisions, per-sample pulls, and state files that merge instead of losing learning."""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

import fastflow
from fastflow import sensitivity
from fastflow.errors import OptionError, StateFileError
from fastflow.policies.ucb import run_weight

from conftest import linear_velocity


def test_straight_flow_rewards_are_exactly_the_steps_skipped_and_calibration_costs_one_sample():
    # v = a + b·t: first-order extrapolation is exact, so every skip's error is 0
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    pol = fastflow.get_policy("ucb")
    noise = torch.zeros(4, 2)
    out = fastflow.sample(linear_velocity(a, b), noise, steps=20, policy=pol, model_key="line")
    # row 0 calibrates alone (20 evaluations, and the sensitivity probes: 1 each, as the
    # extrapolation is exact they find no error to grow); rows 1-3 take the longest arm (8)
    # at once: computed 0, 1, then 10 (after skipping 2-9), then 19 (11-18 skipped)
    cal = 20 + len(sensitivity.probe_steps(20, pol.run_lengths(20)))
    assert out.nfe_per_sample == [cal, 4, 4, 4] and out.calibration_samples == 1 and out.nfe == (cal + 12) / 4
    assert pol.sensitivity == pytest.approx([1.0] * 21)  # the field does not depend on x: A = 1
    assert [s.k for s in out.trace if s.computed] == [0, 1, 10, 19]
    exact = noise + sum((t1 - t0) * (a + b * t0) for t0, t1 in zip(fastflow.schedule.timesteps(20),
                                                                     fastflow.schedule.timesteps(20)[1:]))
    torch.testing.assert_close(out.x, exact.expand(4, 2), rtol=0, atol=1e-5)
    arm8 = pol.arms.index(8)
    b2 = pol.bandit(2, 0)  # the bandit of step 2 after computed steps 0, 1
    # prior: one pull per arm with reward = steps skipped; then 3 pulls (one per row) of arm 8
    assert b2.counts[arm8] == 4 and b2.sums[arm8] == pytest.approx(4 * 8.0, abs=1e-6)  # float32 rounding only
    assert b2.values[0] == 0.0 and b2.values[pol.arms.index(3)] == pytest.approx(3.0, abs=1e-9)
    assert pol.greedy_path() == [0, 1, 10, 19] and "computes 4 of 20 steps" in pol.learned()


def test_with_skip_last_a_run_may_reach_the_end_priced_by_the_calibration():
    # v = a + b·t again (every extrapolation exact), arms 0 and 9 on 20 steps: after 0, 1
    # and 11, a run of 8 reaches the end. Nothing measures it; its calibrated mean (8
    # skipped, no error) is pulled once more per row, so its bandit keeps learning
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    noise = torch.zeros(4, 2)
    pol = fastflow.get_policy("ucb", arms="0,9", skip_last=True)
    out = fastflow.sample(linear_velocity(a, b), noise, steps=20, policy=pol, model_key="line-end")
    from fastflow.schedule import timesteps

    ts = timesteps(20)
    exact = noise + sum((t1 - t0) * (a + b * t0) for t0, t1 in zip(ts, ts[1:]))
    assert [s.k for s in out.trace if s.computed] == [0, 1, 11] and out.nfe_per_sample[1:] == [3, 3, 3]
    torch.testing.assert_close(out.x, exact.expand(4, 2), rtol=0, atol=1e-5)
    end = pol.bandit(12, 1)  # at step 12, after computed steps 1 and 11
    arm9 = pol.arms.index(9)
    assert end.counts[arm9] == 1 + 3 and end.sums[arm9] == pytest.approx(4 * 8.0, abs=1e-5)  # prior + 3 rows
    assert pol.greedy_path() == [0, 1, 11]
    kept = fastflow.get_policy("ucb", arms="0,9")  # the default, the paper's rule: the last step computed
    out = fastflow.sample(linear_velocity(a, b), noise, steps=20, policy=kept, model_key="line-end")
    assert [s.k for s in out.trace if s.computed] == [0, 1, 11, 19] and out.nfe_per_sample[1:] == [4, 4, 4]
    assert fastflow.get_policy("fixed").run_lengths(20)[19] == 0  # other policies: the last step computed


def test_a_state_saved_before_skip_last_existed_is_refused_by_skip_last(tmp_path):
    # its bandits hold no prior for runs that reach the end (they were never allowed)
    path = tmp_path / "ucb.json"
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    pol = fastflow.get_policy("ucb", state=str(path))
    fastflow.sample(linear_velocity(a, b), torch.zeros(2, 2), steps=20, policy=pol, model_key="old")
    pol.save()
    data = json.loads(path.read_text())
    del data["options"]["skip_last"]
    path.write_text(json.dumps(data))
    fastflow.get_policy("ucb", state=str(path))  # the default reads it as before
    with pytest.raises(StateFileError, match="skip_last=False"):
        fastflow.get_policy("ucb", state=str(path), skip_last=True)


def test_costly_flow_teaches_short_skips():
    # a velocity that turns fast in t: extrapolating even one step is far off
    def wiggle(x, t):
        return torch.sin(40.0 * t).view(-1, 1).expand_as(x) * 5.0

    pol = fastflow.get_policy("ucb", tolerance=0.005)  # the mechanism, at a tight budget
    for seed in range(3):
        fastflow.sample(wiggle, torch.randn(8, 3, generator=torch.Generator().manual_seed(seed)), steps=30,
                        policy=pol, model_key="wiggle")
    assert len(pol.greedy_path()) >= 20  # most steps computed (a flipped reward sign would give 4)
    straight = fastflow.get_policy("ucb")
    fastflow.sample(linear_velocity(torch.ones(3), torch.ones(3)), torch.zeros(8, 3), steps=30, policy=straight,
                    model_key="line")
    assert len(straight.greedy_path()) < 8


def test_decisions_do_not_depend_on_the_models_units():
    gmm = fastflow.get_model("gmm").build()
    c = 1024.0  # a power of two: the scaled trajectory is the same numbers, exactly

    def scaled(x, t, label=None):
        return c * gmm(x / c, t, label=label)

    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    label = torch.arange(8) % 8
    runs = []
    for model, z in ((gmm, noise), (scaled, noise * c)):
        pol = fastflow.get_policy("ucb", tolerance=0.01)
        traces = [fastflow.sample(model, z, steps=30, policy=pol, model_key="m", label=label).trace for _ in range(3)]
        runs.append(traces)
    assert runs[0] == runs[1]
    assert sum(not s.computed for s in runs[0][-1]) > 0


def test_each_sample_is_a_pull():
    gmm = fastflow.get_model("gmm").build()
    pol = fastflow.get_policy("ucb")
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    out = fastflow.sample(gmm, noise, steps=30, policy=pol, label=torch.arange(16) % 8, model_key="g")
    computed = [s.k for s in out.trace if s.computed]
    decided = [(s.k + 1, computed[computed.index(s.k) - 1]) for s in out.trace if s.decision is not None]
    priors = len(pol.arms)  # one calibration pull per arm
    for k, k_prev in decided:
        assert sum(pol.bandit(k, k_prev).counts) == priors + 15  # the 15 accelerated rows each taught it
    assert pol.samples == 16


def test_run_weight_is_the_share_of_the_error_that_lands_in_the_sample():
    ts = fastflow.schedule.timesteps(10)
    # one skipped step at distance h from t_cur, spacing h: error ∝ d(d+s) = 2h² there, 6h² at j
    assert run_weight(ts, ts[0], ts[1], 2, 1) == pytest.approx(0.1 * 2 / 6)
    assert run_weight(ts, ts[0], ts[1], 2, 3) == pytest.approx(0.1 * (2 + 6 + 12) / 20)


@pytest.mark.parametrize("opts,needle", [
    ({"tolerance": "inf"}, "tolerance must be a finite number"),
    ({"tolerance": 0}, "tolerance must be a finite number > 0"),
    ({"gamma": "nan"}, "gamma must be"),
    ({"gamma": float("inf")}, "gamma must be a finite number"),
    ({"calibrate": 0}, "calibrate must be"),
    ({"state": 123}, "state must be a file path"),
])
def test_bad_options_are_named(opts, needle):
    with pytest.raises(OptionError, match=needle):
        fastflow.get_policy("ucb", **opts)


def test_paper_rule_options_refuse_infinity():
    with pytest.raises(OptionError, match="mu must be a finite number"):
        fastflow.get_policy("ucb-paper", mu="inf")
    with pytest.raises(OptionError, match="gamma must be a finite number"):
        fastflow.get_policy("ucb-paper", gamma="inf")


# -- state files ----------------------------------------------------------------------

def _learn(path, seed, batch=4, steps=20):
    gmm = fastflow.get_model("gmm").build()
    pol = fastflow.get_policy("ucb", state=str(path))
    noise = torch.randn(batch, 2, generator=torch.Generator().manual_seed(seed))
    fastflow.sample(gmm, noise, steps=steps, policy=pol, label=torch.arange(batch) % 8, model_key="gmm")
    return pol


def _counts(path):
    data = json.loads(path.read_text())
    return [c for row in data["bandits"] for c in row["counts"]], data["samples"]


def test_two_writers_from_the_same_start_both_keep_their_learning(tmp_path):
    path = tmp_path / "s.json"
    _learn(path, 0).save()
    base, base_samples = _counts(path)
    b, c = _learn(path, 1), _learn(path, 2)  # both loaded the same file
    gained_b = [x - y for x, y in zip((cnt for bd in b.bandits for cnt in bd.counts), base)]
    gained_c = [x - y for x, y in zip((cnt for bd in c.bandits for cnt in bd.counts), base)]
    b.save()
    c.save()
    counts, samples = _counts(path)
    assert counts == [x + y + z for x, y, z in zip(base, gained_b, gained_c)]
    assert samples == base_samples + 8
    assert c.bandits[2].counts == [int(v) for v in json.loads(path.read_text())["bandits"][2]["counts"]]


WRITER = """
import json, sys, torch, fastflow
gmm = fastflow.get_model("gmm").build()
pol = fastflow.get_policy("ucb", state=sys.argv[1])
noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(int(sys.argv[2])))
fastflow.sample(gmm, noise, steps=20, policy=pol, label=torch.arange(4) % 8, model_key="gmm")
# what this process loaded, and what it holds before merging
print(json.dumps([[c for cs, _ in pol._base for c in cs], [c for b in pol.bandits for c in b.counts]]))
pol.save()
"""


@pytest.mark.slow
def test_concurrent_processes_merge_under_the_lock(tmp_path):
    path = tmp_path / "s.json"
    _learn(path, 0).save()
    base, base_samples = _counts(path)
    env = dict(os.environ, FASTFLOW_LOAD_PLUGINS="", OMP_NUM_THREADS="1")
    # cwd: away from the source tree, so the installed fastflow is the one imported
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(s)], env=env, stdout=subprocess.PIPE, cwd=tmp_path,
                              text=True) for s in (1, 2, 3, 4)]
    held = []
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0
        held.append(json.loads(out))
    counts, samples = _counts(path)
    gained = [sum(h[i] - loaded[i] for loaded, h in held) for i in range(len(base))]
    assert counts == [b + g for b, g in zip(base, gained)]  # nobody's learning is lost
    assert samples == base_samples + 16 and sum(gained) > 0
    assert not list(tmp_path.glob(".s.json.*.tmp"))


def test_saving_writes_through_a_symlink_and_keeps_the_mode(tmp_path):
    target = tmp_path / "real.json"
    link = tmp_path / "link.json"
    _learn(target, 0).save()
    os.chmod(target, 0o644)
    link.symlink_to(target)
    _learn(link, 1).save()
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert _counts(target)[1] == 8


def test_a_read_only_state_file_is_refused_before_sampling(tmp_path):
    from click.testing import CliRunner
    from fastflow.cli import cli

    path = tmp_path / "ro.json"
    _learn(path, 0).save()
    before = path.read_bytes()
    os.chmod(path, 0o444)
    if os.access(path, os.W_OK):
        pytest.skip("running as a user who may write read-only files (root)")
    result = CliRunner().invoke(cli, ["run", "--model", "gmm", "--steps", "10", "--samples", "2", "--state", str(path),
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not writable" in result.output
    assert path.read_bytes() == before and not (tmp_path / "o").exists()


@pytest.mark.parametrize("field,value,needle", [
    ("scale", "NaN", "NaN"), ("scale", "-1.0", "scale"), ("samples", "-3", "samples"),
    ("counts", "[1, -1]", "count"), ("sums", "[1e999, 0]", "Infinity"),
])
def test_non_finite_or_negative_state_values_are_refused_untouched(tmp_path, field, value, needle):
    path = tmp_path / "s.json"
    _learn(path, 0).save()
    text = path.read_text()
    data = json.loads(text)
    if field in ("counts", "sums"):
        row = data["bandits"][2]
        row[field] = json.loads(value.replace("1e999", "1")) + [0] * (len(row[field]) - 2)
        raw = json.dumps(data).replace('"sums": [1, 0', '"sums": [Infinity, 0') if field == "sums" else json.dumps(data)
    else:
        raw = json.dumps(data).replace(f'"{field}": {json.dumps(data[field])}', f'"{field}": {value}')
    path.write_text(raw)
    with pytest.raises(StateFileError, match=needle):
        _learn(path, 1)
    assert path.read_text() == raw


def test_options_that_are_not_an_object_are_a_clear_error(tmp_path):
    path = tmp_path / "s.json"
    _learn(path, 0).save()
    data = json.loads(path.read_text())
    data["options"] = "oops"
    path.write_text(json.dumps(data))
    with pytest.raises(StateFileError, match="'options' is not an object"):
        fastflow.get_policy("ucb", state=str(path))


def test_the_paper_rule_stays_available_as_ucb_paper_and_its_state_merges(tmp_path):
    gmm = fastflow.get_model("gmm").build()
    path = tmp_path / "p.json"
    pols = [fastflow.get_policy("ucb-paper", mu=0.01, state=str(path)) for _ in range(2)]  # same (empty) start
    learned = []
    for i, pol in enumerate(pols):
        fastflow.sample(gmm, torch.randn(2, 2, generator=torch.Generator().manual_seed(i)), steps=12, policy=pol,
                        model_key="gmm", label=torch.tensor([0, 1]))
        learned.append(sum(sum(b.counts) for b in pol.bandits))
        pol.save()
    data = json.loads(path.read_text())
    assert data["policy"] == "ucb-paper" and data["samples"] == 2
    assert sum(sum(r["counts"]) for r in data["bandits"]) == sum(learned) > 0


@pytest.mark.parametrize("model,noise,needle", [
    (lambda x, t: x[:1], torch.ones(2, 3), r"velocity of shape \(1, 3\) for an input of shape \(2, 3\)"),
    (lambda x, t: torch.tensor(1.0), torch.ones(2, 3), r"velocity of shape \(\) for an input"),
    (lambda x, t: None, torch.ones(2, 3), "returned NoneType, not a torch tensor"),
    (lambda x, t: x.numpy(), torch.ones(2, 3), "returned ndarray, not a torch tensor"),
    (lambda x, t: x, [[1.0, 2.0]], "noise must be a floating-point torch tensor"),
    (lambda x, t: x, torch.tensor(1.0), "noise must be a floating-point torch tensor"),
    (lambda x, t: x, torch.ones(2, 3, dtype=torch.long), "noise must be a floating-point torch tensor"),
])
def test_api_misuse_is_a_fastflow_error_naming_the_argument(model, noise, needle):
    with pytest.raises(fastflow.FastFlowError, match=needle):
        fastflow.sample(model, noise, steps=5, policy="none")


def test_a_policy_of_none_is_named():
    with pytest.raises(OptionError, match="policy must be a policy name"):
        fastflow.sample(lambda x, t: x, torch.ones(1, 2), steps=3, policy=None)


def test_two_lambdas_are_two_models_to_a_learning_policy():
    pol = fastflow.get_policy("ucb")
    first = lambda x, t: x * 0 + 1.0  # noqa: E731
    second = lambda x, t: x * 0 + 2.0  # noqa: E731
    fastflow.sample(first, torch.zeros(2, 2), steps=6, policy=pol)
    with pytest.raises(OptionError, match="learned on"):
        fastflow.sample(second, torch.zeros(2, 2), steps=6, policy=pol)


@pytest.mark.parametrize("name,label,needle", [
    ("glyphs", torch.tensor([1, 2, 3]), "label has 3 entries for a batch of 2"),
    ("glyphs", torch.tensor([0, 99]), "label holds 0..99; this model's labels are 0..35"),
    ("gmm", torch.tensor([1, 2, 3]), "label has 3 entries for a batch of 2"),
    ("gmm", torch.tensor([0, 99]), "label holds 0..99; this model's labels are 0..7"),
])
def test_labels_are_checked(name, label, needle):
    spec = fastflow.get_model(name)
    with pytest.raises(fastflow.FastFlowError, match=needle):
        fastflow.sample(spec.build(), torch.randn(2, *spec.shape), steps=3, policy="none", label=label)


def test_numpy_scalars_are_values_not_errors():
    np = pytest.importorskip("numpy")
    out = fastflow.sample(lambda x, t: x * 0 + 1.0, torch.zeros(1, 2), steps=np.int64(10),
                          policy=fastflow.get_policy("fixed", skip=np.int64(2), window_end=np.float32(0.5)))
    assert out.steps == 10 and torch.allclose(out.x, torch.full((1, 2), -1.0))
    again = fastflow.sample(lambda x, t: x * 0 + 1.0, torch.zeros(1, 2), steps=torch.tensor(10),
                            policy=fastflow.get_policy("fixed", skip=torch.tensor(2), window_end=torch.tensor(0.5)))
    assert again.nfe == out.nfe and torch.equal(again.x, out.x)  # torch scalars too


def test_non_string_names_and_paths_are_named():
    with pytest.raises(OptionError, match="policy name must be a string"):
        fastflow.get_policy(None)
    with pytest.raises(OptionError, match="state must be a file path"):
        fastflow.get_policy("planned", state=123)


@pytest.mark.parametrize("value", ['"x"', "null"])
def test_a_stored_mu_scale_of_the_wrong_type_is_a_clear_error(tmp_path, value):
    path = tmp_path / "p.json"
    pol = fastflow.get_policy("ucb-paper", state=str(path))
    fastflow.sample(fastflow.get_model("gmm").build(), torch.randn(2, 2), steps=8, policy=pol, model_key="gmm",
                    label=torch.tensor([0, 1]))
    pol.save()
    text = path.read_text().replace('"mu_scale": 1.0', f'"mu_scale": {value}')
    path.write_text(text)
    with pytest.raises(StateFileError, match="mu_scale"):
        fastflow.get_policy("ucb-paper", state=str(path))
    assert path.read_text() == text


def test_a_state_path_under_a_file_is_refused_before_sampling(tmp_path):
    from click.testing import CliRunner
    from fastflow.cli import cli

    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(cli, ["run", "--model", "gmm", "--steps", "10", "--samples", "2",
                                      "--state", str(tmp_path / "afile" / "s.json"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "cannot create state file" in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_a_state_file_of_the_papers_rule_points_to_ucb_paper(tmp_path):
    path = tmp_path / "old.json"
    pol = fastflow.get_policy("ucb-paper", state=str(path))
    fastflow.sample(fastflow.get_model("gmm").build(), torch.randn(2, 2), steps=8, policy=pol, model_key="gmm",
                    label=torch.tensor([0, 1]))
    pol.save()
    data = json.loads(path.read_text())
    data["policy"] = "ucb"  # as the paper's rule wrote it when it was called ucb
    path.write_text(json.dumps(data))
    with pytest.raises(StateFileError, match="now 'ucb-paper'"):
        fastflow.get_policy("ucb", state=str(path))


def test_a_read_only_state_file_is_refused_even_where_root_could_write_it(tmp_path, monkeypatch):
    # root may write a 0444 file, so the permission answer is simulated: the check must consult it
    from click.testing import CliRunner
    from fastflow.cli import cli

    path = tmp_path / "ro.json"
    _learn(path, 0).save()
    before = path.read_bytes()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(path) and mode & os.W_OK
                        else real_access(p, mode))
    result = CliRunner().invoke(cli, ["run", "--model", "gmm", "--steps", "10", "--samples", "2", "--state", str(path),
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not writable" in result.output, result.output
    assert path.read_bytes() == before and not (tmp_path / "o").exists()

"""State files and options under random input, and writers killed at random moments."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastflow
from fastflow.errors import OptionError, StateFileError
from fastflow.plugins import get_plugins
from fastflow.policy import accepted_options

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def valid_state(tmp_path_factory):
    """A state file as ucb writes it, for the mutations to start from."""
    path = tmp_path_factory.mktemp("valid") / "valid.json"
    _learn_once(path)
    return json.loads(path.read_text())


def _learn_once(path, seed=0):
    pol = fastflow.get_policy("ucb", state=str(path))
    gmm = fastflow.get_model("gmm").build()
    fastflow.sample(gmm, torch.randn(2, 2, generator=torch.Generator().manual_seed(seed)), steps=8, policy=pol,
                    model_key="gmm", label=torch.tensor([0, 1]))
    pol.save()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=st.sampled_from(["replace", "field"]), field=st.sampled_from(
    ["format", "version", "policy", "key", "options", "samples", "scale", "bandits"]), value=json_values)
def test_random_state_files_load_or_fail_cleanly_and_stay_untouched(tmp_path, valid_state, mutation, field, value):
    data = value if mutation == "replace" else {**valid_state, field: value}
    path = tmp_path / "random.json"
    text = json.dumps(data)
    path.write_text(text)
    gmm = fastflow.get_model("gmm").build()
    try:
        pol = fastflow.get_policy("ucb", state=str(path))
        fastflow.sample(gmm, torch.randn(2, 2), steps=8, policy=pol, model_key="gmm", label=torch.tensor([0, 1]))
    except StateFileError:
        pass
    assert path.read_text() == text  # loading never writes


option_text = st.one_of(st.text(max_size=8), st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e400", "0,1,2",
                                                               "true", "", "1.5", "3"]))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_every_policy_builds_or_names_the_bad_option(data):
    entries = get_plugins().registry("policies")
    name = data.draw(st.sampled_from(sorted(entries)))
    accepted = [k for k in accepted_options(entries[name].obj) if k != "state"]
    if not accepted:
        return
    keys = data.draw(st.lists(st.sampled_from(accepted), min_size=1, max_size=3, unique=True))
    options = {k: data.draw(option_text) for k in keys}
    try:
        pol = fastflow.get_policy(name, **options)
    except OptionError as exc:
        assert any(k in str(exc) for k in keys) or "window" in str(exc), str(exc)
        return
    for value in pol.options().values():  # whatever was accepted is a finite, JSON-able value
        json.dumps(value, allow_nan=False)


WRITER = """
import sys, torch, fastflow
gmm = fastflow.get_model("gmm").build()
pol = fastflow.get_policy("ucb", state=sys.argv[1])
for i in range(1000):  # learn and save, again and again, until killed
    noise = torch.randn(2, 2, generator=torch.Generator().manual_seed(i))
    fastflow.sample(gmm, noise, steps=8, policy=pol, model_key="gmm", label=torch.tensor([0, 1]))
    pol.save()
    print(i, flush=True)
"""


@pytest.mark.slow
def test_a_writer_killed_at_random_moments_never_leaves_a_broken_file(tmp_path):
    path = tmp_path / "s.json"
    env = dict(os.environ, FASTFLOW_LOAD_PLUGINS="", OMP_NUM_THREADS="1")
    rng = random.Random(0)
    deadline = time.monotonic() + 60
    kills = 0
    last_samples = 0
    while kills < 6 and time.monotonic() < deadline:
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # it has saved at least once: now kill it at a random moment
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        data = json.loads(path.read_text())  # always parses
        assert data["format"] == "fastflow.policy-state" and data["samples"] >= last_samples
        last_samples = data["samples"]
    assert kills >= 3
    _learn_once(path, seed=99)  # it loads (the file is valid), learns, and its save cleans up
    assert not list(tmp_path.glob(".s.json.*.tmp"))

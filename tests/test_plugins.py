"""Plugin discovery: built-ins, entry points, FASTFLOW_LOAD_PLUGINS, failures, duplicates."""

import importlib.metadata
import os
import subprocess
import sys
import json
import re
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import fastflow
from fastflow import hookspecs
import fastflow.cli
from fastflow.errors import DuplicateNameError
from fastflow.plugins import get_plugins
from fastflow.policy import Policy

ROOT = Path(__file__).resolve().parents[1]


class FakeEP:
    def __init__(self, name, obj, dist="fake-dist", version="9.9"):
        self.name, self._obj = name, obj
        self.dist = types.SimpleNamespace(name=dist, version=version)

    def load(self):
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


def plugin_module(name, policy_name=None, raises=None):
    mod = types.ModuleType(name)

    class P(Policy):
        pass

    P.name = policy_name or name

    @fastflow.hookimpl
    def register_policies(register):
        if raises:
            raise raises
        register(policy_name or name, P, description="test policy")

    mod.register_policies = register_policies
    mod.P = P
    return mod


@pytest.fixture
def fake_eps(monkeypatch):
    eps = []
    real = importlib.metadata.entry_points

    def entry_points(**kw):
        if kw.get("group") == "fastflow":
            return list(eps)
        return real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return eps


def test_builtins_register_through_the_public_hooks(no_entry_points):
    p = get_plugins()
    assert {"ucb", "fixed", "threshold", "none"} <= set(p.registry("policies"))
    assert "torch" in p.registry("backends")
    assert "gmm" in p.registry("models")
    assert p.get("policies", "ucb").plugin == "fastflow.policies.ucb"


def test_entry_point_plugins_load_and_are_listed(fake_eps, monkeypatch):
    monkeypatch.delenv("FASTFLOW_LOAD_PLUGINS", raising=False)
    fake_eps.append(FakeEP("alpha", plugin_module("alpha"), dist="fastflow-alpha"))
    assert "alpha" in get_plugins().registry("policies")
    result = CliRunner().invoke(fastflow.cli.cli, ["plugins", "--json"])
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["alpha"]["distribution"] == "fastflow-alpha"
    assert rows["alpha"]["version"] == "9.9"
    assert rows["alpha"]["registers"]["policies"] == ["alpha"]
    assert rows["alpha"]["hooks"] == ["register_policies"]
    assert rows["fastflow.policies.ucb"]["builtin"] is True


@pytest.mark.parametrize("env,expected", [
    (None, {"alpha", "beta"}),
    ("", set()),
    ("fastflow-alpha", {"alpha"}),
    ("fastflow-beta, fastflow-alpha", {"alpha", "beta"}),
])
def test_fastflow_load_plugins_selects_distributions(fake_eps, monkeypatch, env, expected):
    fake_eps.append(FakeEP("alpha", plugin_module("alpha"), dist="fastflow-alpha"))
    fake_eps.append(FakeEP("beta", plugin_module("beta"), dist="fastflow-beta"))
    if env is None:
        monkeypatch.delenv("FASTFLOW_LOAD_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("FASTFLOW_LOAD_PLUGINS", env)
    names = set(get_plugins().registry("policies")) & {"alpha", "beta"}
    assert names == expected


def test_unknown_name_in_fastflow_load_plugins_warns(fake_eps, monkeypatch, capsys):
    monkeypatch.setenv("FASTFLOW_LOAD_PLUGINS", "nope")
    get_plugins()
    assert "FASTFLOW_LOAD_PLUGINS names 'nope'" in capsys.readouterr().err


def test_a_failing_plugin_is_reported_and_the_rest_keeps_working(fake_eps, monkeypatch, capsys):
    monkeypatch.delenv("FASTFLOW_LOAD_PLUGINS", raising=False)
    fake_eps.append(FakeEP("broken", ImportError("No module named 'missing_dep'"), dist="fastflow-broken"))
    fake_eps.append(FakeEP("raiser", plugin_module("raiser", raises=RuntimeError("boom")), dist="fastflow-raiser"))
    fake_eps.append(FakeEP("good", plugin_module("good"), dist="fastflow-good"))
    policies = get_plugins().registry("policies")
    assert "good" in policies and "ucb" in policies and "raiser" not in policies
    err = capsys.readouterr().err
    assert "plugin 'broken' (from fastflow-broken) failed to load" in err and "missing_dep" in err
    assert "plugin 'raiser' failed in register_policies: RuntimeError: boom" in err
    rows = {r["name"]: r for r in get_plugins().describe()}
    assert "missing_dep" in rows["broken"]["error"] and "boom" in rows["raiser"]["error"]
    out = fastflow.sample(lambda x, t: -x, torch.ones(1, 2), steps=5, policy="good")
    assert out.nfe == 5


def test_two_plugins_registering_one_name_is_an_error_naming_both(fake_eps, monkeypatch):
    monkeypatch.delenv("FASTFLOW_LOAD_PLUGINS", raising=False)
    fake_eps.append(FakeEP("one", plugin_module("one", policy_name="same"), dist="d1"))
    fake_eps.append(FakeEP("two", plugin_module("two", policy_name="same"), dist="d2"))
    with pytest.raises(DuplicateNameError, match="'same' is registered by two plugins: 'one' and 'two'"):
        get_plugins().registry("policies")
    fake_eps.clear()
    fake_eps.append(FakeEP("shadow", plugin_module("shadow", policy_name="ucb"), dist="d3"))
    from fastflow.plugins import reset_plugins

    reset_plugins()
    with pytest.raises(DuplicateNameError, match="'fastflow.policies.ucb' and 'shadow'"):
        get_plugins().registry("policies")


def test_plugins_can_add_commands(fake_eps, monkeypatch):
    monkeypatch.delenv("FASTFLOW_LOAD_PLUGINS", raising=False)
    mod = types.ModuleType("cmdplugin")

    @fastflow.hookimpl
    def register_commands(cli):
        @cli.command(name="hello-plugin")
        def hello():
            """Say hello."""
            print("hello from a plugin")

    mod.register_commands = register_commands
    fake_eps.append(FakeEP("cmdplugin", mod, dist="fastflow-cmd"))
    import fastflow.cli as cli_mod

    try:
        get_plugins().add_commands(cli_mod.cli)
        result = CliRunner().invoke(cli_mod.cli, ["hello-plugin"])
        assert result.exit_code == 0 and "hello from a plugin" in result.output
        rows = {r["name"]: r for r in get_plugins().describe()}
        assert rows["cmdplugin"]["registers"]["commands"] == ["hello-plugin"]
    finally:
        cli_mod.cli.commands.pop("hello-plugin", None)


def test_every_hookspec_is_documented():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    specs = [n for n in dir(hookspecs) if n.startswith("register_")]
    assert specs, "no hookspecs found"
    for name in specs:
        assert re.search(rf"\b{name}\(", doc), f"docs/plugins.md does not document hook {name}"


def test_plugins_lists_backend_availability(no_entry_points):
    rows = {r["name"]: r for r in get_plugins().describe()}
    assert rows["fastflow.backends.torch_backend"]["available"] == {"torch": True}
    trt = rows["fastflow.backends.tensorrt_backend"]["available"]["tensorrt"]
    assert trt is True or isinstance(trt, str) and trt  # a reason when it cannot run here


def test_a_plugin_command_may_not_replace_a_builtin_one(fake_eps, monkeypatch, capsys):
    monkeypatch.delenv("FASTFLOW_LOAD_PLUGINS", raising=False)
    mod = types.ModuleType("shadowcmd")

    @fastflow.hookimpl
    def register_commands(cli):
        @cli.command(name="run")
        def fake_run():
            """Not fastflow's run."""

    mod.register_commands = register_commands
    fake_eps.append(FakeEP("shadowcmd", mod, dist="fastflow-shadow"))
    import fastflow.cli as cli_mod

    original = cli_mod.cli.commands["run"]
    get_plugins().add_commands(cli_mod.cli)
    assert cli_mod.cli.commands["run"] is original
    err = capsys.readouterr().err
    assert "command 'run' is registered by two plugins: 'fastflow' and 'shadowcmd'" in err
    rows = {r["name"]: r for r in get_plugins().describe()}
    assert "command 'run'" in rows["shadowcmd"]["error"]


def test_a_name_conflict_is_listed_not_fatal_to_fastflow_plugins(fake_eps, monkeypatch):
    monkeypatch.delenv("FASTFLOW_LOAD_PLUGINS", raising=False)
    fake_eps.append(FakeEP("one", plugin_module("one", policy_name="same"), dist="d1"))
    fake_eps.append(FakeEP("two", plugin_module("two", policy_name="same"), dist="d2"))
    result = CliRunner().invoke(__import__("fastflow.cli").cli.cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert "registered by two plugins: 'one' and 'two'" in rows["one"]["error"]
    assert "registered by two plugins: 'one' and 'two'" in rows["two"]["error"]


def test_a_builtin_that_fails_to_import_is_an_error(monkeypatch):
    from fastflow import plugins as plugins_mod
    from fastflow.errors import FastFlowError

    monkeypatch.setattr(plugins_mod, "BUILTIN_PLUGINS", plugins_mod.BUILTIN_PLUGINS + ("fastflow.policies.nope",))
    with pytest.raises(FastFlowError, match="fastflow's own module fastflow.policies.nope failed to import"):
        plugins_mod.Plugins(load_entry_points=False)


def test_hooks_run_through_pluggy_so_wrappers_and_tryfirst_work(fake_eps, monkeypatch):
    """A plugin's hook wrapper sees every implementation's call; tryfirst runs first."""
    monkeypatch.delenv("FASTFLOW_LOAD_PLUGINS", raising=False)
    seen = []
    mod = types.ModuleType("wrapping")

    @fastflow.hookimpl(wrapper=True)
    def register_policies(register):
        seen.append("before")
        result = yield
        seen.append("after")
        return result

    mod.register_policies = register_policies
    order = []

    def recorded(name, **marks):  # a plugin whose hook notes when it runs
        plugin = plugin_module(name, policy_name=name)
        inner = plugin.register_policies

        def impl(register):
            order.append(name)
            inner(register)

        impl.fastflow_impl = {**inner.fastflow_impl, **marks}
        plugin.register_policies = impl
        return plugin

    first, late = recorded("early", tryfirst=True), recorded("late")
    fake_eps += [FakeEP("early", first, dist="d-early"), FakeEP("wrapping", mod, dist="d-wrap"),
                 FakeEP("late", late, dist="d-late")]
    policies = get_plugins().registry("policies")
    assert {"early", "late"} <= set(policies) and policies["early"].plugin == "early"
    assert seen == ["before", "after"]  # one hook call, wrapped once
    assert order[0] == "early"  # tryfirst, although registered before "late" (pluggy calls the last first)


def test_fastflow_trace_plugins_prints_every_hook_call(tmp_path):
    env = {**os.environ, "FASTFLOW_TRACE_PLUGINS": "1"}
    proc = subprocess.run([sys.executable, "-c", "from fastflow.cli import main; main()", "policies"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "fastflow trace: register_policies(register) -> " in proc.stderr
    assert "fastflow.policies.ucb" in proc.stderr and "register_policies done in" in proc.stderr
    quiet = subprocess.run([sys.executable, "-c", "from fastflow.cli import main; main()", "policies"], capture_output=True, text=True,
                           cwd=tmp_path, timeout=60, env={k: v for k, v in os.environ.items()
                                                          if k != "FASTFLOW_TRACE_PLUGINS"})
    assert "fastflow trace" not in quiet.stderr

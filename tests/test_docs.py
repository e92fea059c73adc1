"""The examples in the docs run as written."""

import re
import types
from pathlib import Path

import torch

import fastflow
from fastflow.plugins import Plugins

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(name):
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / name).read_text(), re.S)


def test_plugin_examples_register_and_work(monkeypatch):
    modules = []
    for i, code in enumerate(python_blocks("plugins.md")):
        mod = types.ModuleType(f"doc_example_{i}")
        exec(compile(code, f"docs/plugins.md[{i}]", "exec"), mod.__dict__)
        modules.append(mod)
    monkeypatch.setenv("FASTFLOW_LOAD_PLUGINS", "")
    plugins = Plugins()
    for mod in modules:
        plugins.pm.register(mod, name=mod.__name__)
    assert "every-nth" in plugins.registry("policies")
    assert "autocast" in plugins.registry("backends")
    assert "spiral" in plugins.registry("models")
    policy = plugins.get("policies", "every-nth").obj(period=4)
    out = fastflow.sample(lambda x, t: -x, torch.ones(1, 2), steps=14, policy=policy)
    assert [s.k for s in out.trace if s.computed] == [0, 1, 5, 9, 13]
    backend = plugins.get("backends", "autocast").obj()
    out = fastflow.sample(lambda x, t: torch.ones_like(x), torch.zeros(1, 2), steps=4, policy="none", backend=backend)
    assert torch.allclose(out.x, -torch.ones(1, 2))


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    (code,) = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "ucb-state.json").exists()
    assert "torch.Size([16, 2])" in capsys.readouterr().out


def test_the_api_page_runs_in_order(capsys):
    blocks = python_blocks("api.md")
    assert len(blocks) >= 4
    namespace = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/api.md[{i}]", "exec"), namespace)
    out = capsys.readouterr().out
    assert "18 torch.Size([16, 2])" in out and "greedy schedule computes" in out and "shape (1, 3)" in out


def test_every_doc_the_readme_names_exists():
    for name in re.findall(r"\(docs/([a-z-]+\.md)\)", (ROOT / "README.md").read_text()):
        assert (ROOT / "docs" / name).is_file(), name


def test_every_module_the_architecture_page_names_exists():
    text = (ROOT / "docs" / "architecture.md").read_text()
    paths = set(re.findall(r"`((?:fastflow|policies|backends)/[\w/]+\.py)`", text))
    assert len(paths) >= 12
    for p in paths:
        assert (ROOT / p).is_file(), p
    for folder, names in (("policies", r"`policies/\*\.py`[^|]*\|([^|]*)\|"), ("backends", r"`backends/\*\.py`[^|]*\|([^|]*)\|")):
        listed = re.findall(r"`(\w+)`", re.search(names, text).group(1))
        for name in listed:
            assert (ROOT / folder / f"{name}.py").is_file(), (folder, name)

"""Imports go one way (docs/architecture.md): every import of every module, function-local
ones included, is read from the source; a cycle, an import from a higher layer, or a
``from x import _private`` across modules fails."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"fastflow": "fastflow", "backends": "fastflow.backends", "policies": "fastflow.policies"}

#: module (or package prefix, ending in ".") → layer; a module may import only its own layer or lower
LAYERS = {
    "fastflow.errors": 0,
    **{f"fastflow.{m}": 1 for m in ("schedule", "estimator", "sensitivity", "controller", "policy", "checks", "rows", "state", "bandit", "engine", "precision",
                                    "modelspec", "jsonutil", "metrics", "hookspecs", "plugins")},
    "fastflow.artifact": 2, "fastflow.sessions": 2,
    "fastflow.policies": 3, "fastflow.policies.": 3, "fastflow.backends": 3, "fastflow.backends.": 3, "fastflow.models": 3, "fastflow.models.": 3,
    "fastflow.demo": 3, "fastflow.demo.": 3,
    **{f"fastflow.{m}": 4 for m in ("exporting", "export_onnx", "export_trt", "export", "denoiser_call",
                                    "denoiser_export")},
    "fastflow.diffusers_hook": 5, "fastflow.diffusers_handle": 5, "fastflow.diffusers_rows": 5, "fastflow.denoiser_swap": 5, "fastflow.baselines": 5,
    **{f"fastflow.{m}": 6 for m in ("compare", "pipeline_run", "run_outputs", "bench", "generate", "generate_jobs", "generate_pipeline",
                                    "ray_generate")},
    "fastflow.cli": 7, "fastflow.commands": 7, "fastflow.commands.": 7, "fastflow.generate_command": 7,
}
FACADE = "fastflow"  # the package __init__: the public API, importing lazily from every layer


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in PACKAGES.items():
        for p in (ROOT / folder).rglob("*.py"):
            if "build" in p.relative_to(ROOT).parts:
                continue
            parts = list(p.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = p
    return mods


def _imports(mod: str, path: Path, mods: dict) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every import in ``mod``."""
    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            m = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            for a in node.names:
                sub = f"{m}.{a.name}"
                out.append((sub, None, node.lineno) if sub in mods else (m, a.name, node.lineno))
    return [(t, n, line) for t, n, line in out if t in mods]


def _layer(mod: str) -> int | None:
    if mod in LAYERS:
        return LAYERS[mod]
    best = None
    for key, layer in LAYERS.items():
        if key.endswith(".") and mod.startswith(key) and (best is None or len(key) > len(best[0])):
            best = (key, layer)
    return best[1] if best else None


def _graph():
    mods = _modules()
    return mods, {m: _imports(m, p, mods) for m, p in mods.items()}


def test_every_module_has_a_layer():
    mods, _ = _graph()
    unplaced = sorted(m for m in mods if m != FACADE and _layer(m) is None)
    assert not unplaced, f"put these in a layer (tests/test_imports.py and docs/architecture.md): {unplaced}"


def test_no_module_imports_a_higher_layer():
    _, graph = _graph()
    upward = []
    for mod, imports in graph.items():
        if mod == FACADE:
            continue
        for target, _, line in imports:
            if target != FACADE and _layer(target) > _layer(mod):
                upward.append(f"{mod}:{line} imports {target} (layer {_layer(target)} > {_layer(mod)})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    _, graph = _graph()
    edges = {m: sorted({t for t, _, _ in imps if t != FACADE}) for m, imps in graph.items() if m != FACADE}
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, []):
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_imports_another_modules_private_names():
    _, graph = _graph()
    private = [f"{mod}:{line} takes {target}.{name}" for mod, imports in graph.items()
               for target, name, line in imports if name and name.startswith("_") and not name.startswith("__")]
    assert not private, "\n".join(private)


def test_the_walk_sees_function_local_imports():
    """The checker itself: a function-local upward import is found."""
    mods, graph = _graph()
    targets = {t for t, _, _ in graph["fastflow.commands.run"]}
    assert "fastflow.pipeline_run" in targets  # imported inside a function there
    assert _layer("fastflow.policies.ucb") == 3 and _layer("fastflow.commands.run") == 7


def test_import_fastflow_and_the_cli_help_stay_light(tmp_path):
    """No torch, diffusers or onnx behind `import fastflow` or `fastflow --help` (the
    commands import them where they sample)."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io\n"
            "import fastflow, fastflow.cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    fastflow.cli.cli.main(['--help'], standalone_mode=False)\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'onnx', 'onnxruntime', 'ray') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"

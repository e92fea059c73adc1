"""ONNX export and the onnxruntime backend (CPU), plus the CPU-side behaviour of the
tensorrt backend and `fastflow export --backend trt` (refused without a GPU)."""

import json
import os
import shutil
import subprocess
import sys

import pytest


pytestmark = pytest.mark.slow  # exports, wheels, subprocesses: seconds each

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

import fastflow  # noqa: E402
from fastflow.errors import FastFlowError, MissingDependencyError  # noqa: E402
from fastflow.export import (  # noqa: E402
    METADATA_NAME, ArtifactError, ExportVerificationError, InputMismatchError, export_onnx, is_export,
    read_export,
)
from fastflow.metrics import psnr  # noqa: E402

NULL = 36


def _no_leftovers(directory):
    return [p for p in os.listdir(directory) if p.startswith(".fastflow-export-") or p.endswith(".tmp")]


@pytest.fixture(scope="module")
def tiny():
    from fastflow.demo.model import TINY_CONFIG, GlyphFlow

    torch.manual_seed(0)
    return GlyphFlow(TINY_CONFIG).eval()


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "tiny-onnx"
    g = torch.Generator().manual_seed(1)
    example = {"x": torch.randn(2, 3, 32, 32, generator=g), "t": torch.rand(2, generator=g),
               "label": torch.tensor([3, NULL])}
    exp = export_onnx(tiny, out, example, model_name="glyphs", model_key="glyphs-tiny-test")
    return exp


def _copy(exported, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(exported.dir, dst)
    return dst


# -- export -------------------------------------------------------------------------------------------
def test_export_writes_graph_and_metadata(exported):
    files = sorted(os.listdir(exported.dir))
    assert files == sorted([METADATA_NAME, "model.onnx"]), files
    meta = json.loads((exported.dir / METADATA_NAME).read_text())
    assert meta["format"] == "fastflow-export" and meta["backend"] == "onnx"
    assert meta["model"] == "glyphs" and meta["model_key"] == "glyphs-tiny-test"
    assert [i["name"] for i in meta["inputs"]] == ["x", "t", "label"]
    assert meta["inputs"][0] == {"name": "x", "shape": ["batch", 3, 32, 32], "dtype": "float32"}
    assert meta["inputs"][2]["dtype"] == "int64"
    assert meta["outputs"] == [{"name": "v", "shape": ["batch", 3, 32, 32], "dtype": "float32"}]
    assert meta["max_abs_error"] < 1e-4 and meta["verified_batch_sizes"] == [2, 5]
    assert len(meta["source_sha256"]) == 64 and len(meta["file_sha256"]) == 64
    assert meta["file_size"] == (exported.dir / "model.onnx").stat().st_size
    assert isinstance(meta["opset"], int) and meta["fastflow_version"] == fastflow.__version__
    assert exported.runtime_backend == "onnxruntime" and exported.key == "glyphs-tiny-test"
    assert is_export(exported.dir) and is_export(exported.file)


def test_source_hash_follows_the_weights(tiny):
    from fastflow.export import source_sha256

    a = source_sha256(tiny)
    other = type(tiny)(tiny.config)
    assert source_sha256(other) != a
    other.load_state_dict(tiny.state_dict())
    assert source_sha256(other) == a


def test_a_graph_that_disagrees_with_torch_is_not_written(tmp_path):
    class Noisy(torch.nn.Module):
        def forward(self, x, t):
            return x + torch.rand_like(x)  # ORT draws other numbers than torch

    out = tmp_path / "noisy"
    with pytest.raises(ExportVerificationError, match="max abs error"):
        export_onnx(Noisy(), out, {"x": torch.randn(2, 4), "t": torch.rand(2)})
    assert not (out / "model.onnx").exists() and not (out / METADATA_NAME).exists()
    assert not out.exists()  # the folder this failed export made is gone too


def test_export_refuses_a_folder_with_a_foreign_model_and_cleans_old_staging(tmp_path):
    class Plain(torch.nn.Module):
        def forward(self, x, t):
            return x * 2.0

    out = tmp_path / "foreign"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"not ours")
    with pytest.raises(FastFlowError, match="not a fastflow export"):
        export_onnx(Plain(), out, {"x": torch.randn(2, 4), "t": torch.rand(2)})
    assert (out / "model.onnx").read_bytes() == b"not ours"
    again = tmp_path / "again"
    (again / ".fastflow-export-killed").mkdir(parents=True)  # what a kill mid-export leaves
    (again / ".fastflow-export-killed" / "model.onnx").write_bytes(b"x" * 100)
    export_onnx(Plain(), again, {"x": torch.randn(2, 4), "t": torch.rand(2)})
    assert (again / "model.onnx").exists() and not list(again.glob(".fastflow-export-*"))


def test_export_to_an_unwritable_place_exits_2(tmp_path):
    from click.testing import CliRunner

    from fastflow.cli import cli

    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(cli, ["export", "--backend", "onnx", "--model", "gmm", "--out",
                                      str(tmp_path / "afile" / "exp")])
    assert result.exit_code == 2 and "cannot be written" in result.output, result.output


def test_export_needs_example_inputs_with_a_batch(tmp_path):
    with pytest.raises(FastFlowError, match="example_inputs"):
        export_onnx(torch.nn.Identity(), tmp_path / "x")
    with pytest.raises(FastFlowError, match="at least 2"):
        export_onnx(lambda x, t: x, tmp_path / "x", {"x": torch.randn(1, 2), "t": torch.rand(1)})


# -- the onnxruntime backend against torch ------------------------------------------------------------
def _sample_both(tiny, exported, make_policy, batches=2, guidance=None, steps=10):
    results = {}
    for name, model, backend in (("torch", tiny, "torch"), ("ort", exported.dir, "onnxruntime")):
        policy = make_policy()
        outs = []
        for i in range(batches):
            g = torch.Generator().manual_seed(100 + i)
            noise = torch.randn(3, 3, 32, 32, generator=g)
            label = torch.tensor([i, 10 + i, 20 + i])
            kw = {}
            if guidance is not None:
                kw = {"guidance": guidance, "uncond": {"label": torch.full_like(label, NULL)}}
            outs.append(fastflow.sample(model, noise, steps=steps, policy=policy, backend=backend,
                                        label=label, **kw))
        results[name] = outs
    return results["torch"], results["ort"]


@pytest.mark.parametrize("policy", ["none", "fixed", "ucb-paper"])
def test_onnxruntime_matches_torch_under_each_policy(tiny, exported, policy):
    if policy == "ucb-paper":
        def make():
            return fastflow.get_policy("ucb-paper", mu=1e-3)
    elif policy == "fixed":
        def make():
            return fastflow.get_policy("fixed", skip=2)
    else:
        def make():
            return fastflow.get_policy("none")
    ref, got = _sample_both(tiny, exported, make, guidance=3.0 if policy == "fixed" else None)
    for a, b in zip(ref, got):
        assert a.nfe == b.nfe
        assert [s.computed for s in a.trace] == [s.computed for s in b.trace]
        assert psnr(b.x, a.x, data_range=2.0) >= 40.0
    if policy != "none":
        assert any(r.nfe < r.steps for r in ref)  # the policy really skipped


def test_velocity_returns_a_fresh_tensor_and_the_session_is_cached(exported, tiny):
    backend = fastflow.get_backend("onnxruntime")
    fn = backend.load(exported.dir)
    assert backend.load(exported.dir) is fn and fastflow.get_backend("onnxruntime").load(exported.file) is fn
    x, t, lab = torch.randn(4, 3, 32, 32), torch.rand(4), torch.tensor([0, 1, 2, NULL])
    with torch.inference_mode():
        v1 = fn(x, t, label=lab)
        v2 = fn(x, t, label=lab)
        ref = tiny(x, t, label=lab)
    assert v1.data_ptr() != v2.data_ptr() and torch.equal(v1, v2)
    assert v1.dtype == torch.float32 and v1.shape == x.shape
    assert (v1 - ref).abs().max() < 1e-4
    x.add_(1.0)  # the engine updates x in place: the returned velocity must not change
    assert torch.equal(v1, v2)


def test_non_contiguous_inputs_are_accepted(exported, tiny):
    fn = fastflow.get_backend("onnxruntime").load(exported.dir)
    x = torch.randn(3, 32, 32, 4).permute(3, 0, 1, 2)  # (4, 3, 32, 32), not contiguous
    t, lab = torch.rand(4), torch.tensor([5, 6, 7, NULL])
    with torch.no_grad():
        assert (fn(x, t, label=lab) - tiny(x, t, label=lab)).abs().max() < 1e-4


# -- bad inputs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, pattern", [
    ("shape", r"input 'x' of .*model\.onnx: expected shape \(batch, 3, 32, 32\) float32, got \(2, 3, 16, 16\)"),
    ("dtype", r"input 'x' .*expected shape \(batch, 3, 32, 32\) float32, got \(2, 3, 32, 32\) float64"),
    ("label_dtype", r"input 'label' .*int64, got \(2\) int32"),
    ("batch", r"input 't' .*got \(3\) float32 \(all inputs must share one batch size: x has 2\)"),
    ("missing", r"needs input 'label' \(batch\) int64"),
    ("extra", r"has no input 'prompt'"),
])
def test_wrong_inputs_name_the_input_and_what_the_graph_expects(exported, case, pattern):
    fn = fastflow.get_backend("onnxruntime").load(exported.dir)
    x, t, lab = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 2])
    kwargs = {"label": lab}
    if case == "shape":
        x = torch.randn(2, 3, 16, 16)
    elif case == "dtype":
        x = x.double()
    elif case == "label_dtype":
        kwargs["label"] = lab.int()
    elif case == "batch":
        t = torch.rand(3)
    elif case == "missing":
        kwargs = {}
    elif case == "extra":
        kwargs["prompt"] = lab
    with pytest.raises(InputMismatchError, match=pattern):
        fn(x, t, **kwargs)


def test_missing_directory_and_directory_without_metadata(tmp_path):
    backend = fastflow.get_backend("onnxruntime")
    with pytest.raises(ArtifactError, match=r"nowhere: no such export directory.*fastflow export"):
        backend.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match=r"empty is not a fastflow export directory: it has no fastflow-export"):
        backend.load(tmp_path / "empty")


def test_truncated_graph_is_refused_naming_the_file(exported, tmp_path):
    d = _copy(exported, tmp_path)
    data = (d / "model.onnx").read_bytes()
    (d / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"copy/model\.onnx is truncated or was replaced: it has \d+ bytes"):
        fastflow.get_backend("onnxruntime").load(d)


def test_replaced_graph_of_the_same_size_is_refused(exported, tmp_path):
    d = _copy(exported, tmp_path)
    size = (d / "model.onnx").stat().st_size
    (d / "model.onnx").write_bytes(b"\0" * size)
    with pytest.raises(ArtifactError, match=r"copy/model\.onnx does not match its metadata \(sha256"):
        fastflow.get_backend("onnxruntime").load(d)


def test_a_file_that_is_not_onnx_is_refused_naming_it(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(ArtifactError, match=r"bad\.onnx is not a (readable|valid) ONNX model"):
        fastflow.get_backend("onnxruntime").load(bad)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"weights\.bin is neither an ONNX file"):
        fastflow.get_backend("onnxruntime").load(other)


def test_damaged_metadata_is_refused_naming_it(exported, tmp_path):
    d = _copy(exported, tmp_path)
    (d / METADATA_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match=r"cannot read export metadata .*copy/fastflow-export\.json"):
        read_export(d)
    (d / METADATA_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match=r"is not fastflow export metadata"):
        read_export(d)
    meta = dict(exported.meta, file="../escape.onnx")
    (d / METADATA_NAME).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"'file' must name a file in the export directory"):
        read_export(d)
    (d / METADATA_NAME).write_text(json.dumps(exported.meta))
    (d / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"is incomplete: .*model\.onnx is missing"):
        read_export(d)


def test_a_bare_onnx_file_runs_with_inputs_read_from_the_graph(exported, tmp_path):
    bare = tmp_path / "bare.onnx"
    shutil.copy(exported.file, bare)
    exp = read_export(bare)
    assert [s.name for s in exp.inputs] == ["x", "t", "label"] and exp.inputs[0].shape[1:] == [3, 32, 32]
    fn = fastflow.get_backend("onnxruntime").load(bare)
    v = fn(torch.randn(2, 3, 32, 32), torch.rand(2), label=torch.tensor([1, NULL]))
    assert v.shape == (2, 3, 32, 32)


def test_the_backend_refuses_a_torch_model_and_says_how_to_export(tiny):
    with pytest.raises(FastFlowError, match=r"fastflow export --backend onnx --model glyphs"):
        fastflow.get_backend("onnxruntime").load(fastflow.get_model("glyphs"))
    with pytest.raises(FastFlowError, match=r"not a PyTorch model"):
        fastflow.get_backend("onnxruntime").load(tiny)


def test_a_trt_export_is_refused_by_onnxruntime(exported, tmp_path):
    d = _copy(exported, tmp_path)
    meta = dict(exported.meta, backend="trt")
    (d / METADATA_NAME).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"holds a 'trt' export.*needs a 'onnx' export"):
        fastflow.get_backend("onnxruntime").load(d)


def test_missing_onnxruntime_gives_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'fastflow\[onnx\]'"):
        fastflow.get_backend("onnxruntime")


# -- TensorRT without a GPU ---------------------------------------------------------------------------
def _has_trt_gpu():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_has_trt_gpu(), reason="this machine can run TensorRT (see tests/test_gpu.py)")
def test_tensorrt_backend_is_unavailable_with_a_clear_reason():
    with pytest.raises(MissingDependencyError, match=r"backend 'tensorrt' is not available: .*"
                                                      r"pip install 'fastflow\[trt\]'"):
        fastflow.get_backend("tensorrt")


def test_tensorrt_without_the_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    ok, reason = fastflow.plugins.get_plugins().get("backends", "tensorrt").obj().available()
    assert not ok and "tensorrt is not installed" in reason
    from fastflow.export import require_tensorrt

    with pytest.raises(MissingDependencyError, match=r"pip install 'fastflow\[trt\]'"):
        require_tensorrt()


# -- the command line ---------------------------------------------------------------------------------
def _fastflow(*args, cwd=None):
    code = "import sys; from fastflow.cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_cli_export_onnx_then_load(tmp_path):
    out = tmp_path / "gmm-onnx"
    from click.testing import CliRunner

    from fastflow.cli import cli

    result = CliRunner().invoke(cli, ["export", "--backend", "onnx", "--model", "gmm", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    meta = json.loads(result.stdout)
    assert meta["model"] == "gmm" and meta["max_abs_error"] < 1e-4 and meta["dir"] == str(out)
    assert sorted(os.listdir(out)) == [METADATA_NAME, "model.onnx"]
    exp = read_export(out)
    assert exp.spec().name == "gmm" and exp.key == "gmm-ring8-std0.3"
    # the export runs through fastflow.sample and agrees with the analytic model
    spec = exp.spec()
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    label = torch.arange(8)
    ref = fastflow.sample(spec.build(), noise, steps=12, policy="none", label=label)
    got = fastflow.sample(exp, noise, steps=12, policy="none", backend="onnxruntime", label=label)
    assert (ref.x - got.x).abs().max() < 1e-4


@pytest.mark.parametrize("args, pattern", [
    (["--model", "no-such-model"], r"unknown model 'no-such-model'"),
    (["--backend", "trt", "--model", "gmm"], r"fastflow\[trt\]|GPU"),
    (["--backend", "onnx", "--model", "gmm", "--precision", "fp16"], r"ONNX export is fp32"),
])
def test_cli_export_errors_exit_2(tmp_path, args, pattern):
    if "trt" in args and _has_trt_gpu():
        pytest.skip("this machine can build TensorRT engines")
    proc = _fastflow("export", *args, "--out", str(tmp_path / "out"), cwd=tmp_path)  # the installed fastflow
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    import re

    assert re.search(pattern, proc.stderr), proc.stderr
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_the_python_example_in_docs_backends_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "backends.md").read_text()
    export_code, bf16_code = re.findall(r"```python\n(.*?)```", text, re.S)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(export_code, "docs/backends.md", "exec"), scope)
    assert scope["out"].x.shape == (4, 3, 32, 32) and scope["out"].backend == "onnxruntime"
    assert (tmp_path / "exports" / "tiny-onnx" / METADATA_NAME).exists()
    import torch

    scope = {}
    exec(compile(bf16_code, "docs/backends.md (bf16)", "exec"), scope)  # compiles: tens of seconds
    assert scope["out"].x.dtype == torch.float32 and scope["out"].backend == "torch-compile"
    assert next(scope["net"].parameters()).dtype == torch.bfloat16


# -- the pure-Python checks behind the TensorRT backend, on the CPU (no TensorRT needed) -----

def _fake_engine_dir(tmp_path, **meta_changes):
    """An engine export as build_trt_engine writes it, with a stand-in plan file."""
    from fastflow.export import FORMAT, FORMAT_VERSION

    d = tmp_path / "engine"
    d.mkdir(exist_ok=True)
    plan = b"\x00fake serialized engine" * 100
    (d / "model.plan").write_bytes(plan)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "backend": "trt", "file": "model.plan",
            "file_size": len(plan), "model": "glyphs", "tensorrt_version": "10.9.0",
            "gpu": {"name": "NVIDIA H200", "compute_capability": "9.0"}, "precision": "fp16",
            "inputs": [{"name": "x", "shape": ["batch", 3, 32, 32], "dtype": "float32"},
                       {"name": "t", "shape": ["batch"], "dtype": "float32"}],
            "outputs": [{"name": "v", "shape": ["batch", 3, 32, 32], "dtype": "float32"}], **meta_changes}
    (d / METADATA_NAME).write_text(json.dumps(meta))
    return d


def test_engine_metadata_checks_run_on_the_cpu(tmp_path):
    from fastflow.export import StaleEngineError, check_engine, read_export

    exp = read_export(_fake_engine_dir(tmp_path))
    gpu = {"name": "NVIDIA H200", "compute_capability": "9.0"}
    assert exp.runtime_backend == "tensorrt"
    check_engine(exp, "10.9.0", gpu)  # the machine it was built on: accepted
    with pytest.raises(StaleEngineError, match=r"built with TensorRT 10\.9\.0, this is TensorRT 11\.0.*Rebuild it"):
        check_engine(exp, "11.0", gpu)
    with pytest.raises(StaleEngineError, match="built for NVIDIA H200 .* this GPU is NVIDIA H100"):
        check_engine(exp, "10.9.0", {"name": "NVIDIA H100", "compute_capability": "9.0"})


def test_a_truncated_plan_is_refused_on_the_cpu(tmp_path):
    from fastflow.export import ArtifactError, read_export

    d = _fake_engine_dir(tmp_path)
    data = (d / "model.plan").read_bytes()
    (d / "model.plan").write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError, match=r"model\.plan is truncated"):
        read_export(d)


def test_an_engine_whose_onnx_source_changed_is_stale(tmp_path):
    from fastflow.export import StaleEngineError, check_engine, read_export

    src = tmp_path / "onnx-src"
    src.mkdir()
    (src / METADATA_NAME).write_text(json.dumps({"source_sha256": "new-weights"}))
    exp = read_export(_fake_engine_dir(tmp_path, onnx_source=str(src), source_sha256="old-weights"))
    with pytest.raises(StaleEngineError, match="built from other weights than the ONNX export"):
        check_engine(exp, "10.9.0", {"name": "NVIDIA H200", "compute_capability": "9.0"})


def test_the_onnx_source_check_refuses_other_weights(exported, tiny):
    from fastflow.export import ArtifactError, check_source

    check_source(exported, tiny)
    other = type(tiny)(tiny.config)
    with pytest.raises(ArtifactError, match="made from other weights than the given model"):
        check_source(exported, other)


def test_run_samples_from_an_export_directory_as_a_user_types_it(exported, tmp_path):
    from click.testing import CliRunner

    from fastflow.cli import cli

    result = CliRunner().invoke(cli, ["run", "--model", str(exported.dir), "--policy", "fixed", "--steps", "6",
                                      "--samples", "2", "--label", "A", "--json", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["backend"] == "onnxruntime" and s["model"] == str(exported.dir) and s["nfe_mean"] == 4

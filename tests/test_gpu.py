"""GPU tests: the tensorrt backend and engine builds, onnxruntime on CUDA with I/O binding.

They skip on a machine without CUDA (CI); scripts/gpu-check.sh runs them on a GPU.
"""

import copy
import json
import shutil

import pytest

torch = pytest.importorskip("torch")

import fastflow  # noqa: E402
from fastflow.metrics import psnr  # noqa: E402


def _has(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


CUDA = torch.cuda.is_available()
HAS_TRT = CUDA and _has("tensorrt")
ORT_CUDA = CUDA and _has("onnxruntime") and "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers()

needs_trt = pytest.mark.skipif(not HAS_TRT, reason="needs CUDA and tensorrt")
needs_ort_cuda = pytest.mark.skipif(not ORT_CUDA, reason="needs CUDA and onnxruntime-gpu")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA and tensorrt")]

NULL = 36
PROFILE = (1, 8, 16)


@pytest.fixture(scope="module")
def tiny():
    from fastflow.demo.model import TINY_CONFIG, GlyphFlow

    torch.manual_seed(0)
    return GlyphFlow(TINY_CONFIG).eval()


def _example():
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(2, 3, 32, 32, generator=g), "t": torch.rand(2, generator=g),
            "label": torch.tensor([3, NULL])}


@pytest.fixture(scope="module")
def engine(tiny, tmp_path_factory):
    from fastflow.export import build_trt_engine

    out = tmp_path_factory.mktemp("trt") / "tiny-fp16"
    return build_trt_engine(copy.deepcopy(tiny), out, _example(), precision="fp16", min_batch=PROFILE[0],
                            opt_batch=PROFILE[1], max_batch=PROFILE[2], log=print)


@pytest.fixture(scope="module")
def onnx_export(tiny, tmp_path_factory):
    from fastflow.export import export_onnx

    # opset 18: GELU decomposed, which every TensorRT 10 ONNX parser reads
    return export_onnx(copy.deepcopy(tiny), tmp_path_factory.mktemp("onnx") / "tiny", _example(), opset=18)


def _on_gpu(module):
    return copy.deepcopy(module).to("cuda").float().eval()


def _inputs(batch, device="cuda", seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(batch, 3, 32, 32, generator=g), torch.rand(batch, generator=g)
    label = torch.randint(0, NULL + 1, (batch,), generator=g)
    return x.to(device), t.to(device), label.to(device)


@needs_trt
def test_engine_metadata(engine):
    import tensorrt as trt

    m = engine.meta
    assert m["backend"] == "trt" and m["precision"] == "fp16" and m["tensorrt_version"] == trt.__version__
    assert m["profile"] == {"min": PROFILE[0], "opt": PROFILE[1], "max": PROFILE[2]}
    assert m["gpu"]["name"] == torch.cuda.get_device_name()
    assert m["max_abs_error"] is not None and m["max_abs_error"] <= m["tolerance"] * 10
    assert sorted(p.name for p in engine.dir.iterdir()) == ["fastflow-export.json", "model.plan"]


@needs_trt
def test_engine_matches_torch_and_returns_fresh_tensors(engine, tiny):
    fn = fastflow.get_backend("tensorrt").load(engine.dir)
    ref = _on_gpu(tiny)
    x, t, label = _inputs(5)
    side = torch.cuda.Stream()
    with torch.inference_mode(), torch.cuda.stream(side):  # runs on the current stream
        v1 = fn(x, t, label=label)
        v2 = fn(x, t, label=label)
        want = ref(x, t, label=label)
    side.synchronize()
    assert v1.device.type == "cuda" and v1.dtype == torch.float32 and v1.shape == x.shape
    assert v1.data_ptr() != v2.data_ptr() and torch.equal(v1, v2)
    assert (v1 - want).abs().max().item() < 5e-2 * max(1.0, want.abs().max().item())


@needs_trt
def test_sampling_with_tensorrt_matches_torch(engine, tiny):
    ref_model = _on_gpu(tiny)
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)).cuda()
    label = torch.tensor([1, 2, 3, 4], device="cuda")
    kw = dict(steps=12, guidance=3.0, uncond={"label": torch.full_like(label, NULL)}, label=label)
    a = fastflow.sample(ref_model, noise, policy=fastflow.get_policy("fixed", skip=2), **kw)
    b = fastflow.sample(engine.dir, noise, policy=fastflow.get_policy("fixed", skip=2), backend="tensorrt", **kw)
    assert a.nfe == b.nfe
    assert psnr(b.x.cpu(), a.x.cpu(), data_range=2.0) >= 30.0


@needs_trt
def test_batch_outside_the_profile_is_refused(engine):
    from fastflow.export import InputMismatchError

    fn = fastflow.get_backend("tensorrt").load(engine.dir)
    x, t, label = _inputs(PROFILE[2] + 1)
    with pytest.raises(InputMismatchError, match=r"outside the range 1\.\.16 .*--max-batch 17"):
        fn(x, t, label=label)


@needs_trt
def test_inputs_on_the_cpu_are_refused_naming_them(engine):
    from fastflow.export import InputMismatchError

    fn = fastflow.get_backend("tensorrt").load(engine.dir)
    x, t, label = _inputs(2)
    with pytest.raises(InputMismatchError, match=r"input 'label' .* is on cpu"):
        fn(x, t, label=label.cpu())
    with pytest.raises(InputMismatchError, match=r"input 'x' .*float32, got \(2, 3, 32, 32\) float16"):
        fn(x.half(), t, label=label)


@needs_trt
@pytest.mark.parametrize("field, value, pattern", [
    ("tensorrt_version", "0.0.1", r"built with TensorRT 0\.0\.1, this is TensorRT .*Rebuild it: fastflow export"),
    ("gpu", {"name": "Some Other GPU", "compute_capability": "7.5"}, r"built for Some Other GPU .*Rebuild it here"),
])
def test_a_stale_engine_is_refused_with_the_rebuild_command(engine, tmp_path, field, value, pattern):
    from fastflow.export import StaleEngineError

    d = tmp_path / "stale"
    shutil.copytree(engine.dir, d)
    meta = json.loads((d / "fastflow-export.json").read_text())
    meta[field] = value
    (d / "fastflow-export.json").write_text(json.dumps(meta))
    with pytest.raises(StaleEngineError, match=pattern):
        fastflow.get_backend("tensorrt").load(d)


@needs_trt
def test_an_engine_from_other_weights_is_refused(engine, tiny):
    from fastflow.export import StaleEngineError, check_source

    check_source(engine, tiny)
    other = type(tiny)(tiny.config)
    with pytest.raises(StaleEngineError, match="other weights"):
        check_source(engine, other)


@needs_trt
def test_truncated_engine_is_refused(engine, tmp_path):
    from fastflow.export import ArtifactError

    d = tmp_path / "cut"
    shutil.copytree(engine.dir, d)
    data = (d / "model.plan").read_bytes()
    (d / "model.plan").write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError, match=r"model\.plan is truncated"):
        fastflow.get_backend("tensorrt").load(d)


@needs_trt
def test_cli_builds_an_fp32_engine_from_an_onnx_export(onnx_export, tmp_path):
    from click.testing import CliRunner

    from fastflow.cli import cli

    out = tmp_path / "fp32"
    result = CliRunner().invoke(cli, ["export", "--backend", "trt", "--model", str(onnx_export.dir), "--out",
                                      str(out), "--precision", "fp32", "--min-batch", "1", "--opt-batch", "4",
                                      "--max-batch", "8", "--json"])
    assert result.exit_code == 0, result.output
    meta = json.loads(result.stdout)
    assert meta["precision"] == "fp32" and meta["onnx_source"] == str(onnx_export.dir.resolve())
    fn = fastflow.get_backend("tensorrt").load(out)
    x, t, label = _inputs(3)
    with torch.no_grad():
        v = fn(x, t, label=label)
    assert v.shape == x.shape and torch.isfinite(v).all()


@needs_ort_cuda
def test_onnxruntime_on_cuda_keeps_tensors_on_the_device(onnx_export, tiny):
    fn = fastflow.get_backend("onnxruntime").load(onnx_export.dir, device="cuda")
    ref = _on_gpu(tiny)
    x, t, label = _inputs(6)
    with torch.inference_mode():
        v1 = fn(x, t, label=label)
        v2 = fn(x, t, label=label)
        want = ref(x, t, label=label)
    assert v1.device.type == "cuda" and v1.data_ptr() != v2.data_ptr()
    assert (v1 - want).abs().max().item() < 1e-3

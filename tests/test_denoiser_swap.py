"""A diffusers pipeline's denoiser exported to ONNX and swapped for an ONNX Runtime shim
(fastflow.denoiser_export, fastflow.denoiser_swap): the glyph pipeline and a tiny FLUX pipeline, with and
without fastflow's hook; restore; calls the export cannot take."""

import json

import pytest


pytestmark = pytest.mark.slow  # exports, wheels, subprocesses: seconds each

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

import fastflow  # noqa: E402
from fastflow.errors import FastFlowError, MissingDependencyError  # noqa: E402
from fastflow.export import METADATA_NAME, ArtifactError  # noqa: E402
from fastflow.metrics import psnr  # noqa: E402
from fastflow.denoiser_export import export_denoiser, is_denoiser_export  # noqa: E402
from fastflow.denoiser_swap import restore_denoiser, swap_denoiser  # noqa: E402
from fastflow.errors import DenoiserInputError  # noqa: E402

STEPS = 8


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _glyph_pipe():
    from fastflow.demo.model import TINY_CONFIG, GlyphFlow
    from fastflow.demo.pipeline import GlyphPipeline

    # random (not adaLN-zero) init so that the velocity is not identically zero;
    # no position features: the pipeline feeds the transformer patch tokens only
    cfg = {**TINY_CONFIG, "init": "random", "position_features": 0}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = GlyphPipeline.from_glyph_flow(GlyphFlow(cfg).eval().requires_grad_(False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def glyph(tmp_path_factory):
    torch.set_num_threads(1)
    pipe = _glyph_pipe()
    out = tmp_path_factory.mktemp("glyph-denoiser")
    exp = export_denoiser(pipe, out)
    latents = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def call():
        return pipe(["A", "7"], num_inference_steps=STEPS, latents=latents).images

    return pipe, exp, call, 2.0  # outputs in [-1, 1]


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    pytest.importorskip("transformers")
    from diffusers_tiny import tiny_inputs, tiny_pipeline

    torch.set_num_threads(1)
    pipe = tiny_pipeline("flux")
    inputs = tiny_inputs("flux")
    out = tmp_path_factory.mktemp("flux-denoiser")
    exp = export_denoiser(pipe, out, example_call={**inputs, "num_inference_steps": 2}, source="tiny-flux")

    def call():
        return pipe(**inputs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).images

    return pipe, exp, call, 1.0  # outputs in [0, 1]


def test_export_metadata(glyph, flux):
    _, exp, _, _ = glyph
    assert is_denoiser_export(exp.dir)
    meta = json.loads((exp.dir / METADATA_NAME).read_text())
    d = meta["denoiser"]
    assert [s["name"] for s in meta["inputs"]] == ["hidden_states", "encoder_hidden_states", "pooled_projections",
                                                   "timestep", "img_ids", "txt_ids"]
    shapes = {s["name"]: s["shape"] for s in meta["inputs"]}
    assert shapes["hidden_states"][0] == "batch" and shapes["timestep"] == ["batch"]
    # txt_ids is (2, 3) with a batch of 2: a coincidence that must not make it batched
    assert shapes["img_ids"] == [64, 3] and shapes["txt_ids"] == [2, 3]
    assert d["static"] == {"return_dict": False} and d["output"] == {"kind": "tuple"}
    assert meta["max_abs_error"] < 1e-4 and meta["verified_batch_sizes"] == [2, 1, 3]
    fmeta = flux[1].meta
    assert fmeta["denoiser"]["static"] == {"guidance": None, "joint_attention_kwargs": {}, "return_dict": False}
    assert fmeta["verified_batch_sizes"] == [2, 1, 3]  # FLUX calls with batch 1: traced at 2
    assert fmeta["model_key"] == "FluxTransformer2DModel:tiny-flux"
    assert not is_denoiser_export(fastflow.__file__)


@pytest.mark.parametrize("which", ["glyph", "flux"])
def test_swap_matches_torch(which, request):
    pipe, exp, call, data_range = request.getfixturevalue(which)
    original = pipe.transformer
    ref = call()
    refs = {}
    for policy, opts in (("none", {}), ("fixed", {"skip": 2})):
        handle = fastflow.enable(pipe, policy=policy, **opts)
        refs[policy] = (call(), handle.last.nfe)
        fastflow.disable(pipe)
    try:
        shim = swap_denoiser(pipe, exp.dir)
        assert pipe.transformer is shim and shim.original is original
        assert shim.config == original.config and shim.dtype == torch.float32
        assert shim.device == torch.device("cpu") and list(shim.parameters()) == []
        assert psnr(call(), ref, data_range=data_range) >= 40
        for policy, opts in (("none", {}), ("fixed", {"skip": 2})):
            handle = fastflow.enable(pipe, policy=policy, **opts)
            got = call()
            want, nfe = refs[policy]
            assert handle.last.nfe == nfe
            assert psnr(got, want, data_range=data_range) >= 40
            fastflow.disable(pipe)
        assert refs["fixed"][1] < STEPS
    finally:
        restore_denoiser(pipe)
    assert pipe.transformer is original
    assert torch.equal(call(), ref)


def test_bad_inputs(glyph, flux):
    pipe, exp, _, _ = glyph
    shim = swap_denoiser(pipe, exp.dir)
    try:
        good = {"hidden_states": torch.randn(3, 64, 48), "encoder_hidden_states": torch.randn(3, 2, 16),
                "pooled_projections": torch.randn(3, 16), "timestep": torch.rand(3),
                "img_ids": torch.zeros(64, 3), "txt_ids": torch.zeros(2, 3), "return_dict": False}
        out = shim(**good)
        assert isinstance(out, tuple) and out[0].shape == (3, 64, 48)
        with torch.no_grad():
            want = shim.original(**good)[0]
        assert torch.allclose(out[0], want, atol=1e-4)
        cases = {
            "return_dict": {**good, "return_dict": True},                                   # another non-tensor
            "guidance": {**good, "guidance": torch.ones(3)},                                # not exported
            "joint_attention_kwargs": {**good, "joint_attention_kwargs": {"scale": 0.5}},  # not exported
            "'hidden_states'": {**good, "hidden_states": torch.randn(3, 64)},               # rank
            "'timestep'": {**good, "timestep": torch.rand(3).double()},                      # dtype
            "'img_ids'": {**good, "img_ids": torch.zeros(16, 3)},                             # fixed dim
            "pooled_projections": {k: v for k, v in good.items() if k != "pooled_projections"},  # missing
        }
        for name, kwargs in cases.items():
            with pytest.raises(DenoiserInputError, match=name) as info:
                shim(**kwargs)
            assert isinstance(info.value, FastFlowError)
        with pytest.raises(DenoiserInputError, match="batch"):  # batches that disagree
            shim(**{**good, "pooled_projections": torch.randn(2, 16)})
    finally:
        restore_denoiser(pipe)

    fpipe, fexp, _, _ = flux
    from diffusers_tiny import tiny_inputs

    swap_denoiser(fpipe, fexp.dir)
    try:  # another resolution: the export holds one
        with pytest.raises(DenoiserInputError, match="resolution"):
            fpipe(**{**tiny_inputs("flux"), "height": 16, "width": 16}, num_inference_steps=2)
    finally:
        restore_denoiser(fpipe)


def test_swap_refusals(glyph, flux):
    pipe, exp, _, _ = glyph
    with pytest.raises(ArtifactError, match="config"):  # the FLUX export on the glyph pipeline
        swap_denoiser(pipe, flux[1].dir)
    assert not isinstance(pipe.transformer, type(None)) and type(pipe.transformer).__name__ != "ExportedDenoiser"
    other = _glyph_pipe()
    with torch.no_grad():
        next(other.transformer.parameters()).add_(1.0)
    with pytest.raises(ArtifactError, match="other weights"):
        swap_denoiser(other, exp.dir)
    with pytest.raises(FastFlowError, match="not 'torch'"):
        swap_denoiser(pipe, exp.dir, backend="torch")
    import shutil

    plain = exp.dir.parent / "plain"  # an export whose metadata has no denoiser section
    shutil.copytree(exp.dir, plain)
    meta = json.loads((plain / METADATA_NAME).read_text())
    del meta["denoiser"]
    (plain / METADATA_NAME).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="no 'denoiser'"):
        swap_denoiser(pipe, plain)
    assert restore_denoiser(pipe) is None  # nothing swapped


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_tensorrt_needs_gpu(glyph):
    pipe, exp, _, _ = glyph
    with pytest.raises(MissingDependencyError, match="needs an NVIDIA GPU"):
        swap_denoiser(pipe, exp.dir, backend="tensorrt")
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"


def test_export_refuses_unrecordable_arguments(tmp_path):
    from diffusers import DiffusionPipeline

    from fastflow.export import ExportError

    class Caller(DiffusionPipeline):  # calls its transformer once with the given extra arguments
        def __init__(self, transformer):
            super().__init__()
            self.register_modules(transformer=transformer)

        def __call__(self, **extra):
            b = 2
            return self.transformer(
                hidden_states=torch.randn(b, 64, 48), encoder_hidden_states=torch.randn(b, 2, 16),
                pooled_projections=torch.randn(b, 16), timestep=torch.rand(b), img_ids=torch.zeros(64, 3),
                txt_ids=torch.zeros(2, 3), return_dict=False, **extra)

    pipe = Caller(_glyph_pipe().transformer)
    with pytest.raises(ExportError, match="example_call"):  # no default call for an unknown pipeline
        export_denoiser(pipe, tmp_path / "a")
    with pytest.raises(ExportError, match="joint_attention_kwargs"):  # a tensor inside a dict
        export_denoiser(pipe, tmp_path / "b", example_call={"joint_attention_kwargs": {"x": torch.ones(1)}})
    assert not (tmp_path / "b" / METADATA_NAME).exists()

"""The demo model as a diffusers pipeline (GlyphPipeline): same outputs and NFE as the
engine path (fastflow.sample) for the same noise and policy state, with fastflow.enable.

A tiny randomly initialised GlyphFlow (TINY_CONFIG); batches of 2-3, 10 steps.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import fastflow  # noqa: E402
from fastflow.metrics import psnr  # noqa: E402

STEPS = 10
GUIDANCE = 3.0
NULL = 36


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def model():
    from fastflow.demo.model import TINY_CONFIG, GlyphFlow

    torch.manual_seed(0)
    return GlyphFlow(TINY_CONFIG).eval().requires_grad_(False)


@pytest.fixture
def pipe(model):
    from fastflow.demo.pipeline import GlyphPipeline

    p = GlyphPipeline.from_glyph_flow(model)
    p.set_progress_bar_config(disable=True)
    yield p
    fastflow.disable(p)


def _batches(n=3, size=2):
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 36, (size,), generator=g)) for _ in range(n)]


def _engine(model, noise, labels, policy, steps=STEPS):
    return fastflow.sample(model, noise, steps=steps, policy=policy, guidance=GUIDANCE,
                           uncond={"label": torch.full_like(labels, NULL)}, label=labels)


def _pipe(pipe, noise, labels, steps=STEPS):
    return pipe(labels=labels, num_inference_steps=steps, guidance_scale=GUIDANCE, latents=noise).images


def _psnr(a, b):
    return psnr(a.double(), b.double(), data_range=2.0)  # samples live in [-1, 1]


def test_components_and_scheduler_grid(pipe):
    from fastflow.schedule import timesteps

    assert sorted(pipe.components) == ["label_embed", "scheduler", "transformer"]
    cfg = pipe.scheduler.config
    assert cfg.shift == 1.0 and not cfg.use_dynamic_shifting
    for steps in (1, 7, STEPS, 50):
        pipe(labels=[0], num_inference_steps=steps, output_type="pt")
        want = torch.tensor(timesteps(steps), dtype=torch.float32)
        assert torch.equal(pipe.scheduler.sigmas, want)


def test_shifted_grid_follows_the_model(model):
    from fastflow.demo.pipeline import GlyphLabelEmbedding, GlyphPipeline
    from fastflow.schedule import timesteps

    emb = GlyphLabelEmbedding.from_glyph_flow(model)
    emb.register_to_config(default_shift=3.0)
    p = GlyphPipeline(transformer=model.transformer, label_embed=emb, scheduler=GlyphPipeline.make_scheduler())
    p.set_progress_bar_config(disable=True)
    p(labels=[1], num_inference_steps=6)
    assert torch.equal(p.scheduler.sigmas, torch.tensor(timesteps(6, 3.0), dtype=torch.float32))


def test_none_matches_the_engine(model, pipe):
    noise, labels = _batches(1, 3)[0]
    ref = _engine(model, noise, labels, "none")
    out = _pipe(pipe, noise, labels)
    assert out.shape == ref.x.shape == (3, 3, 32, 32)
    assert _psnr(out, ref.x) >= 40.0
    torch.testing.assert_close(out, ref.x, rtol=1e-4, atol=1e-4)
    # the hook with "none" changes nothing at all
    handle = fastflow.enable(pipe, policy="none")
    hooked = _pipe(pipe, noise, labels)
    assert torch.equal(hooked, out)
    assert handle.last.nfe == STEPS and handle.last.denoiser_calls == STEPS and handle.last.complete


@pytest.mark.parametrize("policy_args", [("fixed", {"skip": 2}), ("ucb-paper", {"mu": 1e-3})], ids=["fixed", "ucb-paper"])
def test_skip_policies_match_the_engine(model, pipe, policy_args):
    name, options = policy_args
    batches = _batches(3, 2)
    # the engine first (the pipeline shares the model's transformer: a hook on it would
    # see the engine's calls too)
    engine_policy = fastflow.get_policy(name, **options)
    refs = [_engine(model, noise, labels, engine_policy) for noise, labels in batches]
    handle = fastflow.enable(pipe, policy=fastflow.get_policy(name, **options))
    outs = [_pipe(pipe, noise, labels) for noise, labels in batches]
    assert len(handle.calls) == 3
    for ref, out, call in zip(refs, outs, handle.calls):
        assert call.complete
        assert call.nfe == ref.nfe
        assert call.denoiser_calls == ref.nfe  # one doubled-batch call per computed step
        assert [s.computed for s in call.trace] == [s.computed for s in ref.trace]
        assert _psnr(out, ref.x) >= 40.0
    assert all(c.nfe < STEPS for c in handle.calls[1:])  # ucb: arm 0 first, then it skips
    if name == "fixed":
        assert all(c.nfe < STEPS for c in handle.calls)


def test_disable_restores_exact_outputs(pipe):
    noise, labels = _batches(1, 2)[0]
    before = _pipe(pipe, noise, labels)
    fastflow.enable(pipe, policy="fixed", skip=2)
    skipped = _pipe(pipe, noise, labels)
    assert not torch.equal(skipped, before)
    fastflow.disable(pipe)
    assert torch.equal(_pipe(pipe, noise, labels), before)


def test_prompt_to_labels():
    from fastflow.demo.pipeline import prompt_to_labels

    assert prompt_to_labels("A") == [10]
    assert prompt_to_labels("0") == [0]
    assert prompt_to_labels("z") == [35]
    assert prompt_to_labels("Hi 7") == [17, 18, 7]
    assert prompt_to_labels(["a", "7"]) == [10, 7]
    with pytest.raises(ValueError, match=r"'!'.*'é'|'é'.*'!'"):
        prompt_to_labels("A!é")
    with pytest.raises(ValueError, match="one character"):
        prompt_to_labels(["AB"])
    with pytest.raises(ValueError, match="no character"):
        prompt_to_labels("  ")


def test_pipeline_inputs_and_outputs(pipe):
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a = pipe("a7", num_inference_steps=3, generator=gen()).images
    b = pipe(labels=torch.tensor([10, 7]), num_inference_steps=3, generator=gen()).images
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    # default noise is torch.randn of the generator (as the CLI's engine path draws it)
    c = pipe("A7", num_inference_steps=3, latents=torch.randn(2, 3, 32, 32, generator=gen())).images
    assert torch.equal(a, c)
    arr = pipe("A", num_inference_steps=2, output_type="np", generator=gen()).images
    pt = pipe("A", num_inference_steps=2, generator=gen()).images  # the same sample in [-1, 1], (1, 3, H, W)
    want = ((pt.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert arr.shape == (1, 32, 32, 3) and abs(arr - want).max() < 1e-6  # the same pixels, mapped to 0..1
    pil = pipe("A", num_inference_steps=2, output_type="pil").images
    assert len(pil) == 1 and pil[0].size == (32, 32)
    assert isinstance(pipe("A", num_inference_steps=2, return_dict=False), tuple)
    with pytest.raises(ValueError, match="cannot draw '#'"):
        pipe("#")
    with pytest.raises(ValueError, match="exactly one"):
        pipe("A", labels=[1])
    with pytest.raises(ValueError, match="labels must be"):
        pipe(labels=[37])
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe("AB", latents=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="output_type"):
        pipe("A", output_type="latent")


def test_run_pipeline(pipe, tmp_path):
    from fastflow.pipeline_run import run_pipeline

    s = run_pipeline(pipe, "A", policy="fixed", policy_options={"skip": 2}, steps=STEPS, out_dir=tmp_path)
    assert s["pipeline"] == "GlyphPipeline" and s["nfe"] == [5] and s["nfe_full"] == STEPS
    assert s["psnr_db"] is not None and s["psnr_db"] > 15
    assert len(s["files"]) == 2 and (tmp_path / "summary.json").is_file()


def test_saved_model_and_pipeline_roundtrip(model, pipe, tmp_path):
    from fastflow.demo.model import save_glyph_flow
    from fastflow.demo.pipeline import GlyphPipeline, glyph_pipeline

    noise, labels = _batches(1, 2)[0]
    want = _pipe(pipe, noise, labels, steps=4)
    loaded = glyph_pipeline(save_glyph_flow(model, tmp_path / "model", fp16=False))
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(_pipe(loaded, noise, labels, steps=4), want)
    pipe.save_pretrained(tmp_path / "pipe")
    again = GlyphPipeline.from_pretrained(tmp_path / "pipe")
    again.set_progress_bar_config(disable=True)
    assert torch.equal(_pipe(again, noise, labels, steps=4), want)
    with pytest.raises(ValueError, match="not found"):
        glyph_pipeline(tmp_path / "missing")

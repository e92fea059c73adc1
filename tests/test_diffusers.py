"""fastflow.enable(pipe, ...) on diffusers pipelines.

Real pipeline classes (FLUX, FLUX Kontext, FLUX img2img, SD3, Wan, Chroma, LTX-Video,
QwenImage, CogView4, Lumina 2) with tiny, randomly initialised components built from
configs (tests/diffusers_tiny.py): no downloads. A toy pipeline loop checks the hook
against fastflow.sample step for step.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import fastflow  # noqa: E402
from fastflow import diffusers_hook as dh  # noqa: E402
from fastflow import pipeline_run as pr  # noqa: E402
from conftest import calibration_nfe  # noqa: E402

STEPS = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


# -- a toy pipeline: the scheduler loop of a diffusers flow pipeline, nothing else ---------

class ToyDenoiser(torch.nn.Module):
    """v = W·x·(1 + t) + cond: depends on x and t, so extrapolation errors are nonzero."""

    def __init__(self, dim=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(dim, dim, generator=g) * 0.3)

    def forward(self, hidden_states, timestep, cond=None, return_dict=False):
        v = hidden_states @ self.weight * (1 + timestep.view(-1, 1))
        if cond is not None:
            v = v + cond
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=v)
        return (v,)


def _context(module, name):
    from diffusers.models.cache_utils import CacheMixin

    return CacheMixin.cache_context(module, name)


class ToyPipe:
    def __init__(self, scheduler=None, seed=0):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer = ToyDenoiser(seed=seed)
        self.scheduler = scheduler or FlowMatchEulerDiscreteScheduler()

    def __call__(self, x, sigmas, *, cond, uncond=None, guidance=None, start=0, begin_index=True,
                 contexts=True, return_dict=False, fail_at=None, end_signal=True):
        s = self.scheduler
        s.set_timesteps(sigmas=list(sigmas))
        if begin_index:
            s.set_begin_index(start)
        for i, t in enumerate(s.timesteps[start:]):
            if fail_at is not None and i == fail_at:
                raise RuntimeError("interrupted")
            tt = (t / 1000).expand(x.shape[0])
            with _context(self.transformer, "cond") if contexts else _nullcontext():
                out = self.transformer(x, tt, cond=cond, return_dict=return_dict)
            v = out.sample if return_dict else out[0]
            if guidance is not None:
                with _context(self.transformer, "uncond") if contexts else _nullcontext():
                    vu = self.transformer(x, tt, cond=uncond, return_dict=return_dict)
                vu = vu.sample if return_dict else vu[0]
                v = vu + guidance * (v - vu)
            x = s.step(v, t, x, return_dict=False)[0]
        if end_signal and hasattr(self.transformer, "_diffusers_hook"):  # as maybe_free_model_hooks does
            self.transformer._diffusers_hook.reset_stateful_hooks()
        return x


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _uniform(steps):
    return [1.0 - k / steps for k in range(steps)]


def _toy_inputs(batch=3, dim=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)


def _engine(pipe, noise, steps, policy, cond, uncond=None, guidance=None):
    model = lambda x, t, cond: pipe.transformer(x, t, cond=cond)[0]  # noqa: E731
    kw = {"guidance": guidance, "uncond": {"cond": uncond}} if guidance is not None else {}
    return fastflow.sample(model, noise, steps=steps, policy=policy, cond=cond, **kw)


@pytest.mark.parametrize("guidance", [None, 3.0])
@pytest.mark.parametrize("policy,opts", [("fixed", {"skip": 2}), ("fixed", {"compute": "0,1,2,6,9"}), ("none", {}),
                                         ("fixed", {"skip": 2, "order": 2}),
                                         ("fixed", {"compute": "0,1,2,6,9", "order": 2})])
def test_hook_matches_the_engine_step_for_step(policy, opts, guidance):
    pipe = ToyPipe()
    noise, cond, uncond = _toy_inputs()
    ref = _engine(pipe, noise, 10, fastflow.get_policy(policy, **opts), cond, uncond, guidance)
    handle = fastflow.enable(pipe, policy, **opts)
    x = pipe(noise, _uniform(10), cond=cond, uncond=uncond, guidance=guidance)
    rec = handle.last
    assert torch.allclose(x, ref.x, atol=1e-5, rtol=1e-5)
    assert rec.nfe == ref.nfe and rec.complete
    assert [(s.k, s.computed, s.decision) for s in rec.trace] == [(s.k, s.computed, s.decision) for s in ref.trace]
    assert [s.t for s in rec.trace] == pytest.approx([s.t for s in ref.trace], abs=1e-6)
    assert rec.denoiser_calls == rec.nfe * (2 if guidance else 1)
    assert rec.branches == (["cond", "uncond"] if guidance else ["cond"])


def test_branches_by_call_order_without_cache_context():
    pipe = ToyPipe()
    noise, cond, uncond = _toy_inputs()
    ref = _engine(pipe, noise, 10, fastflow.get_policy("fixed"), cond, uncond, 2.0)
    handle = fastflow.enable(pipe, "fixed")
    x = pipe(noise, _uniform(10), cond=cond, uncond=uncond, guidance=2.0, contexts=False, return_dict=True)
    assert torch.allclose(x, ref.x, atol=1e-5, rtol=1e-5)
    assert handle.last.branches == ["#0", "#1"] and handle.last.nfe == ref.nfe


def test_start_index_from_the_scheduler_with_or_without_begin_index():
    """img2img-style calls that start mid-schedule: begin_index, or found from step_index."""
    noise, cond, _ = _toy_inputs()
    sig = _uniform(12)
    outs, traces = [], []
    for begin in (True, False):
        pipe = ToyPipe()
        handle = fastflow.enable(pipe, "fixed", skip=2)
        outs.append(pipe(noise, sig, cond=cond, start=4, begin_index=begin))
        rec = handle.last
        assert rec.steps == 8 and rec.complete
        assert rec.timesteps == pytest.approx(sig[4:] + [0.0], abs=1e-6)
        traces.append(rec.trace)
    assert torch.equal(outs[0], outs[1])
    assert traces[0] == traces[1]
    assert [s.computed for s in traces[0]] == [True, True, False, False, True, False, False, True]


def test_per_call_state_resets_and_learning_carries_over():
    pipe = ToyPipe()
    noise, cond, _ = _toy_inputs()
    policy = fastflow.get_policy("ucb-paper")
    handle = fastflow.enable(pipe, policy)
    outs = [pipe(noise, _uniform(10), cond=cond) for _ in range(4)]
    assert [c.nfe for c in handle.calls][:2] == [10, 10]  # calibration, then arm 0 everywhere
    assert handle.calls[3].nfe < 10 and policy.samples == 4
    assert all(c.complete for c in handle.calls)
    assert torch.equal(outs[0], outs[1])  # nothing of call 0 leaks into call 1
    # an interrupted call is closed as failed when the next one starts; learning is untouched
    with pytest.raises(RuntimeError):
        pipe(noise, _uniform(10), cond=cond, fail_at=5, end_signal=False)
    pipe(noise, _uniform(10), cond=cond)
    assert [c.complete for c in handle.calls[4:]] == [False, True]
    assert policy.samples == 5


def test_multi_stage_scheduler_runs_unaccelerated():
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe = ToyPipe(scheduler=FlowMatchHeunDiscreteScheduler())
    noise, cond, _ = _toy_inputs()

    def run():  # Heun: two model calls per step, over every scheduler timestep
        s = pipe.scheduler
        s.set_timesteps(6)
        x = noise
        for t in s.timesteps:
            x = s.step(pipe.transformer(x, (t / 1000).expand(3), cond=cond)[0], t, x, return_dict=False)[0]
        if hasattr(pipe.transformer, "_diffusers_hook"):
            pipe.transformer._diffusers_hook.reset_stateful_hooks()  # the pipeline's end of call
        return x

    ref = run()
    handle = fastflow.enable(pipe, "fixed")
    with pytest.warns(UserWarning, match="multi-stage"):
        out = run()
    assert torch.equal(out, ref) and handle.last.skipped == 0 and "multi-stage" in handle.last.note


def test_call_end_without_diffusers_signal():
    """A pipeline that never resets hooks: the call closes once its last step has run."""
    pipe = ToyPipe()
    noise, cond, uncond = _toy_inputs()
    handle = fastflow.enable(pipe, "fixed")
    pipe(noise, _uniform(10), cond=cond, uncond=uncond, guidance=2.0, end_signal=False)
    assert len(handle.calls) == 1 and handle.calls[0].complete
    pipe(noise, _uniform(10), cond=cond, end_signal=False)
    assert len(handle.calls) == 2 and handle.calls[1].complete


@pytest.mark.parametrize("policy", ["fixed", "ucb-paper"])
def test_no_host_reads_per_step(host_reads, policy):
    """Host reads the hook adds per pipeline call do not grow with the step count."""
    counter = host_reads
    noise, cond, uncond = _toy_inputs()

    def reads(steps, hooked):
        pipe = ToyPipe()
        if hooked:
            fastflow.enable(pipe, policy, **({"mu": 1e-4} if policy == "ucb-paper" else {}))
        pipe(noise, _uniform(steps), cond=cond, uncond=uncond, guidance=2.0)  # learning / warm
        counter["n"] = 0
        pipe(noise, _uniform(steps), cond=cond, uncond=uncond, guidance=2.0)
        return counter["n"]

    extra = {steps: reads(steps, True) - reads(steps, False) for steps in (10, 30)}
    assert extra[10] == extra[30] <= 2, extra


def test_enable_twice_replaces_and_disable_restores_exactly():
    pipe = ToyPipe()
    noise, cond, _ = _toy_inputs()
    mod = pipe.transformer
    run = lambda: pipe(noise, _uniform(10), cond=cond, contexts=False, end_signal=False)  # noqa: E731
    ref = run()
    assert "forward" not in vars(mod) and not hasattr(mod, "_diffusers_hook")
    first = fastflow.enable(pipe, "fixed")
    second = fastflow.enable(pipe, "fixed", skip=3)
    assert not first.active and second.active
    assert mod._diffusers_hook._hook_order == [dh.HOOK_NAME]
    assert dh.get_handle(pipe) is second
    run()
    assert second.last.nfe == 4 and not first.calls
    assert fastflow.disable(pipe) is second
    assert "forward" not in vars(mod) and not hasattr(mod, "_diffusers_hook")  # as before
    assert torch.equal(run(), ref)
    assert fastflow.disable(pipe) is None
    second.remove()  # idempotent
    # a registry diffusers made (cache_context) stays, without our hook
    pipe(noise, _uniform(10), cond=cond)
    fastflow.enable(pipe, "fixed")
    fastflow.disable(pipe)
    assert mod._diffusers_hook._hook_order == [] and "forward" not in vars(mod)


def test_enable_errors():
    with pytest.raises(fastflow.OptionError, match="no denoiser"):
        fastflow.enable(object(), "fixed")
    with pytest.raises(fastflow.OptionError, match="skip"):
        fastflow.enable(ToyPipe(), "fixed", skip=-1)
    with pytest.raises(fastflow.UnknownNameError):
        fastflow.enable(ToyPipe(), "nope")


def test_summary_and_dict():
    pipe = ToyPipe()
    noise, cond, _ = _toy_inputs()
    handle = fastflow.enable(pipe, "fixed")
    pipe(noise, _uniform(10), cond=cond)
    d = handle.to_dict()
    assert d["policy"] == "fixed" and d["pipeline_calls"] == 1
    assert d["nfe_mean"] == 5 and d["speedup_nfe"] == 2.0
    call = d["calls"][0]
    assert (call["steps"], call["nfe"], call["skipped"], call["denoiser_calls"]) == (10, 5, 5, 5)
    assert "".join("#" if s["computed"] else "." for s in call["trace"]) == "##..#..#.#"
    json.dumps(d)
    text = handle.summary()
    assert "10 steps, 5 evaluated, 5 skipped" in text and "##..#..#.#" in text


def test_state_file_carries_learning_across_handles(tmp_path):
    state = tmp_path / "ucb.json"
    noise, cond, _ = _toy_inputs()
    pipe = ToyPipe()
    handle = fastflow.enable(pipe, "ucb-paper", state=str(state))
    for _ in range(3):
        pipe(noise, _uniform(10), cond=cond)
    assert state.exists() and json.loads(state.read_text())["samples"] == 3  # autosaved
    fastflow.disable(pipe)
    pipe2 = ToyPipe()
    again = fastflow.enable(pipe2, "ucb-paper", state=str(state))
    assert again.pipeline is pipe2
    pipe2(noise, _uniform(10), cond=cond)
    assert again.policy.samples == 4 and again.last.nfe < 10


def test_import_fastflow_stays_light():
    code = ("import sys, fastflow, fastflow.diffusers_hook; "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- real pipeline classes with tiny components -----------------------------------------

pytest.importorskip("transformers")
from diffusers_tiny import tiny_inputs, tiny_pipeline  # noqa: E402

_PIPES: dict = {}


def _pipe(family, scheduler=None):
    key = (family, type(scheduler).__name__ if scheduler is not None else None)
    if key not in _PIPES:
        _PIPES[key] = tiny_pipeline(family, scheduler=scheduler)
    pipe = _PIPES[key]
    fastflow.disable(pipe)
    return pipe


def _run(pipe, family, seed=0, **extra):
    out = pipe(**{**tiny_inputs(family), **extra}, num_inference_steps=STEPS,
               generator=torch.Generator().manual_seed(seed))
    return out.frames if hasattr(out, "frames") else out.images


FAMILIES = ["flux", "sd3", "wan", "flux-kontext", "flux-img2img", "chroma", "ltx", "qwenimage", "cogview4",
            "lumina2"]
EXPECTED_BRANCHES = {"flux": ["cond"], "sd3": ["#0"], "wan": ["cond", "uncond"], "flux-kontext": ["#0"],
                     "flux-img2img": ["#0"], "chroma": ["#0", "#1"],
                     "ltx": ["cond_uncond"],  # CFG as one doubled batch per step, in one named context
                     "qwenimage": ["cond", "uncond"],  # true CFG: two calls per step
                     "cogview4": ["cond", "uncond"], "lumina2": ["#0", "#1"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_family(family):
    pipe = _pipe(family)
    ref = _run(pipe, family)
    assert torch.isfinite(ref).all()
    try:
        handle = fastflow.enable(pipe, "none")
        assert torch.equal(_run(pipe, family), ref)  # bit for bit
        steps = handle.last.steps
        assert handle.last.nfe == steps and handle.last.branches == EXPECTED_BRANCHES[family]

        handle = fastflow.enable(pipe, "fixed", skip=2)
        out = _run(pipe, family)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        assert handle.last.nfe < steps and not torch.equal(out, ref)
        per_step = len(EXPECTED_BRANCHES[family])
        assert handle.last.denoiser_calls == handle.last.nfe * per_step

        # the default bandit through the hook: call 0 calibrates (the hook hands it every true
        # output), later calls skip; a loose tolerance, as these tiny random denoisers are curvy
        policy = fastflow.get_policy("ucb", tolerance=1.0)
        handle = fastflow.enable(pipe, policy)
        for seed in range(3):
            out = _run(pipe, family, seed=seed)
            assert out.shape == ref.shape and torch.isfinite(out).all()
        nfe = [c.nfe for c in handle.calls]
        assert nfe[0] == calibration_nfe(policy, steps) and nfe[-1] < steps, nfe
        assert all(c.complete for c in handle.calls)
    finally:
        fastflow.disable(pipe)
    assert dh.get_handle(pipe) is None
    assert torch.equal(_run(pipe, family), ref)  # disable restores the original outputs


def test_flux_true_cfg_keeps_separate_histories():
    pipe = _pipe("flux")
    extra = {"negative_prompt": "blurry", "true_cfg_scale": 2.0}
    ref = _run(pipe, "flux", **extra)
    handle = fastflow.enable(pipe, "fixed", skip=2)
    try:
        out = _run(pipe, "flux", **extra)
        rec = handle.last
        assert rec.branches == ["cond", "uncond"] and rec.denoiser_calls == 2 * rec.nfe < 2 * STEPS
        assert out.shape == ref.shape and torch.isfinite(out).all()
        fastflow.enable(pipe, "none")
        assert torch.equal(_run(pipe, "flux", **extra), ref)
    finally:
        fastflow.disable(pipe)


def test_lumina2_truncated_guidance_drops_the_second_branch():
    """cfg_trunc_ratio=0.5: Lumina 2 calls the unconditional branch on the first half of
    the steps only; `none` stays bit for bit and a skipped step skips both branches."""
    pipe = _pipe("lumina2")
    ref = _run(pipe, "lumina2", cfg_trunc_ratio=0.5)
    try:
        handle = fastflow.enable(pipe, "none")
        assert torch.equal(_run(pipe, "lumina2", cfg_trunc_ratio=0.5), ref)
        assert handle.last.branches == ["#0", "#1"] and handle.last.denoiser_calls == STEPS + STEPS // 2
        handle = fastflow.enable(pipe, "fixed", skip=2)
        out = _run(pipe, "lumina2", cfg_trunc_ratio=0.5)
        rec = handle.last
        assert "".join("#" if s.computed else "." for s in rec.trace) == "##..#..#"
        assert rec.denoiser_calls == 2 + 2 + 1 + 1 and rec.fallback_calls == 0  # steps 0, 1 guided; 4, 7 not
        assert out.shape == ref.shape and torch.isfinite(out).all()
    finally:
        fastflow.disable(pipe)


def test_batch_of_prompts_keeps_samples_apart():
    """Each sample of a batch comes out as it does alone (same per-sample generator)."""
    pipe = _pipe("flux")
    prompts = ["a photo of a cat", "a red dog"]
    fastflow.enable(pipe, "fixed", skip=2)
    try:
        kw = {**tiny_inputs("flux"), "num_inference_steps": STEPS}
        batch = pipe(**{**kw, "prompt": prompts},
                     generator=[torch.Generator().manual_seed(s) for s in (11, 12)]).images
        alone = [pipe(**{**kw, "prompt": p}, generator=torch.Generator().manual_seed(s)).images[0]
                 for p, s in zip(prompts, (11, 12))]
    finally:
        fastflow.disable(pipe)
    for i in range(2):
        assert torch.allclose(batch[i], alone[i], atol=1e-4), i
    assert not torch.allclose(batch[0], batch[1])


@pytest.mark.parametrize("kind", ["unipc", "dpm++"])
def test_multistep_schedulers_in_flow_mode(kind):
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    if kind == "unipc":
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    else:
        sched = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            flow_shift=3.0, algorithm_type="dpmsolver++", solver_order=2)
    pipe = _pipe("wan", scheduler=sched)
    ref = _run(pipe, "wan")
    try:
        handle = fastflow.enable(pipe, "none")
        assert torch.equal(_run(pipe, "wan"), ref)
        handle = fastflow.enable(pipe, "fixed", skip=2)
        out = _run(pipe, "wan")
        rec = handle.last
        assert rec.steps == STEPS and rec.nfe < STEPS and rec.complete
        assert rec.timesteps[0] == pytest.approx(1.0, abs=1e-3) and rec.timesteps[-1] == 0.0
        assert out.shape == ref.shape and torch.isfinite(out).all()
    finally:
        fastflow.disable(pipe)
    assert torch.equal(_run(pipe, "wan"), ref)


@pytest.mark.slow
def test_inference_mode_and_torch_compile():
    """Regional compilation of the blocks, and the whole denoiser compiled: the skip
    decision runs eagerly outside the graphs, and no step recompiles."""
    from torch._dynamo.utils import counters

    pipe = tiny_pipeline("wan")  # its own copy: compilation stays with it
    kw = {**tiny_inputs("wan"), "num_inference_steps": STEPS}

    def run():
        with torch.inference_mode():
            return pipe(**kw, generator=torch.Generator().manual_seed(0)).frames

    handle = fastflow.enable(pipe, "fixed", skip=2)
    eager = run()
    pipe.transformer.compile_repeated_blocks(backend="eager", fullgraph=True)
    assert torch.allclose(run(), eager, atol=1e-5)
    fastflow.disable(pipe)

    pipe = tiny_pipeline("wan")
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    handle = fastflow.enable(pipe, "fixed", skip=2)
    torch._dynamo.reset()
    counters.clear()
    assert torch.allclose(run(), eager, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    fastflow.enable(pipe, "fixed", skip=1)
    run()
    assert counters["stats"]["unique_graphs"] == graphs  # another skip pattern, no recompilation
    assert [c.nfe for c in handle.calls] == [4]
    fastflow.disable(pipe)


# -- the CLI's runner ------------------------------------------------------------------------

def test_is_pipeline_dir(tmp_path):
    assert not pr.is_pipeline_dir(tmp_path) and not pr.is_pipeline_dir(tmp_path / "missing")
    (tmp_path / "model_index.json").write_text("{}")
    assert pr.is_pipeline_dir(tmp_path) and pr.is_pipeline_dir(str(tmp_path))
    assert pr.looks_like_pipeline(str(tmp_path)) and pr.looks_like_pipeline("black-forest-labs/FLUX.1-dev")
    assert not pr.looks_like_pipeline("gmm") and not pr.looks_like_pipeline(str(tmp_path / "nope"))


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_run_pipeline(tmp_path, family):
    if family == "flux":  # from a saved folder, as `fastflow run --model PATH` does
        model = tmp_path / "pipe"
        _pipe(family).save_pretrained(model)
        assert pr.is_pipeline_dir(model)
        model = str(model)
    else:  # a loaded pipeline (Wan needs accelerate to load from a folder)
        model = _pipe(family)
    inputs = tiny_inputs(family)
    size = {k: inputs[k] for k in ("height", "width", "num_frames") if k in inputs}
    summary = pr.run_pipeline(
        model, "a photo of a cat", policy="fixed", policy_options={"skip": "2"}, steps=STEPS,
        seed=3, out_dir=tmp_path / "out", compare=True, warmup=False, extra={"max_sequence_length": 16},
        **size,
    )
    for key in ("policy", "model", "steps", "nfe_mean", "nfe_full", "speedup_nfe", "wall_seconds", "ms_per_eval",
                "psnr_db", "max_abs_error", "reference_wall_seconds", "speedup_wall"):
        assert key in summary, key
    assert summary["policy"] == "fixed" and summary["nfe_full"] == STEPS and summary["nfe_mean"] == 4
    assert summary["speedup_nfe"] == 2.0 and summary["max_abs_error"] > 0
    assert summary["video"] == (family == "wan")
    suffix = ".gif" if family == "wan" else ".png"
    assert summary["files"] and all(f.endswith(suffix) for f in summary["files"])
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["nfe_mean"] == 4


def test_run_pipeline_state_and_errors(tmp_path):
    pipe = _pipe("flux")
    state = tmp_path / "ucb.json"
    common = dict(steps=STEPS, out_dir=tmp_path / "o", warmup=False, height=8, width=8,
                  extra={"max_sequence_length": 16})
    s = pr.run_pipeline(pipe, "a cat", policy="ucb-paper", state_path=state, runs=3, compare=False, **common)
    assert s["nfe"][0] == STEPS and s["nfe"][-1] < STEPS and "psnr_db" not in s
    assert json.loads(state.read_text())["samples"] == 3
    assert dh.get_handle(pipe) is None
    with pytest.raises(fastflow.OptionError, match="keeps no learned state"):
        pr.run_pipeline(pipe, "a cat", policy="fixed", state_path=state, **common)
    with pytest.raises(fastflow.OptionError, match="num-frames"):
        pr.run_pipeline(pipe, "a cat", policy="fixed", num_frames=5, **common)


def test_wan22_two_experts_share_one_handle():
    pipe = _pipe("wan2.2")
    ref = _run(pipe, "wan2.2")
    try:
        handle = fastflow.enable(pipe, "none")
        assert handle.denoiser_names == ["transformer", "transformer_2"]
        assert torch.equal(_run(pipe, "wan2.2"), ref)
        assert handle.last.branches == ["cond", "uncond", "transformer_2:cond", "transformer_2:uncond"]
        handle = fastflow.enable(pipe, "fixed", compute="0,1")  # skip wherever allowed
        out = _run(pipe, "wan2.2")
        rec = handle.last
        assert out.shape == ref.shape and torch.isfinite(out).all()
        # the low-noise expert computes two steps of its own before anything is extrapolated
        switch = next(i for i, t in enumerate(rec.timesteps) if t * 1000 < 600)
        computed = [s.computed for s in rec.trace]
        assert computed[switch:switch + 2] == [True, True] and rec.nfe < STEPS, rec.trace
    finally:
        fastflow.disable(pipe)
    for mod in (pipe.transformer, pipe.transformer_2):
        assert mod._diffusers_hook.get_hook(dh.HOOK_NAME) is None
    assert torch.equal(_run(pipe, "wan2.2"), ref)


class _Recorder(fastflow.Policy):
    """Skips 2 after every evaluation and records the protocol calls."""

    name = "recorder"

    def __init__(self):
        super().__init__()
        self.log = []

    def start(self, ctx):
        log = self.log
        log.append(("start", ctx.steps, ctx.batch_size))

        class Run(fastflow.PolicyRun):
            needs_error = True

            def decide(self, k, hist):
                log.append(("decide", k))
                return 2

            def observe(self, k, err):
                log.append(("observe", k, float(err)))

            def close(self, ok=True):
                log.append(("close", ok))

        return Run()


def test_every_decision_gets_one_observation():
    pipe = ToyPipe()
    noise, cond, uncond = _toy_inputs()
    policy = _Recorder()
    fastflow.enable(pipe, policy)
    pipe(noise, _uniform(10), cond=cond, uncond=uncond, guidance=2.0)
    log = policy.log
    assert log[0] == ("start", 10, 3) and log[-1] == ("close", True)
    decides = [e[1] for e in log if e[0] == "decide"]
    observes = [e[1] for e in log if e[0] == "observe"]
    assert decides == observes == [2, 5, 8]
    assert all(e[2] > 0 for e in log if e[0] == "observe")
    # order: each observation comes before the next decision
    kinds = [e[0] for e in log[1:-1]]
    assert kinds == ["decide", "observe"] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_adds_no_sync_per_step():
    """On CUDA: bf16 runs skip steps, and the hook's synchronisations per pipeline call do
    not grow with the step count.  A per-step sync would add at least 8 between 8 and 16
    steps; a constant one or two per call (reading the schedule's sigmas, the one finite
    check) is allowed.  Measured on an H100: 2 at 8 steps, 1 at 16."""
    import warnings

    pipe = tiny_pipeline("flux").to("cuda", torch.bfloat16)
    kw = {**tiny_inputs("flux"), "output_type": "latent"}

    def syncs(steps, hooked):
        if hooked:
            fastflow.enable(pipe, "fixed", skip=2)
        else:
            fastflow.disable(pipe)
        gen = lambda: torch.Generator("cuda").manual_seed(0)  # noqa: E731
        pipe(**kw, num_inference_steps=steps, generator=gen())  # warm
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = pipe(**kw, num_inference_steps=steps, generator=gen()).images
            finally:
                torch.cuda.set_sync_debug_mode(0)
        assert torch.isfinite(out.float()).all()
        return sum("synchroniz" in str(w.message) for w in caught)

    extra = {steps: syncs(steps, True) - syncs(steps, False) for steps in (8, 16, 32)}
    handle = fastflow.enable(pipe, "fixed", skip=2)
    pipe(**kw, num_inference_steps=16, generator=torch.Generator("cuda").manual_seed(0))
    assert handle.last.nfe < 16
    fastflow.disable(pipe)
    assert max(extra.values()) <= 2 and extra[32] <= extra[8], extra


def test_planned_calibrates_under_the_hook_as_in_the_engine():
    # the hook hands calibrating policies every true output: planned plans after call 0
    pipe = ToyPipe()
    noise, cond, _ = _toy_inputs()
    policy = fastflow.get_policy("planned", nfe=5)
    handle = fastflow.enable(pipe, policy)
    for _ in range(3):
        pipe(noise, _uniform(10), cond=cond)
    assert [c.nfe for c in handle.calls] == [calibration_nfe(policy, 10), 5, 5]


def test_the_hook_teaches_the_bandit_what_the_engine_teaches_it():
    """Same model, same seeds, four calls: the learned tables agree, not only the traces
    (calibrating on the whole first batch in both, so both see the same pulls)."""
    noise, cond, _ = _toy_inputs()
    pipe = ToyPipe()
    engine_pol = fastflow.get_policy("ucb", calibrate=3, tolerance=0.05)
    for _ in range(4):
        _engine(pipe, noise, 10, engine_pol, cond)
    hook_pol = fastflow.get_policy("ucb", calibrate=3, tolerance=0.05)
    handle = fastflow.enable(pipe, hook_pol)
    for _ in range(4):
        pipe(noise, _uniform(10), cond=cond)
    assert [c.nfe for c in handle.calls][0] == calibration_nfe(hook_pol, 10) and handle.calls[-1].nfe < 10
    assert hook_pol.scale == pytest.approx(engine_pol.scale, rel=1e-6)
    for a, b in zip(hook_pol.bandits, engine_pol.bandits):
        assert a.counts == b.counts
        assert a.sums == pytest.approx(b.sums, rel=1e-4, abs=1e-6)
    assert sum(sum(b.counts) for b in hook_pol.bandits) > 3 * len(hook_pol.arms) * 5  # many decisions, not forced


def test_a_branch_first_seen_inside_a_skipped_step_is_computed():
    """Guidance that starts at step 5, in a step the policy skips: the unconditional branch
    has no history there, so the hook computes it (a fallback call) while the conditional
    branch is extrapolated; the result is exactly that, computed by hand."""
    from fastflow import estimator

    class LateGuidance(ToyPipe):
        def __call__(self, x, sigmas, *, cond, uncond, guidance):
            s = self.scheduler
            s.set_timesteps(sigmas=list(sigmas))
            s.set_begin_index(0)
            for i, t in enumerate(s.timesteps):
                tt = (t / 1000).expand(x.shape[0])
                with _context(self.transformer, "cond"):
                    v = self.transformer(x, tt, cond=cond)[0]
                if i >= 5:
                    with _context(self.transformer, "uncond"):
                        vu = self.transformer(x, tt, cond=uncond)[0]
                    v = vu + guidance * (v - vu)
                x = s.step(v, t, x, return_dict=False)[0]
            self.transformer._diffusers_hook.reset_stateful_hooks() if hasattr(self.transformer, "_diffusers_hook") else None
            return x

    noise, cond, uncond = _toy_inputs()
    pipe = LateGuidance()
    handle = fastflow.enable(pipe, "fixed", compute="0,1,2,3,4,6,7,8,9")  # only step 5 is skipped
    got = pipe(noise, _uniform(10), cond=cond, uncond=uncond, guidance=2.0)
    rec = handle.last
    assert rec.fallback_calls == 1 and rec.nfe == 9 and rec.denoiser_calls == 9 + 4 + 1
    fastflow.disable(pipe)
    # by hand: the same loop, with the conditional output of step 5 extrapolated from steps 3, 4,
    # and at step 6 (the run's end) the line 4→6 replacing that extrapolation: the scheduler's
    # Euler step takes v6 + a·(slope 4→6 − slope 3→4)/h6, a = h5·(t5 − t4)
    s = pipe.scheduler
    s.set_timesteps(sigmas=_uniform(10))
    s.set_begin_index(0)
    sig = [float(v) for v in s.sigmas]
    x, hist = noise.clone(), []
    for i, t in enumerate(s.timesteps):
        tt = (t / 1000).expand(x.shape[0])
        v = pipe.transformer(x, tt, cond=cond)[0]
        if i == 5:
            (tp, vp), (tc, vc) = hist[-2], hist[-1]
            v = estimator.extrapolate(vp, vc, tp, tc, sig[5])
        else:
            hist.append((sig[i], v))
        if i == 6:
            (t3, v3), (t4, v4) = hist[-3], hist[-2]
            a = (sig[6] - sig[5]) * (sig[5] - t4)
            v = v + a * ((v - v4) / (sig[6] - t4) - (v4 - v3) / (t4 - t3)) / (sig[7] - sig[6])
        if i >= 5:
            vu = pipe.transformer(x, tt, cond=uncond)[0]
            v = vu + 2.0 * (v - vu)
        x = s.step(v, t, x, return_dict=False)[0]
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-6)


# -- per-sample decisions under the hook ----------------------------------------------------

class _ByRow(fastflow.Policy):
    """Per-sample decisions that depend on the row alone: row r skips r % 3 steps at
    every ask (so the rows of one batch take different schedules)."""

    name = "by-row"

    def start(self, ctx):
        run = fastflow.PolicyRun()
        run.per_sample_decisions = True
        run.decide_rows = lambda k, rows, hist: [r % 3 for r in rows]
        return run


def _images(out):
    return out.frames if hasattr(out, "frames") else out.images


@pytest.mark.parametrize("family", ["flux", "sd3", "wan", "wan2.2", "chroma", "ltx", "qwenimage", "cogview4",
                                    "lumina2"])
def test_per_sample_decisions_run_each_sample_as_alone(family):
    """A batch whose samples take different schedules: every sample comes out as it does
    alone under its own schedule (replayed with ``fixed compute=``), the denoiser runs
    only on the rows that compute (guidance branches of a sample together, concatenated
    as in SD3 or apart as in Wan), and the record counts each sample's evaluations."""
    pipe = _pipe(family)
    prompts = ["a photo of a cat", "a red dog", "a blue monkey"]
    if family == "cogview4":  # it pads a batch to its longest prompt with no attention mask: the
        prompts[0] = "a red cat"  # unhooked pipeline too gives a short prompt another image in a batch
    seeds = (11, 12, 13)
    kw = {**tiny_inputs(family), "num_inference_steps": 12}
    sizes = []  # the batch each denoiser layer actually runs on
    layer = next(m for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear))
    probe = layer.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    handle = fastflow.enable(pipe, _ByRow())
    try:
        batch = _images(pipe(**{**kw, "prompt": prompts}, generator=[torch.Generator().manual_seed(s) for s in seeds]))
        rec = handle.last
        probe.remove()
        alone = []
        for r, (p, s) in enumerate(zip(prompts, seeds)):
            h = fastflow.enable(pipe, "fixed", compute=",".join(map(str, rec.computed_per_sample[r])))
            alone.append(_images(pipe(**{**kw, "prompt": p}, generator=torch.Generator().manual_seed(s)))[0])
            assert h.last.nfe == rec.nfe_per_sample[r]
    finally:
        fastflow.disable(pipe)
    nfe = rec.nfe_per_sample
    assert len(set(nfe)) == 3 and nfe[0] == 12 and max(nfe[1:]) < 12, nfe
    assert rec.nfe == 12 and rec.complete  # row 0 computes every step
    full = max(sizes)
    assert full % 3 == 0 and min(sizes) == full // 3, sizes  # some calls ran on row 0 alone
    for r in range(3):
        assert torch.allclose(batch[r], alone[r], atol=1e-4), r
    assert not torch.allclose(batch[1], batch[2])
    assert "nfe_per_sample" in rec.as_dict(trace=False) and "computed_per_sample" in rec.as_dict()
    assert "per sample" in handle.summary()


def test_per_sample_threshold_in_the_hook_is_the_engines():
    """threshold per_sample=true under the hook decides as the engine does, row for row:
    rows with a strong constant drift skip more than the others; same NFE per sample,
    same outputs; a gathered call runs on the computing rows only."""
    pipe = ToyPipe()
    noise, cond, uncond = _toy_inputs(batch=4)
    cond[:2] *= 30  # nearly straight paths for rows 0 and 1
    ref = _engine(pipe, noise, 12, fastflow.get_policy("threshold", per_sample=True, threshold=0.3), cond)
    handle = fastflow.enable(pipe, "threshold", per_sample=True, threshold=0.3)
    x = pipe(noise, _uniform(12), cond=cond)
    rec = handle.last
    fastflow.disable(pipe)
    assert rec.nfe_per_sample == ref.nfe_per_sample and len(set(ref.nfe_per_sample)) > 1
    assert torch.allclose(x, ref.x, rtol=1e-5, atol=1e-4)
    assert rec.denoiser_calls == ref.model_calls == rec.nfe


def test_per_sample_decisions_where_calls_cannot_be_split():
    """A pipeline whose guidance call carries an odd batch cannot be split by sample:
    threshold decides per batch there (as with per_sample=false, bit for bit), a policy
    with no per-batch run computes every step; each says so once, in a warning and the
    call's note."""
    class OddPipe(ToyPipe):
        do_classifier_free_guidance = True  # one call per step "under guidance", 3 rows

    pipe = OddPipe()
    noise, cond, _ = _toy_inputs(batch=3)
    handle = fastflow.enable(pipe, "threshold", per_sample=True, threshold=0.5)
    with pytest.warns(UserWarning, match="decides per batch there"):
        x = pipe(noise, _uniform(10), cond=cond)
    rec = handle.last
    assert "cannot be split" in rec.note and rec.nfe_per_sample is None
    handle = fastflow.enable(pipe, "threshold", per_sample=False, threshold=0.5)
    ref = pipe(noise, _uniform(10), cond=cond)
    assert torch.equal(x, ref) and handle.last.nfe == rec.nfe < 10

    handle = fastflow.enable(pipe, _ByRow())
    with pytest.warns(UserWarning, match="every step is computed"):
        x = pipe(noise, _uniform(10), cond=cond)
    fastflow.disable(pipe)
    assert handle.last.nfe == 10 and "every step computed" in handle.last.note
    assert torch.equal(x, pipe(noise, _uniform(10), cond=cond))


class _NestedDenoiser(ToyDenoiser):
    """Per-row inputs inside a dict and a list (as IP-Adapter embeddings in attention
    kwargs, ControlNet residuals), or hidden in an object fastflow cannot see into."""

    def forward(self, hidden_states, timestep, cond=None, extras=None, residuals=(), box=None, return_dict=False):
        v = super().forward(hidden_states, timestep, cond=cond)[0]
        if extras is not None:
            v = v + extras["shift"]
        for r in residuals:
            v = v + r
        if box is not None:
            v = v + box.tensor
        return (v,)


class _NestedPipe(ToyPipe):
    def __init__(self):
        super().__init__()
        self.transformer = _NestedDenoiser()

    def __call__(self, x, sigmas, **inputs):
        s = self.scheduler
        s.set_timesteps(sigmas=list(sigmas))
        s.set_begin_index(0)
        for t in s.timesteps:
            v = self.transformer(x, (t / 1000).expand(x.shape[0]), **inputs)[0]
            x = s.step(v, t, x, return_dict=False)[0]
        self.transformer._diffusers_hook.reset_stateful_hooks() if hasattr(self.transformer, "_diffusers_hook") else None
        return x


def test_per_sample_decisions_cut_nested_inputs_and_name_what_they_cannot():
    pipe = _NestedPipe()
    noise, cond, uncond = _toy_inputs(batch=3)
    inputs = {"cond": cond, "extras": {"shift": uncond}, "residuals": [0.5 * uncond]}
    handle = fastflow.enable(pipe, _ByRow())
    x = pipe(noise, _uniform(12), **inputs)
    rec = handle.last
    assert len(set(rec.nfe_per_sample)) == 3
    for r in range(3):
        fastflow.enable(pipe, "fixed", compute=",".join(map(str, rec.computed_per_sample[r])))
        one = {"cond": cond[r:r + 1], "extras": {"shift": uncond[r:r + 1]}, "residuals": [0.5 * uncond[r:r + 1]]}
        assert torch.allclose(x[r], pipe(noise[r:r + 1], _uniform(12), **one)[0], atol=1e-5), r

    class Box:
        def __init__(self, tensor):
            self.tensor = tensor

    fastflow.enable(pipe, _ByRow())
    with pytest.raises(fastflow.FastFlowError, match="per_sample=false"):
        pipe(noise, _uniform(12), cond=cond, box=Box(uncond))
    fastflow.disable(pipe)


def test_a_run_that_reaches_the_end_completes_the_call():
    """ucb with skip_last may extrapolate a pipeline call's last steps: the call still ends
    complete (at diffusers' end-of-call reset) and its output is finite."""
    pipe = _pipe("flux")
    ref = _run(pipe, "flux")
    policy = fastflow.get_policy("ucb", tolerance=1.0, skip_last=True)
    handle = fastflow.enable(pipe, policy)
    try:
        for seed in range(3):
            out = _run(pipe, "flux", seed=seed)
            assert out.shape == ref.shape and torch.isfinite(out).all()
        assert all(c.complete for c in handle.calls)
        assert not handle.calls[-1].trace[-1].computed  # the last step extrapolated
    finally:
        fastflow.disable(pipe)

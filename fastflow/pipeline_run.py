"""Run a diffusers pipeline with a skip policy beside the same call without it: what
``fastflow run --prompt`` and ``fastflow export --prompt`` do with a pipeline. Loading
(a folder, a Hub id, or the embedded glyph model as a pipeline), the call's arguments,
the outputs written, and the summary in :mod:`fastflow.compare`'s schema."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from .compare import comparison, cost, resolve_policy_with_state, write_summary
from .diffusers_hook import PipelineCall, disable, enable
from .artifact import Exported
from .errors import FastFlowError, OptionError
from .precision import torch_dtype



def is_pipeline_dir(path) -> bool:
    """Whether ``path`` is a local diffusers pipeline folder (it holds ``model_index.json``)."""
    try:
        p = Path(path)
        return p.is_dir() and (p / "model_index.json").is_file()
    except (TypeError, OSError):
        return False


def looks_like_pipeline(ref: str) -> bool:
    """A local pipeline folder, or a Hugging Face Hub id (``org/name``) that is not a local path.

    Needs no network: a Hub id is recognised by its shape only.
    """
    if is_pipeline_dir(ref):
        return True
    if not isinstance(ref, str) or Path(ref).exists():
        return False
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "~")) and " " not in ref


def _load_diffusers_pipeline(model, device, dtype):
    import torch
    from diffusers import DiffusionPipeline

    if isinstance(model, DiffusionPipeline):
        return model, getattr(model.config, "_name_or_path", None) or type(model).__name__
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    else:
        dtype = torch_dtype(dtype)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(model), torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise FastFlowError(f"cannot load a diffusers pipeline from {model!r}: {exc}") from None
    pipe.to(device)
    return pipe, str(model)


def _call_kwargs(pipe, *, prompt, steps, guidance, negative_prompt, height, width, num_frames, image, extra):
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    kw: dict[str, Any] = {}

    def put(name, value):
        if value is None:
            return
        if name not in params:
            raise OptionError(f"{type(pipe).__name__} takes no {name.replace('_', '-')} "
                              f"(its options: {', '.join(p for p in params if p not in ('self', 'kwargs'))})")
        kw[name] = value

    put("prompt", prompt)
    put("num_inference_steps", steps)
    put("guidance_scale", guidance)
    put("negative_prompt", negative_prompt)
    put("height", height)
    put("width", width)
    put("num_frames", num_frames)
    if image is not None:
        if isinstance(image, (str, Path)):
            from PIL import Image

            image = Image.open(image).convert("RGB")
        put("image", image)
    for k, v in (extra or {}).items():
        put(k, v)
    if "output_type" in params:
        kw["output_type"] = "np"
    return kw, params


def _output_array(result):
    """(numpy array in [0, 1], is_video) from a pipeline output with output_type="np"."""
    import numpy as np

    if hasattr(result, "frames"):
        frames = result.frames
        arr = np.asarray(frames if not isinstance(frames, list) else np.stack([np.asarray(f) for f in frames]))
        return arr, True
    images = getattr(result, "images", None)
    if images is None:
        images = result[0]
    if isinstance(images, list):
        images = np.stack([np.asarray(i) for i in images])
    return np.asarray(images), False


def _save_outputs(arr, is_video: bool, out: Path, stem: str, fps: int) -> list[str]:
    import numpy as np
    from PIL import Image

    files = []
    arr = np.clip(np.nan_to_num(arr), 0.0, 1.0)
    u8 = (arr * 255).round().astype("uint8")
    for j, item in enumerate(u8):
        if is_video:
            if item.ndim == 4 and item.shape[-1] not in (1, 3, 4) and item.shape[1] in (1, 3, 4):
                item = item.transpose(0, 2, 3, 1)  # (F, C, H, W) -> (F, H, W, C)
            frames = [Image.fromarray(f.squeeze(-1) if f.shape[-1] == 1 else f) for f in item]
            path = out / f"{stem}-{j}.gif"
            frames[0].save(path, save_all=True, append_images=frames[1:], duration=max(1, round(1000 / fps)), loop=0)
        else:
            if item.ndim == 3 and item.shape[0] in (1, 3, 4) and item.shape[-1] not in (1, 3, 4):
                item = item.transpose(1, 2, 0)
            path = out / f"{stem}-{j}.png"
            Image.fromarray(item.squeeze(-1) if item.shape[-1] == 1 else item).save(path)
        files.append(str(path))
    return files


def run_pipeline(
    model,
    prompt,
    *,
    policy: Any = "ucb",
    policy_options: dict | None = None,
    steps: int | None = None,
    seed: int = 0,
    guidance: float | None = None,
    out_dir="fastflow-out",
    state_path=None,
    compare: bool = True,
    negative_prompt=None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    image=None,
    runs: int = 1,
    device=None,
    dtype=None,
    warmup: bool = True,
    fps: int = 16,
    extra: dict | None = None,
) -> dict:
    """Run a diffusers pipeline with a skip policy; write its images (or animated GIFs for
    video pipelines) and ``summary.json`` to ``out_dir``; return the summary.

    Args:
        model: a pipeline folder (holding ``model_index.json``), a Hub id, or a loaded
            ``DiffusionPipeline``.
        prompt: the text prompt (or a list: one output each).
        policy, policy_options: as for :func:`enable` (a name and its options, or an object).
        steps: ``num_inference_steps`` (default: the pipeline's).
        seed: seed of the run's generator; run ``i`` uses ``seed + i``.
        guidance: the pipeline's ``guidance_scale`` (default: the pipeline's).
        state_path: policy state file, loaded and saved back (``ucb``).
        compare: also run the same seeds with the unhooked pipeline and report the
            difference (PSNR over outputs in [0, 1], max abs error) and the wall speed-up.
        negative_prompt, height, width, num_frames, image, extra: passed to the pipeline
            (``image``: a path or PIL image, for editing pipelines); an argument the
            pipeline does not take is an error naming the ones it takes.
        runs: pipeline calls with the policy (the policy learns across them).
        device, dtype: where and how to load a pipeline given by path (default: CUDA in
            bf16 when available, else CPU in fp32).
        warmup: one untimed short call first (lazy initialisation is not billed to either side).

    Returns:
        a dict with the keys of ``fastflow run --json``: policy, policy_options, model,
        pipeline, steps, nfe_mean, nfe_full, speedup_nfe, wall_seconds, ms_per_eval, plus
        per-run ``calls``, ``files``, ``out`` and, with ``compare``, psnr_db (None when
        identical), max_abs_error, reference_wall_seconds, speedup_wall.
    """
    import torch

    if not isinstance(runs, int) or runs < 1:
        raise OptionError(f"runs must be a positive integer, got {runs!r}")
    pol = resolve_policy_with_state(policy, policy_options, state_path)
    pipe, model_name = _load_diffusers_pipeline(model, device, dtype)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    kwargs, params = _call_kwargs(pipe, prompt=prompt, steps=steps, guidance=guidance,
                                  negative_prompt=negative_prompt, height=height, width=width,
                                  num_frames=num_frames, image=image, extra=extra)
    gen_device = getattr(pipe, "device", torch.device("cpu"))
    is_cuda = getattr(gen_device, "type", str(gen_device)) == "cuda"

    def call(run_seed):
        gen = torch.Generator(device=gen_device).manual_seed(run_seed)
        started = time.perf_counter()
        result = pipe(**kwargs, generator=gen)
        arr, video = _output_array(result)  # output_type="np": already on the host
        if is_cuda:
            torch.cuda.synchronize()
        return arr, video, time.perf_counter() - started

    disable(pipe)
    if warmup:
        short = dict(kwargs, num_inference_steps=min(2, steps or 2)) if "num_inference_steps" in params else kwargs
        gen = torch.Generator(device=gen_device).manual_seed(seed)
        pipe(**short, generator=gen)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    wall, ref_wall = 0.0, 0.0
    outs, refs = [], []
    is_video = False
    records: list[PipelineCall] = []
    for i in range(runs):
        handle = enable(pipe, pol, autosave=False)
        try:
            arr, is_video, dt = call(seed + i)
            rec = handle.last
        finally:
            disable(pipe)
        if rec is None:
            raise FastFlowError(f"{type(pipe).__name__} never called its denoiser; nothing to accelerate")
        records.append(rec)
        wall += dt
        files += _save_outputs(arr, is_video, out, f"{'video' if is_video else 'image'}-{i}", fps)
        if compare:
            ref, _, rdt = call(seed + i)
            ref_wall += rdt
            files += _save_outputs(ref, is_video, out, f"reference-{i}", fps)
            outs.append(torch.from_numpy(arr.astype("float64")))
            refs.append(torch.from_numpy(ref.astype("float64")))
    if state_path is not None:
        pol.save(str(state_path))

    nfes = [r.nfe for r in records]
    full = records[-1].steps
    # per-batch decisions: every sample of a call has the call's NFE
    per_sample = [n for r, x in zip(records, outs or [None] * len(records))
                  for n in (r.nfe_per_sample or [r.nfe] * (x.shape[0] if x is not None and x.dim() > 3 else 1))]
    summary: dict[str, Any] = {
        "backend": getattr(getattr(pipe, "transformer", None), "backend_name", "torch"),  # a swapped-in export
        "model": model_name,
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "prompt": prompt,
        "steps": full,
        "runs": runs,
        "seed": seed,
        "guidance": guidance,
        "video": is_video,
        "nfe": nfes,
        **cost(pol, per_sample, full, model_calls=sum(r.denoiser_calls for r in records), calibration_samples=0,
               wall_seconds=wall),
        "denoiser_calls": [r.denoiser_calls for r in records],
        "calls": [r.as_dict(trace=True) for r in records],
    }
    summary["ms_per_eval"] = 1000.0 * wall / max(sum(nfes), 1)  # per step evaluated (branches together)
    if compare:
        summary.update(comparison(torch.cat([x.flatten() for x in outs]), torch.cat([x.flatten() for x in refs]),
                                  1.0, speedup_nfe=summary["speedup_nfe"], wall_seconds=wall,
                                  reference_wall_seconds=ref_wall))
    summary["files"] = files
    return write_summary(out, summary, state=state_path)


def load_pipeline(model, device=None, dtype=None):
    """(pipeline, name) for ``fastflow run/export --prompt``: ``glyphs`` is the demo
    model's pipeline, anything else a diffusers folder or Hub id (or a loaded pipeline)."""
    if model == "glyphs":
        from .demo.pipeline import glyph_pipeline

        try:
            return glyph_pipeline(device=device, dtype=dtype), "glyphs"
        except (OSError, ValueError) as exc:
            raise FastFlowError(f"cannot load model 'glyphs': {exc}") from None
    return _load_diffusers_pipeline(model, device, dtype)


def export_pipeline_denoiser(model, prompt, out_dir, *, height: int | None = None, width: int | None = None,
                             num_frames: int | None = None, negative_prompt=None, guidance: float | None = None,
                             image=None, log: Callable[[str], None] | None = None) -> Exported:
    """What ``fastflow export --prompt`` does: load the pipeline on the CPU in float32 and
    export its denoiser as called for ``prompt`` at that height/width (2 steps, stopped
    at the first denoiser call)."""
    from .denoiser_export import export_denoiser

    pipe, name = load_pipeline(model, device="cpu", dtype="fp32")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    kwargs, _ = _call_kwargs(pipe, prompt=prompt, steps=2, guidance=guidance, negative_prompt=negative_prompt,
                             height=height, width=width, num_frames=num_frames, image=image, extra=None)
    return export_denoiser(pipe, out_dir, example_call=kwargs, source=str(name), log=log)

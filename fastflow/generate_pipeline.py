"""``fastflow generate --prompts FILE``: jobs that are text prompts, made by a diffusers
pipeline accelerated with :func:`fastflow.enable` (``--model glyphs`` is the embedded
glyph pipeline: the prompt ``"A"`` draws an A). The same commit rules as the model path
(:mod:`fastflow.generate`): files, then the batch's manifest entry."""

from __future__ import annotations

import io
import time
from pathlib import Path

from .errors import OptionError


def read_prompts(path) -> list[str]:
    """One prompt per line (blank lines skipped); errors name the file and the fix."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(f"--prompts {path} cannot be read ({getattr(exc, 'strerror', None) or exc}); "
                          f"give a readable text file, one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise OptionError(f"--prompts {path} holds no prompts; write one per line")
    return prompts


def prompt_jobs(prompts: list[str], samples: int, seed: int) -> list[dict]:
    """``samples`` jobs cycling through ``prompts``; job i has seed ``seed`` + i."""
    from .generate_jobs import make_job

    return [make_job(None, None, prompts[i % len(prompts)], seed + i) for i in range(samples)]


def load_pipeline(model: str, device: str):
    if model == "glyphs":
        from .demo.pipeline import glyph_pipeline

        return glyph_pipeline(device=device)
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        from .errors import MissingDependencyError

        raise MissingDependencyError("pipelines need diffusers: pip install 'fastflow[diffusers]'") from None
    try:
        return DiffusionPipeline.from_pretrained(model).to(device)
    except (OSError, ValueError) as exc:
        raise OptionError(f"cannot load pipeline '{model}': {exc}") from None


def make_step(settings, out, policy=None, die_once: str | None = None):
    """The batch step of this process: a pipeline's (:class:`PipelineStep`) or a model's."""
    from .generate import BatchStep

    return (PipelineStep if settings.pipeline else BatchStep)(settings, out, policy=policy, die_once=die_once)


class PipelineStep:
    """One process's pipeline (loaded once, fastflow enabled on it) and its batch step."""

    def __init__(self, settings, out, policy=None, die_once: str | None = None):
        import torch

        import fastflow
        from .generate import make_policy

        self.settings, self.out, self.die_once = settings, Path(out), die_once
        self.spec = settings.spec()
        self.policy = policy if policy is not None else make_policy(settings)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(settings.model, self.device)
        if hasattr(self.pipe, "set_progress_bar_config"):
            self.pipe.set_progress_bar_config(disable=True)  # generate reports per batch itself
        self.handle = fastflow.enable(self.pipe, self.policy, autosave=False)

    def __call__(self, jobs: list[dict]) -> dict:
        import torch

        from .generate import IMAGES, already_committed, atomic_write, commit_batch

        done = already_committed(self.out, jobs)
        if done is not None:
            return done
        started = time.perf_counter()
        kwargs = {} if self.settings.guidance is None else {"guidance_scale": self.settings.guidance}
        try:
            out = self.pipe(prompt=[j["prompt"] for j in jobs], num_inference_steps=self.settings.steps,
                            generator=[torch.Generator().manual_seed(j["seed"]) for j in jobs],
                            output_type="pil", **kwargs)
        except ValueError as exc:  # what a pipeline says of prompts it cannot take
            raise OptionError(f"pipeline '{self.settings.model}' refused the prompts of jobs "
                              f"{', '.join(j['id'] for j in jobs[:3])}: {exc}") from None
        call = self.handle.last
        nfe = int(call.nfe) if call is not None else self.settings.steps
        rows = []
        for j, image in zip(jobs, out.images):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            atomic_write(self.out / IMAGES / f"{j['id']}.png", buf.getvalue())
            rows.append({"id": j["id"], "seed": j["seed"], "label": None, "label_name": None, "prompt": j["prompt"],
                         "policy": self.settings.policy, "nfe": nfe, "file": f"{IMAGES}/{j['id']}.png"})
        commit_batch(self.out, jobs, rows, self.die_once)
        return {"rows": rows, "seconds": time.perf_counter() - started, "calibration": 0, "already": False}

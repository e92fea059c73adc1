"""The ``fastflow`` command line."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import click

from .engine import schedule_key
from .errors import FastFlowError
from .state import check_writable, user_cache_dir


class UsageFailure(click.ClickException):
    """A user error: printed as ``Error: ...`` with exit status 2."""

    exit_code = 2


def _fail(exc: Exception):
    raise UsageFailure(str(exc)) from None


class PluginGroup(click.Group):
    """The top-level group: commands that plugins register (built-in ones too, such
    as ``bench`` and ``export``) are added on the first lookup of a name not yet known."""

    _plugins_loaded = False

    def _load_plugin_commands(self) -> None:
        if not self._plugins_loaded:
            self._plugins_loaded = True
            from .plugins import get_plugins

            get_plugins().add_commands(self)

    def get_command(self, ctx, name):
        if name not in self.commands:
            self._load_plugin_commands()
        return super().get_command(ctx, name)

    def list_commands(self, ctx):
        self._load_plugin_commands()
        return super().list_commands(ctx)


@click.group(cls=PluginGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fastflow")
def cli():
    """fastflow: fewer model evaluations for flow-matching samplers.

    At steps where the sampling path changes little, fastflow extrapolates the velocity
    from the last two model predictions instead of calling the model; a skip policy
    (the FastFlow bandit `ucb`, `fixed`, `threshold`, or one from a plugin) decides
    where.

    \b
    Try it (no downloads, runs on the embedded default model):
      fastflow run --policy ucb
      fastflow run --policy fixed --option skip=3 --json
      fastflow plugins
    """


def _parse_options(pairs: tuple[str, ...]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageFailure(f"--option expects KEY=VALUE (e.g. --option skip=3), got '{pair}'")
        if key.strip() in options:
            raise UsageFailure(f"--option {key.strip()} is given twice; give each option once")
        options[key.strip()] = value.strip()
    return options


def _state_option(options: dict, state_path, no_state: bool):
    """``--state PATH`` and ``--option state=PATH`` are one thing."""
    if "state" in options:
        given = options.pop("state")
        if state_path is not None and str(state_path) != given:
            raise UsageFailure(f"--state {state_path} and --option state={given} disagree; give one of them")
        state_path = given
    if no_state and state_path is not None:
        raise UsageFailure("--no-state and --state exclude each other; give one of them")
    return state_path


class RegistryOption(click.Option):
    """An option whose help lists what the plugin registry holds (policies, backends,
    models), read when help is shown, so plugins' additions appear and startup stays light."""

    def __init__(self, *args, registry: str, **kwargs):
        self.registry_kind = registry
        super().__init__(*args, **kwargs)

    def get_help_record(self, ctx):
        from .plugins import get_plugins

        base = self.help or ""
        try:
            entries = get_plugins().registry(self.registry_kind)
            listing = "; ".join(f"{name}" + (f" ({e.description})" if e.description else "")
                                for name, e in sorted(entries.items()))
        except Exception:  # help must never fail
            listing = "see `fastflow plugins`"
        self.help = f"{base} Choices: {listing}."
        try:
            return super().get_help_record(ctx)
        finally:
            self.help = base


def _policy_names() -> str:
    from .plugins import get_plugins

    try:
        return ", ".join(sorted(get_plugins().registry("policies")))
    except Exception:  # help text must never fail
        return "see `fastflow plugins`"


DEFAULT_MODEL = "glyphs"


@cli.command()
@click.option("--model", "model_name", default=None, metavar="NAME", cls=RegistryOption, registry="models",
              help=f"Model to sample from (default: {DEFAULT_MODEL}); also an export folder or a diffusers "
                   "pipeline with --prompt.")
@click.option("--backend", default="torch", show_default=True, cls=RegistryOption, registry="backends",
              help="Velocity backend.")
@click.option("--policy", default="ucb", show_default=True, cls=RegistryOption, registry="policies",
              help="Skip policy; `fastflow policies` lists their options.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Policy option, repeatable: e.g. --option arms=0,2,4 --option gamma=1.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1, max=10_000),
              help="Steps of the Euler schedule (at most 10,000).")
@click.option("--solver", default="euler", show_default=True, type=click.Choice(["euler", "unipc", "dpm++"]),
              help="Base ODE solver; unipc and dpm++ are diffusers' multistep schedulers in flow mode.")
@click.option("--shift", default=None, type=click.FloatRange(min=0, min_open=True),
              help="FLUX/SD3 schedule shift (default: the model's, else uniform).")
@click.option("--samples", default=None, type=click.IntRange(min=1),
              help="Number of samples to generate (default: one per class, 36 for the glyphs, else 64; "
                   "with --edit: one per --label).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Samples per model call; the policy decides once per batch.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1), help="Seed of the noise.")
@click.option("--label", "labels", multiple=True, metavar="LABEL",
              help="Class label(s) to generate, repeatable (default: cycle through all).")
@click.option("--guidance", default=None, type=float,
              help="Classifier-free guidance scale (default: the model's).")
@click.option("--state", "state_path", default=None, type=click.Path(dir_okay=False),
              help="Policy state file: learning is loaded from it and saved back (ucb, planned). "
                   "Default for learning policies: one file per model, schedule and options in "
                   "$XDG_CACHE_HOME/fastflow (~/.cache/fastflow).")
@click.option("--no-state", is_flag=True, help="Learn from scratch and keep nothing (no state file).")
@click.option("--out", "out_dir", default="fastflow-out", show_default=True,
              type=click.Path(file_okay=False), help="Folder for samples and summary.json.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--compare/--no-compare", default=True, show_default=True,
              help="Also run the same seeds with every step computed and report the difference.")
@click.option("--edit", "edit_path", default=None, type=click.Path(dir_okay=False),
              help="Edit this image (PNG/JPEG of the model's size) into --label (SDEdit).")
@click.option("--strength", default=None, type=float,
              help="With --edit: how far to noise the image, in (0, 1] (default 0.6); 1 ignores it entirely.")
@click.option("--prompt", default=None, help="Text prompt: runs --model as a diffusers pipeline "
              "(a local folder or a Hub id such as black-forest-labs/FLUX.1-dev).")
@click.option("--negative-prompt", default=None, help="Pipelines: negative prompt.")
@click.option("--height", default=None, type=click.IntRange(min=8), help="Pipelines: image height.")
@click.option("--width", default=None, type=click.IntRange(min=8), help="Pipelines: image width.")
@click.option("--num-frames", default=None, type=click.IntRange(min=1), help="Video pipelines: frames.")
@click.option("--image", "image_path", default=None, type=click.Path(dir_okay=False),
              help="Pipelines that edit or extend an image (Kontext, img2img): the input image.")
@click.option("--dtype", default=None, type=click.Choice(["bf16", "fp16", "fp32"]), help="Pipelines: weights dtype.")
@click.option("--device", default=None, help="Pipelines: torch device (default: cuda if available).")
@click.option("--export", "export_dir", default=None, type=click.Path(file_okay=False),
              help="Pipelines: a denoiser export (fastflow export --prompt ...) to run with --backend "
                   "onnxruntime/tensorrt.")
def run(model_name, backend, policy, options, steps, solver, shift, samples, batch_size, seed, labels,
        guidance, state_path, no_state, out_dir, as_json, compare, edit_path, strength, prompt, negative_prompt,
        height, width, num_frames, image_path, dtype, device, export_dir):
    """Generate samples with a skip policy and report NFE, speed-up and fidelity.

    \b
    Examples:
      fastflow run --policy ucb                       # the FastFlow bandit; learning kept in the cache
      fastflow run --policy ucb --option tolerance=0.0015   # closer to all steps, fewer skips
      fastflow run --policy ucb --state ucb.json      # learning kept in a file of your own
      fastflow run --policy fixed --option skip=2 --steps 30
      fastflow run --policy threshold --option threshold=0.05 --json

    With --compare (the default) the same seeds are also run with every step computed
    (cached in $XDG_CACHE_HOME/fastflow: it is deterministic), and the summary gives the
    PSNR and max abs error between the two outputs. grid.png shows every sample above
    its all-steps twin. Progress goes to stderr, so --json output stays clean.
    """
    options = _parse_options(options)
    state_path = _state_option(options, state_path, no_state)
    for flag, value in (("--guidance", guidance), ("--shift", shift)):
        if value is not None and not math.isfinite(value):
            raise UsageFailure(f"{flag} must be a finite number, got {value}")
    if prompt is not None and not prompt.strip():
        raise UsageFailure("--prompt is empty; give the text to generate from")
    if strength is not None and edit_path is None:
        raise UsageFailure("--strength only applies with --edit IMAGE; add --edit or drop --strength")
    strength = 0.6 if strength is None else strength
    if prompt is None and not (model_name and _is_pipeline_ref(model_name)):
        for flag, value in (("--height", height), ("--width", width), ("--num-frames", num_frames),
                            ("--negative-prompt", negative_prompt), ("--image", image_path)):
            if value is not None:
                raise UsageFailure(f"{flag} applies to diffusers pipelines (with --prompt); drop it or add --prompt")
    try:
        if prompt is not None or (model_name and _is_pipeline_ref(model_name)):
            summary = _run_pipeline(model_name, prompt, policy, options, steps, seed, guidance,
                                    out_dir, state_path, compare, negative_prompt, height, width, num_frames,
                                    image_path, dtype, device, backend, export_dir)
            if as_json:
                click.echo(_json_text(summary))
            else:
                _print_summary(summary)
            return
        summary = _run(model_name or DEFAULT_MODEL, backend, policy, options, steps,
                       solver, shift, samples, batch_size, seed, labels, guidance, state_path, out_dir,
                       compare, quiet=as_json, edit_path=edit_path, strength=strength, no_state=no_state)
    except FastFlowError as exc:
        _fail(exc)
    if as_json:
        click.echo(_json_text(summary))
    else:
        _print_summary(summary)


def _is_pipeline_ref(model_name: str) -> bool:
    """A diffusers pipeline folder or Hub id, rather than a registered fastflow model."""
    from .plugins import get_plugins

    if model_name in get_plugins().registry("models"):
        return False
    from .diffusers_hook import looks_like_pipeline

    return looks_like_pipeline(model_name)


def _run_pipeline(model, prompt, policy, options, steps, seed, guidance, out_dir, state_path, compare,
                  negative_prompt, height, width, num_frames, image_path, dtype, device, backend, export_dir=None):
    model = model or DEFAULT_MODEL
    if prompt is None:
        raise UsageFailure(f"--model {model} is a diffusers pipeline: give a text with --prompt")
    if export_dir is not None and backend == "torch":
        from .export import read_export

        backend = read_export(export_dir).runtime_backend
    if backend != "torch":  # the pipeline's denoiser is replaced by the exported graph or engine
        if export_dir is None:
            raise UsageFailure(f"--backend {backend} with --prompt runs an exported denoiser: give --export DIR "
                               f"(make one with: fastflow export --backend onnx --model {model} --prompt ... --out DIR)")
        from .pipeline_backends import load_pipeline, swap_denoiser

        model, _ = load_pipeline(model, device=device or "cpu", dtype=dtype or "fp32")
        swap_denoiser(model, export_dir, backend=backend)
    from .plugins import get_plugins

    if isinstance(model, str) and model in get_plugins().registry("models"):  # a registered model, not a folder
        if model != "glyphs":
            raise UsageFailure(f"model '{model}' has no diffusers pipeline; drop --prompt (use --label)")
        from .demo.pipeline import glyph_pipeline

        try:  # the demo model as a diffusers pipeline: --prompt "A" draws the glyph A
            model = glyph_pipeline(device=device, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise UsageFailure(f"cannot load model 'glyphs': {exc}") from None
    from .diffusers_hook import run_pipeline

    return run_pipeline(model, prompt, policy=policy, policy_options=options, steps=steps, seed=seed,
                        guidance=guidance, out_dir=out_dir, state_path=state_path, compare=compare,
                        negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
                        image=image_path, dtype=dtype, device=device)


def _resolve_labels(spec, labels: tuple[str, ...], samples: int) -> list[int] | None:
    if not spec.num_labels:
        if labels:
            raise UsageFailure(f"model '{spec.name}' is unconditional; drop --label")
        return None
    names = {n.lower(): i for i, n in enumerate(spec.label_names)}
    chosen = []
    for lab in labels:
        if lab.lower() in names:
            chosen.append(names[lab.lower()])
        elif lab.lstrip("-").isdigit() and 0 <= int(lab) < spec.num_labels:
            chosen.append(int(lab))
        else:
            known = ", ".join(spec.label_names) if spec.label_names else f"0..{spec.num_labels - 1}"
            raise UsageFailure(f"unknown --label '{lab}' for model '{spec.name}'. Known labels: {known}")
    pool = chosen or list(range(spec.num_labels))
    return [pool[i % len(pool)] for i in range(samples)]


def _choose_state(policy_name, options, state_path, no_state, model_key, sched_key):
    """(state path, how it was chosen) for this run: the given path; else, for a policy
    that learns, a file in the user cache keyed to model, schedule and options."""
    import hashlib

    from .plugins import get_plugins
    from .policy import accepted_options

    learns = "state" in accepted_options(get_plugins().get("policies", policy_name).obj)
    if state_path is not None:
        if not learns:
            raise UsageFailure(f"policy '{policy_name}' keeps no learned state; drop --state")
        return state_path, "given"
    if no_state or not learns:
        return None, None
    ident = json.dumps([model_key, sched_key, sorted(options.items())], sort_keys=True)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(model_key))[:60]
    return str(user_cache_dir() / f"{policy_name}-{safe}-{digest}.json"), "cache"


def _run(model_name, backend_name, policy_name, options, steps, solver, shift, samples, batch_size, seed,
         labels, guidance, state_path, out_dir, compare, quiet, edit_path=None, strength=0.6, no_state=False):
    import fastflow
    from .models import resolve_model
    from .metrics import max_abs_error, psnr

    from .export import is_export, read_export

    export = None
    if is_export(model_name):  # an exported graph or engine: its metadata names the model
        export = read_export(model_name)
        spec = export.spec()
        if backend_name == "torch":
            backend_name = export.runtime_backend
        elif backend_name != export.runtime_backend:
            raise UsageFailure(f"{model_name} is a {export.runtime_backend} export; use --backend "
                               f"{export.runtime_backend} (or leave --backend out)")
    else:
        spec = resolve_model(model_name)
    edit = None
    if edit_path is not None:
        if not labels:
            raise UsageFailure("--edit needs --label: the class to edit the image into")
        if not 0 < strength <= 1:
            raise UsageFailure(f"--strength must be in (0, 1], got {strength}")
        edit = _read_image(edit_path, spec)
        samples = samples or len(labels)
    samples = samples or (spec.num_labels or 64)  # one per class by default
    shift = spec.default_shift if shift is None else shift
    model_key = export.key if export is not None else spec.key
    state_path, state_note = _choose_state(policy_name, options, state_path, no_state, model_key,
                                           schedule_key(solver, steps, shift, strength if edit is not None else None))
    if state_path is not None:
        check_writable(state_path)  # before any sampling: the run's learning must have somewhere to go
        options = {**options, "state": state_path}
    out = _check_out(out_dir)  # and so must its outputs
    pol = fastflow.get_policy(policy_name, **options)
    backend = fastflow.get_backend(backend_name)
    label_list = _resolve_labels(spec, labels, samples)
    guidance = spec.default_guidance if guidance is None else guidance
    if guidance is not None and spec.null_label is None:
        raise UsageFailure(f"model '{spec.name}' has no unconditional branch; drop --guidance")

    import torch

    try:
        model = export if export is not None else spec.build()
    except (OSError, ValueError) as exc:  # e.g. missing or damaged weights
        raise UsageFailure(f"cannot load model '{spec.name}': {exc}") from None
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((samples, *spec.shape), generator=gen)
    batches = [(i, min(i + batch_size, samples)) for i in range(0, samples, batch_size)]
    ref_path = _reference_path(model_key, schedule_key(solver, steps, shift, strength if edit is not None else None),
                               seed, samples, batch_size, label_list, guidance, backend_name,
                               None if edit is None else edit)
    cached_ref = _load_reference(ref_path, (samples, *spec.shape)) if compare else None
    jobs = [("policy", pol)] + ([("reference", "none")] if compare and cached_ref is None else [])

    outputs = {name: [] for name, _ in jobs}
    nfe = {name: [] for name, _ in jobs}
    wall = {name: 0.0 for name, _ in jobs}
    calibration = {name: 0 for name, _ in jobs}  # samples that computed every step to calibrate
    calls = {name: 0 for name, _ in jobs}
    show = sys.stderr.isatty() and not quiet
    say = (lambda msg: click.echo(f"fastflow: {msg}", err=True)) if not (show or quiet) else (lambda msg: None)
    say(f"sampling {samples} samples in {len(batches)} batch(es) of up to {batch_size}, {steps} steps, policy "
        f"{policy_name}" + ("" if not compare else ", beside the all-steps reference" if cached_ref is None
                            else "; the all-steps reference comes from the cache"))
    _warm_up(model, noise[:batch_size], spec, label_list, backend)
    started = time.perf_counter()
    with click.progressbar(length=len(batches) * len(jobs), label=f"sampling ({policy_name})",
                           file=sys.stderr if show else _Null(), show_pos=True) as bar:
        for b, (lo, hi) in enumerate(batches, 1):  # policy and reference interleaved: the same machine load
            if b > 1:
                spent = time.perf_counter() - started
                say(f"batch {b - 1}/{len(batches)} done in {spent:.0f} s; about {spent / (b - 1) * (len(batches) - b + 1):.0f} s left")
            for name, p in jobs:
                cond = {}
                if label_list is not None:
                    lab = torch.tensor(label_list[lo:hi])
                    cond["label"] = lab
                kwargs = {} if edit is None else {"init": edit.expand(hi - lo, *spec.shape), "strength": strength}
                if guidance is not None:
                    kwargs.update(guidance=guidance, uncond={"label": torch.full_like(lab, spec.null_label)})
                res = fastflow.sample(model, noise[lo:hi], steps=steps, policy=p, backend=backend,
                                      shift=shift, solver=solver, model_key=model_key, **kwargs, **cond)
                outputs[name].append(res.x)
                nfe[name].append(res.nfe_per_sample)
                calibration[name] += res.calibration_samples
                calls[name] += res.model_calls
                wall[name] += res.wall_seconds
                bar.update(1)
    if state_path is not None:
        pol.save(state_path)

    x = torch.cat(outputs["policy"])
    nfe_per_sample = [n for per_batch in nfe["policy"] for n in per_batch]
    nfe_mean = sum(nfe_per_sample) / len(nfe_per_sample)
    evals = calls["policy"]
    cal = calibration["policy"]
    steps_run = max(1, round(steps * strength)) if edit is not None else steps  # an edit runs the schedule's tail
    after = nfe_per_sample[cal:]
    summary = {
        "policy": policy_name,
        "policy_options": _jsonable(pol.options()),
        "backend": backend_name,
        "model": spec.name if export is None else str(model_name),
        "steps": steps,
        "solver": solver,
        "shift": shift,
        "samples": samples,
        "batch_size": batch_size,
        "seed": seed,
        "guidance": guidance,
        "nfe_mean": nfe_mean,
        "nfe_per_sample": nfe_per_sample,
        "nfe_min": min(nfe_per_sample),
        "nfe_max": max(nfe_per_sample),
        "nfe_full": steps_run,
        "model_calls": evals,
        "calibration_samples": cal,
        "calibration_nfe": sum(nfe_per_sample[:cal]),
        "nfe_mean_after_calibration": sum(after) / len(after) if after else None,
        "learned": pol.learned() if hasattr(pol, "learned") else None,
        "speedup_nfe": steps_run / nfe_mean,
        "wall_seconds": wall["policy"],
        "ms_per_eval": 1000.0 * wall["policy"] / max(evals, 1),
    }
    _clear_outputs(out)
    _save_tensor(out / "samples.npy", x)
    ref = None
    if compare:
        if cached_ref is None:
            ref = torch.cat(outputs["reference"])
            _store_reference(ref_path, ref)
        else:
            ref = cached_ref
        _save_tensor(out / "reference.npy", ref)
        data_range = spec.data_range
        summary.update({
            "psnr_db": _finite_or_none(psnr(x, ref, data_range)),
            "max_abs_error": max_abs_error(x, ref),
            "reference_cached": cached_ref is not None,
        })
        if cached_ref is None:  # timed here, interleaved batch by batch with the policy
            speedup = wall["reference"] / wall["policy"] if wall["policy"] > 0 else None
            summary.update({"reference_wall_seconds": wall["reference"], "speedup_wall": speedup})
            if speedup is not None and speedup > 1.1 * summary["speedup_nfe"]:
                summary["speedup_wall_note"] = ("noisy: above the NFE speed-up, which bounds it; the machine's load "
                                                "changed during the run")
        else:
            summary["speedup_wall_note"] = "not measured: the all-steps reference came from the cache"
    if spec.is_image:
        summary.update(_image_outputs(spec, x, ref if compare else None, label_list, out, edit, summary))
    summary.update(_metrics(spec, x, ref if compare else None, label_list))
    if state_path is not None:
        summary["state"] = str(state_path)
        summary["state_note"] = state_note
    summary["out"] = str(out)
    (out / "summary.json").write_text(_json_text(summary, indent=1))
    return summary


#: The files a run writes into --out; an earlier run's copies are removed first, so a
#: reused folder never holds one run's samples beside another run's reference.
RUN_OUTPUTS = ("samples.npy", "reference.npy", "summary.json", "grid.png", "before.png", "after.png",
               "after_reference.png")


def _check_out(out_dir) -> Path:
    """Prove, before any sampling, that --out can be written: create it (and any missing
    parents) and a file in it, then remove what the probe created."""
    import tempfile

    out = Path(out_dir)
    missing = [p for p in [out, *out.parents] if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".fastflow-write-test-"):
            pass
    except OSError as exc:
        raise UsageFailure(f"--out {out_dir} cannot be written ({exc.strerror or exc}); pass a writable folder") from None
    finally:
        for p in missing:  # deepest first
            try:
                p.rmdir()
            except OSError:
                pass
    return out


def _clear_outputs(out: Path) -> None:
    """Remove an earlier run's outputs (after sampling, so a failed run loses nothing)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_OUTPUTS:
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass


def _reference_path(*ident) -> Path:
    """Where the all-steps output of these exact inputs is cached (it is deterministic)."""
    import hashlib

    from . import __version__

    h = hashlib.sha256(__version__.encode())
    for part in ident:
        if hasattr(part, "numpy"):
            h.update(part.detach().cpu().numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return user_cache_dir() / "reference" / f"{h.hexdigest()[:24]}.npy"


def _load_reference(path: Path, shape):
    import numpy as np
    import torch

    try:
        arr = np.load(path)
    except (OSError, ValueError):
        return None  # absent or damaged: computed again (and rewritten)
    return torch.from_numpy(arr) if tuple(arr.shape) == tuple(shape) else None


def _store_reference(path: Path, x) -> None:
    import os
    import tempfile

    import numpy as np

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".ref-", suffix=".npy", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, x.detach().cpu().numpy())
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs time next run


def _read_image(path: str, spec):
    """An image file as a (1, C, H, W) tensor in [-1, 1]; exit 2 naming the file if it
    is missing, unreadable or not the model's size."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: keep its depth
                grey = np.asarray(im, dtype=np.float32)
                peak = 65535.0 if im.mode.startswith("I;16") or grey.max() > 255 else 255.0
                arr = np.repeat((grey / peak * 255.0)[..., None], 3, axis=2)
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    except FileNotFoundError:
        raise UsageFailure(f"--edit image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UsageFailure(f"--edit image {path} is not a readable image ({exc})") from None
    c, h, w = spec.shape
    if arr.shape != (h, w, c):
        raise UsageFailure(f"--edit image {path} is {arr.shape[1]}x{arr.shape[0]}; model '{spec.name}' "
                           f"needs {w}x{h} RGB")
    import torch

    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1.0


#: Fewer samples than this make a Fréchet distance noise, not a measurement.
FID_MIN_SAMPLES = 200


def _image_outputs(spec, x, ref, label_list, out: Path, edit, summary: dict) -> dict:
    """grid.png (every sample, accelerated above all-steps, titled and labelled) and the
    evaluator's metrics."""
    import torch

    from .demo.metrics import save_image_grid
    from .demo.sheet import comparison_sheet

    names = spec.label_names or []
    captions = [names[i] if i < len(names) else str(i) for i in label_list] if label_list is not None else None
    nfe, full = summary["nfe_mean"], summary["nfe_full"]
    title = (f"{spec.name}: policy {summary['policy']}, {nfe:.1f} of {full} evaluations per sample "
             f"({summary['speedup_nfe']:.2f}x fewer)")
    if summary.get("psnr_db") is not None:
        title += f", {summary['psnr_db']:.1f} dB vs all steps"
    comparison_sheet(str(out / "grid.png"), x, ref, title=title, captions=captions,
                     row_labels=(f"fastflow {summary['policy']}, {nfe:.1f} NFE", f"all {full} steps"))
    result = {"grid": str(out / "grid.png")}
    if edit is not None:
        save_image_grid(edit, str(out / "before.png"), nrow=1)
        save_image_grid(x, str(out / "after.png"), nrow=min(12, x.shape[0]))
        if ref is not None:
            save_image_grid(ref, str(out / "after_reference.png"), nrow=min(12, x.shape[0]))
    return result


def _metrics(spec, x, ref, label_list) -> dict:
    """The model's own evaluator (class accuracy; a feature FID only where the sample
    count makes it a measurement), on the samples and on the all-steps reference."""
    import torch

    if spec.evaluate is None or label_list is None:
        return {}
    labels = torch.tensor(label_list)
    metrics = spec.evaluate(x, labels)
    result = {"class_accuracy": metrics.get("class_accuracy")}
    if "fid_feature" in metrics:
        if x.shape[0] >= FID_MIN_SAMPLES:
            result["fid_feature"] = metrics["fid_feature"]
        else:
            result["fid_feature"] = None
            result["fid_note"] = f"not shown: a feature FID needs at least {FID_MIN_SAMPLES} samples"
    if ref is not None:
        result["class_accuracy_reference"] = spec.evaluate(ref, labels).get("class_accuracy")
    return result


def _warm_up(model, x, spec, label_list, backend) -> None:
    """One untimed evaluation, so lazy initialisation is not billed to the first policy."""
    import torch

    fn = backend.load(model, device=x.device)
    cond = {} if label_list is None else {"label": torch.tensor(label_list[: x.shape[0]])}
    with torch.inference_mode():
        fn(x, torch.ones(x.shape[0]), **cond)


def _finite_or_none(v: float):
    return v if math.isfinite(v) else None  # identical outputs: JSON has no inf


def _json_text(obj, indent=None) -> str:
    """Standard JSON: a non-finite number (which JSON cannot hold) becomes null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), indent=indent, allow_nan=False)


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v)) for k, v in d.items()}


def _save_tensor(path: Path, x) -> None:
    import numpy as np

    np.save(path, x.detach().cpu().numpy())


class _Null:
    def write(self, *_):
        pass

    def flush(self):
        pass

    def isatty(self):
        return False


def _print_summary(s: dict) -> None:
    """The human summary; it reads only what both the model and the pipeline runs write."""
    nfe = f"{s['nfe_mean']:.2f} of {s['nfe_full']}"
    if s.get("nfe_min") is not None and s["nfe_min"] != s["nfe_max"]:
        nfe += f" (min {s['nfe_min']}, max {s['nfe_max']})"
    rows = [
        ("model", s.get("model")), ("policy", s.get("policy")), ("backend", s.get("backend", "torch")),
        ("steps", s.get("steps")), ("samples" if "samples" in s else "pipeline calls", s.get("samples", s.get("runs"))),
        ("NFE per sample", nfe),
        ("speed-up (NFE)", f"{s['speedup_nfe']:.2f}x"),
    ]
    if s.get("calibration_samples"):
        after = s.get("nfe_mean_after_calibration")
        rows.append(("calibration", f"{s['calibration_samples']} sample(s) with every step computed "
                                    f"({s['calibration_nfe']} evaluations); the rest: "
                                    + (f"{after:.2f} NFE = {s['nfe_full'] / after:.2f}x" if after else "none")))
    if s.get("learned"):
        rows.append(("learned", s["learned"]))
    if s.get("wall_seconds") is not None:
        rows.append(("wall time", f"{s['wall_seconds']:.2f} s"))
    if s.get("ms_per_eval") is not None:
        rows.append(("ms per evaluation", f"{s['ms_per_eval']:.2f}"))
    if "psnr_db" in s:
        p = s["psnr_db"]
        if s.get("reference_wall_seconds") is not None:
            rows.append(("reference wall time", f"{s['reference_wall_seconds']:.2f} s"))
        if s.get("speedup_wall_note", "").startswith("noisy"):
            rows.append(("speed-up (wall)", f"{s['speedup_wall']:.2f}x — {s['speedup_wall_note']}"))
        elif s.get("speedup_wall") is not None:
            rows.append(("speed-up (wall)", f"{s['speedup_wall']:.2f}x (policy and reference timed batch by batch)"))
        elif s.get("speedup_wall_note"):
            rows.append(("speed-up (wall)", s["speedup_wall_note"]))
        rows.append(("PSNR vs all steps", "identical" if p is None else f"{p:.2f} dB (same seeds, every step computed)"))
        if s.get("max_abs_error") is not None:
            rows.append(("max abs error", f"{s['max_abs_error']:.3g}" + (
                " (largest pixel difference; images span -1..1)" if s.get("grid") else " (largest element difference)")))
    if s.get("class_accuracy") is not None:
        rows.append(("class accuracy", f"{s['class_accuracy']:.3f}" + (
            f" (all steps: {s['class_accuracy_reference']:.3f})" if "class_accuracy_reference" in s else "")
            + " (the model's evaluator agrees with the requested class)"))
        if s.get("fid_feature") is not None:
            rows.append(("feature FID", f"{s['fid_feature']:.3f} (to 1024 real glyphs; lower is better)"))
    if s.get("state"):
        rows.append(("state", s["state"] + (" (learning kept here; --no-state to start fresh)"
                                            if s.get("state_note") == "cache" else "")))
    if s.get("out"):
        rows.append(("outputs", s["out"]))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (scriptable).")
@click.pass_context
def plugins(ctx, as_json):
    """List plugins and what each registers (policies, backends, models, commands)."""
    from .plugins import get_plugins

    root = ctx.find_root().command
    if isinstance(root, PluginGroup):
        root._load_plugin_commands()  # so commands count in what each plugin registers
    rows = get_plugins().describe()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        what = "; ".join(f"{k}: {', '.join(v)}" for k, v in row["registers"].items() if v)
        missing = {n: r for n, r in row.get("available", {}).items() if r is not True}
        if missing:
            what += " (" + "; ".join(f"{n} unavailable: {r}" for n, r in missing.items()) + ")"
        origin = "built-in" if row["builtin"] else f"{row['distribution']} {row['version']}"
        click.echo(f"{row['name']} ({origin}) {what}")
        if "error" in row:
            click.echo(f"  error: {row['error']}")


@cli.command()
def policies():
    """List skip policies with their options and defaults."""
    from .plugins import get_plugins
    from .policy import accepted_options

    for name, entry in sorted(get_plugins().registry("policies").items()):
        click.echo(f"{name}: {entry.description} [{entry.plugin}]")
        try:  # the values a default-built policy really uses (a None in a signature may mean 50)
            real = entry.obj().options()
        except Exception:
            real = {}
        for opt, default in accepted_options(entry.obj).items():
            value = real.get(opt, default)
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            note = " (calibrated from the first sample)" if value is None and opt == "mu" else ""
            click.echo(f"    {opt} = {value!r}{note}")


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="fastflow")
    except FastFlowError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)

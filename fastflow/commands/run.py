"""``fastflow run``: sample a registered model, an export or a diffusers pipeline with a
skip policy, beside the all-steps reference (:mod:`fastflow.compare`)."""

from __future__ import annotations

import json
import math
import sys
import time

import click

from ..compare import comparison, cost, json_text, write_summary
from ..engine import SOLVERS, schedule_key
from ..errors import FastFlowError, UsageFailure
from ..modelspec import DEFAULT_MODEL, label_index
from ..precision import at_precision
from ..state import check_writable, user_cache_dir
from ..run_outputs import (NullStream, check_out, clear_outputs, picture_outputs, load_reference, model_metrics,
                           print_summary, read_image, reference_path, save_tensor, store_reference, warm_up)
from .options import RegistryOption, parse_options, state_option




@click.command()
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
@click.option("--solver", default="euler", show_default=True, type=click.Choice(SOLVERS),
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
@click.option("--dtype", default=None, type=click.Choice(["bf16", "fp16", "fp32"]),
              help="The network's precision. Registered models: it computes in this dtype while the sampler "
                   "keeps float32 (bf16 with --backend torch-compile is the fastest CPU path on AVX512-BF16 "
                   "or AMX; the reference runs in it too). Pipelines: the weights' dtype.")
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
    its all-steps twin (a clip as its frames in a row; the GMM's points as a scatter).
    Progress goes to stderr, so --json output stays clean.
    """
    options = parse_options(options)
    state_path = state_option(options, state_path, no_state)
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
                click.echo(json_text(summary))
            else:
                print_summary(summary)
            return
        summary = _run(model_name or DEFAULT_MODEL, backend, policy, options, steps,
                       solver, shift, samples, batch_size, seed, labels, guidance, state_path, out_dir,
                       compare, quiet=as_json, edit_path=edit_path, strength=strength, no_state=no_state,
                       dtype=dtype)
    except FastFlowError as exc:
        raise UsageFailure(str(exc)) from None
    if as_json:
        click.echo(json_text(summary))
    else:
        print_summary(summary)


def _is_pipeline_ref(model_name: str) -> bool:
    """A diffusers pipeline folder or Hub id, rather than a registered fastflow model."""
    from ..plugins import get_plugins

    if model_name in get_plugins().registry("models"):
        return False
    from ..pipeline_run import looks_like_pipeline

    return looks_like_pipeline(model_name)


def _run_pipeline(model, prompt, policy, options, steps, seed, guidance, out_dir, state_path, compare,
                  negative_prompt, height, width, num_frames, image_path, dtype, device, backend, export_dir=None):
    model = model or DEFAULT_MODEL
    if prompt is None:
        raise UsageFailure(f"--model {model} is a diffusers pipeline: give a text with --prompt")
    from ..artifact import read_export
    from ..pipeline_run import load_pipeline, run_pipeline

    if export_dir is not None and backend == "torch":
        backend = read_export(export_dir).runtime_backend
    if backend != "torch":  # the pipeline's denoiser is replaced by the exported graph or engine
        if export_dir is None:
            raise UsageFailure(f"--backend {backend} with --prompt runs an exported denoiser: give --export DIR "
                               f"(make one with: fastflow export --backend onnx --model {model} --prompt ... --out DIR)")
        from ..denoiser_swap import swap_denoiser

        model, _ = load_pipeline(model, device=device or "cpu", dtype=dtype or "fp32")
        swap_denoiser(model, export_dir, backend=backend)
    from ..plugins import get_plugins

    if isinstance(model, str) and model in get_plugins().registry("models"):  # a registered model, not a folder
        if model != "glyphs":
            raise UsageFailure(f"model '{model}' has no diffusers pipeline; drop --prompt (use --label)")
        model, _ = load_pipeline(model, device=device, dtype=dtype)  # --prompt "A" draws the glyph A
    return run_pipeline(model, prompt, policy=policy, policy_options=options, steps=steps, seed=seed,
                        guidance=guidance, out_dir=out_dir, state_path=state_path, compare=compare,
                        negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
                        image=image_path, dtype=dtype, device=device)


def _resolve_labels(spec, labels: tuple[str, ...], samples: int) -> list[int] | None:
    if not spec.num_labels:
        if labels:
            raise UsageFailure(f"model '{spec.name}' is unconditional; drop --label")
        return None
    chosen = []
    for lab in labels:
        try:
            chosen.append(label_index(spec, lab))
        except FastFlowError as exc:  # the same check as generate's --labels, named as this flag
            raise UsageFailure(str(exc).replace("unknown label", "unknown --label", 1)) from None
    pool = chosen or list(range(spec.num_labels))
    return [pool[i % len(pool)] for i in range(samples)]


def _choose_state(policy_name, options, state_path, no_state, model_key, sched_key):
    """(state path, how it was chosen) for this run: the given path; else, for a policy
    that learns, a file in the user cache keyed to model, schedule and options."""
    import hashlib

    from ..compare import keeps_state, state_format

    learns = keeps_state(policy_name)
    if state_path is not None:
        if not learns:
            raise UsageFailure(f"policy '{policy_name}' keeps no learned state; drop --state")
        return state_path, "given"
    if no_state or not learns:
        return None, None
    ident = [model_key, sched_key, sorted(options.items())]
    fmt = state_format(policy_name)
    ident = json.dumps(ident + ([fmt] if fmt is not None else []), sort_keys=True)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(model_key))[:60]
    return str(user_cache_dir() / f"{policy_name}-{safe}-{digest}.json"), "cache"


def _run(model_name, backend_name, policy_name, options, steps, solver, shift, samples, batch_size, seed,
         labels, guidance, state_path, out_dir, compare, quiet, edit_path=None, strength=0.6, no_state=False,
         dtype=None):
    import fastflow
    from ..models import resolve_model

    from ..export import is_export, read_export

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
        import os

        looks_like_path = os.sep in model_name or model_name.startswith((".", "~"))
        if looks_like_path and not os.path.isdir(os.path.expanduser(model_name)):
            raise UsageFailure(f"--model {model_name}: no such folder. --model takes a registered model name "
                               f"(the choices in fastflow run --help), a folder made by fastflow export, a "
                               f"folder of glyph-model weights, or a diffusers pipeline folder (with --prompt)")
        spec = resolve_model(model_name)
    lowered = dtype not in (None, "fp32")  # the network computes in bf16/fp16
    if lowered and (export is not None or backend_name not in ("torch", "torch-compile")):
        raise UsageFailure(f"--dtype {dtype} runs the PyTorch network in {dtype} (--backend torch or "
                           f"torch-compile); an export keeps the precision it was built with "
                           f"(fastflow export --precision)")
    edit = None
    if edit_path is not None:
        if not spec.is_image:
            raise UsageFailure(f"--edit takes an image, and model '{spec.name}' does not generate images "
                               f"(samples of shape {tuple(spec.shape)}); drop --edit, or use --model glyphs")
        if not labels:
            raise UsageFailure("--edit needs --label: the class to edit the image into")
        if not 0 < strength <= 1:
            raise UsageFailure(f"--strength must be in (0, 1], got {strength}")
        edit = read_image(edit_path, spec)
        samples = samples or len(labels)
    samples = samples or (spec.num_labels or 64)  # one per class by default
    shift = spec.default_shift if shift is None else shift
    model_key = export.key if export is not None else spec.key
    if lowered:  # its own learning and its own reference: the rounding is part of the model
        model_key = f"{model_key}@{dtype}"
    state_path, state_note = _choose_state(policy_name, options, state_path, no_state, model_key,
                                           schedule_key(solver, steps, shift, strength if edit is not None else None))
    if state_path is not None:
        check_writable(state_path)  # before any sampling: the run's learning must have somewhere to go
        options = {**options, "state": state_path}
    out = check_out(out_dir)  # and so must its outputs
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
    if lowered:
        if not isinstance(model, torch.nn.Module):
            raise UsageFailure(f"--dtype {dtype} converts a PyTorch network; model '{spec.name}' is not one "
                               f"(it computes in float32): drop --dtype")
        model = at_precision(model, dtype)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((samples, *spec.shape), generator=gen)
    batches = [(i, min(i + batch_size, samples)) for i in range(0, samples, batch_size)]
    ref_path = reference_path(model_key, schedule_key(solver, steps, shift, strength if edit is not None else None),
                               seed, samples, batch_size, label_list, guidance, backend_name,
                               None if edit is None else edit)
    cached_ref = load_reference(ref_path, (samples, *spec.shape)) if compare else None
    jobs = [("policy", pol)] + ([("reference", "none")] if compare and cached_ref is None else [])

    outputs = {name: [] for name, _ in jobs}
    nfe = {name: [] for name, _ in jobs}
    wall = {name: 0.0 for name, _ in jobs}
    calibration = {name: 0 for name, _ in jobs}  # samples that computed every step to calibrate
    calls = {name: 0 for name, _ in jobs}
    timings = {name: [] for name, _ in jobs}  # (wall, sample evaluations, which batch) of each batch
    timed = len(jobs) == 2  # the reference runs here, interleaved with the policy
    # a short run is timed again on its first batch, with the policy as it was before it
    snapshot = _snapshot(pol) if timed and len(batches) < REPEAT_BELOW_BATCHES else None
    show = sys.stderr.isatty() and not quiet
    say = (lambda msg: click.echo(f"fastflow: {msg}", err=True)) if not (show or quiet) else (lambda msg: None)
    say(f"loading {spec.name} on the {backend_name} backend")
    warmup_seconds = warm_up(model, noise[:batch_size], spec, label_list, backend)

    def sample_batch(p, lo, hi, n_steps=steps):
        cond, kwargs = {}, {} if edit is None else {"init": edit.expand(hi - lo, *spec.shape), "strength": strength}
        if label_list is not None:
            cond["label"] = lab = torch.tensor(label_list[lo:hi])
            if guidance is not None:
                kwargs.update(guidance=guidance, uncond={"label": torch.full_like(lab, spec.null_label)})
        return fastflow.sample(model, noise[lo:hi], steps=n_steps, policy=p, backend=backend,
                               shift=shift, solver=solver, model_key=model_key, **kwargs, **cond)

    # the estimate up front: two plain steps of the first batch price an evaluation; the
    # reference computes every step, a policy about a third of them (plus a calibration)
    # (on a terminal the progress bar shows its own ETA)
    if not (show or quiet):
        probe = sample_batch("none", *batches[0], n_steps=2)
        per_step = probe.wall_seconds / max(probe.model_calls, 1)
        all_rows = sum(hi - lo for lo, hi in batches) / (batches[0][1] - batches[0][0]) * per_step
        eta = all_rows * (steps / 3 + steps / batch_size + (steps if len(jobs) == 2 else 0))
        say(f"sampling {samples} samples in {len(batches)} batch(es) of up to {batch_size}, {steps} steps, policy "
            f"{policy_name}" + ("" if not compare else ", beside the all-steps reference" if cached_ref is None
                                else "; the all-steps reference comes from the cache") + f": about {eta:.0f} s")
    started = time.perf_counter()
    with click.progressbar(length=len(batches) * len(jobs), label=f"sampling ({policy_name})",
                           file=sys.stderr if show else NullStream(), show_pos=True) as bar:
        for b, (lo, hi) in enumerate(batches, 1):  # policy and reference interleaved: the same machine load
            if b > 1:
                spent = time.perf_counter() - started
                say(f"batch {b - 1}/{len(batches)} done in {spent:.0f} s; about {spent / (b - 1) * (len(batches) - b + 1):.0f} s left")
            for name, p in jobs:
                res = sample_batch(p, lo, hi)
                outputs[name].append(res.x)
                nfe[name].append(res.nfe_per_sample)
                calibration[name] += res.calibration_samples
                calls[name] += res.model_calls
                wall[name] += res.wall_seconds
                timings[name].append((res.wall_seconds, sum(res.nfe_per_sample), b))
                bar.update(1)
    if snapshot is not None and wall["policy"] + wall["reference"] < REPEAT_BELOW_SECONDS:
        lo, hi = batches[0]
        for _ in range(REPEAT_BELOW_BATCHES - len(batches)):  # the same work again, interleaved
            again = _snapshot(snapshot)
            if again is None:
                break
            for name, p in (("reference", "none"), ("policy", again)):
                res = sample_batch(p, lo, hi)
                timings[name].append((res.wall_seconds, sum(res.nfe_per_sample), 1))  # batch 1 again
    if state_path is not None:
        pol.save(state_path)

    x = torch.cat(outputs["policy"])
    nfe_per_sample = [n for per_batch in nfe["policy"] for n in per_batch]
    evals = calls["policy"]
    cal = calibration["policy"]
    steps_run = max(1, round(steps * strength)) if edit is not None else steps  # an edit runs the schedule's tail
    summary = {
        "policy": policy_name,
        "backend": backend_name,
        "dtype": dtype or ("fp32" if export is None else None),
        "model": spec.name if export is None else str(model_name),
        "steps": steps,
        "solver": solver,
        "shift": shift,
        "samples": samples,
        "batch_size": batch_size,
        "seed": seed,
        "guidance": guidance,
        **({"strength": strength} if edit is not None else {}),  # an edit runs the schedule's tail
        **cost(pol, nfe_per_sample, steps_run, model_calls=evals, calibration_samples=cal,
               wall_seconds=wall["policy"]),
        "backend_warmup_seconds": warmup_seconds,  # loading, compiling: before any timed evaluation
        "policy": policy_name,
    }
    clear_outputs(out)
    save_tensor(out / "samples.npy", x)
    ref = None
    if compare:
        if cached_ref is None:
            ref = torch.cat(outputs["reference"])
            store_reference(ref_path, ref)
        else:
            ref = cached_ref
        save_tensor(out / "reference.npy", ref)
        # the reference is timed here, interleaved batch by batch with the policy, unless cached
        summary.update(comparison(x, ref, spec.data_range, speedup_nfe=summary["speedup_nfe"],
                                  wall_seconds=wall["policy"],
                                  reference_wall_seconds=None if cached_ref is not None else wall["reference"],
                                  timings=[(rw, pw, rn, pn, b) for (pw, pn, b), (rw, rn, _)
                                           in zip(timings["policy"], timings.get("reference", []))]))
        summary["reference_cached"] = cached_ref is not None
    summary.update(picture_outputs(spec, x, ref if compare else None, label_list, out, edit, summary))
    summary.update(model_metrics(spec, x, ref if compare else None, label_list))
    return write_summary(out, summary, state=state_path, state_note=state_note)


#: runs of fewer batches are timed again on their first batch, to this many timings ...
REPEAT_BELOW_BATCHES = 3
#: ... when policy and reference took less than this together (seconds); a timing is
#: (seconds, sample evaluations) of a batch
REPEAT_BELOW_SECONDS = 20.0


def _snapshot(policy):
    """A copy of the policy that decides as it does now (None if it cannot be copied)."""
    import copy

    try:
        return copy.deepcopy(policy)
    except Exception:
        return None

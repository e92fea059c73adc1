"""``fastflow generate``: dataset-scale generation, in this process or on Ray
(fastflow/generate.py, fastflow/ray_generate.py; docs/scale-out.md)."""

from __future__ import annotations

import json
import math

import click

from .commands.options import parse_options
from .engine import SOLVERS
from .errors import UsageFailure
from .hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    @cli.command()
    @click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
                  help="Folder for images/, manifest/ and metadata.parquet; re-running the same command resumes it.")
    @click.option("--model", "model_name", default="glyphs", show_default=True, metavar="NAME",
                  help="Registered model (`fastflow plugins` lists them) or a glyph-weights folder.")
    @click.option("--labels", "label_spec", default=None, metavar="SPEC",
                  help="Labels to cycle through, e.g. 0-9,A-Z (names, indices, FIRST-LAST ranges); default: all.")
    @click.option("--samples", default=None, type=click.IntRange(min=1),
                  help="Number of images (default: one per label).")
    @click.option("--jobs", "jobs_file", default=None, type=click.Path(dir_okay=False),
                  help='JSONL, one job per line: {"label": "A", "seed": 7, "id": "optional"}.')
    @click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False),
                  help="Text file, one prompt per line: --model is then a diffusers pipeline (a folder or Hub id; "
                       "'glyphs': the embedded glyph pipeline) accelerated with fastflow.enable.")
    @click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**62),
                  help="Seed of the first job with --labels (job i has seed SEED+i).")
    @click.option("--policy", default="ucb", show_default=True, help="Skip policy; `fastflow policies` lists them.")
    @click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Policy option, repeatable.")
    @click.option("--backend", default="torch", show_default=True, help="Velocity backend.")
    @click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1, max=10_000))
    @click.option("--solver", default="euler", show_default=True, type=click.Choice(SOLVERS))
    @click.option("--shift", default=None, type=click.FloatRange(min=0, min_open=True),
                  help="Schedule shift (default: the model's).")
    @click.option("--guidance", default=None, type=float, help="Classifier-free guidance (default: the model's).")
    @click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
                  help="Images per model call; also the unit of commit (a crash loses at most one batch).")
    @click.option("--state", "state_path", default=None, type=click.Path(dir_okay=False),
                  help="Policy state file: learning loaded from it, and the (merged) learning saved to it.")
    @click.option("--ray", "ray_address", default=None, metavar="local|ADDRESS",
                  help="Run on Ray: 'local' starts a cluster here, an address (ray://host:10001, auto) joins one.")
    @click.option("--workers", default=None, type=click.IntRange(min=1),
                  help="With --ray: worker processes (one model each; one GPU each where there are GPUs). Default 2.")
    @click.option("--threads", default=None, type=click.IntRange(min=1),
                  help="Torch threads per worker (with --ray, default 1) or of this process.")
    @click.option("--sync-every", default=1, show_default=True, type=click.IntRange(min=1),
                  help="With --ray: batches between absorbing the merged learning.")
    @click.option("--share/--no-share", default=True, show_default=True,
                  help="With --ray: pool the workers' learning (--no-share: each worker learns alone).")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
    def generate(out_dir, model_name, label_spec, samples, jobs_file, prompts_file, seed, policy, options, backend, steps, solver,
                 shift, guidance, batch_size, state_path, ray_address, workers, threads, sync_every, share, as_json):
        """Generate a data set: every image a PNG, a metadata.parquet row per image.

        \b
        Examples:
          fastflow generate --out glyph-set --labels 0-9,A-Z --samples 360
          fastflow generate --out glyph-set --jobs jobs.jsonl --state ucb.json
          fastflow generate --out glyph-set --samples 10000 --ray local --workers 2
          fastflow generate --out /shared/set --samples 1000000 --ray auto --workers 8

        Batches are committed as they finish (files written, then a manifest entry); the
        same command again skips what is done. With --ray, the workers' policies pool
        what they learn through a merge actor; the merged learning goes to --state.
        """
        from .errors import FastFlowError

        opts = parse_options(options)
        if "state" in opts:
            raise UsageFailure("give the state file as --state PATH, not --option state=...")
        if ray_address is None and workers is not None:
            raise UsageFailure("--workers needs --ray (e.g. --ray local --workers 2); without --ray "
                                     "everything runs in this process")
        if ray_address is None and (sync_every != 1 or not share):
            raise UsageFailure("--sync-every and --no-share need --ray: they set how workers merge learning")
        if jobs_file is not None and (label_spec is not None or samples is not None or prompts_file is not None):
            raise UsageFailure("--jobs lists every job; drop --labels/--samples/--prompts (or drop --jobs)")
        if prompts_file is not None and label_spec is not None:
            raise UsageFailure("--prompts and --labels exclude each other: a pipeline takes prompts, "
                                     "a registered model labels")
        if guidance is not None and not math.isfinite(guidance):
            raise UsageFailure(f"--guidance must be a finite number, got {guidance}")
        try:
            summary = _generate(out_dir, model_name, label_spec, samples, jobs_file, prompts_file, seed, policy, opts, backend,
                                steps, solver, shift, guidance, batch_size, state_path, ray_address, workers,
                                threads, sync_every, share, as_json)
        except FastFlowError as exc:
            raise UsageFailure(str(exc)) from None
        if as_json:
            click.echo(json.dumps(summary, allow_nan=False, default=str))
        else:
            from .generate import summary_lines

            for line in summary_lines(summary):
                click.echo(line)


def _generate(out_dir, model_name, label_spec, samples, jobs_file, prompts_file, seed, policy, opts, backend, steps, solver,
              shift, guidance, batch_size, state_path, ray_address, workers, threads, sync_every, share, quiet):
    import fastflow
    from .generate import Settings, prepare_out, require_pyarrow, run_in_process
    from .generate_jobs import check_ids, label_jobs, parse_labels, read_jobs
    from .state import check_writable

    if ray_address is not None:
        from .ray_generate import require_ray

        require_ray()  # before any work: the pip command if Ray is missing
    require_pyarrow()
    settings = Settings(model=model_name, policy=policy, options=opts, backend=backend, steps=steps, solver=solver,
                        shift=shift, guidance=guidance, batch_size=batch_size, state=state_path,
                        pipeline=prompts_file is not None)
    spec = settings.spec()
    if not settings.pipeline and guidance is not None and spec.null_label is None:
        raise UsageFailure(f"model '{spec.name}' has no unconditional branch; drop --guidance")
    if settings.pipeline:
        from .generate_pipeline import prompt_jobs, read_prompts

        if backend != "torch" or solver != "euler" or shift is not None:
            raise UsageFailure("with --prompts the pipeline's own scheduler and denoiser run: drop "
                                     "--backend/--solver/--shift")
        prompts = read_prompts(prompts_file)
        jobs = prompt_jobs(prompts, samples or len(prompts), seed)
        source = f"--prompts {prompts_file}"
    elif jobs_file is not None:
        jobs = read_jobs(jobs_file, spec)
        source = f"--jobs {jobs_file}"
    else:
        labels = parse_labels(spec, label_spec) if label_spec is not None else None
        n = samples or (len(labels) if labels else spec.num_labels or 64)
        jobs = label_jobs(spec, labels, n, seed)
        source = "--labels/--seed"
    check_ids(jobs, source)
    fastflow.get_policy(policy, **opts)  # unknown policies and options fail here, before any work
    fastflow.get_backend(backend)
    if state_path is not None:
        check_writable(state_path)
    prepare_out(out_dir, settings.identity(spec))
    say = (lambda msg: click.echo(f"fastflow: {msg}", err=True))
    if ray_address is None:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        from .generate_pipeline import make_step

        return run_in_process(settings, jobs, out_dir, say=say, make_step=make_step)
    from .ray_generate import run_on_ray

    return run_on_ray(settings, jobs, out_dir, address=ray_address, workers=workers or 2, threads=threads or 1,
                      sync_every=sync_every, share=share, say=say)

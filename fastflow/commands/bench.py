"""``fastflow bench``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..bench import format_table, run_bench
from ..errors import FastFlowError, UsageFailure
from ..hookspecs import hookimpl
from ..modelspec import DEFAULT_MODEL


@hookimpl
def register_commands(cli):
    @cli.command()
    @click.option("--model", "model_name", default=None, help="Registered model (default: the run default).")
    @click.option("--samples", default=256, show_default=True, type=click.IntRange(min=1),
                  help="Measured samples per method (the same seeds for every method).")
    @click.option("--steps", default=50, show_default=True, type=click.IntRange(min=4),
                  help="Steps of the full schedule every method is compared with.")
    @click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
                  help="Samples per model call.")
    @click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1),
                  help="Seed of the measured noise (warm-up seeds are derived from it).")
    @click.option("--methods", default=None, metavar="A,B",
                  help="Only these methods or families (e.g. euler,unipc,ucb,planned,fbcache).")
    @click.option("--quick", is_flag=True, help="One setting per method, fewer warm-up samples (--samples 8: about 1.5 min on 2 CPU cores; it prints an estimate first).")
    @click.option("--ode-steps", default=100, show_default=True, type=click.IntRange(min=10),
                  help="UniPC steps of the high-accuracy reference (cached).")
    @click.option("--out", "out_dir", default="bench-out", show_default=True, type=click.Path(file_okay=False))
    @click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                  help="Where the high-accuracy reference is cached (default: ~/.cache/fastflow).")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
    def bench(model_name, samples, steps, batch_size, seed, methods, quick, ode_steps, out_dir, cache_dir, as_json):
        """Compare every method on the same seeds: NFE, wall time, fidelity, accuracy.

        \b
        Writes bench.json, bench.csv, pareto.png and learning.png under --out.
        Examples:
          fastflow bench                          # the full sweep (minutes on a CPU)
          fastflow bench --quick --samples 16     # a smoke run
          fastflow bench --methods euler,ucb,planned --samples 64
        """

        selected = {m.strip() for m in methods.split(",") if m.strip()} if methods else None
        err = click.echo if not as_json else (lambda msg: click.echo(msg, err=True))
        try:
            result = run_bench(model_name=model_name or DEFAULT_MODEL, samples=samples, steps=steps,
                               batch_size=batch_size, seed=seed, methods=selected, quick=quick,
                               out_dir=Path(out_dir), ode_steps=ode_steps,
                               cache_dir=Path(cache_dir or os.path.expanduser("~/.cache/fastflow")),
                               progress=lambda m: click.echo(m, err=True))
        except FastFlowError as exc:
            raise UsageFailure(str(exc)) from None
        if as_json:
            click.echo(json.dumps(result))
        else:
            err(format_table(result))
            plots = "pareto.png, learning.png" if (Path(out_dir) / "learning.png").exists() else \
                "pareto.png (no learning.png: learning over batches needs at least 2 batches)"
            err(f"\nwrote {out_dir}/bench.json, bench.csv, {plots}")

"""The ``fastflow`` command line."""

from __future__ import annotations

import json
import sys

import click

from .commands.run import run
from .errors import FastFlowError


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


cli.add_command(run)  # the card's command is the CLI's own; the others come through register_commands


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

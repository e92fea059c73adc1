"""Command-line options the commands share: ``--option KEY=VALUE`` pairs, ``--state``
and ``--no-state``, and choices listed from the registries."""

from __future__ import annotations


import click

from ..errors import UsageFailure


def parse_options(pairs: tuple[str, ...]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageFailure(f"--option expects KEY=VALUE (e.g. --option skip=3), got '{pair}'")
        if key.strip() in options:
            raise UsageFailure(f"--option {key.strip()} is given twice; give each option once")
        options[key.strip()] = value.strip()
    return options


def state_option(options: dict, state_path, no_state: bool):
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
        from ..plugins import get_plugins

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

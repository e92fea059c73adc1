"""The extension points of fastflow.

Every hook receives a ``register`` callback instead of returning values, so the host
owns duplicate detection, aliases and error messages (the same design as ``llm``).
Built-in backends, policies and models register through exactly these hooks.
An implementation may accept fewer arguments than its spec (pluggy allows this), so
specs can grow without breaking plugins.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("fastflow")
hookimpl = pluggy.HookimplMarker("fastflow")


@hookspec
def register_policies(register: Callable[..., None]) -> None:
    """Register skip policies.

    Call ``register(name, factory, description="...")`` once per policy. ``factory``
    is called with the user's options as keyword arguments (``--option KEY=VALUE`` on
    the command line, ``fastflow.get_policy(name, **options)`` in Python) and must
    return an object that implements :class:`fastflow.policy.Policy` (subclassing it
    gives the common options ``window_start``, ``window_end`` and ``warmup`` for
    free). Invalid options raise :class:`fastflow.errors.OptionError`.
    """


@hookspec
def register_backends(register: Callable[..., None]) -> None:
    """Register velocity backends.

    Call ``register(name, factory, description="...", requires="pip install ...")``
    once per backend. ``factory()`` returns an object with
    ``load(model, device=None, dtype=None) -> callable(x, t, **conditioning) -> v`` and
    ``available() -> (bool, reason)``. ``requires`` is the install command printed
    when the backend's optional dependencies are missing.
    """


@hookspec
def register_models(register: Callable[..., None]) -> None:
    """Register named models that ``fastflow run --model NAME`` can load.

    Call ``register(spec)`` with a :class:`fastflow.models.ModelSpec`: its name, a
    ``build()`` that returns the velocity model, the sample shape, the number of class
    labels and the null label for classifier-free guidance.
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add commands to the ``fastflow`` command line.

    ``cli`` is the top-level :class:`click.Group`; decorate new commands with
    ``@cli.command()``.
    """

"""fastflow: skip network evaluations in flow-matching samplers.

>>> import torch, fastflow
>>> policy = fastflow.get_policy("fixed", skip=2)
>>> out = fastflow.sample(lambda x, t: x * 0 + 1.0, torch.zeros(1, 2), steps=8, policy=policy)
>>> out.x.tolist(), out.nfe
([[-1.0, -1.0]], 4)

Importing fastflow is cheap: torch and friends load when first needed.
"""

from __future__ import annotations

from typing import Any

from .errors import FastFlowError, OptionError, UnknownNameError
from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "sample", "get_policy", "get_backend", "get_model", "enable", "disable", "hookimpl", "Policy", "PolicyRun",
    "FastFlowError", "OptionError", "UnknownNameError", "__version__",
]


def get_policy(name: str, **options: Any):
    """A new policy object by registered name, built with ``options``.

    Unknown names raise :class:`UnknownNameError` (with a did-you-mean); unknown or
    invalid options raise :class:`OptionError` naming the option and what it accepts.
    """
    from .plugins import get_plugins
    from .policy import accepted_options

    if not isinstance(name, str):
        raise OptionError(f"policy name must be a string such as 'ucb' or 'none', got {name!r}")
    entry = get_plugins().get("policies", name)
    accepted = accepted_options(entry.obj)
    unknown = sorted(set(options) - set(accepted)) if accepted else []
    if unknown:
        import difflib

        listing = ", ".join(f"{k}={v!r}" for k, v in accepted.items())
        close = difflib.get_close_matches(unknown[0], list(accepted), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise OptionError(f"policy '{name}' has no option {', '.join(unknown)}.{hint} Its options: {listing}")
    return entry.obj(**options)


def get_backend(name: str):
    """A backend object by registered name; fails with the pip command if unavailable."""
    from .errors import MissingDependencyError
    from .plugins import get_plugins

    entry = get_plugins().get("backends", name)
    backend = entry.obj()
    ok, reason = backend.available()
    if not ok:
        requires = entry.extra.get("requires")
        hint = f" Install it with: {requires}" if requires else ""
        raise MissingDependencyError(f"backend '{name}' is not available: {reason}.{hint}")
    return backend


def get_model(name: str):
    """The :class:`fastflow.models.ModelSpec` registered under ``name``."""
    from .plugins import get_plugins

    return get_plugins().get("models", name).obj


def sample(model, noise, **kwargs):  # noqa: D103 (documented in engine)
    """See :func:`fastflow.engine.sample`."""
    from .engine import sample as _sample

    return _sample(model, noise, **kwargs)


def enable(pipe, policy: Any = "ucb", **options):
    """Accelerate a diffusers pipeline in place; returns a handle (``.summary()``).

    >>> handle = fastflow.enable(pipe, policy="ucb")       # doctest: +SKIP
    >>> image = pipe("a cat", num_inference_steps=50).images[0]   # doctest: +SKIP
    >>> print(handle.summary())                            # doctest: +SKIP

    See :func:`fastflow.diffusers_hook.enable` and docs/diffusers.md.
    """
    from .diffusers_hook import enable as _enable

    return _enable(pipe, policy, **options)


def disable(pipe):
    """Remove fastflow from a pipeline; it is exactly as before :func:`enable`."""
    from .diffusers_hook import disable as _disable

    return _disable(pipe)


def __getattr__(name: str):
    if name in ("Policy", "PolicyRun", "SampleContext", "History"):
        from . import policy

        return getattr(policy, name)
    if name in ("SampleResult", "Step"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'fastflow' has no attribute {name!r}")

"""Plug-and-play FastFlow for diffusers pipelines: ``fastflow.enable(pipe, policy=...)``.

The pipeline keeps its own scheduler loop. A :class:`diffusers.hooks.ModelHook` on the
denoiser (``pipe.transformer``, ``pipe.transformer_2`` where present, or ``pipe.unet``)
decides at every call whether to run the network or to return the extrapolated output

    v̂(t) = v_k + (t − t_k) · (v_k − v_p) / (t_k − t_p)

from the last two **true** outputs of the same branch (the engine's estimator, on the
scheduler's sigma axis, in the denoiser's output space). The step index comes from the
scheduler (``step_index`` / ``begin_index``), the time axis from ``scheduler.sigmas``:
read once per pipeline call, so the hook adds no device→host transfer per step.

Branches (the conditional and unconditional passes of classifier-free guidance) keep
separate histories, keyed by diffusers' ``cache_context`` name when the pipeline sets
one, else by call order within the step; one decision covers every branch of a step,
so the scheduler always sees a consistent step. Per-call state is reset between
pipeline calls; the policy object (and what it learned) is kept.

Running a pipeline beside its unhooked self and reporting it is
:mod:`fastflow.pipeline_run`'s job; torch and diffusers are imported inside functions,
so ``import fastflow`` stays light.
"""

from __future__ import annotations

import functools
from typing import Any

from .diffusers_handle import HOOK_NAME, FastFlowHandle, PipelineCall, remove_hook
from .diffusers_rows import Gather, gather, main_tensor
from .errors import FastFlowError, OptionError

DENOISER_ATTRS = ("transformer", "transformer_2", "unet")

__all__ = ["enable", "disable", "get_handle", "FastFlowHandle", "PipelineCall", "HOOK_NAME"]


# -- the diffusers hook ----------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _hook_class():
    import torch
    from diffusers.hooks import ModelHook
    from diffusers.hooks.hooks import BaseState, StateManager

    _before = torch.compiler.disable(FastFlowHandle._before)
    _after = torch.compiler.disable(FastFlowHandle._after)

    class _NoState(BaseState):
        def reset(self, *args, **kwargs):
            pass

    class FastFlowHook(ModelHook):
        """Runs the denoiser or returns the extrapolated output; the decision is the handle's.

        Stateful (in diffusers' sense) so that ``cache_context`` names reach it and the
        pipeline's end-of-call reset (``maybe_free_model_hooks``) closes the call.
        """

        _is_stateful = True

        def __init__(self, handle: FastFlowHandle, tag: str = ""):
            super().__init__()
            self.handle = handle
            self.tag = tag  # prefixes history keys: "" for the first denoiser, "transformer_2:" ...
            self.state_manager = StateManager(_NoState)  # receives the cache context

        def context_name(self):
            sm = self.state_manager
            ctx = getattr(sm, "_context", None)
            if ctx is None:
                ctx = getattr(sm, "_current_context", None)  # diffusers < 0.42: the name itself
            return getattr(ctx, "name", ctx)

        def new_forward(self, module, *args, **kwargs):
            out = _before(self.handle, self)
            forward = self.fn_ref.original_forward
            if isinstance(out, Gather):  # per-sample decisions: only the rows that compute
                sub_args, sub_kwargs = gather(args, kwargs, out.index, out.batch)
                rows, problem = len(out.index), None
                try:
                    sub_out = forward(*sub_args, **sub_kwargs)
                    got = main_tensor(sub_out).shape[0]
                    if got != rows:
                        problem = f"it returned {got} rows"
                except (RuntimeError, ValueError) as exc:
                    problem = f"it failed ({exc})"
                if problem is not None:
                    self.handle._pending_call = None
                    raise FastFlowError(
                        f"per-sample decisions ran {type(module).__name__} on {rows} of {out.batch} rows and "
                        f"{problem}: an input that is per row was not recognised as such. "
                        f"Give the policy per_sample=false to decide per batch")
                return _after(self.handle, sub_out, None)
            if out is not None:
                return out

            def rerun(e):
                """The denoiser once more at its main input + e (a calibration's probe);
                None where that input is not of the output's shape."""
                x = kwargs.get("hidden_states", args[0] if args else None)
                if not torch.is_tensor(x) or tuple(x.shape) != tuple(e.shape):
                    return None
                x = x + e.to(x.dtype)
                if "hidden_states" in kwargs:
                    return forward(*args, **{**kwargs, "hidden_states": x})
                return forward(x, *args[1:], **kwargs)

            return _after(self.handle, forward(*args, **kwargs), rerun)

        def reset_state(self, module):
            self.handle._end_of_call()
            self.state_manager.reset()
            return module

        def __repr__(self):
            return f"FastFlowHook(policy={self.handle.policy_name})"

    return FastFlowHook




# -- enable / disable --------------------------------------------------------------------

def _denoisers(pipe, which=None) -> dict:
    import torch

    names = DENOISER_ATTRS if which is None else tuple([which] if isinstance(which, str) else which)
    found = {}
    for name in names:
        mod = getattr(pipe, name, None)
        if isinstance(mod, torch.nn.Module):
            found[name] = mod
    if "transformer" in found and "unet" in found and which is None:
        found.pop("unet")  # the transformer is the denoiser (e.g. prior/decoder pipelines keep a unet aside)
    return found


def get_handle(pipe) -> FastFlowHandle | None:
    """The active :class:`FastFlowHandle` on ``pipe``, if fastflow is enabled on it."""
    import torch

    for name in DENOISER_ATTRS:
        mod = getattr(pipe, name, None)
        if isinstance(mod, torch.nn.Module):
            registry = getattr(mod, "_diffusers_hook", None)
            hook = registry.get_hook(HOOK_NAME) if registry is not None else None
            if hook is not None:
                return hook.handle
    return None


def enable(pipe, policy: Any = "ucb", *, denoisers=None, model_key: str | None = None,
           schedule_key: str | None = None, autosave: bool = True, **policy_options) -> FastFlowHandle:
    """Accelerate a diffusers pipeline: skip denoiser calls the policy deems safe.

    Args:
        pipe: a diffusers pipeline whose denoiser is ``pipe.transformer`` (and
            ``pipe.transformer_2``, e.g. Wan 2.2) or ``pipe.unet``.
        policy: a policy name (``"ucb"``, ``"fixed"``, ``"threshold"``, ``"none"``, a
            plugin's) or a policy object; the same object keeps learning across calls.
        denoisers: attribute name(s) of the modules to hook (default: found automatically).
        model_key, schedule_key: identify model and schedule in policy state files
            (defaults: the denoiser class and pipeline name; the scheduler class, the
            step count and a digest of its sigmas).
        autosave: save the policy after every complete call when it has a ``state`` file.
        **policy_options: options for a policy given by name (e.g. ``skip=2``,
            ``state="ucb.json"``).

    Returns:
        a :class:`FastFlowHandle` (``.summary()``, ``.to_dict()``, ``.policy``).

    Enabling again on the same pipeline replaces the previous hooks (never stacks two).
    """
    from .engine import resolve_policy

    pol = resolve_policy(policy, **policy_options)
    mods = _denoisers(pipe, denoisers)
    if not mods:
        raise OptionError(
            f"{type(pipe).__name__} has no denoiser to hook: expected a torch module at "
            f"{' or '.join('pipe.' + n for n in DENOISER_ATTRS)}"
            + (f" (asked for {denoisers!r})" if denoisers is not None else "")
        )
    if not hasattr(pipe, "scheduler"):
        raise OptionError(f"{type(pipe).__name__} has no scheduler; fastflow needs the pipeline's scheduler")
    disable(pipe)  # replacement, never a double hook
    from diffusers.hooks import HookRegistry

    handle = FastFlowHandle(pipe, pol, mods, model_key=model_key, schedule_key=schedule_key, autosave=autosave)
    cls = _hook_class()
    try:
        for i, (name, mod) in enumerate(mods.items()):
            had_forward = "forward" in vars(mod)
            had_registry = hasattr(mod, "_diffusers_hook")
            HookRegistry.check_if_exists_or_initialize(mod).register_hook(cls(handle, "" if i == 0 else f"{name}:"), HOOK_NAME)
            handle._restore[name] = (had_forward, had_registry)
    except Exception:
        handle.remove()
        raise
    return handle


def disable(pipe) -> FastFlowHandle | None:
    """Remove fastflow from ``pipe``; returns the removed handle (its records stay readable)."""
    import torch

    handle = get_handle(pipe)
    if handle is not None:
        handle.remove()
    # hooks of a handle whose modules were swapped on the pipeline since: remove them too
    for name in DENOISER_ATTRS:
        mod = getattr(pipe, name, None)
        if isinstance(mod, torch.nn.Module):
            registry = getattr(mod, "_diffusers_hook", None)
            if registry is not None and registry.get_hook(HOOK_NAME) is not None:
                registry.get_hook(HOOK_NAME).handle.remove()
                remove_hook(mod, True, True)
    return handle

"""diffusers' own caching methods, run on the same transformer and seeds as fastflow's
skip policies, as comparison baselines for ``fastflow bench``.

Three methods of ``diffusers.hooks`` are wrapped, each applied to ``model.transformer``
(a diffusers ``ModelMixin`` with ``CacheMixin``) for one sampling run and removed again:

* ``"fbcache"`` — FirstBlockCache: the first block always runs; when its residual changed
  by less than ``threshold`` (relative abs-mean) since the last full pass, the other
  blocks are skipped and their cached residual is added.
* ``"taylorseer"`` — TaylorSeer: hooked modules run fully every ``cache_interval`` steps
  (and for the first ``disable_cache_before_step`` steps); in between their outputs are
  predicted by a Taylor expansion (order ``max_order``) in the step index. Which modules
  are hooked is the ``scope`` of the setting: ``"attention"`` (diffusers' default: the
  ``attn`` module of every block; the MLPs and norms still run), ``"blocks"`` (every
  whole block) or ``"lite"`` (diffusers' ``use_lite_mode``: the blocks are skipped, the
  final ``proj_out`` is predicted).
* ``"magcache"`` — MagCache: skips all blocks (re-using the last residual) while the
  accumulated error predicted from the per-step magnitude ratios stays below
  ``threshold``. The ratios are calibrated first with MagCache's own calibration mode on
  a separate batch (:func:`calibrate_magcache`).

Sampling is exactly ``fastflow.sample(model, noise, steps=steps, policy="none",
guidance=g, uncond={"label": null}, label=labels)`` (plain Euler on the uniform
schedule; classifier-free guidance as one call on the doubled batch [cond, uncond])
with the hooks in place, so a cache that never skips reproduces it bit for bit.

Cost accounting: every ``nn.Linear`` inside ``transformer_blocks`` and
``single_transformer_blocks`` has a forward pre-hook that adds its multiply-accumulates
(MACs) to its block. A Linear's ``__call__`` only happens when the block's code really
runs (diffusers' cache hooks replace ``forward`` of the block or of its ``attn``, the
leaves are never hooked), so skipped work is not counted. A block execution counts as
``executed MACs / MACs of that block in a full pass`` (1 when it ran fully, 0 when it was
skipped, a fraction when only its attention was), and

    nfe = Σ (block executions) / number of blocks / samples-per-call normalisation

i.e. the number of full model evaluations per sample. A guided call counts once (as in
fastflow). Not counted: the attention-score matmuls (a few % at this token count) and
the layers outside the blocks (embedders, final norm and projection), which every
transformer call runs whatever the cache does; ``calls`` reports those calls.

Diffusers is imported inside the functions: ``import fastflow.baselines`` stays cheap.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from .errors import OptionError

METHODS = ("fbcache", "taylorseer", "magcache")

#: accepted setting keys per method (the defaults are diffusers' unless stated)
SETTING_KEYS: dict[str, tuple[str, ...]] = {
    "fbcache": ("threshold",),
    "taylorseer": ("cache_interval", "max_order", "disable_cache_before_step",
                   "disable_cache_after_step", "taylor_factors_dtype", "scope"),
    "magcache": ("threshold", "max_skip_steps", "retention_ratio"),
}

#: the block lists of a FLUX-style transformer whose work is counted
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")

#: TaylorSeer module patterns (``re.fullmatch`` on module names) per ``scope``
_TAYLORSEER_BLOCK_PATTERNS = [r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"]


@dataclass
class CachedResult:
    x: Any  # final samples, shape of the noise
    nfe: float  # effective full model evaluations per sample (block work / one full pass)
    calls: int  # transformer calls per sample (a guided, doubled-batch call counts once)
    wall_seconds: float  # the sampling loop only (hook setup and calibration excluded)
    method: str = ""
    setting: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return int(self.info.get("steps", 0))


def default_settings(quick: bool = False) -> list[tuple[str, dict, str]]:
    """(method, setting, label) sweeps from light to aggressive caching; when ``quick``,
    the one peer at the quick bench's budget (TaylorSeer, the strongest of the three)."""
    if quick:
        return [
            ("taylorseer", {"cache_interval": 3, "max_order": 1, "disable_cache_before_step": 2,
                            "scope": "blocks"}, "TaylorSeer blocks N=3 O=1"),
        ]
    out = []
    for th in (0.05, 0.1, 0.2, 0.4):
        out.append(("fbcache", {"threshold": th}, f"FBCache t={th}"))
    for scope, interval, order in (("attention", 3, 1), ("blocks", 2, 1), ("blocks", 3, 1),
                                   ("blocks", 5, 2)):
        out.append(("taylorseer", {"cache_interval": interval, "max_order": order,
                                   "disable_cache_before_step": 2, "scope": scope},
                    f"TaylorSeer {scope} N={interval} O={order}"))
    for th, k, r in ((0.02, 2, 0.2), (0.06, 3, 0.2), (0.12, 4, 0.1), (0.25, 6, 0.1)):
        out.append(("magcache", {"threshold": th, "max_skip_steps": k, "retention_ratio": r},
                    f"MagCache t={th} K={k} r={r}"))
    return out


# -- block work counting ---------------------------------------------------------------------------
def transformer_blocks(transformer) -> list[tuple[str, Any]]:
    """(name, module) of every block of ``transformer_blocks`` and
    ``single_transformer_blocks``, in execution order."""
    blocks = []
    for list_name in BLOCK_LISTS:
        for i, block in enumerate(getattr(transformer, list_name, None) or []):
            blocks.append((f"{list_name}.{i}", block))
    return blocks


class BlockWorkCounter:
    """Counts the work really done inside each transformer block, and the transformer calls.

    A forward pre-hook on every ``nn.Linear`` of a block adds ``rows × in × out`` MACs to
    that block; a pre-hook on the transformer counts calls and their batch rows. Use as a
    context manager (hooks are removed on exit)."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.blocks = transformer_blocks(transformer)
        if not self.blocks:
            raise OptionError(
                f"{type(transformer).__name__} has no {' / '.join(BLOCK_LISTS)}: cannot count its work"
            )
        self.macs = [0] * len(self.blocks)
        self.calls = 0
        self.rows = 0  # batch rows over all calls
        self._handles = []

    def __enter__(self):
        import torch

        for bi, (_, block) in enumerate(self.blocks):
            for m in block.modules():
                if isinstance(m, torch.nn.Linear):
                    self._handles.append(
                        m.register_forward_pre_hook(self._linear_hook(bi, m.out_features), with_kwargs=True)
                    )
        self._handles.append(self.transformer.register_forward_pre_hook(self._call_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def _linear_hook(self, index: int, out_features: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            self.macs[index] += x.numel() * out_features  # (numel / in) rows × in × out

        return hook

    def _call_hook(self, module, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        self.calls += 1
        self.rows += int(hs.shape[0])

    def reset(self) -> None:
        self.macs = [0] * len(self.blocks)
        self.calls = 0
        self.rows = 0

    def per_row(self) -> list[Fraction]:
        """MACs per batch row of each block, averaged over the counted calls."""
        return [Fraction(m, self.rows) for m in self.macs]


def reference_block_macs(model, x, t, cond: dict) -> list[Fraction]:
    """MACs per batch row of each block in one full, uncached pass of ``model``."""
    import torch

    with BlockWorkCounter(model.transformer) as counter, torch.inference_mode():
        model(x, t, **cond)
    if counter.calls != 1:
        raise OptionError(f"the model called its transformer {counter.calls} times in one evaluation")
    per_row = counter.per_row()
    if any(m == 0 for m in per_row):
        raise OptionError("a transformer block did no Linear work in a full pass: cannot count its cost")
    return per_row


def effective_nfe(executed: list[int], reference: list[Fraction], rows_per_call: int) -> float:
    """Full model evaluations equivalent to the executed block MACs: each block's MACs in
    units of its full-pass MACs for one call of ``rows_per_call`` rows, averaged over the
    blocks (exact: a run that never skips gives ``steps``)."""
    units = sum(Fraction(m) / (ref * rows_per_call) for m, ref in zip(executed, reference))
    return float(units / len(reference))


# -- hook management -------------------------------------------------------------------------------
def _module_state(transformer) -> dict[int, tuple[bool, bool]]:
    return {id(m): ("_diffusers_hook" in m.__dict__, "forward" in m.__dict__) for m in transformer.modules()}


def _check_transformer(transformer) -> None:
    if not hasattr(transformer, "enable_cache"):
        raise OptionError(f"{type(transformer).__name__} does not support diffusers caching (no CacheMixin)")
    if getattr(transformer, "is_cache_enabled", False):
        raise OptionError(
            f"{type(transformer).__name__} already has a cache enabled "
            f"({type(transformer._cache_config).__name__}); disable it first"
        )


@contextmanager
def cache_enabled(transformer, config):
    """Enable a diffusers cache ``config`` on ``transformer`` for the ``with`` block, then
    disable it and remove what hook registration left on the modules (empty hook
    registries, the instance ``forward`` attribute), leaving the model as before."""
    _check_transformer(transformer)
    before = _module_state(transformer)
    had_config = "_cache_config" in transformer.__dict__
    transformer.enable_cache(config)
    try:
        yield
    finally:
        transformer.disable_cache()
        _strip_hook_leftovers(transformer, before)
        if not had_config and transformer.__dict__.get("_cache_config", 0) is None:
            del transformer.__dict__["_cache_config"]  # back to the class attribute (None)


def _strip_hook_leftovers(transformer, before: dict[int, tuple[bool, bool]]) -> None:
    for m in transformer.modules():
        had_registry, had_forward = before.get(id(m), (False, False))
        registry = m.__dict__.get("_diffusers_hook")
        if registry is not None and registry.hooks:
            continue  # someone else's hooks: leave the module alone
        if not had_forward and "forward" in m.__dict__:
            del m.__dict__["forward"]
        if not had_registry and registry is not None:
            del m.__dict__["_diffusers_hook"]


def _reset(transformer) -> None:
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks(recurse=True)


# -- configs ---------------------------------------------------------------------------------------
def _check_setting(method: str, setting: dict) -> dict:
    if method not in METHODS:
        raise OptionError(f"unknown caching method {method!r}; choose one of {', '.join(METHODS)}")
    setting = dict(setting or {})
    unknown = sorted(set(setting) - set(SETTING_KEYS[method]))
    if unknown:
        raise OptionError(
            f"{method} has no setting {', '.join(unknown)}; its settings: {', '.join(SETTING_KEYS[method])}"
        )
    return setting


def _dtype(value, default):
    import torch

    if value is None:
        return default if default is not None else torch.float32
    if isinstance(value, torch.dtype):
        return value
    dt = getattr(torch, str(value).replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise OptionError(f"taylor_factors_dtype must be a torch dtype name, got {value!r}")
    return dt


def make_config(method: str, setting: dict, *, steps: int, dtype=None, mag_ratios=None):
    """The diffusers cache config of ``method`` with ``setting``."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    setting = _check_setting(method, setting)
    if method == "fbcache":
        return FirstBlockCacheConfig(**setting)
    if method == "taylorseer":
        scope = setting.pop("scope", "attention")
        if scope not in ("attention", "blocks", "lite"):
            raise OptionError(f"taylorseer scope must be attention, blocks or lite, got {scope!r}")
        # float32 Taylor factors by default (diffusers defaults to bfloat16 for memory)
        setting["taylor_factors_dtype"] = _dtype(setting.get("taylor_factors_dtype"), dtype)
        before = setting.get("disable_cache_before_step", 3)
        interval = setting.get("cache_interval", 5)
        if before < 1 and interval != 1:
            raise OptionError("taylorseer needs disable_cache_before_step >= 1 (step 0 must be computed)")
        if scope == "blocks":
            setting["cache_identifiers"] = list(_TAYLORSEER_BLOCK_PATTERNS)
        elif scope == "lite":
            setting["use_lite_mode"] = True
        return TaylorSeerCacheConfig(**setting)
    if mag_ratios is None:
        raise OptionError("magcache needs calibrated mag_ratios")
    return MagCacheConfig(num_inference_steps=steps, mag_ratios=list(mag_ratios), **setting)


# -- sampling --------------------------------------------------------------------------------------
def _sample_kwargs(labels, guidance, null_label) -> dict:
    import torch

    kw: dict[str, Any] = {"label": labels}
    if guidance is not None:
        kw["guidance"] = float(guidance)
        kw["uncond"] = {"label": torch.full_like(labels, int(null_label))}
    return kw


def _split_calibration(calibration):
    if isinstance(calibration, dict):
        return calibration["noise"], calibration["labels"]
    if isinstance(calibration, (tuple, list)) and len(calibration) == 2 and getattr(calibration[0], "ndim", 0) >= 2:
        return calibration[0], calibration[1]
    return None


def calibrate_magcache(model, noise, labels, *, steps: int = 50, guidance: float | None,
                       null_label: int) -> list[float]:
    """MagCache's calibration mode (``calibrate=True``, nothing skipped) on one batch:
    the per-step ratio mean(‖r_k‖ / ‖r_{k−1}‖) of the residual r of all blocks (image
    tokens), 1.0 at step 0; one value per transformer call, i.e. per step."""
    from diffusers.hooks import MagCacheConfig
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK

    from .engine import sample

    tr = model.transformer
    # num_inference_steps = steps + 1: the hook prints and clears its ratios when the
    # step count reaches num_inference_steps; one more keeps them readable in its state.
    config = MagCacheConfig(calibrate=True, num_inference_steps=steps + 1)
    name = "fastflow-calibration"
    with cache_enabled(tr, config):
        _reset(tr)
        tail = [m._diffusers_hook.get_hook(_MAG_CACHE_BLOCK_HOOK) for _, m in transformer_blocks(tr)
                if "_diffusers_hook" in m.__dict__ and m._diffusers_hook.get_hook(_MAG_CACHE_BLOCK_HOOK)]
        tail = [h for h in tail if h.is_tail]
        if len(tail) != 1:
            raise OptionError(f"expected one MagCache tail hook, found {len(tail)}")
        with tr.cache_context(name):
            sample(model, noise, steps=steps, policy="none", **_sample_kwargs(labels, guidance, null_label))
            ratios = list(tail[0].state_manager.get_state().calibration_ratios)
        _reset(tr)
    if len(ratios) != steps:
        raise OptionError(f"MagCache calibration gave {len(ratios)} ratios for {steps} steps")
    return [float(r) for r in ratios]


def run_cached(model, noise, labels, *, method: str, setting: dict, steps: int = 50,
               guidance: float | None, null_label: int, calibration=None) -> CachedResult:
    """Sample ``noise`` with diffusers' cache ``method`` / ``setting`` on ``model.transformer``.

    Args:
        model: a wrapper with ``.transformer`` (a diffusers ``ModelMixin`` with
            ``CacheMixin``) and ``forward(x, t, label)``, e.g. a GlyphFlow.
        noise, labels: the starting samples x_1 (B, ...) and their labels (B,).
        method: ``"fbcache"``, ``"taylorseer"`` or ``"magcache"``.
        setting: the method's settings (:data:`SETTING_KEYS`).
        steps: Euler steps on the uniform schedule.
        guidance: classifier-free guidance scale (``None``: none); the unconditional
            branch uses ``null_label`` and both run as one doubled-batch call.
        calibration: for ``magcache``: a separate calibration batch ``(noise, labels)``
            (or ``{"noise":, "labels":}``) run through :func:`calibrate_magcache`, or
            already calibrated ratios (a list of ``steps`` floats).

    The hooks are removed afterwards; the model's outputs are as before, bit for bit.
    """
    import torch

    from .engine import sample

    setting = _check_setting(method, setting)
    if not isinstance(steps, int) or steps < 1:
        raise OptionError(f"steps must be a positive integer, got {steps!r}")
    tr = model.transformer
    _check_transformer(tr)
    info: dict[str, Any] = {"steps": steps}
    mag_ratios = None
    if method == "magcache":
        if calibration is None:
            raise OptionError("magcache needs calibration=(noise, labels) of a separate batch, or ratios")
        batch = _split_calibration(calibration)
        started = time.perf_counter()
        if batch is not None:
            mag_ratios = calibrate_magcache(model, batch[0], batch[1], steps=steps, guidance=guidance,
                                            null_label=null_label)
            info["calibration_seconds"] = time.perf_counter() - started
            info["calibration_batch"] = int(batch[0].shape[0])
        else:
            mag_ratios = [float(r) for r in calibration]
        info["mag_ratios"] = mag_ratios
        info["mag_ratios_len"] = len(mag_ratios)
    config = make_config(method, setting, steps=steps, dtype=model.transformer.dtype, mag_ratios=mag_ratios)

    kw = _sample_kwargs(labels, guidance, null_label)
    rows_per_call = int(noise.shape[0]) * (2 if guidance is not None else 1)
    # per-row MACs of each block in one full pass (before any hook is in place)
    t1 = torch.ones(1, dtype=noise.dtype, device=noise.device)
    reference = reference_block_macs(model, noise[:1], t1, {"label": labels[:1]})

    with cache_enabled(tr, config), BlockWorkCounter(tr) as counter:
        _reset(tr)
        try:
            with tr.cache_context("fastflow"):
                out = sample(model, noise, steps=steps, policy="none", **kw)
        finally:
            _reset(tr)
    if counter.rows != counter.calls * rows_per_call:
        raise OptionError(f"transformer calls had {counter.rows} rows, expected {rows_per_call} per call")
    block_runs = [float(Fraction(m) / (ref * rows_per_call)) for m, ref in zip(counter.macs, reference)]
    info.update(block_names=[n for n, _ in counter.blocks], block_runs=block_runs,
                blocks=len(reference))
    return CachedResult(
        x=out.x, nfe=effective_nfe(counter.macs, reference, rows_per_call), calls=counter.calls,
        wall_seconds=out.wall_seconds, method=method, setting=dict(setting), info=info,
    )


__all__ = ["run_cached", "calibrate_magcache", "default_settings", "CachedResult", "METHODS",
           "SETTING_KEYS", "BlockWorkCounter", "cache_enabled", "make_config"]

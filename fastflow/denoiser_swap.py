"""Run a diffusers pipeline's denoiser on an export (ONNX Runtime, TensorRT)::

    from fastflow.denoiser_export import export_denoiser
    from fastflow.denoiser_swap import swap_denoiser, restore_denoiser

    exp = export_denoiser(pipe, "exports/glyphs-denoiser", example_call={"prompt": "A"})
    swap_denoiser(pipe, "exports/glyphs-denoiser", backend="onnxruntime")
    handle = fastflow.enable(pipe, policy="fixed", skip=2)    # hooks the shim as usual
    images = pipe("A", num_inference_steps=20).images
    restore_denoiser(pipe)                                     # the PyTorch module again

**Swap.** :func:`swap_denoiser` replaces ``pipe.transformer`` by an
:class:`ExportedDenoiser`: an ``nn.Module`` (so ``fastflow.enable`` hooks it through
diffusers' ``HookRegistry`` like the original) with the original's ``config``, ``dtype``
and ``device`` and diffusers' ``cache_context`` / stateful-hook reset, whose ``forward``
feeds the same named tensors to the backend (``onnxruntime``: the registered backend's
session, CPU or CUDA; ``tensorrt``: its engine runner) and returns the output in the
structure the original returned (a 1-tuple for ``return_dict=False``). A call the
export cannot take raises :class:`DenoiserInputError` naming the argument.
:func:`restore_denoiser` puts the PyTorch module back.
"""

from __future__ import annotations

import inspect

from .artifact import read_export, source_sha256
from .artifact import Exported, dtype_name, torch_dtype
from .denoiser_call import (by_name, class_path, config_json, forward_defaults, param_names, rebuild_output,
                            same_static)
from .errors import ArtifactError, DenoiserInputError, FastFlowError, InputMismatchError, MissingDependencyError

#: pipeline attribute → the original module while a shim stands in for it
_ORIGINALS = "_fastflow_original_denoisers"


# -- the shim --------------------------------------------------------------------------------------
def _shim_base():
    import torch
    from diffusers.models.cache_utils import CacheMixin  # cache_context, _reset_stateful_cache

    return CacheMixin, torch.nn.Module


def _make_shim_class():
    CacheMixin, Module = _shim_base()

    class ExportedDenoiser(CacheMixin, Module):
        """Stands in for a pipeline's denoiser: the same call, run by an exported graph/engine.

        Keeps the original's ``config`` (and its plain attributes, e.g. ``out_channels``),
        reports the export's ``dtype`` and the device it runs on, supports diffusers'
        ``cache_context`` and stateful-hook reset, and has no parameters of its own.
        ``original`` is the PyTorch module it replaced.
        """

        is_fastflow_export = True  # what export_denoiser refuses to export again

        def __init__(self, original, exp: Exported, backend: str, device):
            Module.__init__(self)
            d = exp.meta["denoiser"]
            self.__dict__["original"] = original  # not a submodule: its weights stay out of this module
            self.config = getattr(original, "config", None)
            self.export = exp
            self.backend_name = backend
            self._device = device
            self._names = param_names(original)
            self.forward_defaults = forward_defaults(original)
            self._inputs = {s.name: s for s in exp.inputs}
            self._batched = set(d.get("batched_inputs") or [])
            self._static = dict(d.get("static") or {})
            self._output = d.get("output") or {"kind": "tensor"}
            self._dtype = torch_dtype(exp.inputs[0].dtype)
            self._runners: dict = {}

        # -- what pipelines read ------------------------------------------------------------
        @property
        def dtype(self):
            return self._dtype

        @property
        def device(self):
            return self._device

        def __getattr__(self, name):
            try:
                return Module.__getattr__(self, name)
            except AttributeError:
                pass
            original = self.__dict__.get("original")
            if original is not None and not name.startswith("_"):
                value = original.__dict__.get(name, inspect.Parameter.empty)
                if isinstance(value, (bool, int, float, str, tuple, type(None))):
                    return value
            raise AttributeError(f"{type(self).__name__} (pipe.transformer on the {self.__dict__.get('backend_name')} "
                                 f"backend) has no attribute '{name}'")

        def to(self, *args, **kwargs):
            import torch

            device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
            if dtype is not None and dtype != self._dtype:
                raise DenoiserInputError(f"the exported denoiser {self.export.file} computes in {self._dtype}; "
                                         f"it cannot be converted to {dtype}. Export it again in that dtype.")
            if device is not None:
                self._device = device
            return self

        def extra_repr(self) -> str:
            return f"{self.export.dir}, backend={self.backend_name}, device={self._device}"

        # -- the call -----------------------------------------------------------------------
        def _runner(self, device):
            key = str(device)
            r = self._runners.get(key)
            if r is None:
                import fastflow

                r = fastflow.get_backend(self.backend_name).load(self.export, device=device)
                self._runners[key] = r
            return r

        def forward(self, *args, **kwargs):
            import torch

            what = f"the exported denoiser ({self.export.file})"
            given = by_name(self._names, args, kwargs, what)
            feeds = {}
            for name, value in given.items():
                if name in self._inputs:
                    if not torch.is_tensor(value):
                        raise DenoiserInputError(
                            f"argument '{name}' of {what} must be a tensor {self._inputs[name].describe()}, got "
                            f"{type(value).__name__}" + (" (None: the export was made with it given)"
                                                         if value is None else ""))
                    feeds[name] = value
                elif name in self._static:
                    if not same_static(value, self._static[name]):
                        raise DenoiserInputError(
                            f"argument '{name}' of {what} is {_short(value)}, but the export was made with "
                            f"{name}={_short(self._static[name])}; export the denoiser again from a call like "
                            f"this one, or run it on the torch backend")
                elif torch.is_tensor(value):
                    raise DenoiserInputError(
                        f"argument '{name}' of {what} is a tensor, but the export was made without it (its tensor "
                        f"inputs: {', '.join(self._inputs)}); export the denoiser again from a call that passes it")
                elif not same_static(value, self.forward_defaults.get(name, inspect.Parameter.empty)):
                    raise DenoiserInputError(
                        f"argument '{name}' of {what} is {_short(value)}, but the export was made without it "
                        f"(default {_short(self.forward_defaults.get(name))}); export the denoiser again from such a call")
            missing = [n for n in self._inputs if n not in given]
            if missing:
                raise DenoiserInputError(f"{what} needs the tensor argument(s) {', '.join(missing)} "
                                         f"({'; '.join(self._inputs[n].describe() for n in missing)})")
            for name, value in self._static.items():
                if name not in given and not same_static(value, self.forward_defaults.get(name, inspect.Parameter.empty)):
                    raise DenoiserInputError(f"{what} was exported with {name}={_short(value)}; the call does not "
                                             f"pass it")
            ordered = [n for n in self._inputs]  # graph order
            for n in ordered:
                v, spec = feeds[n], self._inputs[n]
                if v.ndim != len(spec.shape) or dtype_name(v.dtype) != spec.dtype:
                    raise DenoiserInputError(
                        f"argument '{n}' of {what}: expected {spec.describe()}, got "
                        f"({', '.join(str(int(s)) for s in v.shape)}) {dtype_name(v.dtype)}")
            x, t = feeds[ordered[0]], feeds[ordered[1]] if len(ordered) > 1 else None
            rest = {n: feeds[n] for n in ordered[2:]}
            runner = self._runner(feeds[ordered[0]].device)
            try:
                out = runner(x, t, **rest)
            except DenoiserInputError:
                raise
            except InputMismatchError as exc:
                raise DenoiserInputError(
                    f"{exc} — the export was made at one resolution (all but the batch dimension are fixed); "
                    f"export it again for this one") from None
            return rebuild_output(self._output, out)

    return ExportedDenoiser


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


_SHIM = None


def _shim_class():
    global _SHIM
    if _SHIM is None:
        _SHIM = _make_shim_class()
    return _SHIM


def __getattr__(name):  # ExportedDenoiser is built on first use (diffusers is optional)
    if name == "ExportedDenoiser":
        return _shim_class()
    raise AttributeError(name)


def _require_gpu_for_tensorrt() -> None:
    import torch
    if not torch.cuda.is_available():
        raise MissingDependencyError("TensorRT needs an NVIDIA GPU and a CUDA build of torch; torch sees no CUDA "
                                     "device here. Use backend='onnxruntime' (runs on the CPU) instead.")


def swap_denoiser(pipe, export_dir, backend: str = "onnxruntime", *, attr: str | None = None,
                  check_weights: bool = True):
    """Replace ``pipe.transformer`` (the export's ``attr``) by an :class:`ExportedDenoiser`
    running ``export_dir`` on ``backend`` (``onnxruntime`` or ``tensorrt``); returns it.

    The export must come from the same denoiser class and config and (``check_weights``)
    the same weights. fastflow hooks on the pipeline are removed first (enable again
    after swapping). Swapping again replaces the shim; :func:`restore_denoiser` puts
    the original back.
    """
    import torch
    if backend not in ("onnxruntime", "tensorrt"):
        raise FastFlowError(f"swap_denoiser runs an export on 'onnxruntime' or 'tensorrt', not '{backend}'")
    if backend == "tensorrt":
        _require_gpu_for_tensorrt()
    import fastflow

    fastflow.get_backend(backend)  # the package is there (else the pip command)
    exp = read_export(export_dir, backend="onnx" if backend == "onnxruntime" else "trt")
    d = exp.meta.get("denoiser")
    if not isinstance(d, dict):
        raise ArtifactError(f"{exp.dir} is not a pipeline denoiser export (its metadata has no 'denoiser'); "
                            f"make one with fastflow.denoiser_export.export_denoiser")
    attr = attr or d.get("attr") or "transformer"
    originals = pipe.__dict__.setdefault(_ORIGINALS, {})
    original = originals.get(attr, getattr(pipe, attr, None))
    if not isinstance(original, torch.nn.Module):
        raise FastFlowError(f"{type(pipe).__name__} has no denoiser module at pipe.{attr}")
    if class_path(original) != d.get("class"):
        raise ArtifactError(f"{exp.dir} was exported from a {d.get('class')}, pipe.{attr} is a "
                            f"{class_path(original)}")
    cfg = config_json(original)
    if d.get("config") is not None and cfg is not None and cfg != d["config"]:
        diff = sorted(k for k in set(cfg) | set(d["config"]) if cfg.get(k) != d["config"].get(k))
        raise ArtifactError(f"{exp.dir} was exported from a {type(original).__name__} with another config "
                            f"(differs in {', '.join(diff)}); export this pipeline's denoiser")
    if check_weights and exp.meta.get("source_sha256") and source_sha256(original) != exp.meta["source_sha256"]:
        raise ArtifactError(f"{exp.dir} was exported from other weights than pipe.{attr} (source sha256 "
                            f"differs); export this pipeline's denoiser")
    device = getattr(original, "device", None)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if backend == "tensorrt" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    shim = _shim_class()(original, exp, backend, device)
    shim._runner(device)  # load now: a missing provider or a stale engine fails here, not mid-pipeline
    from .diffusers_hook import disable

    disable(pipe)
    originals[attr] = original
    setattr(pipe, attr, shim)
    return shim


def restore_denoiser(pipe, attr: str | None = None):
    """Put back the PyTorch module(s) that :func:`swap_denoiser` replaced; returns the
    (last) restored module, or None when nothing was swapped."""
    originals = pipe.__dict__.get(_ORIGINALS) or {}
    names = [attr] if attr is not None else list(originals)
    restored = None
    if names and any(n in originals for n in names):
        from .diffusers_hook import disable

        disable(pipe)
    for name in names:
        if name in originals:
            restored = originals.pop(name)
            setattr(pipe, name, restored)
    return restored


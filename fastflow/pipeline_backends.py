"""Run a diffusers pipeline's denoiser on an exported engine (ONNX Runtime, TensorRT).

::

    from fastflow.pipeline_backends import export_denoiser, swap_denoiser, restore_denoiser

    exp = export_denoiser(pipe, "exports/glyphs-denoiser", example_call={"prompt": "A"})
    swap_denoiser(pipe, "exports/glyphs-denoiser", backend="onnxruntime")
    handle = fastflow.enable(pipe, policy="fixed", skip=2)    # hooks the shim as usual
    images = pipe("A", num_inference_steps=20).images
    restore_denoiser(pipe)                                     # the PyTorch module again

**Export.** :func:`export_denoiser` runs the pipeline once on ``example_call`` and
stops it at the first call of its denoiser (``pipe.transformer``), recording that call's
arguments. Its tensor arguments become the graph inputs, by name and in the order of the
denoiser's ``forward`` signature, with a dynamic batch dimension where their first
dimension is the call's batch size (``hidden_states``, ``timestep``, ...) and fixed
shapes otherwise (FLUX's ``img_ids``/``txt_ids``); every other dimension is fixed, so an
export holds one resolution. The other arguments (``return_dict=False``,
``joint_attention_kwargs``, ``guidance=None`` ...) are recorded in the metadata and
baked into the graph. The graph is exported with ``torch.onnx.export(dynamo=True)``,
checked against PyTorch in ONNX Runtime at the recorded batch size, at 1 and at one more,
and written atomically with ``fastflow-export.json`` (the usual fields, see
docs/backends.md, plus a ``denoiser`` section).

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
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import FastFlowError, MissingDependencyError
from .export import (
    BATCH_DIM, DEFAULT_TOLERANCE, FORMAT, FORMAT_VERSION, ONNX_FILE, ONNX_REQUIRES, ArtifactError, ExportError,
    Exported, InputMismatchError, _fastflow_version, _now, check_agreement,
    _publish, _require, _staging, dynamo_export, _version, dtype_name, ort_session, read_export,
    source_sha256, sha256_file, torch_dtype,
)

__all__ = ["export_denoiser", "swap_denoiser", "restore_denoiser", "ExportedDenoiser", "DenoiserInputError",
           "is_denoiser_export", "OUTPUT_NAME"]

OUTPUT_NAME = "sample"
#: pipeline attribute → the original module while a shim stands in for it
_ORIGINALS = "_fastflow_original_denoisers"


class DenoiserInputError(InputMismatchError):
    """A denoiser call that the exported graph/engine cannot take: another non-tensor
    argument, a tensor it was not exported with, or a wrong rank, shape or dtype."""


class _Captured(Exception):
    """Stops the example pipeline call at the denoiser's first call."""


# -- helpers ---------------------------------------------------------------------------------------
def _torch():
    import torch

    return torch


def _param_names(module) -> list[str]:
    """Names of ``module.forward``'s parameters that can be passed by name, in order."""
    sig = inspect.signature(module.forward)
    return [n for n, p in sig.parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _defaults(module) -> dict:
    sig = inspect.signature(module.forward)
    return {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def _by_name(names: list[str], args: tuple, kwargs: dict, what: str) -> dict:
    if len(args) > len(names):
        raise DenoiserInputError(f"{what} takes at most {len(names)} positional arguments, got {len(args)}")
    out = dict(zip(names, args))
    for k, v in kwargs.items():
        if k in out:
            raise DenoiserInputError(f"{what} got argument '{k}' twice (positionally and by name)")
        out[k] = v
    return out


def _jsonable(value: Any, name: str):
    """``value`` as JSON (tuples become lists) or ExportError naming the argument."""
    torch = _torch()

    def conv(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if torch.is_tensor(v):
            raise ExportError(f"argument '{name}' of the denoiser holds a tensor inside a {type(value).__name__}; "
                              f"only top-level tensor arguments can become graph inputs")
        raise ExportError(f"argument '{name}' of the denoiser is a {type(v).__name__}, which an export cannot "
                          f"record; only tensors and JSON values (None, numbers, strings, lists, dicts) are "
                          f"supported")

    return conv(value)


def _same_static(a, b) -> bool:
    """Equal as recorded JSON; None and {} both mean 'no options'."""
    norm = (lambda v: None if v == {} else v)
    try:
        return norm(json.loads(json.dumps(a))) == norm(json.loads(json.dumps(b)))
    except (TypeError, ValueError):
        return False


def _main_output(out):
    """(the output tensor, structure record) of a denoiser's return value."""
    torch = _torch()
    if torch.is_tensor(out):
        return out, {"kind": "tensor"}
    if isinstance(out, (tuple, list)):
        if len(out) != 1 or not torch.is_tensor(out[0]):
            raise ExportError(f"the denoiser returned a {type(out).__name__} of {len(out)} items; an export "
                              f"takes one output tensor")
        return out[0], {"kind": type(out).__name__}
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):  # diffusers BaseOutput
        keys = list(out.keys())
        if len(keys) != 1 or not torch.is_tensor(out[keys[0]]):
            raise ExportError(f"the denoiser returned {type(out).__name__} with fields {keys}; an export takes "
                              f"one output tensor")
        cls = type(out)
        return out[keys[0]], {"kind": "output", "class": f"{cls.__module__}:{cls.__qualname__}", "key": keys[0]}
    raise ExportError(f"the denoiser returned a {type(out).__name__}; expected a tensor, a tuple or a "
                      f"diffusers output")


def _rebuild_output(record: dict, v):
    kind = record.get("kind")
    if kind == "tuple":
        return (v,)
    if kind == "list":
        return [v]
    if kind == "output":
        import importlib

        mod, _, qual = record["class"].partition(":")
        cls = importlib.import_module(mod)
        for part in qual.split("."):
            cls = getattr(cls, part)
        return cls(**{record["key"]: v})
    return v


def _class_path(module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _config_json(module) -> dict | None:
    cfg = getattr(module, "config", None)
    if cfg is None:
        return None
    try:
        items = dict(cfg)
    except (TypeError, ValueError):
        return None
    return {k: v for k, v in json.loads(json.dumps(items, default=str)).items() if not k.startswith("_")}


def is_denoiser_export(path) -> bool:
    """Whether ``path`` is an export made by :func:`export_denoiser`."""
    try:
        exp = read_export(path)
    except FastFlowError:
        return False
    return isinstance(exp.meta.get("denoiser"), dict)


# -- export ----------------------------------------------------------------------------------------
def capture_denoiser_call(pipe, example_call: dict | None = None, *, attr: str = "transformer") -> tuple[dict, Any]:
    """Run ``pipe(**example_call)`` until its denoiser is first called; return that
    call's arguments by name (tensors cloned) and the denoiser module."""
    torch = _torch()
    module = getattr(pipe, attr, None)
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"{type(pipe).__name__} has no denoiser module at pipe.{attr}")
    if isinstance(module, _shim_class()):
        raise ExportError(f"pipe.{attr} is already an exported denoiser; restore_denoiser(pipe) first")
    if example_call is None:
        if type(pipe).__name__ == "GlyphPipeline":
            example_call = {"prompt": "A", "num_inference_steps": 2}
        else:
            raise ExportError(f"export_denoiser needs example_call=: the arguments of one {type(pipe).__name__} "
                              f"call at the resolution you will run (e.g. prompt, height, width)")
    names = _param_names(module)
    seen: dict = {}

    def pre_hook(mod, args, kwargs):
        seen.update(_by_name(names, args, kwargs, f"{type(mod).__name__}.forward"))
        raise _Captured()

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**example_call)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ExportError(f"{type(pipe).__name__} never called pipe.{attr} with example_call={example_call!r}")
    return {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in seen.items()}, module


def export_denoiser(pipe, out_dir: str | os.PathLike, *, example_call: dict | None = None,
                    attr: str = "transformer", batch_inputs: Sequence[str] | None = None,
                    tolerance: float | None = None, opset: int | None = None, max_batch: int = 1 << 16,
                    source: str | None = None, log: Callable[[str], None] | None = None) -> Exported:
    """Export ``pipe.<attr>`` as called by ``pipe`` to ``out_dir/model.onnx``.

    Args:
        example_call: keyword arguments of one pipeline call (prompt, height, width...)
            at the resolution the export will serve; it is stopped at the denoiser's
            first call. Default for :class:`~fastflow.demo.pipeline.GlyphPipeline`: ``"A"``.
        batch_inputs: names of the tensor inputs with a dynamic batch dimension
            (default: those whose first dimension is the first tensor's).
        tolerance: max abs error against PyTorch, scaled by max(1, |out|max) (default 1e-3).
        source: how to load the pipeline again (a model name, folder or Hub id), recorded.

    Returns the :class:`~fastflow.export.Exported` directory. Raises
    :class:`~fastflow.export.ExportError` (nothing written) when the call has arguments
    an export cannot record, or :class:`~fastflow.export.ExportVerificationError`.
    """
    torch = _require("torch", "pip install torch")
    _require("onnx", ONNX_REQUIRES)
    _require("onnxscript", ONNX_REQUIRES)
    _require("onnxruntime", ONNX_REQUIRES)
    log = log or (lambda m: None)
    call, module = capture_denoiser_call(pipe, example_call, attr=attr)
    order = _param_names(module)
    tensors = {k: call[k] for k in order if k in call and torch.is_tensor(call[k])}
    static = {k: _jsonable(v, k) for k, v in call.items() if k not in tensors}
    if not tensors:
        raise ExportError(f"the call of pipe.{attr} has no tensor argument to export")
    names = list(tensors)
    first = tensors[names[0]]
    if first.ndim == 0:
        raise ExportError(f"the denoiser's first tensor argument '{names[0]}' has no batch dimension")
    batch = int(first.shape[0])
    call_static = {k: call[k] for k in static}
    if batch_inputs is None:
        batched = _infer_batched(module, tensors, call_static, batch)
    else:
        unknown = sorted(set(batch_inputs) - set(names))
        if unknown:
            raise ExportError(f"batch_inputs names {unknown}, which are not tensor arguments of the call ({names})")
        batched = [n for n in names if n in set(batch_inputs)]
        bad = [n for n in batched if tensors[n].ndim == 0 or int(tensors[n].shape[0]) != batch]
        if bad:
            raise ExportError(f"batch_inputs {bad} do not have the batch size {batch} as first dimension")
    example = dict(tensors)
    if batch < 2:  # a batch of 1 would be specialised into the graph: trace a batch of 2
        example = {n: (torch.cat([v, v]) if n in batched else v) for n, v in tensors.items()}
    example = {n: v.detach().cpu() for n, v in example.items()}
    tolerance = DEFAULT_TOLERANCE["fp32"] if tolerance is None else float(tolerance)

    class Forward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = module

        def forward(self, *args):
            return _main_output(self.model(**dict(zip(names, args)), **call_static))[0]

    device = first.device
    src_hash = source_sha256(module)
    with torch.no_grad():
        ref_out = module(**{n: v.to(device) for n, v in example.items()}, **call_static)
    _, output_record = _main_output(ref_out)
    wrapped = Forward().eval()
    cpu_example = example
    if device.type != "cpu":
        raise ExportError(f"export the denoiser from a pipeline on the CPU (it is on {device}); the graph is "
                          f"traced and verified there")
    out_dir = Path(out_dir)
    dyn = torch.export.Dim(BATCH_DIM, min=1, max=max_batch)
    with _staging(out_dir) as tmp:
        onnx_path = tmp / ONNX_FILE
        log(f"exporting {type(module).__name__} (pipe.{attr}) to ONNX (torch.onnx.export, dynamo) ...")
        started = time.perf_counter()
        ins, outs, proto = dynamo_export(
            wrapped, tuple(cpu_example.values()), names, [OUTPUT_NAME],
            (tuple({0: dyn} if n in batched else None for n in names),), onnx_path, opset, type(module).__name__)
        export_seconds = time.perf_counter() - started
        for s in ins:  # the exporter names the dynamic dimension after the Dim; make sure of it
            if s.name in batched and not isinstance(s.shape[0], str):
                raise ExportError(f"the exported graph fixed the batch dimension of '{s.name}' to {s.shape[0]}; "
                                  f"the denoiser specialises on its batch size")
        graph_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        del proto
        log("verifying against PyTorch with ONNX Runtime ...")
        max_err, checked = _verify(onnx_path, wrapped, cpu_example, batched, tolerance)
        log(f"max abs error {max_err:.3g} at batch sizes {checked} (tolerance {tolerance:g})")
        ref_name = _class_path(module)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "backend": "onnx",
            "file": ONNX_FILE,
            "model": None,
            "model_key": f"{type(module).__name__}:{source}" if source else ref_name,
            "inputs": [s.to_json() for s in ins],
            "outputs": [s.to_json() for s in outs],
            "dynamic_dims": {BATCH_DIM: {"min": 1, "max": max_batch}},
            "compute_dtype": dtype_name(first.dtype),
            "opset": graph_opset,
            "source_sha256": src_hash,
            "file_sha256": sha256_file(onnx_path),
            "file_size": onnx_path.stat().st_size,
            "external_data": sorted(f.name for f in tmp.iterdir() if f.name != ONNX_FILE),
            "max_abs_error": max_err,
            "tolerance": tolerance,
            "verified_batch_sizes": checked,
            "fastflow_version": _fastflow_version(),
            "torch_version": torch.__version__,
            "onnx_version": _version("onnx"),
            "onnxruntime_version": _version("onnxruntime"),
            "export_seconds": round(export_seconds, 2),
            "created": _now(),
            "denoiser": {
                "pipeline": type(pipe).__name__,
                "source": source,
                "attr": attr,
                "class": ref_name,
                "config": _config_json(module),
                "batched_inputs": batched,
                "static": static,
                "output": output_record,
                "example_call": {k: (v if isinstance(v, (bool, int, float, str, type(None))) else repr(v))
                                 for k, v in (example_call or {}).items()},
            },
        }
        _publish(tmp, out_dir, meta)
    return read_export(out_dir)


def _infer_batched(module, tensors: dict, static: dict, batch: int, max_tries: int = 64) -> list[str]:
    """Which tensor inputs carry the batch dimension. Candidates are those whose first
    dimension is the batch size; a set is accepted when the denoiser, given those inputs
    with their rows repeated to batch+1 (the others unchanged), runs and returns the
    matching rows of its output. (A batch-sized first dimension can be a coincidence:
    FLUX's ``txt_ids`` are (tokens, 3).) Largest accepted set first."""
    import itertools

    torch = _torch()
    names = list(tensors)
    first = names[0]
    cands = [n for n in names if tensors[n].ndim >= 1 and int(tensors[n].shape[0]) == batch]
    with torch.no_grad():
        ref = _main_output(module(**tensors, **static))[0]
    idx = torch.arange(batch + 1, device=tensors[first].device) % batch
    want = ref.index_select(0, idx)
    scale = max(1.0, float(want.abs().max()))

    def works(chosen) -> bool:
        feeds = {n: (v.index_select(0, idx) if n in chosen else v) for n, v in tensors.items()}
        try:
            with torch.no_grad():
                got = _main_output(module(**feeds, **static))[0]
        except Exception:
            return False
        return tuple(got.shape) == tuple(want.shape) and float((got - want).abs().max()) <= 1e-4 * scale

    others = [n for n in cands if n != first]
    tries = 0
    for k in range(len(others), -1, -1):
        for drop in itertools.combinations(others, len(others) - k):
            chosen = [first] + [n for n in others if n not in drop]
            tries += 1
            if works(chosen):
                return [n for n in names if n in chosen]
            if tries >= max_tries:
                break
        if tries >= max_tries:
            break
    raise ExportError(f"cannot tell which of the denoiser's inputs {cands} carry the batch dimension (none of the "
                      f"tried sets reproduces the output at another batch size); pass batch_inputs=[...]")


def _verify(onnx_path: Path, fn, example: dict, batched: list[str], tolerance: float) -> tuple[float, list[int]]:
    """The graph against PyTorch at the traced batch size, at 1 and at one more (rows of
    the example repeated)."""
    torch = _torch()
    sess = ort_session(onnx_path, device=None)
    traced = int(example[batched[0]].shape[0]) if batched else 1
    sizes = [traced] + ([1, traced + 1] if batched else [])
    worst, checked = 0.0, []
    for b in sizes:
        idx = torch.arange(b) % traced
        feeds = {n: (v.index_select(0, idx) if n in batched else v) for n, v in example.items()}
        with torch.no_grad():
            ref = fn(*feeds.values())
        got = sess.run(None, {k: v.contiguous().numpy() for k, v in feeds.items()})[0]
        worst = max(worst, check_agreement(torch.from_numpy(got), ref, b, tolerance, "the ONNX graph"))
        checked.append(b)
    return worst, checked


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

        def __init__(self, original, exp: Exported, backend: str, device):
            Module.__init__(self)
            d = exp.meta["denoiser"]
            self.__dict__["original"] = original  # not a submodule: its weights stay out of this module
            self.config = getattr(original, "config", None)
            self.export = exp
            self.backend_name = backend
            self._device = device
            self._names = _param_names(original)
            self._defaults = _defaults(original)
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
            given = _by_name(self._names, args, kwargs, what)
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
                    if not _same_static(value, self._static[name]):
                        raise DenoiserInputError(
                            f"argument '{name}' of {what} is {_short(value)}, but the export was made with "
                            f"{name}={_short(self._static[name])}; export the denoiser again from a call like "
                            f"this one, or run it on the torch backend")
                elif torch.is_tensor(value):
                    raise DenoiserInputError(
                        f"argument '{name}' of {what} is a tensor, but the export was made without it (its tensor "
                        f"inputs: {', '.join(self._inputs)}); export the denoiser again from a call that passes it")
                elif not _same_static(value, self._defaults.get(name, inspect.Parameter.empty)):
                    raise DenoiserInputError(
                        f"argument '{name}' of {what} is {_short(value)}, but the export was made without it "
                        f"(default {_short(self._defaults.get(name))}); export the denoiser again from such a call")
            missing = [n for n in self._inputs if n not in given]
            if missing:
                raise DenoiserInputError(f"{what} needs the tensor argument(s) {', '.join(missing)} "
                                         f"({'; '.join(self._inputs[n].describe() for n in missing)})")
            for name, value in self._static.items():
                if name not in given and not _same_static(value, self._defaults.get(name, inspect.Parameter.empty)):
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
            return _rebuild_output(self._output, out)

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
    torch = _torch()
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
    torch = _torch()
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
                            f"make one with fastflow.pipeline_backends.export_denoiser")
    attr = attr or d.get("attr") or "transformer"
    originals = pipe.__dict__.setdefault(_ORIGINALS, {})
    original = originals.get(attr, getattr(pipe, attr, None))
    if not isinstance(original, torch.nn.Module):
        raise FastFlowError(f"{type(pipe).__name__} has no denoiser module at pipe.{attr}")
    if _class_path(original) != d.get("class"):
        raise ArtifactError(f"{exp.dir} was exported from a {d.get('class')}, pipe.{attr} is a "
                            f"{_class_path(original)}")
    cfg = _config_json(original)
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


# -- for the command line ----------------------------------------------------------------------------
def load_pipeline(model, device=None, dtype=None):
    """(pipeline, name) for ``fastflow run/export --prompt``: ``glyphs`` is the demo
    model's pipeline, anything else a diffusers folder or Hub id (or a loaded pipeline)."""
    from .diffusers_hook import _load_pipeline

    if model == "glyphs":
        from .demo.pipeline import glyph_pipeline

        try:
            return glyph_pipeline(device=device or "cpu", dtype=dtype), "glyphs"
        except (OSError, ValueError) as exc:
            raise FastFlowError(f"cannot load model 'glyphs': {exc}") from None
    return _load_pipeline(model, device, dtype)


def export_pipeline_denoiser(model, prompt, out_dir, *, height: int | None = None, width: int | None = None,
                             num_frames: int | None = None, negative_prompt=None, guidance: float | None = None,
                             image=None, log: Callable[[str], None] | None = None) -> Exported:
    """What ``fastflow export --prompt`` does: load the pipeline on the CPU in float32 and
    export its denoiser as called for ``prompt`` at that height/width (2 steps, stopped
    at the first denoiser call)."""
    from .diffusers_hook import _call_kwargs

    pipe, name = load_pipeline(model, device="cpu", dtype="fp32")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    kwargs, _ = _call_kwargs(pipe, prompt=prompt, steps=2, guidance=guidance, negative_prompt=negative_prompt,
                             height=height, width=width, num_frames=num_frames, image=image, extra=None)
    return export_denoiser(pipe, out_dir, example_call=kwargs, source=str(name), log=log)

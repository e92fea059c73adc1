"""Export a diffusers pipeline's denoiser as it is called (ONNX, dynamic batch),
verified against PyTorch; see :func:`export_denoiser`.

:func:`export_denoiser` runs the pipeline once on ``example_call`` and
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
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .artifact import (BATCH_DIM, DEFAULT_TOLERANCE, FORMAT, FORMAT_VERSION, ONNX_FILE, ONNX_REQUIRES, Exported,
                       dtype_name, read_export, require, sha256_file, source_sha256)
from .denoiser_call import OUTPUT_NAME, by_name, class_path, config_json, main_output, param_names, recorded_json
from .errors import ExportError, FastFlowError
from .export_onnx import dynamo_export
from .exporting import check_agreement, fastflow_version, now, package_version, publish, staging
from .sessions import ort_session


class _Captured(Exception):
    """Stops the example pipeline call at the denoiser's first call."""



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
    import torch
    module = getattr(pipe, attr, None)
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"{type(pipe).__name__} has no denoiser module at pipe.{attr}")
    if getattr(module, "is_fastflow_export", False):
        raise ExportError(f"pipe.{attr} is already an exported denoiser; restore_denoiser(pipe) first")
    if example_call is None:
        if type(pipe).__name__ == "GlyphPipeline":
            example_call = {"prompt": "A", "num_inference_steps": 2}
        else:
            raise ExportError(f"export_denoiser needs example_call=: the arguments of one {type(pipe).__name__} "
                              f"call at the resolution you will run (e.g. prompt, height, width)")
    names = param_names(module)
    seen: dict = {}

    def pre_hook(mod, args, kwargs):
        seen.update(by_name(names, args, kwargs, f"{type(mod).__name__}.forward"))
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
    torch = require("torch", "pip install torch")
    require("onnx", ONNX_REQUIRES)
    require("onnxscript", ONNX_REQUIRES)
    require("onnxruntime", ONNX_REQUIRES)
    log = log or (lambda m: None)
    call, module = capture_denoiser_call(pipe, example_call, attr=attr)
    order = param_names(module)
    tensors = {k: call[k] for k in order if k in call and torch.is_tensor(call[k])}
    static = {k: recorded_json(v, k) for k, v in call.items() if k not in tensors}
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
            return main_output(self.model(**dict(zip(names, args)), **call_static))[0]

    device = first.device
    src_hash = source_sha256(module)
    with torch.no_grad():
        ref_out = module(**{n: v.to(device) for n, v in example.items()}, **call_static)
    _, output_record = main_output(ref_out)
    wrapped = Forward().eval()
    cpu_example = example
    if device.type != "cpu":
        raise ExportError(f"export the denoiser from a pipeline on the CPU (it is on {device}); the graph is "
                          f"traced and verified there")
    out_dir = Path(out_dir)
    dyn = torch.export.Dim(BATCH_DIM, min=1, max=max_batch)
    with staging(out_dir) as tmp:
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
        ref_name = class_path(module)
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
            "fastflow_version": fastflow_version(),
            "torch_version": torch.__version__,
            "onnx_version": package_version("onnx"),
            "onnxruntime_version": package_version("onnxruntime"),
            "export_seconds": round(export_seconds, 2),
            "created": now(),
            "denoiser": {
                "pipeline": type(pipe).__name__,
                "source": source,
                "attr": attr,
                "class": ref_name,
                "config": config_json(module),
                "batched_inputs": batched,
                "static": static,
                "output": output_record,
                "example_call": {k: (v if isinstance(v, (bool, int, float, str, type(None))) else repr(v))
                                 for k, v in (example_call or {}).items()},
            },
        }
        publish(tmp, out_dir, meta)
    return read_export(out_dir)


def _infer_batched(module, tensors: dict, static: dict, batch: int, max_tries: int = 64) -> list[str]:
    """Which tensor inputs carry the batch dimension. Candidates are those whose first
    dimension is the batch size; a set is accepted when the denoiser, given those inputs
    with their rows repeated to batch+1 (the others unchanged), runs and returns the
    matching rows of its output. (A batch-sized first dimension can be a coincidence:
    FLUX's ``txt_ids`` are (tokens, 3).) Largest accepted set first."""
    import itertools

    import torch
    names = list(tensors)
    first = names[0]
    cands = [n for n in names if tensors[n].ndim >= 1 and int(tensors[n].shape[0]) == batch]
    with torch.no_grad():
        ref = main_output(module(**tensors, **static))[0]
    idx = torch.arange(batch + 1, device=tensors[first].device) % batch
    want = ref.index_select(0, idx)
    scale = max(1.0, float(want.abs().max()))

    def works(chosen) -> bool:
        feeds = {n: (v.index_select(0, idx) if n in chosen else v) for n, v in tensors.items()}
        try:
            with torch.no_grad():
                got = main_output(module(**feeds, **static))[0]
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
    import torch
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


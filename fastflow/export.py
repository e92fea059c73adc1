"""Export velocity models to ONNX and TensorRT, and read exports back: ``fastflow export``.

An export is a directory::

    DIR/model.onnx            the graph (backend "onnx"), or
    DIR/model.plan            a serialized TensorRT engine (backend "trt")
    DIR/fastflow-export.json  metadata: model name, inputs/outputs, hashes, versions

The graph takes ``x``, ``t`` and the model's conditioning (``label`` for the registered
class-conditional models) with a dynamic batch dimension, and returns ``v``. Files are
written under a temporary name inside ``DIR`` and renamed into place, the metadata last,
so a reader never sees a half-written export.

This module is the exporters' front door (:func:`run_export`, what ``fastflow export``
runs) and re-exports their public names; the work is split by job:
:mod:`fastflow.artifact` (the format, read back), :mod:`fastflow.exporting` (staged
publish, example inputs, agreement), :mod:`fastflow.export_onnx`,
:mod:`fastflow.export_trt`, and :mod:`fastflow.sessions` (runtime sessions, engine
checks). Heavy imports (torch, onnx, onnxruntime, tensorrt) happen inside functions.

Python API (see docs/backends.md)::

    from fastflow.export import export_onnx, build_trt_engine, read_export
    exp = export_onnx(module, "out/glyphs-onnx", {"x": x, "t": t, "label": label},
                      model_name="glyphs")
    exp = read_export("out/glyphs-onnx")      # validates; raises ArtifactError
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .artifact import (BATCH_DIM, DEFAULT_PROFILE, DEFAULT_TOLERANCE, ENGINE_FILE, FORMAT, FORMAT_VERSION,
                       METADATA_NAME, ONNX_FILE, TRT_OPSET, Exported, TensorSpec, is_export, read_export,
                       sha256_file, source_sha256)
from .errors import ArtifactError, ExportError, ExportVerificationError, InputMismatchError, StaleEngineError
from .export_onnx import export_onnx
from .export_trt import build_trt_engine
from .exporting import example_inputs_for, log_stderr
from .sessions import check_engine, check_source, gpu_identity, require_tensorrt

__all__ = [
    "run_export", "export_onnx", "build_trt_engine", "read_export", "is_export", "Exported", "TensorSpec",
    "example_inputs_for", "check_engine", "check_source", "gpu_identity", "require_tensorrt", "sha256_file",
    "source_sha256", "ExportError", "ExportVerificationError", "ArtifactError", "StaleEngineError",
    "InputMismatchError", "METADATA_NAME", "FORMAT", "FORMAT_VERSION", "ONNX_FILE", "ENGINE_FILE", "BATCH_DIM",
    "DEFAULT_PROFILE", "DEFAULT_TOLERANCE", "TRT_OPSET",
]


def run_export(backend: str, model: str, out_dir: str | None, *, precision: str | None = None,
               opset: int | None = None, tolerance: float | None = None, min_batch: int = DEFAULT_PROFILE[0],
               opt_batch: int = DEFAULT_PROFILE[1], max_batch: int = DEFAULT_PROFILE[2],
               log: Callable[[str], None] = log_stderr) -> Exported:
    """What ``fastflow export`` does: export ``model`` (a registered name; for ``trt`` also
    an ONNX export directory) into ``out_dir``."""
    label = Path(model).name if is_export(model) else model
    out = Path(out_dir) if out_dir else Path("fastflow-export") / f"{label}-{backend}"
    if backend == "onnx":
        if precision not in (None, "fp32"):
            raise ExportError("ONNX export is fp32 (--precision applies to --backend trt)")
        if is_export(model):
            raise ExportError(f"{model} is already an export; --backend onnx takes a registered model name")
        import fastflow

        fastflow.get_model(model)  # unknown names fail before any heavy import
        return export_onnx(model, out, opset=opset, tolerance=tolerance, log=log)
    if backend == "trt":
        require_tensorrt()
        if opset is not None and is_export(model):
            raise ExportError("--opset applies when exporting from a model; this ONNX export has its opset")
        if is_export(model) or os.sep in model or Path(model).exists():
            read_export(model, backend="onnx")  # a path: fail here, naming it, if it is no ONNX export
        else:
            import fastflow

            fastflow.get_model(model)
        return build_trt_engine(model, out, precision=precision or "fp16", min_batch=min_batch,
                                opt_batch=opt_batch, max_batch=max_batch, tolerance=tolerance, opset=opset, log=log)
    raise ExportError(f"unknown export backend '{backend}'; use onnx or trt")

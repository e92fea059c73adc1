"""ONNX export of a velocity model (torch.export / dynamo), verified against PyTorch
with ONNX Runtime before it is published."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from .artifact import BATCH_DIM, DEFAULT_TOLERANCE, Exported, FORMAT, FORMAT_VERSION, ONNX_FILE, ONNX_REQUIRES, dtype_name, load_onnx_proto, onnx_specs, read_export, require, sha256_file, source_sha256
from .exporting import Positional, check_agreement, check_example_inputs, fastflow_version, now, package_version, publish, random_like, resolve_source, staging
from .errors import ExportError, FastFlowError

from .sessions import ort_session

# -- ONNX export ------------------------------------------------------------------------------------
def dynamo_export(module, args: tuple, names: list[str], output_names: list[str], dynamic_shapes,
                  onnx_path: Path, opset: int | None, label: str):
    """torch.onnx.export(dynamo=True) to ``onnx_path``, failures as :class:`ExportError`;
    returns the graph's (input specs, output specs, proto), inputs checked against ``names``."""
    import torch

    kwargs = {} if opset is None else {"opset_version": int(opset)}
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(module, args, dynamo=True, input_names=names, output_names=output_names,
                                        dynamic_shapes=dynamic_shapes, verbose=False, **kwargs)
            program.save(str(onnx_path))
    except FastFlowError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        raise ExportError(f"torch.onnx.export failed for {label}: {type(exc).__name__}: "
                          f"{msg[0] if msg else ''}") from exc
    proto = load_onnx_proto(onnx_path)
    ins, outs = onnx_specs(proto)
    if [s.name for s in ins] != names:
        raise ExportError(f"the exported graph's inputs are {[s.name for s in ins]}, expected {names}")
    return ins, outs, proto


def export_onnx(model: Any, out_dir: str | os.PathLike, example_inputs: dict | None = None, *,
                model_name: str | None = None, model_key: str | None = None, opset: int | None = None,
                tolerance: float | None = None, verify: bool = True, compute_dtype=None,
                max_batch: int = 1 << 16, log: Callable[[str], None] | None = None) -> Exported:
    """Export a velocity model to ``out_dir/model.onnx`` with ``torch.onnx.export(dynamo=True)``.

    Args:
        model: a registered model name, a :class:`~fastflow.models.ModelSpec`, or an
            ``nn.Module``/callable ``(x, t, **conditioning) -> v``.
        example_inputs: ``{"x": x, "t": t, "label": label, ...}`` in the model's argument
            order (first x, then t, then conditioning by keyword), batch ≥ 2. Optional
            for registered models.
        model_name: the registry name recorded in the metadata (so ``fastflow run
            --model DIR`` can find shapes and labels).
        tolerance: max abs error allowed against PyTorch, scaled by max(1, |v|max)
            (default 1e-3); above it :class:`ExportVerificationError` is raised and
            nothing is written.
        compute_dtype: run the model in this dtype inside the graph (inputs and outputs
            stay float32); used for strongly typed TensorRT builds.

    Returns the :class:`Exported` directory. Verification runs the graph in ONNX Runtime
    at the traced batch size and another one, against the model in PyTorch.
    """
    torch = require("torch", "pip install torch")
    require("onnx", ONNX_REQUIRES)
    require("onnxscript", ONNX_REQUIRES)
    if verify:
        require("onnxruntime", ONNX_REQUIRES)
    log = log or (lambda m: None)
    fn, example_inputs, name, key, spec = resolve_source(model, example_inputs, 2)
    model_name = model_name or name
    model_key = model_key or key or model_name
    example = check_example_inputs(example_inputs)
    names = list(example)
    tolerance = DEFAULT_TOLERANCE["fp32"] if tolerance is None else float(tolerance)
    out_dir = Path(out_dir)

    src_hash = source_sha256(fn)
    if isinstance(fn, torch.nn.Module):
        fn.eval()
        if compute_dtype is not None:
            fn.to(compute_dtype)
    wrapped = Positional.wrap(fn, names, compute_dtype)
    args = tuple(example.values())

    with staging(out_dir) as tmp:
        onnx_path = tmp / ONNX_FILE
        log(f"exporting {model_name or type(fn).__name__} to ONNX (torch.onnx.export, dynamo) ...")
        started = time.perf_counter()
        batch = torch.export.Dim(BATCH_DIM, min=1, max=max_batch)
        ins, outs, proto = dynamo_export(wrapped, args, names, ["v"], (tuple({0: batch} for _ in args),),
                                         onnx_path, opset, model_name or type(fn).__name__)
        export_seconds = time.perf_counter() - started
        graph_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        del proto

        max_err, checked = None, []
        if verify:
            log("verifying against PyTorch with ONNX Runtime ...")
            max_err, checked = _verify_onnx(onnx_path, fn, example, tolerance)
            log(f"max abs error {max_err:.3g} at batch sizes {checked} (tolerance {tolerance:g})")
        file_size = onnx_path.stat().st_size
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "backend": "onnx",
            "file": ONNX_FILE,
            "model": model_name,
            "model_key": model_key,
            "inputs": [s.to_json() for s in ins],
            "outputs": [s.to_json() for s in outs],
            "dynamic_dims": {BATCH_DIM: {"min": 1, "max": max_batch}},
            "compute_dtype": dtype_name(compute_dtype) if compute_dtype is not None else "float32",
            "opset": graph_opset,
            "source_sha256": src_hash,
            "file_sha256": sha256_file(onnx_path),
            "file_size": file_size,
            "external_data": sorted(f.name for f in tmp.iterdir() if f.name != ONNX_FILE),
            "max_abs_error": max_err,
            "tolerance": tolerance if verify else None,
            "verified_batch_sizes": checked,
            "fastflow_version": fastflow_version(),
            "torch_version": torch.__version__,
            "onnx_version": package_version("onnx"),
            "onnxruntime_version": package_version("onnxruntime") if verify else None,
            "export_seconds": round(export_seconds, 2),
            "created": now(),
        }
        if spec is not None:
            meta["spec"] = {"shape": list(spec.shape), "num_labels": spec.num_labels,
                            "null_label": spec.null_label, "default_guidance": spec.default_guidance,
                            "default_shift": spec.default_shift, "is_image": spec.is_image}
        publish(tmp, out_dir, meta)
    return read_export(out_dir)


@contextmanager
def _quiet_exporter():
    """Silence the exporter's chatter (torchvision-not-installed notes, deprecation
    warnings); errors still propagate."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _verify_onnx(onnx_path: Path, fn, example: dict, tolerance: float) -> tuple[float, list[int]]:
    import torch

    sess = ort_session(onnx_path, device=None)
    traced = next(iter(example.values())).shape[0]
    worst, checked = 0.0, []
    for i, b in enumerate((traced, traced + 3)):
        feeds = example if i == 0 else random_like(example, b, seed=1234 + b)
        names = list(feeds)
        with torch.no_grad():
            ref = fn(feeds[names[0]], feeds[names[1]], **{k: feeds[k] for k in names[2:]})
        got = sess.run(None, {k: v.contiguous().numpy() for k, v in feeds.items()})[0]
        worst = max(worst, check_agreement(torch.from_numpy(got), ref, b, tolerance, "the ONNX graph",
                                           "Check the model for data-dependent control flow or raise --tolerance."))
        checked.append(b)
    return worst, checked

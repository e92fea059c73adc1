"""Runtime sessions for exports: ONNX Runtime sessions, TensorRT availability and the
checks an engine must pass before it runs (TensorRT version, GPU, source weights), and a
small cache so a backend loads each session or engine once."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable

from .artifact import (METADATA_NAME, ONNX_GPU_REQUIRES, ONNX_REQUIRES, TRT_REQUIRES, Exported, require,
                       source_sha256)
from .errors import ArtifactError, MissingDependencyError, StaleEngineError

def module_status(module: str) -> tuple[bool, str]:
    """``(True, "")`` when ``module`` imports, else ``(False, "<module> is not installed (...)")``:
    the shape of a backend's ``available()`` answer."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        return False, f"{module} is not installed ({exc})"
    return True, ""


class RunnerCache:
    """Loaded sessions/engines, keyed by file (path, mtime, size) and device, least
    recently used dropped first: run() loads its backend once per batch, and the
    ONNX session or TensorRT engine behind it must not be rebuilt each time."""

    def __init__(self, size: int):
        from collections import OrderedDict

        self.size = size
        self._items: "OrderedDict[tuple, Any]" = OrderedDict()
        self._lock = threading.Lock()

    def get_or_create(self, file: Path, device, create: Callable[[], Any]):
        stat = file.stat()
        key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size, str(device))
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                return item
        item = create()
        with self._lock:
            self._items[key] = item
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return item


# -- ONNX Runtime sessions (shared with the onnxruntime backend) ------------------------------------
def ort_session(path: Path, device=None, *, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` for ``path``: CPU (all graph optimisations,
    ``threads`` intra-op threads — default ``FASTFLOW_ORT_THREADS`` or ORT's choice —
    no spin-waiting between calls) or, for a CUDA ``device``, the CUDA provider."""
    ort = require("onnxruntime", ONNX_REQUIRES)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads is None:
        env = os.environ.get("FASTFLOW_ORT_THREADS", "").strip()
        threads = int(env) if env.isdigit() else 0
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list = ["CPUExecutionProvider"]
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise MissingDependencyError(
                "onnxruntime has no CUDA provider, so it cannot run on the GPU. Install the GPU build "
                f"(instead of onnxruntime) with: {ONNX_GPU_REQUIRES}")
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    try:
        sess = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        raise ArtifactError(f"ONNX Runtime cannot load {path}: {msg[0] if msg else type(exc).__name__}. "
                            f"Is it a complete ONNX file? Export it again.") from None
    if len(providers) > 1 and "CUDAExecutionProvider" not in sess.get_providers():
        # ORT falls back to the CPU when the CUDA provider cannot load (CUDA/cuDNN mismatch)
        raise MissingDependencyError(
            f"onnxruntime-gpu could not start its CUDA provider (session providers: {sess.get_providers()}); "
            f"its CUDA/cuDNN versions must match the installed ones. See "
            f"https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html")
    return sess


# -- TensorRT ---------------------------------------------------------------------------------------
def require_tensorrt():
    """The ``tensorrt`` module and a CUDA device, or :class:`MissingDependencyError`."""
    trt = require("tensorrt", TRT_REQUIRES)
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError("TensorRT needs an NVIDIA GPU and a CUDA build of torch; torch sees no CUDA "
                                     "device here. Use --backend onnx (runs on the CPU) instead.")
    return trt


def gpu_identity(device=None) -> dict:
    import torch

    index = torch.device(device).index if device is not None else None
    index = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def check_engine(exp: Exported, trt_version: str, gpu: dict) -> None:
    """Refuse an engine built by another TensorRT version, for another GPU, or from
    weights that changed since (when the ONNX export it came from is still there)."""
    meta, rebuild = exp.meta, exp.meta.get("rebuild_command") or \
        f"fastflow export --backend trt --model {exp.model or 'NAME'} --out {exp.dir}"
    built = meta.get("tensorrt_version")
    if built != trt_version:
        raise StaleEngineError(f"{exp.file} was built with TensorRT {built}, this is TensorRT {trt_version}; an "
                               f"engine runs only on the TensorRT version that built it. Rebuild it: {rebuild}")
    want = meta.get("gpu") or {}
    if want.get("name") != gpu["name"] or want.get("compute_capability") != gpu["compute_capability"]:
        raise StaleEngineError(
            f"{exp.file} was built for {want.get('name')} (compute capability {want.get('compute_capability')}), "
            f"this GPU is {gpu['name']} ({gpu['compute_capability']}); an engine runs only on the GPU model it "
            f"was built for. Rebuild it here: {rebuild}")
    src = meta.get("onnx_source")
    if src:
        src_meta = Path(exp.dir, src) / METADATA_NAME if not os.path.isabs(src) else Path(src) / METADATA_NAME
        if src_meta.is_file():
            try:
                cur = json.loads(src_meta.read_text()).get("source_sha256")
            except (OSError, ValueError):
                cur = None
            if cur and cur != meta.get("source_sha256"):
                raise StaleEngineError(f"{exp.file} was built from other weights than the ONNX export "
                                       f"{src_meta.parent} now holds (source sha256 differs). Rebuild it: {rebuild}")


def check_source(exp: Exported, model: Any) -> None:
    """Refuse an export whose recorded source weights differ from ``model``'s (a module,
    ModelSpec or registered name)."""
    import fastflow
    from .modelspec import ModelSpec

    if isinstance(model, str):
        model = fastflow.get_model(model)
    if isinstance(model, ModelSpec):
        model = model.build()
    digest = source_sha256(model)
    if exp.meta.get("source_sha256") and digest != exp.meta["source_sha256"]:
        cls = StaleEngineError if exp.backend == "trt" else ArtifactError
        raise cls(f"{exp.file} was made from other weights than the given model (source sha256 differs). "
                  f"Rebuild it: {exp.meta.get('rebuild_command') or 'fastflow export ...'}")


_TRT_TO_TORCH = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                 "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}


def trt_dtype_name(trt_dtype) -> str:
    return _TRT_TO_TORCH.get(str(trt_dtype).split(".")[-1], str(trt_dtype))

"""Export velocity models to ONNX and TensorRT, and read exports back: ``fastflow export``.

An export is a directory::

    DIR/model.onnx            the graph (backend "onnx"), or
    DIR/model.plan            a serialized TensorRT engine (backend "trt")
    DIR/fastflow-export.json  metadata: model name, inputs/outputs, hashes, versions

The graph takes ``x``, ``t`` and the model's conditioning (``label`` for the registered
class-conditional models) with a dynamic batch dimension, and returns ``v``. Files are
written under a temporary name inside ``DIR`` and renamed into place, the metadata last,
so a reader never sees a half-written export.

This module is also the built-in plugin that adds ``fastflow export`` to the command
line; heavy imports (torch, onnx, onnxruntime, tensorrt) happen inside functions.

Python API (see docs/backends.md)::

    from fastflow.export import export_onnx, build_trt_engine, read_export
    exp = export_onnx(module, "out/glyphs-onnx", {"x": x, "t": t, "label": label},
                      model_name="glyphs")
    exp = read_export("out/glyphs-onnx")      # validates; raises ArtifactError
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import FastFlowError, MissingDependencyError
from .hookspecs import hookimpl

METADATA_NAME = "fastflow-export.json"
FORMAT = "fastflow-export"
FORMAT_VERSION = 1
ONNX_FILE = "model.onnx"
ENGINE_FILE = "model.plan"
BATCH_DIM = "batch"
DEFAULT_MODEL = "glyphs"
ONNX_REQUIRES = "pip install 'fastflow[onnx]'"
ONNX_GPU_REQUIRES = "pip install 'fastflow[onnx-gpu]'"
TRT_REQUIRES = "pip install 'fastflow[trt]'"
#: max abs error allowed between the export and PyTorch (fp32), scaled by max(1, |v|max)
DEFAULT_TOLERANCE = {"fp32": 1e-3, "trt-fp32": 1e-2, "trt-fp16": 5e-2, "trt-bf16": 2e-1}
#: the TensorRT optimisation profile used unless --min/opt/max-batch say otherwise
#: (classifier-free guidance doubles the batch: 16 samples → 32 rows)
DEFAULT_PROFILE = (1, 32, 64)
RUNTIME_BACKEND = {"onnx": "onnxruntime", "trt": "tensorrt"}
#: opset of the ONNX graph a TensorRT engine is built from (when fastflow exports it)
TRT_OPSET = 18
LARGE_FILE = 1 << 30  # files above this are checked by size only, not hashed at load


# -- errors ----------------------------------------------------------------------------------------
class ExportError(FastFlowError):
    """An export or engine build that failed; nothing was written."""


class ExportVerificationError(ExportError):
    """The exported graph or engine disagrees with PyTorch beyond the tolerance."""


class ArtifactError(FastFlowError):
    """A missing, truncated or corrupt export directory, graph, engine or metadata file."""


class StaleEngineError(ArtifactError):
    """A TensorRT engine built by another TensorRT version, for another GPU or from
    other weights. The message says how to rebuild it."""


class InputMismatchError(FastFlowError, ValueError):
    """An input whose name, shape or dtype the graph or engine does not accept."""


# -- tensor specs ----------------------------------------------------------------------------------
_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
                10: "float16", 11: "float64", 16: "bfloat16"}


def torch_dtype(name: str):
    import torch

    try:
        return getattr(torch, name)
    except AttributeError:
        raise ArtifactError(f"unknown dtype '{name}' in export metadata") from None


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class TensorSpec:
    """Name, shape and dtype of a graph input or output. ``shape`` entries are ints or
    the name of a dynamic dimension (``"batch"``)."""

    name: str
    shape: list
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: Any, where: str) -> "TensorSpec":
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not isinstance(d.get("shape"), list) \
                or not isinstance(d.get("dtype"), str):
            raise ArtifactError(f"corrupt metadata {where}: each input/output needs name, shape and dtype, got {d!r}")
        for s in d["shape"]:
            if not (isinstance(s, str) or (isinstance(s, int) and s >= 0)):
                raise ArtifactError(f"corrupt metadata {where}: bad dimension {s!r} in the shape of '{d['name']}'")
        return cls(d["name"], list(d["shape"]), d["dtype"])

    def describe(self) -> str:
        return f"({', '.join(str(s) for s in self.shape)}) {self.dtype}"

    def resolve(self, dims: dict) -> tuple:
        return tuple(dims.get(s, -1) if isinstance(s, str) else s for s in self.shape)


@dataclass
class Exported:
    """A validated export: directory, artifact file and metadata (from :func:`read_export`).

    Pass it (or its directory) to the ``onnxruntime``/``tensorrt`` backends; ``key``
    identifies the model in policy state files, ``model`` is the registry name.
    """

    dir: Path
    file: Path
    meta: dict
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)

    @property
    def backend(self) -> str:
        return self.meta["backend"]

    @property
    def runtime_backend(self) -> str:
        """The backend that runs it: ``onnxruntime`` or ``tensorrt``."""
        return RUNTIME_BACKEND[self.backend]

    @property
    def model(self) -> str | None:
        return self.meta.get("model")

    @property
    def key(self) -> str:
        return self.meta.get("model_key") or self.model or str(self.file)

    def spec(self):
        """The registered :class:`fastflow.models.ModelSpec` this export was made from."""
        import fastflow

        if not self.model:
            raise ArtifactError(f"{self.dir / METADATA_NAME} names no model; pass --model NAME to sample from it")
        try:
            return fastflow.get_model(self.model)
        except fastflow.UnknownNameError as exc:
            raise ArtifactError(f"export {self.dir} was made from model '{self.model}', which no installed "
                                f"plugin registers ({exc})") from None

    def verify_file(self) -> None:
        """Check size and (for files up to 1 GiB) the sha256 recorded at export time."""
        size = self.file.stat().st_size
        want = self.meta.get("file_size")
        if isinstance(want, int) and size != want:
            raise ArtifactError(f"{self.file} is truncated or was replaced: it has {size} bytes, the export wrote "
                                f"{want}. Export it again (see {self.dir / METADATA_NAME}).")
        digest = self.meta.get("file_sha256")
        if digest and size <= LARGE_FILE and sha256_file(self.file) != digest:
            raise ArtifactError(f"{self.file} does not match its metadata (sha256 differs): the file was changed "
                                f"after the export. Export it again.")

    def bind(self, x, t, conditioning: dict) -> tuple[list, dict]:
        """Map ``(x, t, **conditioning)`` onto the graph inputs, in graph order, checking
        names, shapes and dtypes. Returns (tensors, dims) where ``dims`` maps each dynamic
        dimension name to its size. Raises :class:`InputMismatchError`."""
        specs = self.inputs
        given = {specs[0].name: x}
        if len(specs) > 1:
            given[specs[1].name] = t
        names = [s.name for s in specs]
        extra = sorted(set(conditioning) - set(names[2:]))
        if extra:
            raise InputMismatchError(
                f"{self.file} has no input {', '.join(repr(e) for e in extra)}; its inputs are "
                + ", ".join(f"{s.name} {s.describe()}" for s in specs))
        given.update(conditioning)
        tensors, dims = [], {}
        for s in specs:
            if s.name not in given:
                raise InputMismatchError(f"{self.file} needs input '{s.name}' {s.describe()}; pass {s.name}=... "
                                         f"as conditioning")
            v = given[s.name]
            if not hasattr(v, "shape") or not hasattr(v, "dtype"):
                raise InputMismatchError(f"input '{s.name}' of {self.file} must be a tensor {s.describe()}, "
                                         f"got {type(v).__name__}")
            got = dtype_name(v.dtype)
            ok = got == s.dtype and len(v.shape) == len(s.shape)
            if ok:
                for want, have in zip(s.shape, v.shape):
                    if isinstance(want, str):
                        if dims.setdefault(want, int(have)) != int(have):
                            ok = False
                    elif want != int(have):
                        ok = False
            if not ok:
                hint = ""
                if got != s.dtype:
                    hint = f" (convert it with .to(torch.{s.dtype}))"
                elif len(v.shape) == len(s.shape) and all(
                        isinstance(w, str) or w == int(h) for w, h in zip(s.shape, v.shape)):
                    hint = f" (all inputs must share one batch size: {specs[0].name} has {int(x.shape[0])})"
                raise InputMismatchError(
                    f"input '{s.name}' of {self.file}: expected shape {s.describe()}, got "
                    f"({', '.join(str(int(d)) for d in v.shape)}) {got}{hint}")
            tensors.append(v)
        return tensors, dims


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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_sha256(model: Any) -> str:
    """sha256 over a model's weights: every state_dict entry's name, dtype, shape and
    bytes, in name order (tensor attributes for a plain callable). Identifies the
    weights an export was made from, independently of how they are stored."""
    import torch

    if isinstance(model, torch.nn.Module):
        items = model.state_dict().items()
    else:
        items = [(k, v) for k, v in vars(model).items() if torch.is_tensor(v) or isinstance(v, (int, float, str))]
    h = hashlib.sha256()
    for name, value in sorted(items, key=lambda kv: kv[0]):
        h.update(name.encode())
        if torch.is_tensor(value):
            v = value.detach().to("cpu").contiguous()
            h.update(f"{v.dtype}{tuple(v.shape)}".encode())
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


# -- reading exports -------------------------------------------------------------------------------
def is_export(path: Any) -> bool:
    """Whether ``path`` is an export directory (or its graph/engine/metadata file)."""
    if isinstance(path, Exported):
        return True
    if not isinstance(path, (str, os.PathLike)):
        return False
    p = Path(path)
    if p.is_dir():
        return (p / METADATA_NAME).is_file()
    return p.is_file() and (p.name == METADATA_NAME or (p.parent / METADATA_NAME).is_file()
                            or p.suffix == ".onnx")


def read_export(path: Any, *, backend: str | None = None) -> Exported:
    """Read and validate an export: a directory with ``fastflow-export.json``, its
    graph/engine file, the metadata file, or a bare ``.onnx`` file (inputs read from the
    graph). ``backend`` ("onnx"/"trt") requires that kind. Raises :class:`ArtifactError`
    naming the file and what is wrong."""
    if isinstance(path, Exported):
        exp = path
    else:
        if not isinstance(path, (str, os.PathLike)):
            raise ArtifactError(f"expected an export directory or file path, got {type(path).__name__}")
        exp = _read(Path(path))
    if backend is not None and exp.backend != backend:
        raise ArtifactError(
            f"{exp.dir} holds a {exp.backend!r} export ({exp.file.name}); the {RUNTIME_BACKEND[backend]} backend "
            f"needs a {backend!r} export: fastflow export --backend {backend} --model {exp.model or 'NAME'} --out DIR")
    return exp


def _how_to_export(p: Path) -> str:
    return f"Create it with: fastflow export --backend onnx --model NAME --out {p}"


def _read(p: Path) -> Exported:
    if not p.exists():
        raise ArtifactError(f"{p}: no such export directory or file. {_how_to_export(p)}")
    if p.is_dir():
        meta_path = p / METADATA_NAME
        if not meta_path.is_file():
            raise ArtifactError(f"{p} is not a fastflow export directory: it has no {METADATA_NAME}. "
                                f"{_how_to_export(p)}")
    elif p.name == METADATA_NAME:
        meta_path = p
    else:
        meta_path = p.parent / METADATA_NAME
        if not meta_path.is_file():
            if p.suffix == ".onnx":
                return _read_bare_onnx(p)
            raise ArtifactError(f"{p} is neither an ONNX file nor part of a fastflow export (no {METADATA_NAME} "
                                f"beside it). {_how_to_export(p.parent)}")
    meta = _load_meta(meta_path)
    file = meta_path.parent / meta["file"]
    if p.is_file() and p != meta_path and p.resolve() != file.resolve():
        raise ArtifactError(f"{p} is not the file that {meta_path} describes ({meta['file']})")
    if not file.is_file():
        raise ArtifactError(f"export {meta_path.parent} is incomplete: {file} is missing. Export it again.")
    where = str(meta_path)
    inputs = [TensorSpec.from_json(d, where) for d in meta["inputs"]]
    outputs = [TensorSpec.from_json(d, where) for d in meta["outputs"]]
    exp = Exported(dir=meta_path.parent, file=file, meta=meta, inputs=inputs, outputs=outputs)
    size, want = file.stat().st_size, meta.get("file_size")
    if isinstance(want, int) and size != want:
        raise ArtifactError(f"{file} is truncated or was replaced: it has {size} bytes, the export wrote {want}. "
                            f"Export it again.")
    return exp


def _load_meta(meta_path: Path) -> dict:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(f"cannot read export metadata {meta_path}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{meta_path} is not fastflow export metadata (its 'format' is not {FORMAT!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{meta_path} has format_version {version!r}; this fastflow reads up to "
                            f"{FORMAT_VERSION}. Upgrade fastflow or export again.")
    if meta.get("backend") not in RUNTIME_BACKEND:
        raise ArtifactError(f"{meta_path}: 'backend' must be one of {sorted(RUNTIME_BACKEND)}, "
                            f"got {meta.get('backend')!r}")
    f = meta.get("file")
    if not isinstance(f, str) or not f or "/" in f or "\\" in f or f.startswith("."):
        raise ArtifactError(f"{meta_path}: 'file' must name a file in the export directory, got {f!r}")
    for key in ("inputs", "outputs"):
        if not isinstance(meta.get(key), list) or not meta[key]:
            raise ArtifactError(f"{meta_path}: '{key}' must be a non-empty list")
    if len(meta["inputs"]) < 2:
        raise ArtifactError(f"{meta_path}: the graph needs at least the inputs x and t")
    return meta


def _onnx_specs(model_proto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    def spec(vi):
        tt = vi.type.tensor_type
        shape = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            else:
                shape.append(d.dim_param or BATCH_DIM)
        return TensorSpec(vi.name, shape, _ONNX_DTYPES.get(tt.elem_type, f"onnx-type-{tt.elem_type}"))

    inits = {i.name for i in model_proto.graph.initializer}
    ins = [spec(v) for v in model_proto.graph.input if v.name not in inits]
    return ins, [spec(v) for v in model_proto.graph.output]


def _load_onnx_proto(path: Path):
    onnx = _require("onnx", ONNX_REQUIRES)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}). "
                            f"Export it again.") from None
    if not proto.graph.node or not proto.graph.output:
        raise ArtifactError(f"{path} is not a valid ONNX model (its graph has no nodes or outputs). "
                            f"Export it again.")
    return proto


def _read_bare_onnx(p: Path) -> Exported:
    proto = _load_onnx_proto(p)
    ins, outs = _onnx_specs(proto)
    if len(ins) < 2:
        raise ArtifactError(f"{p} has {len(ins)} input(s); a velocity graph takes at least x and t")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "backend": "onnx", "file": p.name,
            "inputs": [s.to_json() for s in ins], "outputs": [s.to_json() for s in outs]}
    return Exported(dir=p.parent, file=p, meta=meta, inputs=ins, outputs=outs)


# -- helpers ----------------------------------------------------------------------------------------
def _require(module: str, requires: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"{module} is not installed ({exc}). Install it with: {requires}") from None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def _staging(out_dir: Path):
    """A temporary folder inside ``out_dir`` (same filesystem, so renames are atomic),
    removed whatever happens; ``out_dir`` itself too when this export created it and
    failed. A folder holding model files that fastflow did not write is refused, and
    staging folders an interrupted export left are removed first."""
    foreign = [n for n in ("model.onnx", "model.plan") if (out_dir / n).exists()]
    if foreign and not (out_dir / METADATA_NAME).exists():
        raise ExportError(f"{out_dir} already holds {foreign[0]}, which is not a fastflow export (no "
                          f"{METADATA_NAME}); it was left untouched. Pass another --out or move it away.")
    created = [p for p in [out_dir, *out_dir.parents] if not p.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in out_dir.glob(".fastflow-export-*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fastflow-export-", dir=out_dir))
    except OSError as exc:
        raise ExportError(f"--out {out_dir} cannot be written ({exc.strerror or exc}); pass a writable folder") from None
    ok = False
    try:
        yield tmp
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            for p in created:  # deepest first; only folders this export made, and only if empty
                try:
                    p.rmdir()
                except OSError:
                    break


def _publish(tmp: Path, out_dir: Path, meta: dict) -> Path:
    """Move every file of ``tmp`` into ``out_dir`` and write the metadata last; the old
    metadata goes first, so a reader never pairs new files with old metadata."""
    meta_tmp = tmp / (METADATA_NAME + ".tmp")
    meta_tmp.write_text(json.dumps(meta, indent=1) + "\n")
    (out_dir / METADATA_NAME).unlink(missing_ok=True)
    for f in sorted(tmp.iterdir()):
        if f != meta_tmp and f.is_file():
            os.replace(f, out_dir / f.name)
    os.replace(meta_tmp, out_dir / METADATA_NAME)
    return out_dir / METADATA_NAME


class _Positional:
    """Builds an nn.Module whose forward takes the graph inputs positionally, so every
    input gets a dynamic batch dimension and its own name; optionally runs the model in
    a reduced precision with float32 inputs and outputs."""

    @staticmethod
    def wrap(fn, names: list[str], compute_dtype=None):
        import torch

        class Positional(torch.nn.Module):
            def __init__(self):
                super().__init__()
                if isinstance(fn, torch.nn.Module):
                    self.inner = fn
                else:
                    self.fn = fn

            def forward(self, *args):
                f = self.inner if hasattr(self, "inner") else self.fn
                if compute_dtype is not None:
                    args = [a.to(compute_dtype) if a.is_floating_point() else a for a in args]
                out = f(args[0], args[1], **dict(zip(names[2:], args[2:])))
                if compute_dtype is not None:
                    out = out.float()
                return out

        return Positional().eval()


def _resolve_source(model: Any, example_inputs: dict | None, batch: int):
    """(callable, example_inputs, model_name, model_key, spec) from a registry name, a
    ModelSpec, or a module with example inputs."""
    import fastflow
    from .models import ModelSpec

    spec = None
    if isinstance(model, str):
        spec = fastflow.get_model(model)
    elif isinstance(model, ModelSpec):
        spec = model
    if spec is not None:
        try:
            fn = spec.build()
        except FastFlowError:
            raise
        except Exception as exc:  # e.g. the weights are not there
            raise ExportError(f"cannot build model '{spec.name}': {type(exc).__name__}: {exc}") from None
        if example_inputs is None:
            example_inputs = example_inputs_for(spec, batch)
        return fn, example_inputs, spec.name, spec.key, spec
    if not callable(model):
        raise ExportError(f"cannot export {type(model).__name__}: pass a registered model name, a ModelSpec, "
                          f"or an nn.Module/callable with example_inputs")
    if example_inputs is None:
        raise ExportError("exporting a module needs example_inputs, e.g. {'x': x, 't': t, 'label': label}")
    return model, example_inputs, None, None, None


def example_inputs_for(spec, batch: int = 2) -> dict:
    """Example inputs for a registered model: x (batch, *shape), t (batch,) and, for a
    class-conditional model, label (batch,) int64 (the null label included)."""
    import torch

    g = torch.Generator().manual_seed(0)
    ex = {"x": torch.randn((batch, *spec.shape), generator=g), "t": torch.rand(batch, generator=g)}
    if spec.num_labels:
        top = spec.num_labels if spec.null_label is None else max(spec.num_labels, spec.null_label + 1)
        lab = torch.randint(0, top, (batch,), generator=g)
        if spec.null_label is not None:
            lab[-1] = spec.null_label
        ex["label"] = lab
    return ex


def _check_example_inputs(example_inputs) -> dict:
    import torch

    if not isinstance(example_inputs, dict) or len(example_inputs) < 2:
        raise ExportError("example_inputs must be a dict with at least x and t, in the model's argument order, "
                          "e.g. {'x': x, 't': t, 'label': label}")
    batch = None
    for name, v in example_inputs.items():
        if not torch.is_tensor(v) or v.ndim == 0:
            raise ExportError(f"example input '{name}' must be a tensor with a batch dimension, got {v!r}")
        if batch is None:
            batch = v.shape[0]
        elif v.shape[0] != batch:
            raise ExportError(f"example inputs must share the batch size: '{name}' has {v.shape[0]}, x has {batch}")
    if batch < 2:
        raise ExportError("trace with a batch of at least 2 (batch 1 would be specialised into the graph)")
    return {k: v.detach().cpu() for k, v in example_inputs.items()}


def _random_like(example: dict, batch: int, seed: int) -> dict:
    """Random inputs shaped like ``example`` with another batch size: floats ~ N(0,1)
    (``t`` uniform in [0, 1]), integers drawn from the example's values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, v) in enumerate(example.items()):
        shape = (batch, *v.shape[1:])
        if v.is_floating_point():
            r = torch.rand(shape, generator=g) if i == 1 else torch.randn(shape, generator=g)
            out[name] = r.to(v.dtype)
        else:
            pool = v.reshape(-1).unique()
            out[name] = pool[torch.randint(0, pool.numel(), shape, generator=g)].to(v.dtype)
    return out


def check_agreement(got, want, batch: int, tolerance: float, what: str, hint: str = "") -> float:
    """The max abs error of an export's output ``got`` against PyTorch's ``want`` at ``batch``;
    raises :class:`ExportVerificationError` (naming ``what``) on a shape mismatch or an error
    above ``tolerance`` (relative to the output's scale)."""
    if tuple(got.shape) != tuple(want.shape):
        raise ExportVerificationError(f"{what} returned shape {tuple(got.shape)} at batch {batch}, PyTorch "
                                      f"{tuple(want.shape)}; nothing was written")
    err, scale = _max_error(got, want)
    if not err <= tolerance * scale:
        raise ExportVerificationError(
            f"{what} disagrees with PyTorch at batch {batch}: max abs error {err:.3g} > tolerance "
            f"{tolerance * scale:.3g}; nothing was written.{' ' + hint if hint else ''}")
    return err


def _max_error(a, b) -> tuple[float, float]:
    """(max abs error, allowed scale = max(1, |b|max))."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max()), max(1.0, float(b.abs().max()))


def _fastflow_version() -> str:
    from . import __version__

    return __version__


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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
    proto = _load_onnx_proto(onnx_path)
    ins, outs = _onnx_specs(proto)
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
    torch = _require("torch", "pip install torch")
    _require("onnx", ONNX_REQUIRES)
    _require("onnxscript", ONNX_REQUIRES)
    if verify:
        _require("onnxruntime", ONNX_REQUIRES)
    log = log or (lambda m: None)
    fn, example_inputs, name, key, spec = _resolve_source(model, example_inputs, 2)
    model_name = model_name or name
    model_key = model_key or key or model_name
    example = _check_example_inputs(example_inputs)
    names = list(example)
    tolerance = DEFAULT_TOLERANCE["fp32"] if tolerance is None else float(tolerance)
    out_dir = Path(out_dir)

    src_hash = source_sha256(fn)
    if isinstance(fn, torch.nn.Module):
        fn.eval()
        if compute_dtype is not None:
            fn.to(compute_dtype)
    wrapped = _Positional.wrap(fn, names, compute_dtype)
    args = tuple(example.values())

    with _staging(out_dir) as tmp:
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
            "fastflow_version": _fastflow_version(),
            "torch_version": torch.__version__,
            "onnx_version": _version("onnx"),
            "onnxruntime_version": _version("onnxruntime") if verify else None,
            "export_seconds": round(export_seconds, 2),
            "created": _now(),
        }
        if spec is not None:
            meta["spec"] = {"shape": list(spec.shape), "num_labels": spec.num_labels,
                            "null_label": spec.null_label, "default_guidance": spec.default_guidance,
                            "default_shift": spec.default_shift, "is_image": spec.is_image}
        _publish(tmp, out_dir, meta)
    return read_export(out_dir)


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


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
        feeds = example if i == 0 else _random_like(example, b, seed=1234 + b)
        names = list(feeds)
        with torch.no_grad():
            ref = fn(feeds[names[0]], feeds[names[1]], **{k: feeds[k] for k in names[2:]})
        got = sess.run(None, {k: v.contiguous().numpy() for k, v in feeds.items()})[0]
        worst = max(worst, check_agreement(torch.from_numpy(got), ref, b, tolerance, "the ONNX graph",
                                           "Check the model for data-dependent control flow or raise --tolerance."))
        checked.append(b)
    return worst, checked


# -- ONNX Runtime sessions (shared with the onnxruntime backend) ------------------------------------
def ort_session(path: Path, device=None, *, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` for ``path``: CPU (all graph optimisations,
    ``threads`` intra-op threads — default ``FASTFLOW_ORT_THREADS`` or ORT's choice —
    no spin-waiting between calls) or, for a CUDA ``device``, the CUDA provider."""
    ort = _require("onnxruntime", ONNX_REQUIRES)
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
    trt = _require("tensorrt", TRT_REQUIRES)
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
    from .models import ModelSpec

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


class _Ticker:
    """Prints 'still building' with the elapsed time every ``every`` seconds."""

    def __init__(self, what: str, log: Callable[[str], None], every: float = 15.0):
        self.what, self.log, self.every = what, log, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        start = time.perf_counter()
        while not self._stop.wait(self.every):
            self.log(f"  ... {self.what}: {time.perf_counter() - start:.0f} s")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=1)


def build_trt_engine(source: Any, out_dir: str | os.PathLike, example_inputs: dict | None = None, *,
                     model_name: str | None = None, precision: str = "fp16", min_batch: int = DEFAULT_PROFILE[0],
                     opt_batch: int = DEFAULT_PROFILE[1], max_batch: int = DEFAULT_PROFILE[2],
                     tolerance: float | None = None, verify: bool = True, workspace_gib: float | None = None,
                     opset: int | None = None, log: Callable[[str], None] | None = None) -> Exported:
    """Build a TensorRT engine into ``out_dir/model.plan`` (needs a GPU and ``tensorrt``).

    ``source``: a registered model name, a ModelSpec or module (+ ``example_inputs``):
    exported to ONNX first, in ``precision`` for fp16/bf16 (strongly typed network, float32
    inputs and outputs); or an ONNX export directory (fp32 graph: fp16/bf16 use the
    builder's precision flags where this TensorRT has them, i.e. TensorRT 10).
    The profile covers batch sizes ``min_batch..max_batch``, tuned for ``opt_batch``.
    The intermediate ONNX graph uses ``opset`` (default 18: GELU stays decomposed into
    primitive ops, LayerNormalization is native; every TensorRT 10 parser reads it).
    With ``verify``, the engine is compared with the model in PyTorch (fp32) on random
    inputs when the model is available.
    """
    trt = require_tensorrt()
    import torch

    log = log or (lambda m: None)
    if precision not in ("fp16", "bf16", "fp32"):
        raise ExportError(f"--precision must be fp16, bf16 or fp32, got {precision!r}")
    if not (1 <= min_batch <= opt_batch <= max_batch):
        raise ExportError(f"the batch profile needs 1 ≤ min ≤ opt ≤ max, got {min_batch}, {opt_batch}, {max_batch}")
    out_dir = Path(out_dir)
    tolerance = DEFAULT_TOLERANCE[f"trt-{precision}"] if tolerance is None else float(tolerance)
    has_weak_flags = hasattr(trt.BuilderFlag, "FP16")
    ref_fn, example = None, None
    onnx_source = None

    with _staging(out_dir) as tmp:
        if isinstance(source, (str, os.PathLike, Exported)) and is_export(source):
            src = read_export(source, backend="onnx")
            src.verify_file()
            if src.dir.resolve() == out_dir.resolve():
                raise ExportError(f"--out {out_dir} is the ONNX export the engine is built from; choose another "
                                  f"directory for the engine")
            onnx_path, onnx_meta, onnx_source = src.file, src.meta, str(src.dir.resolve())
            strong = False
            if precision != "fp32" and not has_weak_flags:
                raise ExportError(
                    f"TensorRT {trt.__version__} builds strongly typed networks only, so it cannot lower the fp32 "
                    f"graph {src.file} to {precision}. Build from the model instead: fastflow export --backend trt "
                    f"--model {src.model or 'NAME'} --precision {precision}, or use --precision fp32.")
            model_name = model_name or src.model
            if verify and src.model:
                try:
                    ref_fn = src.spec().build()
                    check_source(src, ref_fn)
                except Exception as exc:  # not registered, weights missing or changed
                    log(f"not verifying against PyTorch: model '{src.model}' is not available as exported "
                        f"({type(exc).__name__}: {exc})")
                    ref_fn = None
        else:
            ref_fn, example, name, key, _ = _resolve_source(source, example_inputs, 2)
            model_name = model_name or name
            strong = precision != "fp32"
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
            import copy

            export_fn = copy.deepcopy(ref_fn) if isinstance(ref_fn, torch.nn.Module) and dtype else ref_fn
            sub = tmp / "onnx"
            onnx_exp = export_onnx(export_fn, sub, example, model_name=model_name, model_key=key,
                                   verify=(dtype is None), compute_dtype=dtype, opset=opset or TRT_OPSET, log=log)
            if dtype is not None:  # the hash names the source weights, not their fp16/bf16 copy
                onnx_exp.meta["source_sha256"] = source_sha256(ref_fn)
            onnx_path, onnx_meta = onnx_exp.file, onnx_exp.meta

        log(f"building a TensorRT {trt.__version__} {precision} engine for batch {min_batch}..{max_batch} "
            f"(opt {opt_batch}); this takes a while ...")
        started = time.perf_counter()
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        if strong and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        if workspace_gib:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        if not strong and precision != "fp32":
            config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = list(tensor.shape)
            if not shape or shape[0] != -1 or any(d < 0 for d in shape[1:]):
                raise ExportError(f"input '{tensor.name}' of {onnx_path} has shape {shape}; expected a dynamic "
                                  f"batch dimension first and fixed dimensions after it")
            profile.set_shape(tensor.name, [min_batch, *shape[1:]], [opt_batch, *shape[1:]],
                              [max_batch, *shape[1:]])
        config.add_optimization_profile(profile)
        with _Ticker("building the TensorRT engine", log):
            serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see its messages above)")
        build_seconds = time.perf_counter() - started
        log(f"built in {build_seconds:.0f} s")
        plan = tmp / ENGINE_FILE
        with open(plan, "wb") as f:
            f.write(memoryview(serialized))
        del serialized
        shutil.rmtree(tmp / "onnx", ignore_errors=True)

        gpu = gpu_identity()
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "backend": "trt",
            "file": ENGINE_FILE,
            "model": model_name,
            "model_key": onnx_meta.get("model_key") or model_name,
            "inputs": onnx_meta["inputs"],
            "outputs": onnx_meta["outputs"],
            "dynamic_dims": {BATCH_DIM: {"min": min_batch, "max": max_batch}},
            "precision": precision,
            "typing": "strong" if strong else "weak",
            "opset": onnx_meta.get("opset"),
            "profile": {"min": min_batch, "opt": opt_batch, "max": max_batch},
            "tensorrt_version": trt.__version__,
            "gpu": gpu,
            "source_sha256": onnx_meta.get("source_sha256"),
            "onnx_sha256": onnx_meta.get("file_sha256"),
            "onnx_source": onnx_source,
            "file_sha256": sha256_file(plan),
            "file_size": plan.stat().st_size,
            "build_seconds": round(build_seconds, 1),
            "fastflow_version": _fastflow_version(),
            "torch_version": torch.__version__,
            "rebuild_command": (f"fastflow export --backend trt --model {onnx_source or model_name or 'NAME'} "
                                f"--out {out_dir} --precision {precision} --min-batch {min_batch} "
                                f"--opt-batch {opt_batch} --max-batch {max_batch}"),
            "max_abs_error": None,
            "tolerance": None,
            "created": _now(),
        }
        if "spec" in onnx_meta:
            meta["spec"] = onnx_meta["spec"]
        if verify and ref_fn is not None:
            log("verifying the engine against PyTorch (fp32) ...")
            exp = Exported(dir=tmp, file=plan, meta=meta,
                           inputs=[TensorSpec.from_json(d, "build") for d in meta["inputs"]],
                           outputs=[TensorSpec.from_json(d, "build") for d in meta["outputs"]])
            if example is None:
                import fastflow

                example = example_inputs_for(fastflow.get_model(model_name), 2) if model_name else None
            if example is not None:
                err, checked = _verify_trt(exp, ref_fn, example, tolerance, (min_batch, opt_batch, max_batch))
                meta.update(max_abs_error=err, tolerance=tolerance, verified_batch_sizes=checked)
                log(f"max abs error {err:.3g} at batch sizes {checked} (tolerance {tolerance:g})")
        _publish(tmp, out_dir, meta)
    return read_export(out_dir)


def _verify_trt(exp: Exported, ref_fn, example: dict, tolerance: float, profile) -> tuple[float, list[int]]:
    import copy

    import torch

    from .backends.tensorrt_backend import TrtRunner

    runner = TrtRunner(exp, device=torch.device("cuda", torch.cuda.current_device()), check=False)
    ref = copy.deepcopy(ref_fn) if isinstance(ref_fn, torch.nn.Module) else ref_fn
    if isinstance(ref, torch.nn.Module):
        ref = ref.float().cuda().eval()
    worst, checked = 0.0, []
    for b in sorted({profile[0], profile[1], profile[2]}):
        feeds = {k: v.cuda() for k, v in _random_like(example, b, seed=99 + b).items()}
        names = list(feeds)
        with torch.no_grad():
            want = ref(feeds[names[0]], feeds[names[1]], **{k: feeds[k] for k in names[2:]})
            got = runner(feeds[names[0]], feeds[names[1]], **{k: feeds[k] for k in names[2:]})
        torch.cuda.synchronize()
        worst = max(worst, check_agreement(got, want, b, tolerance, "the TensorRT engine",
                                           "Try --precision fp32 or raise --tolerance."))
        checked.append(b)
    return worst, checked


# -- the command --------------------------------------------------------------------------------------
def run_export(backend: str, model: str, out_dir: str | None, *, precision: str | None = None,
               opset: int | None = None, tolerance: float | None = None, min_batch: int = DEFAULT_PROFILE[0],
               opt_batch: int = DEFAULT_PROFILE[1], max_batch: int = DEFAULT_PROFILE[2],
               log: Callable[[str], None] = _stderr) -> Exported:
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


@hookimpl
def register_commands(cli):
    import click

    @cli.command("export")
    @click.option("--backend", type=click.Choice(["onnx", "trt"]), default="onnx", show_default=True,
                  help="onnx: an ONNX graph for the onnxruntime backend; trt: a TensorRT engine (GPU).")
    @click.option("--model", default=DEFAULT_MODEL, show_default=True, metavar="NAME|DIR",
                  help="A registered model name; for --backend trt also an ONNX export directory.")
    @click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
                  help="Export directory (default: fastflow-export/MODEL-BACKEND).")
    @click.option("--precision", type=click.Choice(["fp16", "bf16", "fp32"]), default=None,
                  help="TensorRT engine precision (default fp16; ONNX graphs are fp32).")
    @click.option("--min-batch", default=DEFAULT_PROFILE[0], show_default=True, type=click.IntRange(min=1),
                  help="Smallest batch the TensorRT engine accepts.")
    @click.option("--opt-batch", default=DEFAULT_PROFILE[1], show_default=True, type=click.IntRange(min=1),
                  help="Batch the TensorRT engine is tuned for (guidance doubles the batch).")
    @click.option("--max-batch", default=DEFAULT_PROFILE[2], show_default=True, type=click.IntRange(min=1),
                  help="Largest batch the TensorRT engine accepts.")
    @click.option("--opset", default=None, type=click.IntRange(min=7),
                  help=f"ONNX opset (default: the exporter's; {TRT_OPSET} for the graph a TensorRT engine is built from).")
    @click.option("--tolerance", default=None, type=click.FloatRange(min=0, min_open=True),
                  help="Max abs error allowed against PyTorch, scaled by max(1, |v|max) "
                       "(default 1e-3 for ONNX; TensorRT 1e-2 fp32, 5e-2 fp16, 0.2 bf16).")
    @click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
    @click.option("--prompt", default=None, help="Export the denoiser of a diffusers pipeline (--model glyphs, "
                  "a folder or Hub id) as it is called for this prompt; run it with fastflow run --export DIR.")
    @click.option("--height", default=None, type=click.IntRange(min=8), help="With --prompt: image height.")
    @click.option("--width", default=None, type=click.IntRange(min=8), help="With --prompt: image width.")
    def export(backend, model, out_dir, precision, min_batch, opt_batch, max_batch, opset, tolerance, as_json,
               prompt, height, width):
        """Export a model to ONNX or build a TensorRT engine, verified against PyTorch.

        \b
        Examples:
          fastflow export --backend onnx --model glyphs --out exports/glyphs-onnx
          fastflow run --backend onnxruntime --model exports/glyphs-onnx
          fastflow export --backend trt --model glyphs --out exports/glyphs-trt --precision fp16
          fastflow export --backend trt --model exports/glyphs-onnx --out exports/glyphs-trt-fp32 --precision fp32

        The export directory holds the graph (model.onnx) or engine (model.plan) and
        fastflow-export.json; files appear only once verified. Exits with status 2 when
        the model, a dependency or the verification fails.
        """
        from .cli import UsageFailure

        if prompt is not None:  # a pipeline's denoiser, swapped in by run --export
            if backend != "onnx":
                raise UsageFailure("--prompt exports a pipeline denoiser to ONNX: use --backend onnx")
            if out_dir is None:
                raise UsageFailure("--prompt needs --out DIR")
            from .pipeline_backends import export_pipeline_denoiser

            try:
                exp = export_pipeline_denoiser(model, prompt, out_dir, height=height, width=width,
                                               log=(lambda m: None) if as_json else _stderr)
            except FastFlowError as exc:
                raise UsageFailure(str(exc)) from None
            click.echo(json.dumps({**exp.meta, "dir": str(exp.dir)}, indent=1) if as_json else f"exported {exp.dir}")
            return
        try:
            exp = run_export(backend, model, out_dir, precision=precision, opset=opset, tolerance=tolerance,
                             min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                             log=(lambda m: None) if as_json else _stderr)
        except FastFlowError as exc:
            raise UsageFailure(str(exc)) from None
        if as_json:
            click.echo(json.dumps({**exp.meta, "dir": str(exp.dir)}, indent=1))
            return
        m = exp.meta
        rows = [("export", str(exp.dir)), ("file", f"{exp.file.name} ({m['file_size'] / 1e6:.1f} MB)"),
                ("model", m.get("model")), ("backend", f"{m['backend']} (run with --backend {exp.runtime_backend})"),
                ("inputs", ", ".join(f"{s.name} {s.describe()}" for s in exp.inputs)),
                ("outputs", ", ".join(f"{s.name} {s.describe()}" for s in exp.outputs))]
        if m["backend"] == "onnx":
            rows.append(("opset", m.get("opset")))
        else:
            rows += [("precision", m.get("precision")), ("profile", "{min}..{max} (opt {opt})".format(**m["profile"])),
                     ("TensorRT", m.get("tensorrt_version")),
                     ("GPU", f"{m['gpu']['name']} (sm {m['gpu']['compute_capability']})")]
        err = m.get("max_abs_error")
        rows.append(("max abs error", "not verified" if err is None else f"{err:.3g} (tolerance {m['tolerance']:g})"))
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            click.echo(f"{k:<{width}}  {v}")

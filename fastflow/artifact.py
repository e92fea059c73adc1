"""The export format, read back: ``DIR/model.onnx`` or ``DIR/model.plan`` beside
``DIR/fastflow-export.json`` (model name, inputs/outputs, hashes, versions).

:func:`read_export` validates a directory (or a bare ``.onnx`` file) and returns an
:class:`Exported`; a missing, truncated or corrupt one raises
:class:`~fastflow.errors.ArtifactError` naming the file and how to rebuild it. Writing
exports is :mod:`fastflow.export`'s job; running them, the backends'.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactError, InputMismatchError, MissingDependencyError

METADATA_NAME = "fastflow-export.json"
FORMAT = "fastflow-export"
FORMAT_VERSION = 1
ONNX_FILE = "model.onnx"
ENGINE_FILE = "model.plan"
BATCH_DIM = "batch"
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


def onnx_specs(model_proto) -> tuple[list[TensorSpec], list[TensorSpec]]:
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


def load_onnx_proto(path: Path):
    onnx = require("onnx", ONNX_REQUIRES)
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
    proto = load_onnx_proto(p)
    ins, outs = onnx_specs(proto)
    if len(ins) < 2:
        raise ArtifactError(f"{p} has {len(ins)} input(s); a velocity graph takes at least x and t")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "backend": "onnx", "file": p.name,
            "inputs": [s.to_json() for s in ins], "outputs": [s.to_json() for s in outs]}
    return Exported(dir=p.parent, file=p, meta=meta, inputs=ins, outputs=outs)



def require(module: str, requires: str):
    """Import ``module`` or raise MissingDependencyError naming the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"{module} is not installed ({exc}). Install it with: {requires}") from None

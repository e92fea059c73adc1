"""What every exporter shares: staged writes published atomically, the model source and
its example inputs, agreement with PyTorch, version stamps."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .artifact import METADATA_NAME
from .errors import ExportError, ExportVerificationError, FastFlowError

# -- helpers ----------------------------------------------------------------------------------------
def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def staging(out_dir: Path):
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


def publish(tmp: Path, out_dir: Path, meta: dict) -> Path:
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


class Positional:
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


def resolve_source(model: Any, example_inputs: dict | None, batch: int):
    """(callable, example_inputs, model_name, model_key, spec) from a registry name, a
    ModelSpec, or a module with example inputs."""
    import fastflow
    from .modelspec import ModelSpec

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


def check_example_inputs(example_inputs) -> dict:
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


def random_like(example: dict, batch: int, seed: int) -> dict:
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
    err, scale = max_error(got, want)
    if not err <= tolerance * scale:
        raise ExportVerificationError(
            f"{what} disagrees with PyTorch at batch {batch}: max abs error {err:.3g} > tolerance "
            f"{tolerance * scale:.3g}; nothing was written.{' ' + hint if hint else ''}")
    return err


def max_error(a, b) -> tuple[float, float]:
    """(max abs error, allowed scale = max(1, |b|max))."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max()), max(1.0, float(b.abs().max()))


def fastflow_version() -> str:
    from . import __version__

    return __version__


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def package_version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None

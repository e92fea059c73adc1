"""``torch-compile``: the model compiled by ``torch.compile`` (inductor), once per model.

On a CPU inductor fuses the transformer's elementwise work into C++ kernels (it needs a
C++ compiler, ``g++``); on CUDA it also captures CUDA graphs (``mode="reduce-overhead"``),
which is what a small, launch-bound model needs (each output is copied out of the graph's
memory, since the sampler keeps the last two velocities). The batch dimension is compiled dynamic,
so the batch sizes a run meets (a calibration row alone, the rest of the batch, guidance
doubling it) share one compilation.

Compiling takes long (tens of seconds on 2 CPU cores); it happens at the first
evaluation, which ``fastflow run`` makes untimed and reports as the backend's warm-up.
The compiled module is cached per model object and device, so every ``fastflow.sample``
call after the first reuses it. Numerics: the same as eager up to float32 rounding.
"""

from __future__ import annotations

import threading
import time
import weakref

from fastflow.hookspecs import hookimpl

_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # module -> {device: Compiled}
_LOCK = threading.Lock()


class Compiled:
    """A compiled module; ``compile_seconds`` is filled in by its first call."""

    def __init__(self, module, mode: str):
        import torch

        self.module = module
        self.mode = mode
        self.compiled = torch.compile(module, mode=mode, dynamic=True)
        self.compile_seconds: float | None = None

    def __call__(self, *args, **kwargs):
        if self.compile_seconds is None:
            started = time.perf_counter()
            out = self._call(args, kwargs)
            self.compile_seconds = time.perf_counter() - started
            return out
        return self._call(args, kwargs)

    def _call(self, args, kwargs):
        if self.mode != "reduce-overhead":
            return self.compiled(*args, **kwargs)
        # CUDA graphs replay into the same output memory: the sampler keeps the last two
        # velocities, so each call starts a new graph step and hands back its own copy
        import torch

        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(*args, **kwargs).clone()


class TorchCompileBackend:
    name = "torch-compile"

    def available(self):
        import shutil

        try:
            import torch  # noqa: F401
        except ImportError as exc:
            return False, f"torch is not installed ({exc})"
        if shutil.which("g++") is None and shutil.which("c++") is None:
            return False, "inductor needs a C++ compiler (g++) on the PATH"
        return True, ""

    def load(self, model, device=None, dtype=None):
        import torch

        from fastflow.modelspec import ModelSpec

        if isinstance(model, ModelSpec):
            model = model.build()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"the torch-compile backend compiles an nn.Module, got {type(model).__name__}; "
                            f"use --backend torch for other callables")
        model.eval()
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        dev = str(device if device is not None else next(model.parameters(), torch.empty(0)).device)
        mode = "reduce-overhead" if dev.startswith("cuda") else "default"
        with _LOCK:
            per_device = _COMPILED.setdefault(model, {})
            if dev not in per_device:
                per_device[dev] = Compiled(model, mode)
            return per_device[dev]


def compile_seconds(model) -> float | None:
    """How long the first call of ``model``'s compiled form took (None: not compiled yet)."""
    with _LOCK:
        found = [c.compile_seconds for c in _COMPILED.get(model, {}).values() if c.compile_seconds is not None]
    return max(found) if found else None


@hookimpl
def register_backends(register):
    register("torch-compile", TorchCompileBackend,
             description="torch.compile (inductor; CUDA graphs on a GPU), compiled once per model",
             requires="pip install torch (and a C++ compiler, g++, for the CPU)")

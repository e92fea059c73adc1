"""The network in a lower precision, the sampler in float32.

:func:`at_precision` wraps an ``nn.Module`` so that its weights live in ``dtype``
(bfloat16, float16) while the sampling state stays what the caller gives it: every
floating-point input is cast to ``dtype`` on the way in and the velocity back to the
input's dtype on the way out. That is how large flow models run (FLUX in bf16), and
it is what a CPU with AVX512-BF16 or AMX multiplies fast: on the shipped glyph model
bf16 is 1.4x eager fp32 at batch 16, 1.7x under ``torch.compile`` (docs/benchmarks.md).

Its cost in fidelity is the network's rounding, paid at every evaluation; measure it
against fp32 on the same seeds before trusting it (``scripts/bench_backends.py
--bf16`` reports the PSNR of all-steps samples).

>>> import torch
>>> net = at_precision(torch.nn.Linear(2, 2), "bf16")
>>> net(torch.ones(1, 2)).dtype, net.inner.weight.dtype
(torch.float32, torch.bfloat16)
"""

from __future__ import annotations

import functools

from .errors import OptionError

NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
         "fp16": "float16", "float16": "float16"}


def torch_dtype(dtype):
    """A torch dtype from a name (``fp32``/``bf16``/``fp16`` or the long forms) or a dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str) or dtype.lower() not in NAMES:
        raise OptionError(f"dtype must be one of fp32, bf16 or fp16, got {dtype!r}")
    return getattr(torch, NAMES[dtype.lower()])


def at_precision(module, dtype):
    """``module`` computing in ``dtype`` behind float inputs and outputs (fp32: ``module`` itself).

    The module is converted in place (its float32 weights are not kept twice)."""
    import torch

    dt = torch_dtype(dtype)
    if dt == torch.float32:
        return module
    if not isinstance(module, torch.nn.Module):
        raise OptionError(f"a lower precision needs an nn.Module to convert, got {type(module).__name__}")
    return _wrapper()(module, dt)


def _cast(value, dtype):
    import torch

    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


@functools.lru_cache(maxsize=None)
def _wrapper():
    """The wrapper class (it subclasses ``nn.Module``, so it is made when torch is first needed)."""
    import torch

    class AtPrecision(torch.nn.Module):
        """``inner`` with weights in ``dtype``; float inputs in, outputs in the first input's dtype."""

        def __init__(self, inner, dtype):
            super().__init__()
            self.inner = inner.to(dtype).eval()
            self.dtype = dtype

        def forward(self, x, *args, **kwargs):
            out = self.inner(x.to(self.dtype), *_cast(args, self.dtype), **_cast(kwargs, self.dtype))
            return out.to(x.dtype)

    return AtPrecision

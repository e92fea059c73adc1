"""The torch-compile backend: compiled once per model, the same numbers as eager (float32
rounding), every batch size of a run on one compilation, usable from fastflow.sample."""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")

import fastflow  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("g++") is None, reason="inductor needs a C++ compiler (g++)")]


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(6, 6, generator=g) * 0.3)

    def forward(self, x, t, label=None):
        return torch.tanh(x @ self.w) * (1 + t.view(-1, 1)) + (0 if label is None else label.view(-1, 1) * 0.1)


def test_compiled_sampling_matches_eager_and_compiles_once(one_torch_thread):
    from fastflow.backends.torch_compile_backend import compile_seconds

    model = Tiny()
    noise = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    label = torch.arange(5)
    eager = fastflow.sample(model, noise, steps=10, policy="fixed", label=label)
    be = fastflow.get_backend("torch-compile")
    first = fastflow.sample(model, noise, steps=10, policy="fixed", backend=be, label=label)
    assert first.nfe == eager.nfe == 5 and first.backend == "torch-compile"  # steps 0, 1, 4, 7, 9
    assert torch.allclose(first.x, eager.x, atol=1e-5, rtol=1e-5)
    spent = compile_seconds(model)
    assert spent is not None and spent > 0
    # other batch sizes (a calibration row alone, guidance doubling the batch) reuse the compilation
    fn = be.load(model)
    assert be.load(model) is fn
    with torch.inference_mode():
        for b in (1, 3, 10):
            x = torch.randn(b, 6)
            assert torch.allclose(fn(x, torch.full((b,), 0.5)), model(x, torch.full((b,), 0.5)), atol=1e-5)
    assert compile_seconds(model) == spent  # measured once, at the first call


def test_a_callable_that_is_not_a_module_is_refused_naming_the_fix():
    with pytest.raises(TypeError, match="--backend torch"):
        fastflow.get_backend("torch-compile").load(lambda x, t: -x)

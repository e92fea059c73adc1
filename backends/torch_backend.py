"""``torch``: PyTorch eager. Accepts an ``nn.Module``, any callable
``(x, t, **conditioning) -> v``, or a :class:`fastflow.models.ModelSpec`."""

from __future__ import annotations

from fastflow.hookspecs import hookimpl


class TorchBackend:
    name = "torch"

    def available(self):
        return True, ""

    def load(self, model, device=None, dtype=None):
        from fastflow.modelspec import ModelSpec

        if isinstance(model, ModelSpec):
            model = model.build()
        if not callable(model):
            raise TypeError(f"the torch backend needs a callable model, got {type(model).__name__}")
        import torch

        if isinstance(model, torch.nn.Module):
            model.eval()
            if device is not None or dtype is not None:
                model.to(device=device, dtype=dtype)
        return model


@hookimpl
def register_backends(register):
    register("torch", TorchBackend, description="PyTorch eager (any nn.Module or callable)",
             requires="pip install torch")

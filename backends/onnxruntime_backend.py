"""``onnxruntime``: run a graph exported by ``fastflow export --backend onnx``.

``load(model)`` takes the export directory (or its ``model.onnx``, or a bare ``.onnx``
file, or a :class:`fastflow.artifact.Exported`) and returns ``velocity(x, t, **cond) -> v``
on torch tensors:

* CPU tensors: ``CPUExecutionProvider`` with all graph optimisations and no
  spin-waiting; inputs are handed over without copies (``Tensor.numpy()`` shares
  memory) and the output array is wrapped by ``torch.from_numpy``.
* CUDA tensors (``onnxruntime-gpu``): ``CUDAExecutionProvider`` with I/O binding, so
  inputs and the output stay on the GPU; the output is a torch-allocated tensor.

Sessions are cached per (file, device), so calling ``load`` for every batch (as
``fastflow run`` does) creates the session once. Every call returns a fresh tensor.
Inputs are checked against the export's metadata: a wrong name, shape or dtype raises
:class:`fastflow.errors.InputMismatchError` naming the input and what the graph expects.
"""

from __future__ import annotations

import threading

from fastflow.sessions import RunnerCache, module_status
from fastflow.hookspecs import hookimpl

_SESSIONS = RunnerCache(4)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def available(self):
        return module_status("onnxruntime")

    def load(self, model, device=None, dtype=None):
        import torch

        from fastflow.artifact import read_export
        from fastflow.errors import InputMismatchError
        from fastflow.modelspec import ModelSpec

        if isinstance(model, ModelSpec) or isinstance(model, torch.nn.Module) or (
                callable(model) and not isinstance(model, (str, bytes))):
            name = model.name if isinstance(model, ModelSpec) else "NAME"
            raise InputMismatchError(
                "the onnxruntime backend runs an exported ONNX graph, not a PyTorch model. Export it first: "
                f"fastflow export --backend onnx --model {name} --out DIR, then pass DIR "
                "(fastflow run --backend onnxruntime --model DIR)")
        exp = read_export(model, backend="onnx")
        want = exp.inputs[0].dtype
        if dtype is not None and str(dtype).replace("torch.", "") != want:
            raise InputMismatchError(f"{exp.file} computes in {want}; it cannot run in {dtype}. Load it with "
                                     f"dtype=None or torch.{want}.")
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type not in ("cpu", "cuda"):
            raise InputMismatchError(f"the onnxruntime backend runs on cpu or cuda, not {device}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        def create():
            exp.verify_file()
            return OrtVelocity(exp, device)

        return _SESSIONS.get_or_create(exp.file, device, create)


class OrtVelocity:
    """``(x, t, **conditioning) -> v`` for one ONNX Runtime session."""

    def __init__(self, exp, device):
        from fastflow.artifact import torch_dtype
        from fastflow.sessions import ort_session

        self.exp = exp
        self.device = device
        self.session = ort_session(exp.file, device)
        self.input_names = [s.name for s in exp.inputs]
        self.output = exp.outputs[0]
        self.output_dtype = torch_dtype(self.output.dtype)
        self.key = exp.key
        self._lock = threading.Lock()  # an IOBinding is not shareable between threads
        self._binding = self.session.io_binding() if device.type == "cuda" else None

    def __repr__(self):
        return f"OrtVelocity({self.exp.file}, {self.device})"

    def __call__(self, x, t, **conditioning):
        tensors, dims = self.exp.bind(x, t, conditioning)
        if self._binding is not None:
            return self._run_cuda(tensors, dims)
        import torch

        feeds = {}
        for name, tensor in zip(self.input_names, tensors):
            if tensor.device.type != "cpu":
                raise _device_error(name, tensor, self.device, self.exp)
            feeds[name] = tensor.detach().contiguous().numpy()  # shares memory when contiguous
        out = self.session.run([self.output.name], feeds)[0]  # a new array every run
        return torch.from_numpy(out)

    def _run_cuda(self, tensors, dims):
        import numpy as np
        import torch

        from fastflow.artifact import torch_dtype

        index = self.device.index
        keep = []
        with self._lock:
            b = self._binding
            b.clear_binding_inputs()
            b.clear_binding_outputs()
            for name, tensor, spec in zip(self.input_names, tensors, self.exp.inputs):
                if tensor.device != self.device:
                    raise _device_error(name, tensor, self.device, self.exp)
                tensor = tensor.detach().contiguous()
                keep.append(tensor)
                b.bind_input(name, "cuda", index, _np_dtype(np, spec.dtype), list(tensor.shape), tensor.data_ptr())
            shape = self.output.resolve(dims)
            if any(d < 0 for d in shape):
                raise RuntimeError(f"cannot infer the shape of output '{self.output.name}' from the inputs")
            out = torch.empty(shape, dtype=torch_dtype(self.output.dtype), device=self.device)
            b.bind_output(self.output.name, "cuda", index, _np_dtype(np, self.output.dtype), list(shape),
                          out.data_ptr())
            # ORT runs on its own CUDA stream: wait for the producers of the inputs first
            torch.cuda.current_stream(self.device).synchronize()
            self.session.run_with_iobinding(b)
            b.synchronize_outputs()
        return out


def _np_dtype(np, name):
    if name == "bfloat16":
        raise TypeError("bfloat16 graph inputs are not supported by the onnxruntime backend")
    return getattr(np, name)


def _device_error(name, tensor, device, exp):
    from fastflow.errors import InputMismatchError

    return InputMismatchError(f"input '{name}' of {exp.file} is on {tensor.device}, but the session runs on "
                              f"{device}; move it with .to('{device}')")


@hookimpl
def register_backends(register):
    register("onnxruntime", OnnxRuntimeBackend,
             description="ONNX Runtime on an exported graph (CPU; CUDA with onnxruntime-gpu)",
             requires="pip install 'fastflow[onnx]'")

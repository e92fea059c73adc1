"""``tensorrt``: run an engine built by ``fastflow export --backend trt`` (NVIDIA GPU).

``load(model)`` takes the engine's export directory (or its ``model.plan``, or a
:class:`fastflow.artifact.Exported`), refuses a stale engine (built by another TensorRT
version, for another GPU model, or from weights that changed since) with the command
that rebuilds it, and returns ``velocity(x, t, **cond) -> v``: inputs and output are
CUDA torch tensors, the engine runs on the current torch CUDA stream
(``execute_async_v3``), input shapes are checked against the build profile, and every
call returns a freshly allocated output.
"""

from __future__ import annotations

import threading

from fastflow.sessions import RunnerCache, module_status
from fastflow.hookspecs import hookimpl

_ENGINES = RunnerCache(2)


class TensorRTBackend:
    name = "tensorrt"

    def available(self):
        ok, why = module_status("tensorrt")
        if not ok:
            return ok, why
        try:
            import torch

            if not torch.cuda.is_available():
                return False, "TensorRT needs an NVIDIA GPU and a CUDA build of torch; torch sees no CUDA device"
        except ImportError:
            return False, "torch is not installed"
        return True, ""

    def load(self, model, device=None, dtype=None):
        import torch

        from fastflow.artifact import read_export
        from fastflow.errors import InputMismatchError
        from fastflow.modelspec import ModelSpec

        if isinstance(model, (ModelSpec, torch.nn.Module)) or (callable(model) and not isinstance(model, str)):
            name = model.name if isinstance(model, ModelSpec) else "NAME"
            raise InputMismatchError(
                "the tensorrt backend runs a TensorRT engine, not a PyTorch model. Build one first: "
                f"fastflow export --backend trt --model {name} --out DIR, then pass DIR")
        exp = read_export(model, backend="trt")
        device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        if device.type != "cuda":
            raise InputMismatchError(f"a TensorRT engine runs on a CUDA device, not {device}; create the noise "
                                     f"on 'cuda'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if dtype is not None and str(dtype).replace("torch.", "") != exp.inputs[0].dtype:
            raise InputMismatchError(f"{exp.file} takes {exp.inputs[0].dtype} inputs; it cannot run in {dtype}")
        return _ENGINES.get_or_create(exp.file, device, lambda: TrtRunner(exp, device))


class TrtRunner:
    """One deserialized engine and execution context: ``(x, t, **cond) -> v``."""

    def __init__(self, exp, device, *, check: bool = True):
        import torch

        from fastflow.errors import ArtifactError, ExportError
        from fastflow.sessions import check_engine, gpu_identity, require_tensorrt, trt_dtype_name

        trt = require_tensorrt()
        self.exp, self.device, self.key = exp, device, exp.key
        if check:
            check_engine(exp, trt.__version__, gpu_identity(device))
            exp.verify_file()
        self.logger = trt.Logger(trt.Logger.ERROR)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(device):
            engine = self.runtime.deserialize_cuda_engine(exp.file.read_bytes())
            if engine is None:
                raise ArtifactError(f"TensorRT cannot deserialize {exp.file} (corrupt, or built by another TensorRT "
                                    f"version or for another GPU). Rebuild it: "
                                    f"{exp.meta.get('rebuild_command', 'fastflow export --backend trt ...')}")
            self.engine = engine
            self.context = engine.create_execution_context()
        if self.context is None:
            raise ExportError(f"TensorRT could not create an execution context for {exp.file} (out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        want_in = [s.name for s in exp.inputs]
        if sorted(inputs) != sorted(want_in) or exp.outputs[0].name not in outputs:
            raise ArtifactError(f"{exp.file} has inputs {inputs} and outputs {outputs}, but its metadata says "
                                f"{want_in} and {[s.name for s in exp.outputs]}; rebuild it")
        # inputs are checked against the metadata (the ONNX graph's dtypes); where the
        # engine narrowed an integer input (int64 → int32), values are cast on the way in
        self.casts = {}
        for spec in exp.inputs:
            got = trt_dtype_name(engine.get_tensor_dtype(spec.name))
            if got == spec.dtype:
                continue
            if got.startswith("int") and spec.dtype.startswith("int"):
                self.casts[spec.name] = getattr(torch, got)
            else:
                raise ArtifactError(f"{exp.file}: input '{spec.name}' is {got} in the engine, {spec.dtype} in its "
                                    f"metadata; rebuild it")
        self.output_name = exp.outputs[0].name
        self.output_dtype = getattr(torch, trt_dtype_name(engine.get_tensor_dtype(self.output_name)))
        # batch range of optimisation profile 0, read from the engine itself
        lo, _, hi = engine.get_tensor_profile_shape(exp.inputs[0].name, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self._lock = threading.Lock()

    def __repr__(self):
        return f"TrtRunner({self.exp.file}, {self.device}, batch {self.min_batch}..{self.max_batch})"

    def __call__(self, x, t, **conditioning):
        import torch

        from fastflow.errors import InputMismatchError

        tensors, dims = self.exp.bind(x, t, conditioning)
        batch = int(x.shape[0])
        if not self.min_batch <= batch <= self.max_batch:
            import re

            cmd = self.exp.meta.get("rebuild_command") or f"fastflow export --backend trt --model " \
                f"{self.exp.model or 'NAME'} --out {self.exp.dir}"
            cmd = re.sub(r" --(min|max)-batch \d+", "", cmd)
            cmd += f" --min-batch {min(batch, self.min_batch)} --max-batch {max(batch, self.max_batch)}"
            raise InputMismatchError(
                f"batch size {batch} is outside the range {self.min_batch}..{self.max_batch} that {self.exp.file} "
                f"was built for (classifier-free guidance doubles the batch). Rebuild it with a wider profile: {cmd}")
        ctx = self.context
        keep = []
        with self._lock, torch.cuda.device(self.device):
            for spec, tensor in zip(self.exp.inputs, tensors):
                if tensor.device != self.device:
                    raise InputMismatchError(f"input '{spec.name}' of {self.exp.file} is on {tensor.device}; the "
                                             f"engine runs on {self.device}")
                if spec.name in self.casts:
                    tensor = tensor.to(self.casts[spec.name])
                tensor = tensor.detach().contiguous()
                keep.append(tensor)
                if not ctx.set_input_shape(spec.name, tuple(tensor.shape)):
                    raise InputMismatchError(f"{self.exp.file} does not accept shape {tuple(tensor.shape)} for "
                                             f"input '{spec.name}' (its profile: batch "
                                             f"{self.min_batch}..{self.max_batch}, {spec.describe()})")
                ctx.set_tensor_address(spec.name, tensor.data_ptr())
            shape = tuple(ctx.get_tensor_shape(self.output_name))
            out = torch.empty(shape, dtype=self.output_dtype, device=self.device)
            ctx.set_tensor_address(self.output_name, out.data_ptr())
            stream = torch.cuda.current_stream(self.device)
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run {self.exp.file} at batch {batch}")
            # temporaries made by .contiguous() are freed into torch's caching allocator,
            # which reuses them only for work queued later on this same stream: safe.
        return out


@hookimpl
def register_backends(register):
    register("tensorrt", TensorRTBackend, description="TensorRT engine built by fastflow export (NVIDIA GPU)",
             requires="pip install 'fastflow[trt]'")

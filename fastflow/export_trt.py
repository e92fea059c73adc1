"""TensorRT engine builds from an ONNX export (or a model, exported first), verified
against PyTorch before they are published. Written against the TensorRT 10/11 Python
API; not run in this project's CI (no TensorRT there): see scripts/gpu-check.sh."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .artifact import BATCH_DIM, DEFAULT_PROFILE, DEFAULT_TOLERANCE, ENGINE_FILE, Exported, FORMAT, FORMAT_VERSION, TRT_OPSET, TensorSpec, is_export, read_export, sha256_file, source_sha256
from .exporting import check_agreement, example_inputs_for, fastflow_version, now, publish, random_like, resolve_source, staging
from .sessions import check_source
from .errors import ExportError
from .export_onnx import export_onnx

from .sessions import gpu_identity, require_tensorrt

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

    with staging(out_dir) as tmp:
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
            ref_fn, example, name, key, _ = resolve_source(source, example_inputs, 2)
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
            "fastflow_version": fastflow_version(),
            "torch_version": torch.__version__,
            "rebuild_command": (f"fastflow export --backend trt --model {onnx_source or model_name or 'NAME'} "
                                f"--out {out_dir} --precision {precision} --min-batch {min_batch} "
                                f"--opt-batch {opt_batch} --max-batch {max_batch}"),
            "max_abs_error": None,
            "tolerance": None,
            "created": now(),
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
        publish(tmp, out_dir, meta)
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
        feeds = {k: v.cuda() for k, v in random_like(example, b, seed=99 + b).items()}
        names = list(feeds)
        with torch.no_grad():
            want = ref(feeds[names[0]], feeds[names[1]], **{k: feeds[k] for k in names[2:]})
            got = runner(feeds[names[0]], feeds[names[1]], **{k: feeds[k] for k in names[2:]})
        torch.cuda.synchronize()
        worst = max(worst, check_agreement(got, want, b, tolerance, "the TensorRT engine",
                                           "Try --precision fp32 or raise --tolerance."))
        checked.append(b)
    return worst, checked

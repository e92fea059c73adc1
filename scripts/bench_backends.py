#!/usr/bin/env python
"""Milliseconds per model evaluation: PyTorch eager against the exported backends.

CPU (default): torch eager fp32 vs onnxruntime (CPU) on the demo model::

    python scripts/bench_backends.py                       # batch 16 and 1
    python scripts/bench_backends.py --batch 16 --reps 30 --json bench.json

GPU: torch eager bf16 (and fp32) vs a TensorRT fp16 engine (and onnxruntime CUDA when
onnxruntime-gpu is installed)::

    python scripts/bench_backends.py --device cuda --batch 16 --batch 32

The model is the registered ``glyphs`` model (the embedded weights); when those are not
present it falls back to ``GlyphFlow()`` with random initialisation (the same config, so
the same compute) and says so. Backends are timed in interleaved repetitions (each
repetition runs every backend once, in rotating order, so all see the same machine
load); the table gives the median. Each backend's output is checked against torch fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model(name: str):
    """(module, description) — the registered model, or GlyphFlow() at random init."""
    import fastflow

    try:
        model = fastflow.get_model(name).build()
        return model.eval(), f"'{name}' (embedded weights)"
    except Exception as exc:  # weights not there yet: same architecture, random weights
        if name != "glyphs":
            raise
        import torch

        from fastflow.demo.model import GlyphFlow

        torch.manual_seed(0)
        print(f"note: could not load '{name}' ({type(exc).__name__}: {exc}); using GlyphFlow() with random "
              f"initialisation and the default config (same compute)", file=sys.stderr)
        return GlyphFlow().eval(), "GlyphFlow() default config, random init (embedded weights not found)"


def fresh(directory: Path, model) -> bool:
    """Whether ``directory`` holds an export made from exactly ``model``'s weights."""
    import fastflow
    from fastflow.export import check_source, is_export, read_export

    if not is_export(directory):
        return False
    try:
        check_source(read_export(directory), model)
        return True
    except fastflow.FastFlowError as exc:
        print(f"{directory} does not match the model ({exc}); exporting again", file=sys.stderr)
        return False


def inputs(batch: int, device: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    t = torch.rand(batch, generator=g)
    label = torch.randint(0, 37, (batch,), generator=g)
    return x.to(device), t.to(device), label.to(device)


def timed(fn, args, device: str, inner: int) -> tuple[float, float]:
    """(wall ms, process CPU ms) per call, averaged over ``inner`` back-to-back calls.
    CPU time counts every thread of this process: on a shared machine it is less
    disturbed by other processes than wall time."""
    import torch

    x, t, label = args
    if device == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(inner):
        fn(x, t, label=label)
    if device == "cuda":
        torch.cuda.synchronize()
    return 1000.0 * (time.perf_counter() - start) / inner, 1000.0 * (time.process_time() - cpu) / inner


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", default="glyphs", help="registered model name (default: glyphs)")
    ap.add_argument("--batch", type=int, action="append", help="batch size, repeatable (default: 16 and 1)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 15 cpu, 30 cuda)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch and onnxruntime alike (default: torch's current setting)")
    ap.add_argument("--export-dir", default=None, help="reuse (or keep) the ONNX export here")
    ap.add_argument("--engine-dir", default=None, help="reuse (or keep) the TensorRT engine here (cuda)")
    ap.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch-compile backend (CPU)")
    ap.add_argument("--int8", action="store_true",
                    help="add torch's dynamic int8 quantization of the Linear layers (CPU), and report its "
                         "quality cost: PSNR of 16 all-steps samples against fp32 on the same seeds")
    ap.add_argument("--bf16", action="store_true",
                    help="add the network in bf16 behind float32 inputs (eager, and compiled unless --no-compile; "
                         "fastflow run --dtype bf16), and report its quality cost as for --int8")
    args = ap.parse_args(argv)

    import torch

    batches = args.batch or [16, 1]
    reps = args.reps or (15 if args.device == "cpu" else 30)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    os.environ.setdefault("FASTFLOW_ORT_THREADS", str(threads))
    model, described = build_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="fastflow-bench-"))
    try:
        return _bench(args, model, described, work, batches, reps, threads)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def _bench(args, model, described, work: Path, batches, reps, threads) -> int:
    import torch

    import fastflow
    from fastflow.export import build_trt_engine, export_onnx, read_export


    onnx_dir = Path(args.export_dir) if args.export_dir else work / "onnx"
    backends: dict[str, object] = {}
    ref_fp32 = model
    if args.device == "cpu":
        backends["torch eager fp32"] = model
        if not fresh(onnx_dir, model):
            print(f"exporting to ONNX in {onnx_dir} ...", file=sys.stderr)
            ex = {"x": torch.randn(2, 3, 32, 32), "t": torch.rand(2), "label": torch.tensor([1, 36])}
            export_onnx(model, onnx_dir, ex, model_name=args.model)
        backends["onnxruntime cpu fp32"] = fastflow.get_backend("onnxruntime").load(read_export(onnx_dir))
        if not args.no_compile:
            import copy

            compiled = copy.deepcopy(model)
            tc = fastflow.get_backend("torch-compile").load(compiled)
            started = time.perf_counter()
            with torch.inference_mode():  # compile here (dynamic batch: every size below shares it)
                tc(torch.randn(2, 3, 32, 32), torch.rand(2), label=torch.tensor([1, 36]))
            print(f"torch-compile: compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            backends["torch-compile cpu fp32"] = tc
        if args.int8:
            backends["torch eager int8 (dynamic)"] = _int8(model)
        if args.bf16:  # the network in bf16, inputs and outputs float32 (fastflow run --dtype bf16)
            import copy

            from fastflow.precision import at_precision

            backends["torch eager bf16"] = at_precision(copy.deepcopy(model), "bf16")
            if not args.no_compile:
                tcb = fastflow.get_backend("torch-compile").load(at_precision(copy.deepcopy(model), "bf16"))
                started = time.perf_counter()
                with torch.inference_mode():
                    tcb(torch.randn(2, 3, 32, 32), torch.rand(2), label=torch.tensor([1, 36]))
                print(f"torch-compile bf16: compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr)
                backends["torch-compile cpu bf16"] = tcb
    else:
        if not torch.cuda.is_available():
            print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
        import copy

        ref_fp32 = model.to("cuda")
        backends["torch eager fp32"] = ref_fp32
        backends["torch eager bf16"] = copy.deepcopy(model).to("cuda", torch.bfloat16)
        engine_dir = Path(args.engine_dir) if args.engine_dir else work / "trt-fp16"
        try:
            if not fresh(engine_dir, model):
                print(f"building a TensorRT fp16 engine in {engine_dir} ...", file=sys.stderr)
                ex = {"x": torch.randn(2, 3, 32, 32), "t": torch.rand(2), "label": torch.tensor([1, 36])}
                build_trt_engine(copy.deepcopy(model).float().cpu(), engine_dir, ex, model_name=args.model,
                                 precision="fp16", min_batch=1, opt_batch=max(batches), max_batch=max(64, *batches),
                                 log=lambda m: print(m, file=sys.stderr))
            backends["tensorrt fp16"] = fastflow.get_backend("tensorrt").load(engine_dir, device="cuda")
        except fastflow.FastFlowError as exc:
            print(f"TensorRT skipped: {exc}", file=sys.stderr)
        try:
            import onnxruntime as ort

            if "CUDAExecutionProvider" in ort.get_available_providers():
                if not fresh(onnx_dir, model):
                    ex = {"x": torch.randn(2, 3, 32, 32), "t": torch.rand(2), "label": torch.tensor([1, 36])}
                    export_onnx(copy.deepcopy(model).float().cpu(), onnx_dir, ex, model_name=args.model)
                backends["onnxruntime cuda fp32"] = fastflow.get_backend("onnxruntime").load(onnx_dir,
                                                                                             device="cuda")
            else:
                print("onnxruntime CUDA skipped: onnxruntime-gpu is not installed", file=sys.stderr)
        except ImportError:
            print("onnxruntime skipped: not installed", file=sys.stderr)
        except fastflow.FastFlowError as exc:
            print(f"onnxruntime CUDA skipped: {exc}", file=sys.stderr)

    inner = 1 if args.device == "cpu" else 10
    rows = []
    with torch.inference_mode():
        for batch in batches:
            feed = inputs(batch, args.device)
            want = ref_fp32(*feed[:2], label=feed[2]).float()
            errors = {n: float((fn(*feed[:2], label=feed[2]).float() - want).abs().max()) for n, fn in backends.items()}
            names = list(backends)
            for _ in range(args.warmup):
                for n in names:
                    timed(backends[n], feed, args.device, inner)
            times = {n: [] for n in names}
            cpu_times = {n: [] for n in names}
            for r in range(reps):
                order = names[r % len(names):] + names[: r % len(names)]
                for n in order:
                    wall, cpu = timed(backends[n], feed, args.device, inner)
                    times[n].append(wall)
                    cpu_times[n].append(cpu)
            base_name = "torch eager fp32" if args.device == "cpu" else "torch eager bf16"
            base = statistics.median(times[base_name])
            for n in names:
                med = statistics.median(times[n])
                rows.append({"backend": n, "batch": batch, "ms_per_eval": med,
                             "min_ms": min(times[n]), "cpu_ms_per_eval": statistics.median(cpu_times[n]),
                             "speedup_vs_" + base_name.replace(" ", "_"): base / med,
                             "max_abs_error_vs_torch_fp32": errors[n]})

    base_key = next(k for k in rows[0] if k.startswith("speedup_vs_"))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    load = f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"\nmodel: {described}; device: {device_name}; torch {torch.__version__}; "
          f"threads: {threads} (torch and onnxruntime){load}; {reps} interleaved repetitions, median\n")
    cpu_col = args.device == "cpu"
    print(f"| backend | batch | ms / eval (median) | min | speed-up vs {base_key[len('speedup_vs_'):].replace('_', ' ')} "
          + ("| CPU ms / eval (all threads) " if cpu_col else "") + "| max abs err vs torch fp32 |")
    print("|---|---:|---:|---:|---:|" + ("---:|" if cpu_col else "") + "---:|")
    for r in rows:
        print(f"| {r['backend']} | {r['batch']} | {r['ms_per_eval']:.2f} | {r['min_ms']:.2f} | {r[base_key]:.2f}x | "
              + (f"{r['cpu_ms_per_eval']:.1f} | " if cpu_col else "") + f"{r['max_abs_error_vs_torch_fp32']:.2g} |")
    for flag, name in ((args.int8, "torch eager int8 (dynamic)"), (args.bf16, "torch eager bf16")):
        if flag and args.device == "cpu":
            quality = _quality_vs_fp32(args.model, model, backends[name])
            print(f"\n{name}, quality: {quality}")
            rows.append({"backend": name, "quality": quality})
    if args.json_path:
        info = {"model": described, "device": device_name, "torch": torch.__version__, "threads": threads,
                "reps": reps, "rows": rows, "versions": _versions()}
        Path(args.json_path).write_text(json.dumps(info, indent=1))
    return 0


def _int8(model):
    """``model`` with every nn.Linear quantized to int8 weights, activations quantized per
    call (torch.ao dynamic quantization; fbgemm kernels on x86)."""
    import copy
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that the API moves to torchao
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def _quality_vs_fp32(name: str, model, other, samples: int = 64) -> dict:
    """PSNR and class accuracy of all-steps samples (the model's defaults) from ``other``
    (int8, bf16) against the fp32 model on the same seeds."""
    import torch

    import fastflow
    from fastflow.metrics import psnr

    spec = fastflow.get_model(name)
    noise = torch.randn((samples, *spec.shape), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(samples) % spec.num_labels
    kw = {"label": labels, "shift": spec.default_shift, "policy": "none"}
    if spec.default_guidance is not None:
        kw.update(guidance=spec.default_guidance, uncond={"label": torch.full_like(labels, spec.null_label)})
    ref = fastflow.sample(model, noise, **kw).x
    out = fastflow.sample(other, noise, **kw).x
    res = {"samples": samples, "psnr_vs_fp32_db": round(psnr(out, ref, spec.data_range), 2)}
    if spec.evaluate is not None:
        res["class_accuracy_fp32"] = spec.evaluate(ref, labels).get("class_accuracy")
        res["class_accuracy_other"] = spec.evaluate(out, labels).get("class_accuracy")
    return res


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cpus)"
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "diffusers", "fastflow"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())

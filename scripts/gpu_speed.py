#!/usr/bin/env python
"""Evaluation speed on a GPU (issue 18), prepared to run once on a lent H100/H200 in
under 8 minutes, installing nothing:

    python scripts/gpu_speed.py                      # cuda when there is one, results in $OUT
    python scripts/gpu_speed.py --device cpu --no-compile --quick   # the same code paths on a CPU

1. Milliseconds per evaluation of the shipped glyph model at the rows a guided batch of
   16 sends (32): torch eager fp32 and bf16, torch.compile without CUDA graphs
   (``mode="default"``) and with them (the torch-compile backend: ``reduce-overhead``),
   in interleaved repetitions (median, min). Compile times are reported apart.
2. Whole samples through the engine (``fastflow.sample``, 50 steps, guidance) under
   ``none``, ``fixed`` and ``ucb`` (warm: its calibration sample runs first, untimed), and
   a cold ``ucb`` batch calibrating on one row (the default) or on the whole batch, on
   eager bf16 and on the fastest compiled path: wall per sample batch, NFE, the wall
   speed-up against the NFE speed-up, and device→host synchronisations per sample
   (``torch.cuda.set_sync_debug_mode``; the target is a constant few, none per step).

Targets (docs/benchmarks.md): a compiled/graph path >= 3x eager per evaluation at batch
16 for this launch-bound model; wall within 5 % of the NFE speed-up; no sync per step.
Writes ``gpu_speed.json`` and ``gpu_speed.md`` to ``$OUT`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def count_syncs(fn, device: str):
    """(result, device→host synchronisations fn made); None on a CPU (there are none)."""
    import torch

    if device != "cuda":
        return fn(), None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return out, sum("synchroniz" in str(w.message).lower() for w in caught)


def variants(model, device: str, compile_: bool):
    """name → (velocity function, compile seconds or None), built lazily in this order."""
    import torch

    import fastflow
    from fastflow.precision import at_precision

    yield "torch eager fp32", model
    yield "torch eager bf16", at_precision(copy.deepcopy(model), "bf16")
    if not compile_:
        return
    yield "torch.compile bf16 (no CUDA graphs)", torch.compile(at_precision(copy.deepcopy(model), "bf16"),
                                                              mode="default", dynamic=True)
    if device == "cuda":  # the torch-compile backend: CUDA graphs (reduce-overhead), outputs copied out
        yield "torch.compile bf16 + CUDA graphs", fastflow.get_backend("torch-compile").load(
            at_precision(copy.deepcopy(model), "bf16"), device=device)


def per_eval(fns: dict, rows: int, device: str, reps: int, inner: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 3, 32, 32, generator=g).to(device)
    t = torch.rand(rows, generator=g).to(device)
    label = torch.randint(0, 37, (rows,), generator=g).to(device)
    times = {n: [] for n in fns}
    with torch.inference_mode():
        want = fns["torch eager fp32"](x, t, label=label).float()
        err = {n: float((f(x, t, label=label).float() - want).abs().max()) for n, f in fns.items()}
        for r in range(reps):
            names = list(fns)
            for n in names[r % len(names):] + names[: r % len(names)]:
                sync(device)
                started = time.perf_counter()
                for _ in range(inner):
                    fns[n](x, t, label=label)
                sync(device)
                times[n].append(1000 * (time.perf_counter() - started) / inner)
    base = statistics.median(times["torch eager fp32"])
    return [{"variant": n, "rows": rows, "ms_median": statistics.median(v), "ms_min": min(v),
             "speedup_vs_eager_fp32": base / statistics.median(v),
             "speedup_vs_eager_bf16": statistics.median(times["torch eager bf16"]) / statistics.median(v),
             "max_abs_err_vs_fp32": err[n]} for n, v in times.items()]


def whole_samples(fns: dict, spec, device: str, batch: int, steps: int, reps: int) -> list[dict]:
    import torch

    import fastflow

    noise = torch.randn((batch, *spec.shape), generator=torch.Generator().manual_seed(1)).to(device)
    label = (torch.arange(batch) % spec.num_labels).to(device)
    kw = {"steps": steps, "shift": spec.default_shift, "label": label, "guidance": spec.default_guidance,
          "uncond": {"label": torch.full_like(label, spec.null_label)}}
    out = []
    for name, fn in fns.items():
        policies = {"none": "none", "fixed": fastflow.get_policy("fixed"), "ucb": fastflow.get_policy("ucb")}
        fastflow.sample(fn, noise, policy=policies["ucb"], **kw)  # ucb's calibration sample, untimed
        # a cold first batch, fresh each time: the default calibrates on one row alone (the
        # rest accelerated after it); where a call costs about the same at any batch (this
        # launch-bound model on a GPU), calibrating on the whole batch costs the same wall
        cold = {"ucb cold (calibrate=1)": {}, f"ucb cold (calibrate={batch})": {"calibrate": batch}}
        policies.update({c: None for c in cold})
        sync(device)
        walls = {p: [] for p in policies}
        nfe, syncs = {}, {}
        for r in range(reps):
            for p in (list(policies)[r % len(policies):] + list(policies)[: r % len(policies)]):
                pol = fastflow.get_policy("ucb", **cold[p]) if p in cold else policies[p]
                res, n_sync = count_syncs(lambda pol=pol: fastflow.sample(fn, noise, policy=pol, **kw), device)
                walls[p].append(res.wall_seconds)  # the engine synchronises at the end on CUDA
                nfe[p], syncs[p] = res.nfe, n_sync
        base = statistics.median(walls["none"])
        for p in policies:
            wall = statistics.median(walls[p])
            out.append({"backend": name, "policy": p, "nfe": nfe[p], "wall_s_median": wall,
                        "speedup_nfe": steps / nfe[p], "speedup_wall": base / wall,
                        "wall_over_nfe": (base / wall) / (steps / nfe[p]), "syncs_per_sample": syncs[p]})
    return out


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=16, help="samples per batch (guidance doubles the rows)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 30 cuda, 7 cpu)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants")
    ap.add_argument("--quick", action="store_true", help="a few repetitions and 8 steps: checks the paths run")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-speed-out")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device (use --device cpu)", file=sys.stderr)
        return 2
    reps = args.reps or (2 if args.quick else 30 if args.device == "cuda" else 7)
    steps = 8 if args.quick else args.steps
    inner = 10 if args.device == "cuda" else 1

    import fastflow

    spec = fastflow.get_model("glyphs")
    model = spec.build().eval().to(args.device)
    fns, compile_s = {}, {}
    for name, fn in variants(model, args.device, not args.no_compile):
        started = time.perf_counter()
        with torch.inference_mode():  # first call: compiles (dynamic batch), untimed
            fn(torch.randn(2 * args.batch, 3, 32, 32, device=args.device),
               torch.rand(2 * args.batch, device=args.device), label=torch.arange(2 * args.batch, device=args.device) % 37)
        sync(args.device)
        compile_s[name] = time.perf_counter() - started
        fns[name] = fn
        print(f"{name}: first call {compile_s[name]:.1f} s", file=sys.stderr)
    evals = per_eval(fns, 2 * args.batch, args.device, reps, inner)
    fastest = min((r for r in evals if r["variant"] != "torch eager fp32"), key=lambda r: r["ms_median"])["variant"]
    chosen = {n: fns[n] for n in dict.fromkeys(["torch eager bf16", fastest])}
    samples = whole_samples(chosen, spec, args.device, args.batch, steps, max(3, reps // 5))

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    lines = [f"device: {device_name}; torch {torch.__version__}; rows per evaluation {2 * args.batch} "
             f"(batch {args.batch}, guidance); {reps} interleaved repetitions, median", "",
             "| variant | ms / eval | min | vs eager fp32 | vs eager bf16 | max abs err vs fp32 | first call (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['ms_median']:.3f} | {r['ms_min']:.3f} | {r['speedup_vs_eager_fp32']:.2f}x | "
              f"{r['speedup_vs_eager_bf16']:.2f}x | {r['max_abs_err_vs_fp32']:.2g} | {compile_s[r['variant']]:.1f} |"
              for r in evals]
    lines += ["", f"whole samples: {steps} steps, batch {args.batch}, guidance {spec.default_guidance}; ucb warm unless said cold", "",
              "| backend | policy | NFE | wall / batch (s) | NFE speed-up | wall speed-up | wall / NFE | syncs / sample |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['backend']} | {r['policy']} | {r['nfe']:.2f} | {r['wall_s_median']:.4f} | {r['speedup_nfe']:.2f}x | "
              f"{r['speedup_wall']:.2f}x | {r['wall_over_nfe']:.3f} | "
              f"{'n/a (cpu)' if r['syncs_per_sample'] is None else r['syncs_per_sample']} |" for r in samples]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_speed.md").write_text(text + "\n")
    (out / "gpu_speed.json").write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                                    "reps": reps, "steps": steps, "per_eval": evals,
                                                    "compile_seconds": compile_s, "samples": samples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reference sampler and quality report for the demo model.

:func:`sample_euler` is a deliberately plain Euler sampler with classifier-free
guidance, independent of the fastflow engine, used to measure the embedded
model (``python -m fastflow.demo.evaluate``).

Convention: t = 1 is noise, t = 0 is data, ``v = noise - data``, Euler step
``x <- x + (t_next - t) * v`` from t = 1 down to 0.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from . import NULL_LABEL, NUM_CLASSES


def time_grid(steps: int, shift: float | None = None) -> torch.Tensor:
    """``steps + 1`` times from 1 to 0 (uniform, optionally SD3/Flux-style shifted:
    ``t' = s t / (1 + (s - 1) t)``)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift is not None and shift != 1.0:
        t = shift * t / (1 + (shift - 1) * t)
    return t


def initial_noise(n: int, seed: int, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, 3, size, size, generator=g)


@torch.no_grad()
def sample_euler(model, labels, seed: int = 0, steps: int = 50, guidance: float | None = None,
                 shift: float | None = None, noise: torch.Tensor | None = None,
                 batch_size: int = 256) -> torch.Tensor:
    """Sample images (N, 3, 32, 32) in [-1, 1] (float32, CPU) for ``labels``.

    ``guidance`` None -> the model's default (its config ``default_guidance``);
    ``guidance`` 1.0 -> no CFG (one model call per step); otherwise the model is
    called on a doubled batch [labels, null] and ``v = v_u + g (v_c - v_u)``.
    The initial noise is ``torch.randn`` from a CPU generator seeded by ``seed``
    (or ``noise`` when given).
    """
    cfg = getattr(model, "config", {}) or {}
    if guidance is None:
        guidance = float(cfg.get("default_guidance", 1.0))
    if shift is None:
        shift = cfg.get("default_shift")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    n = labels.numel()
    size = int(cfg.get("image_size", 32))
    x_all = initial_noise(n, seed, size) if noise is None else noise.detach().float().cpu().clone()
    ts = time_grid(steps, shift)
    device = getattr(model, "device", torch.device("cpu"))
    dtype = getattr(model, "dtype", torch.float32)
    null = int(cfg.get("null_label", NULL_LABEL))
    outs = []
    for s in range(0, n, batch_size):
        x = x_all[s:s + batch_size].to(device=device, dtype=torch.float32)
        lab = labels[s:s + batch_size].to(device)
        b = x.shape[0]
        for i in range(steps):
            t, t_next = float(ts[i]), float(ts[i + 1])
            if guidance == 1.0:
                v = model(x.to(dtype), torch.full((b,), t, device=device), label=lab).float()
            else:
                xx = torch.cat([x, x]).to(dtype)
                ll = torch.cat([lab, torch.full_like(lab, null)])
                vv = model(xx, torch.full((2 * b,), t, device=device), label=ll).float()
                v_c, v_u = vv[:b], vv[b:]
                v = v_u + guidance * (v_c - v_u)
            x = x + (t_next - t) * v
        outs.append(x.float().cpu())
    return torch.cat(outs).clamp(-1, 1)


def cycle_labels(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.long) % NUM_CLASSES


def evaluate_model(model, *, n: int = 360, steps: int = 50, guidances=(3.0,), seed: int = 0,
                   shift: float | None = None, fid_real: int = 2000, grid_path: str | None = None,
                   classifier=None) -> dict:
    """Class accuracy and Frechet feature distance of ``n`` samples (labels
    cycling over all 36 classes) for each guidance scale."""
    from . import glyphs, metrics
    from .classifier import load_classifier

    clf = classifier if classifier is not None else load_classifier()
    real, _ = glyphs.make_dataset(fid_real, glyphs.EVAL_SEED)
    real_feats = metrics.features(glyphs.to_tensor(real), classifier=clf)
    labels = cycle_labels(n)
    report = {"n": n, "steps": steps, "seed": seed, "shift": shift, "fid_real": fid_real, "results": []}
    for g in guidances:
        t0 = time.time()
        imgs = sample_euler(model, labels, seed=seed, steps=steps, guidance=g, shift=shift)
        dt = time.time() - t0
        acc = metrics.class_accuracy(imgs, labels, classifier=clf)
        fd = metrics.frechet_distance(metrics.features(imgs, classifier=clf), real_feats)
        report["results"].append({"guidance": g, "accuracy": acc, "frechet_feature_distance": fd,
                                  "sampling_seconds": round(dt, 2)})
        if grid_path is not None:
            root, ext = os.path.splitext(grid_path)
            path = grid_path if len(guidances) == 1 else f"{root}_g{g:g}{ext or '.png'}"
            k = min(n, NUM_CLASSES * 8)
            metrics.save_image_grid(imgs[:k], path, nrow=NUM_CLASSES)
    # reference: real images against the same real feature statistics (a floor for the distance)
    real2, real2_labels = glyphs.make_dataset(n, glyphs.EVAL_SEED + 1)
    real2_t = glyphs.to_tensor(real2)
    report["real_reference"] = {
        "accuracy": metrics.class_accuracy(real2_t, torch.from_numpy(real2_labels), classifier=clf),
        "frechet_feature_distance": metrics.frechet_distance(metrics.features(real2_t, classifier=clf), real_feats),
    }
    return report


@torch.no_grad()
def time_model_calls(model, batch_sizes=(1, 16), repeats: int = 30, warmup: int = 5) -> dict:
    """Median milliseconds per model evaluation ``model(x, t, label=...)`` for each
    batch size, measured interleaved in one run (so the numbers are comparable)."""
    device = getattr(model, "device", torch.device("cpu"))
    dtype = getattr(model, "dtype", torch.float32)
    inputs = {b: (torch.randn(b, 3, 32, 32, device=device, dtype=dtype), torch.full((b,), 0.5, device=device),
                  torch.arange(b, device=device) % NUM_CLASSES) for b in batch_sizes}
    for _ in range(warmup):
        for b, (x, t, lab) in inputs.items():
            model(x, t, label=lab)
    times: dict[int, list[float]] = {b: [] for b in batch_sizes}
    for _ in range(repeats):
        for b, (x, t, lab) in inputs.items():
            t0 = time.perf_counter()
            model(x, t, label=lab)
            times[b].append((time.perf_counter() - t0) * 1000)
    return {f"batch{b}_ms": float(np.median(v)) for b, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastflow.demo.evaluate",
                                 description="Measure a glyph-flow model with the shipped classifier.")
    ap.add_argument("--model", default=None, help="model directory (default: the embedded weights)")
    ap.add_argument("--n", type=int, default=360)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, nargs="+", default=None)
    ap.add_argument("--shift", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", default=None, help="write a PNG grid of the samples here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench", action="store_true", help="also time model calls at batch 1 and 16")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from .model import load_glyph_flow

    model = load_glyph_flow(args.model)
    gs = args.guidance or [float(model.config.get("default_guidance", 3.0))]
    rep = evaluate_model(model, n=args.n, steps=args.steps, guidances=gs, seed=args.seed, shift=args.shift,
                         grid_path=args.grid)
    if args.bench:
        rep["model_call_ms"] = time_model_calls(model)
    print(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

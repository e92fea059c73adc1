"""Measure the ``ucb`` bandit cold and warm on a registered model, against the all-steps
output of the same seeds (cached per run) and ``threshold`` at matched NFE.

    python scripts/ucb_sweep.py --model glyphs --tolerance 0.05 --tolerance 0.1

Prints one JSON line per setting: mean NFE (calibration counted), PSNR vs all steps
(data range 2 for images), and class accuracy where the model has an evaluator.
"""

from __future__ import annotations

import argparse
import json

import torch

import fastflow
from fastflow.metrics import psnr


def batches(spec, n, seed, batch):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *spec.shape), generator=gen)
    labels = [i % spec.num_labels for i in range(n)] if spec.num_labels else None
    for lo in range(0, n, batch):
        hi = min(lo + batch, n)
        kw = {}
        if labels is not None:
            lab = torch.tensor(labels[lo:hi])
            kw["label"] = lab
            if spec.default_guidance is not None and spec.null_label is not None:
                kw.update(guidance=spec.default_guidance, uncond={"label": torch.full_like(lab, spec.null_label)})
        yield noise[lo:hi], kw, labels[lo:hi] if labels else None


def generate(model, spec, policy, n, seed, batch, steps):
    xs, nfes, labs, wall = [], [], [], 0.0
    for xb, kw, lb in batches(spec, n, seed, batch):
        res = fastflow.sample(model, xb, steps=steps, policy=policy, shift=spec.default_shift,
                              model_key=spec.key, **kw)
        xs.append(res.x)
        nfes += res.nfe_per_sample
        labs += lb or []
        wall += res.wall_seconds
    return torch.cat(xs), nfes, labs, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="glyphs")
    ap.add_argument("--tolerance", type=float, action="append")
    ap.add_argument("--gamma", type=float, default=None)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="another ucb option, repeatable (e.g. lookahead=true)")
    ap.add_argument("--threshold", type=float, action="append", default=[])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--warm", type=int, default=144, help="warm-up samples (seed 1000) before the warm run")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(2)
    spec = fastflow.get_model(a.model)
    model = spec.build()
    ref, _, labs, ref_wall = generate(model, spec, "none", a.samples, a.seed, a.batch, a.steps)
    data_range = spec.data_range

    def report(name, x, nfes, wall, extra=None):
        row = {"model": a.model, "method": name, "nfe": sum(nfes) / len(nfes),
               "psnr_db": round(psnr(x, ref, data_range), 2), "wall_s": round(wall, 2)}
        if spec.evaluate is not None and labs:
            row["acc"] = spec.evaluate(x, torch.tensor(labs)).get("class_accuracy")
        if x.dim() == 5:  # video (N, C, F, H, W): the worst frame's PSNR and the frame-to-frame change
            frames = [psnr(x[:, :, f], ref[:, :, f], 2.0) for f in range(x.shape[2])]
            row["psnr_worst_frame_db"] = round(min(frames), 2)
            row["frame_change"] = round((x[:, :, 1:] - x[:, :, :-1]).abs().mean().item(), 4)
            row["frame_change_all_steps"] = round((ref[:, :, 1:] - ref[:, :, :-1]).abs().mean().item(), 4)
        row.update(extra or {})
        print(json.dumps(row), flush=True)

    if spec.evaluate is not None and labs:
        print(json.dumps({"model": a.model, "method": "all-steps", "nfe": a.steps,
                          "acc": spec.evaluate(ref, torch.tensor(labs)).get("class_accuracy"),
                          "wall_s": round(ref_wall, 2)}), flush=True)
    for tol in a.tolerance or [0.05]:
        opts = {"tolerance": tol, **({"gamma": a.gamma} if a.gamma is not None else {}),
                **dict(o.split("=", 1) for o in a.option)}
        cold = fastflow.get_policy("ucb", **opts)
        x, nfes, _, wall = generate(model, spec, cold, a.samples, a.seed, a.batch, a.steps)
        tag = "".join(f" {o}" for o in a.option)
        report(f"ucb-cold tol={tol}{tag}", x, nfes, wall, {"after_cal": sum(nfes[1:]) / max(len(nfes) - 1, 1)})
        if a.warm:
            warm = fastflow.get_policy("ucb", **opts)
            generate(model, spec, warm, a.warm, 1000, a.batch, a.steps)
            x, nfes, _, wall = generate(model, spec, warm, a.samples, a.seed, a.batch, a.steps)
            report(f"ucb-warm tol={tol}{tag}", x, nfes, wall, {"learned": warm.learned()})
    for th in a.threshold:
        x, nfes, _, wall = generate(model, spec, fastflow.get_policy("threshold", threshold=th), a.samples,
                                    a.seed, a.batch, a.steps)
        report(f"threshold={th}", x, nfes, wall)


if __name__ == "__main__":
    main()

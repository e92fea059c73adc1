"""Per-sample against per-batch skip decisions, at matched mean NFE (issue 13, step 1).

Per-sample decisions are emulated with batch size 1 (each sample decides alone, on its own
errors); per-batch decisions are the default batch of 16 (one decision covers the batch,
taken on the batch-mean error). Same seeds, labels and policy settings in both; each
setting is swept so both modes cover about 12-20 evaluations, and PSNR (vs the all-steps
output and vs a high-accuracy ODE solution, UniPC 100 steps) is interpolated at 12, 14
and 19 mean NFE (for ``--edit``, at the same speed-ups 50/12, 50/14, 50/19 of the mix's
full NFE). Mixed batches: guidance 1.5 and 4.5 alternating in one batch (a per-row
guidance tensor); or ``--edit S``: every other sample is an edit (SDEdit at strength S of
a generated image of its own label), the rest generations. Rows at different strengths
start at different times, so no pipeline can share a step between them: per-batch
decisions batch each kind on its own (batches of up to 16 within a kind), per-sample
decisions run every sample alone.

    python scripts/per_sample_measure.py --model glyphs --samples 48 > per-sample-glyphs.jsonl

One JSON line per run, then one summary line per (policy, mode) with the interpolated
figures.
"""

from __future__ import annotations

import argparse
import json

import torch

import fastflow
from fastflow.metrics import psnr


def generate(model, spec, policy, noise, labels, guidance, batch, steps, solver="euler", edit=None):
    """All samples in batches of ``batch``; with ``edit=(init, strength)`` the odd rows are
    edits of ``init`` and the even rows generations, each kind batched on its own."""
    if edit is not None:
        init, strength = edit
        n = noise.shape[0]
        out = torch.empty_like(noise)
        nfes, calls, wall = [0] * n, 0, 0.0
        # a learning policy is bound to one schedule: the edits' (a shorter one) get a twin
        twin = policy if isinstance(policy, str) else fastflow.get_policy(policy.name, **policy.options())
        for rows, pol, kw in ((torch.arange(0, n, 2), policy, {}),
                              (torch.arange(1, n, 2), twin, {"init": init[1::2], "strength": strength})):
            x, part_nfes, part_calls, part_wall = _generate(
                model, spec, pol, noise[rows], None if labels is None else labels[rows], guidance, batch, steps,
                solver, _edit_kwargs=kw)
            out[rows] = x
            for r, k in zip(rows.tolist(), part_nfes):
                nfes[r] = k
            calls, wall = calls + part_calls, wall + part_wall
        return out, nfes, calls, wall
    return _generate(model, spec, policy, noise, labels, guidance, batch, steps, solver)


def generate_mixed(model, spec, policy, noise, labels, guidance, batch, steps, init, strength):
    """The edit mix as a user runs it: batches of ``batch`` rows mixing generations (even
    rows) and edits (odd rows), one ``strength`` per row; a per-sample policy runs each
    batch whole (fastflow.rows), a per-batch one as one part per strength."""
    strengths = [1.0 if r % 2 == 0 else strength for r in range(noise.shape[0])]
    xs, nfes, calls, wall = [], [], 0, 0.0
    for lo in range(0, noise.shape[0], batch):
        hi = min(lo + batch, noise.shape[0])
        lab = labels[lo:hi]
        res = fastflow.sample(model, noise[lo:hi], steps=steps, policy=policy, shift=spec.default_shift,
                              model_key=spec.key, init=init[lo:hi], strength=strengths[lo:hi], label=lab,
                              guidance=guidance, uncond={"label": torch.full_like(lab, spec.null_label)})
        xs.append(res.x)
        nfes += res.nfe_per_sample
        calls += res.model_calls
        wall += res.wall_seconds
    return torch.cat(xs), nfes, calls, wall


def _generate(model, spec, policy, noise, labels, guidance, batch, steps, solver="euler", _edit_kwargs=None):
    xs, nfes, calls, wall = [], [], 0, 0.0
    for lo in range(0, noise.shape[0], batch):
        hi = min(lo + batch, noise.shape[0])
        kw = {}
        if _edit_kwargs:
            kw.update(init=_edit_kwargs["init"][lo:hi], strength=_edit_kwargs["strength"])
        call = model
        if labels is not None:
            lab = labels[lo:hi]
            kw["label"] = lab
            if torch.is_tensor(guidance):  # one scale per row: guidance inside the model call
                kw["scale"] = guidance[lo:hi]
                call = _per_row_guidance(model, spec.null_label)
            elif guidance is not None:
                kw.update(guidance=guidance, uncond={"label": torch.full_like(lab, spec.null_label)})
        res = fastflow.sample(call, noise[lo:hi], steps=steps, policy=policy, shift=spec.default_shift,
                              solver=solver, model_key=spec.key, **kw)
        xs.append(res.x)
        nfes += res.nfe_per_sample
        calls += res.model_calls
        wall += res.wall_seconds
    return torch.cat(xs), nfes, calls, wall


def _per_row_guidance(model, null_label):
    """``(x, t, label, scale) -> v_u + scale·(v_c − v_u)`` with one scale per row (the
    engine slices ``label`` and ``scale`` with the rows; an evaluation counts once)."""
    def guided(x, t, label, scale):
        v = model(torch.cat([x, x]), torch.cat([t, t]), label=torch.cat([label, torch.full_like(label, null_label)]))
        v_c, v_u = v.chunk(2)
        return torch.lerp(v_u, v_c, scale.view(-1, *[1] * (x.dim() - 1)).to(v.dtype))

    guided.__qualname__ = "per_row_guidance"
    return guided


def interpolate(points, nfe):
    """PSNR at ``nfe`` by linear interpolation over (nfe, psnr) points (None outside them)."""
    pts = sorted(points)
    for (n0, p0), (n1, p1) in zip(pts, pts[1:]):
        if n0 <= nfe <= n1:
            return p0 if n1 == n0 else p0 + (p1 - p0) * (nfe - n0) / (n1 - n0)
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="glyphs")
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mixed-guidance", action="store_true", help="guidance 1.5 / 4.5 alternating per row")
    ap.add_argument("--edit", type=float, default=None, metavar="S",
                    help="every other sample an edit at strength S of a generated image of its label")
    ap.add_argument("--policies", default="threshold,ucb", help="comma-separated: threshold, ucb")
    ap.add_argument("--one-batch", action="store_true",
                    help="with --edit: also run the mix in mixed batches (per-sample decisions for real, "
                         "threshold per_sample=auto) and per batch at the default options")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    spec = fastflow.get_model(a.model)
    model = spec.build()
    gen = torch.Generator().manual_seed(a.seed)
    noise = torch.randn((a.samples, *spec.shape), generator=gen)
    labels = torch.arange(a.samples) % spec.num_labels if spec.num_labels else None
    guidance = spec.default_guidance
    if a.mixed_guidance:
        guidance = torch.tensor([1.5 if i % 2 == 0 else 4.5 for i in range(a.samples)])
    edit = None
    with torch.inference_mode():
        if a.edit is not None:  # the images to edit: all-steps generations of the same labels, other noise
            images = _generate(model, spec, "none", torch.randn(noise.shape, generator=gen), labels, guidance,
                               a.batch, a.steps)[0]
            edit = (images, a.edit)
        ref, full_nfes, *_ = generate(model, spec, "none", noise, labels, guidance, a.batch, a.steps, edit=edit)
        # the ODE reference for edits: the same noised start, integrated finely (Euler, 10x the steps)
        ode, *_ = (generate(model, spec, "none", noise, labels, guidance, a.batch, 10 * a.steps, edit=edit)
                   if edit is not None else
                   generate(model, spec, "none", noise, labels, guidance, a.batch, 100, solver="unipc"))
    full_nfe = sum(full_nfes) / len(full_nfes)
    rng = spec.data_range
    base = {"model": a.model, "samples": a.samples, "seed": a.seed, "mixed_guidance": a.mixed_guidance,
            "edit": a.edit}
    if spec.evaluate is not None and labels is not None:
        print(json.dumps({**base, "method": "all-steps", "nfe": full_nfe,
                          "acc": spec.evaluate(ref, labels).get("class_accuracy"),
                          "psnr_ode_db": round(psnr(ref, ode, rng), 2)}), flush=True)
    sweeps = {"threshold": ("threshold", (0.03, 0.05, 0.08, 0.12, 0.16, 0.22)),
              "ucb": ("tolerance", (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04))}
    sweeps = {k: sweeps[k] for k in a.policies.split(",")}
    curves = {}
    for policy, (opt, values) in sweeps.items():
        modes = [("per-batch", a.batch), ("per-sample", 1)]
        if a.one_batch and edit is not None and policy == "threshold":
            modes.append(("per-sample, mixed batches", a.batch))
        for mode, batch in modes:
            for v in values:
                pol = fastflow.get_policy(policy, **{opt: v})
                if mode == "per-sample, mixed batches":
                    x, nfes, calls, wall = generate_mixed(model, spec, pol, noise, labels, guidance, batch,
                                                          a.steps, *edit)
                else:
                    x, nfes, calls, wall = generate(model, spec, pol, noise, labels, guidance, batch, a.steps,
                                                    edit=edit)
                row = {**base, "method": policy, opt: v, "mode": mode, "nfe": sum(nfes) / len(nfes),
                       "nfe_min": min(nfes), "nfe_max": max(nfes), "model_calls": calls,
                       "psnr_full_db": round(psnr(x, ref, rng), 2), "psnr_ode_db": round(psnr(x, ode, rng), 2),
                       "wall_s": round(wall, 2)}
                if spec.evaluate is not None and labels is not None:
                    row["acc"] = spec.evaluate(x, labels).get("class_accuracy")
                print(json.dumps(row), flush=True)
                curves.setdefault((policy, mode), []).append(row)
    for (policy, mode), rows in curves.items():
        out = {**base, "summary": policy, "mode": mode}
        for target in (12, 14, 19):  # mean NFE on 50 steps; the same speed-up for other mixes
            nfe = target * full_nfe / 50
            full = interpolate([(r["nfe"], r["psnr_full_db"]) for r in rows], nfe)
            o = interpolate([(r["nfe"], r["psnr_ode_db"]) for r in rows], nfe)
            out[f"psnr_full_at_{target}"] = None if full is None else round(full, 2)
            out[f"psnr_ode_at_{target}"] = None if o is None else round(o, 2)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

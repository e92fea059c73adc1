"""Do other extrapolations from three true velocities err less than FastFlow's first-order
one from two? Measured on all-steps trajectories of a registered model.

    python scripts/extrapolation_order.py --model glyphs --samples 16

For every computed step c (with true velocities at c−2, c−1, c) and every skip run of
L = 1..6 steps after it, the error the run leaves in the state,
E = Σ_{i=c+1}^{c+L} h_i (v̂_i − v_i), is taken with v̂ from (c−1, c) (first order, the
estimator fastflow uses) and from each alternative: the quadratic through (c−2, c−1, c)
(second order), the least-squares line through those three (first order, smoothed), and
v_c itself (zeroth order, what FBCache/TeaCache reuse). Printed per alternative: the
median over samples of |E_alt|² / |E₁|² per time band and run length (below 1: the
alternative errs less), and how often it wins.

With ``--fixed 2,3`` it then samples with a fixed skip pattern (steps 0 and 1 computed,
then one computed step and S extrapolated, the last step computed: ``fixed``'s pattern)
once with the first-order estimator and once with the quadratic through the last three
true velocities, and prints PSNR against all steps: the history there is evenly spaced
S + 1 steps apart, unlike the adjacent pairs the one-step table measures.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import fastflow
from fastflow.schedule import timesteps as make_timesteps
from fastflow.estimator import extrapolate, quadratic_weights


def quadratic(va, vb, vc, ta, tb, tc, t):
    """The quadratic through (ta, va), (tb, vb), (tc, vc), at t: fastflow's order-2 weights."""
    wa, wb, wc = quadratic_weights(t, ta, tb, tc)
    return wa * va + wb * vb + wc * vc


def line_fit(va, vb, vc, ta, tb, tc, t):
    """The least-squares line through (ta, va), (tb, vb), (tc, vc), at t."""
    m = (ta + tb + tc) / 3
    da, db, dc = ta - m, tb - m, tc - m
    slope = (da * va + db * vb + dc * vc) / (da * da + db * db + dc * dc)
    return (va + vb + vc) / 3 + (t - m) * slope


ALTERNATIVES = {
    "second order (quadratic through 3)": quadratic,
    "first order, least-squares line through 3": line_fit,
    "zeroth order (reuse the last velocity)": lambda va, vb, vc, ta, tb, tc, t: vc,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="glyphs")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--max-run", type=int, default=6)
    ap.add_argument("--fixed", default=None, help="comma-separated skip counts S to sample with (see above)")
    a = ap.parse_args()
    spec = fastflow.get_model(a.model)
    model = spec.build()
    if hasattr(model, "eval"):
        model.eval()
    noise = torch.randn((a.samples, *spec.shape), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(a.samples) % spec.num_labels if spec.num_labels else None
    ts = make_timesteps(a.steps, spec.default_shift)
    g = spec.default_guidance

    def velocity(x, k):
        t = torch.full((a.samples,), ts[k])
        if labels is None:
            return model(x, t)
        if g is None:
            return model(x, t, label=labels)
        both = model(torch.cat([x, x]), torch.cat([t, t]),
                     label=torch.cat([labels, torch.full_like(labels, spec.null_label)]))
        vc, vu = both.chunk(2)
        return vu + g * (vc - vu)

    vs = []
    with torch.inference_mode():
        x = noise.clone()
        for k in range(a.steps):
            v = velocity(x, k).float()
            vs.append(v)
            x = x + (ts[k + 1] - ts[k]) * v
    full = x
    bands = [(1.0, 0.8), (0.8, 0.6), (0.6, 0.4), (0.4, 0.2), (0.2, 0.0)]
    print(f"model {a.model}, {a.samples} samples, {a.steps} steps: median |E_alt|^2/|E_1|^2 "
          f"(share of runs where the alternative errs less)")
    for name, alt in ALTERNATIVES.items():
        ratios: dict = {}
        for c in range(2, a.steps - 1):
            e1 = e2 = 0
            for L in range(1, a.max_run + 1):
                i = c + L
                if i >= a.steps:
                    break
                h = ts[i + 1] - ts[i]
                e1 = e1 + h * (extrapolate(vs[c - 1], vs[c], ts[c - 1], ts[c], ts[i]) - vs[i])
                e2 = e2 + h * (alt(vs[c - 2], vs[c - 1], vs[c], ts[c - 2], ts[c - 1], ts[c], ts[i]) - vs[i])
                r = (e2.flatten(1).square().sum(1) / e1.flatten(1).square().sum(1).clamp_min(1e-30)).tolist()
                band = next(b for b in bands if b[0] >= ts[c] > b[1])
                ratios.setdefault((band, L), []).extend(r)
        print(f"\n{name}:\n")
        print("| t of the last true step | " + " | ".join(f"L={L}" for L in range(1, a.max_run + 1)) + " |")
        print("|---|" + "---:|" * a.max_run)
        for band in bands:
            cells = []
            for L in range(1, a.max_run + 1):
                r = ratios.get((band, L))
                cells.append("" if not r else f"{statistics.median(r):.2f} ({sum(x < 1 for x in r) / len(r):.0%})")
            print(f"| {band[0]:.1f}-{band[1]:.1f} | " + " | ".join(cells) + " |")
    if a.fixed:
        from fastflow.metrics import psnr

        print("\nfixed skip pattern, PSNR vs all steps (dB):\n\n| S | NFE | first order | second order |\n|---:|---:|---:|---:|")
        for skip in (int(v) for v in a.fixed.split(",")):
            computed = set(range(2)) | set(range(2, a.steps, skip + 1)) | {a.steps - 1}
            out = []
            with torch.inference_mode():
                for order in (1, 2):
                    x, hist = noise.clone(), []  # hist: (t, v) of the last three computed steps
                    for k in range(a.steps):
                        t = ts[k]
                        if k in computed or len(hist) < 2:
                            v = velocity(x, k).float()
                            hist = (hist + [(t, v)])[-3:]
                        elif order == 2 and len(hist) == 3:
                            (ta, va), (tb, vb), (tc, vc) = hist
                            v = quadratic(va, vb, vc, ta, tb, tc, t)
                        else:
                            (tb, vb), (tc, vc) = hist[-2:]
                            v = extrapolate(vb, vc, tb, tc, t)
                        x = x + (ts[k + 1] - t) * v
                    out.append(psnr(x, full, spec.data_range))
            print(f"| {skip} | {len(computed)} | {out[0]:.2f} | {out[1]:.2f} |")

if __name__ == "__main__":
    main()

"""Policies side by side at matched NFE: mean evaluations per sample (calibration counted)
and PSNR against the same seeds with every step computed.

    python scripts/matched_nfe.py --model glyphs "ucb:tolerance=0.005" "threshold:threshold=0.12"

A spec is ``name[:option=value;option=value]``. Learning policies (``ucb*``, ``planned``)
are warmed first on other seeds (``--warm`` samples from seed 1000; ``planned`` on one
batch), unless ``--cold``. One JSON line per spec; the same seeds (0..samples-1) for all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

import fastflow  # noqa: E402
from fastflow.metrics import psnr  # noqa: E402
from ucb_sweep import generate  # noqa: E402


def parse(spec: str):
    name, _, opts = spec.partition(":")
    return name, dict(kv.split("=", 1) for kv in opts.split(";")) if opts else {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--model", default="glyphs")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--warm", type=int, default=144)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0, help="first seed of the measured samples (warm-up: seed + 1000)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    spec = fastflow.get_model(a.model)
    model = spec.build()
    ref, _, labs, _ = generate(model, spec, "none", a.samples, a.seed, 16, a.steps)
    for s in a.specs:
        name, opts = parse(s)
        pol = fastflow.get_policy(name, **opts)
        if not a.cold and (name.startswith("ucb") or name == "planned"):
            generate(model, spec, pol, 16 if name == "planned" else a.warm, a.seed + 1000, 16, a.steps)
        x, nfes, _, wall = generate(model, spec, pol, a.samples, a.seed, 16, a.steps)
        row = {"model": a.model, "policy": s, "seed": a.seed, "warm": not a.cold, "nfe": round(sum(nfes) / len(nfes), 2),
               "psnr_db": round(psnr(x, ref, spec.data_range), 2)}
        if spec.evaluate is not None and labs:
            row["acc"] = spec.evaluate(x, torch.tensor(labs)).get("class_accuracy")
        learned = getattr(pol, "learned", lambda: None)()
        if learned:
            row["learned"] = learned
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

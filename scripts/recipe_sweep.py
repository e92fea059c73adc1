"""Which glyph-model recipe reaches the quality bar inside the CPU training budget?

Each candidate is a training recipe (model config, lr, batch, law of t) with a step count
sized so that it fits the CPU budget of issue 3 (60 min on the 2-core CPU machine): the
seconds per step of every candidate are measured on that machine (``--measure-cpu``) and
the step counts below come from them.  The sweep itself runs the candidates side by side
on a GPU (same recipe, same step count; only faster), and measures class accuracy over
256 samples (50 Euler steps, guidance 3 and 5) at four points of each run, so the curves
show whether a recipe is still improving when the CPU budget ends.

    python scripts/recipe_sweep.py --measure-cpu              # s/step on this CPU, per candidate
    python scripts/recipe_sweep.py --run --device cuda --out DIR   # all candidates in parallel
    python scripts/recipe_sweep.py --candidate base --device cuda --out DIR   # one of them
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import torch

from fastflow.demo.model import DEFAULT_CONFIG

CPU_BUDGET_S = 52 * 60  # of the 60 min: leaves room for rendering the data and for a noisy machine

#: the config the candidates vary: the embedded model's before the first sweep (4x4 patches,
#: 2 + 4 blocks, width 128), spelled out so that later changes to DEFAULT_CONFIG do not move it.
#: That sweep's "p2-small" was shipped first; its "wide" (run to its full step count on the CPU,
#: at lr 1.5e-3) is today's DEFAULT_CONFIG.
PREVIOUS_CONFIG = {**DEFAULT_CONFIG, "patch_size": 4,
                   "transformer": {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 32,
                                   "num_attention_heads": 4, "joint_attention_dim": 64,
                                   "pooled_projection_dim": 64, "axes_dims_rope": [4, 14, 14]}}


def _cfg(**over):
    cfg = copy.deepcopy(PREVIOUS_CONFIG)
    tr = over.pop("transformer", {})
    cfg.update(over)
    cfg["transformer"].update(tr)
    return cfg


CANDIDATES = {
    "base": dict(config=_cfg(), lr=1e-3, batch=64),
    "lr2e-3": dict(config=_cfg(), lr=2e-3, batch=64),
    "x0": dict(config=_cfg(prediction="x0"), lr=1e-3, batch=64),
    "noisy-t": dict(config=_cfg(), lr=1e-3, batch=64, time_sampling="logit-normal(0.5, 1)"),
    "wide": dict(config=_cfg(transformer={"num_attention_heads": 6, "joint_attention_dim": 96,
                                          "pooled_projection_dim": 96}), lr=1e-3, batch=64),
    "deep-single": dict(config=_cfg(transformer={"num_layers": 1, "num_single_layers": 8}), lr=1e-3, batch=64),
    "p2-small": dict(config=_cfg(patch_size=2, transformer={"num_layers": 1, "num_single_layers": 3,
                                                           "num_attention_heads": 3}), lr=1e-3, batch=64),
    "bs128": dict(config=_cfg(), lr=2e-3, batch=128),
}

def measure_cpu(names, n=8):
    from fastflow.demo.model import GlyphFlow

    torch.set_num_threads(2)
    out = {}
    for name in names:
        c = CANDIDATES[name]
        torch.manual_seed(0)
        m = GlyphFlow(c["config"]).train()
        opt = torch.optim.AdamW(m.parameters(), 1e-3)
        bs = c["batch"]
        x = torch.randn(bs, 3, 32, 32)
        t = torch.rand(bs)
        lab = torch.randint(0, 37, (bs,))
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                v = m(x, t, label=lab)
            loss = (v.float() - x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ts.append(time.perf_counter() - t0)
        s = sorted(ts[2:])[len(ts[2:]) // 2]
        out[name] = round(s, 4)
        print(f"{name:14s} {s:.3f} s/step -> {int(CPU_BUDGET_S / s)} steps in {CPU_BUDGET_S / 60:.0f} min", flush=True)
    return out


def run_one(name, device, out, steps=None, evals=4, eval_n=256):
    from fastflow.demo.evaluate import sample_euler
    from fastflow.demo.metrics import class_accuracy
    from fastflow.demo.train import train_glyph_flow

    c = CANDIDATES[name]
    steps = steps or c["steps"]
    labels = torch.arange(eval_n) % 36
    curve = []

    def cb(step, ema):
        t0 = time.time()
        row = {"step": step}
        for g in (3.0, 5.0):
            imgs = sample_euler(ema, labels, seed=0, steps=50, guidance=g)
            row[f"acc_g{g:g}"] = round(class_accuracy(imgs, labels), 4)
        row["eval_s"] = round(time.time() - t0, 1)
        curve.append(row)
        print(f"[{name}] {row}", flush=True)
        write(done=False)

    def write(done):
        res = {"name": name, "steps": steps, "lr": c["lr"], "batch": c["batch"],
               "time_sampling": c.get("time_sampling"), "cpu_s_per_step": c.get("cpu_s"),
               "train_s": round(time.time() - t0, 1), "done": done, "curve": curve}
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(res, f, indent=1)
        return res

    t0 = time.time()
    d = os.path.join(out, name)
    train_glyph_flow(d, seed=0, steps=steps, lr=c["lr"], batch_size=c["batch"], config=c["config"],
                     time_sampling=c.get("time_sampling"), device=device, progress=False, log_every=1000,
                     checkpoint_every=max(1, steps // evals), callback=cb, threads=2,
                     amp=os.environ.get("SWEEP_AMP", "1") != "0")
    return write(done=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure-cpu", action="store_true")
    ap.add_argument("--run", action="store_true", help="run every candidate, in parallel processes")
    ap.add_argument("--candidate", action="append", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="recipe-sweep")
    ap.add_argument("--steps", type=int, default=None, help="override every candidate's step count (smoke test)")
    ap.add_argument("--eval-n", type=int, default=256, help="samples per accuracy measurement")
    ap.add_argument("--cpu-times", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                          "recipe_sweep_cpu.json"))
    args = ap.parse_args(argv)
    names = args.candidate or list(CANDIDATES)
    if args.measure_cpu:
        times = measure_cpu(names)
        with open(args.cpu_times, "w") as f:
            json.dump(times, f, indent=1)
        return 0
    with open(args.cpu_times) as f:
        times = json.load(f)
    for n, c in CANDIDATES.items():
        if n in times:
            c["cpu_s"] = times[n]
            c["steps"] = int(CPU_BUDGET_S / times[n]) // 100 * 100
    os.makedirs(args.out, exist_ok=True)
    if args.run:
        procs = []
        for n in names:
            log = open(os.path.join(args.out, f"{n}.log"), "w")
            cmd = [sys.executable, __file__, "--candidate", n, "--device", args.device, "--out", args.out,
                   "--cpu-times", args.cpu_times, "--eval-n", str(args.eval_n)] + (["--steps", str(args.steps)] if args.steps else [])
            procs.append((n, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
        try:
            for n, p in procs:
                p.wait()
                print(f"{n}: exit {p.returncode}", flush=True)
        except KeyboardInterrupt:  # timeout / Ctrl-C: keep what the runs wrote so far
            for n, p in procs:
                p.kill()
        rows = []
        for n in names:
            path = os.path.join(args.out, f"{n}.json")
            try:
                with open(path) as f:
                    rows.append(json.load(f))
            except (OSError, ValueError) as exc:  # never started, or killed mid-write
                print(f"{n}: no result ({exc})", flush=True)
        with open(os.path.join(args.out, "sweep.json"), "w") as f:
            json.dump(rows, f, indent=1)
        best = max((r for r in rows if r["curve"]), key=lambda r: r["curve"][-1]["acc_g3"], default=None)
        if best is not None:
            with open(os.path.join(args.out, "BEST"), "w") as f:
                f.write(best["name"])
        for r in rows:
            print(f"{r['name']:14s} {'done' if r['done'] else 'PART'} steps {r['steps']:5d} cpu {r['cpu_s_per_step']} s/it  train {r['train_s']} s  "
                  + "  ".join(f"{c['step']}:{c['acc_g3']:.3f}/{c['acc_g5']:.3f}" for c in r["curve"]), flush=True)
        return 0
    for n in names:
        run_one(n, args.device, args.out, steps=args.steps, eval_n=args.eval_n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

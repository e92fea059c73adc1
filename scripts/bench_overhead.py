"""How much does the engine and each policy cost per step, against one model evaluation?

    python scripts/bench_overhead.py [--model NAME] [--batch 16] [--steps 50]
    python scripts/bench_overhead.py --calibration [--model NAME]

The loop is timed with a null model (it returns a precomputed velocity of the real
shape), so what remains is the engine's own per-step work: the Euler update, the
extrapolation, and the policy's bookkeeping. The real model's cost per evaluation is
measured in the same process, interleaved. Prints a markdown table.

``--calibration`` times instead what a cold ``ucb`` pays before it skips, on the real
model with its default guidance, interleaved: its one calibration sample (every step,
plus the sensitivity probes riding in their steps' calls), the same without probes
(``sensitivity=false``: the rest is the calibration's own arithmetic), the same sample
with every step and nothing else, and a whole batch with every step (what an
evaluation costs per sample where the accelerated samples run).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import fastflow


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="registered model name (default: the CLI's default)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--calibration", action="store_true", help="time a cold ucb's calibration sample instead")
    args = ap.parse_args()
    torch.set_num_threads(2)

    from fastflow.modelspec import DEFAULT_MODEL

    spec = fastflow.get_model(args.model or DEFAULT_MODEL)
    model = spec.build()
    if args.calibration:
        return calibration(spec, model, args)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((args.batch, *spec.shape), generator=gen)
    cond = {"label": torch.arange(args.batch) % max(spec.num_labels, 1)} if spec.num_labels else {}
    with torch.inference_mode():
        v0 = model(x, torch.ones(args.batch), **cond)
    null_model = lambda x, t, **c: v0[: x.shape[0]]  # noqa: E731  (ucb calibrates on one row)

    # Same skip pattern for all three (two skipped after each evaluation), so the
    # difference to `fixed` is the policy's bookkeeping alone.
    policies = {
        "fixed (skip=2)": fastflow.get_policy("fixed", skip=2),
        "fixed (skip=2, correct=false)": fastflow.get_policy("fixed", skip=2, correct=False),
        "ucb (arms=2)": fastflow.get_policy("ucb", arms="2"),
        "threshold (max_skip=2)": fastflow.get_policy("threshold", threshold=1e9, max_skip=2),
    }
    for pol in policies.values():  # warm up; ucb calibrates on its first sample
        for _ in range(3):
            fastflow.sample(null_model, x, steps=args.steps, policy=pol, **cond)

    def eval_once():
        with torch.inference_mode():
            model(x, torch.full((args.batch,), 0.5), **cond)

    eval_once()
    rows = []
    eval_ms = []
    for name, pol in policies.items():
        eval_ms.append(1000 * median_time(eval_once, args.repeat))
        res = fastflow.sample(null_model, x, steps=args.steps, policy=pol, **cond)
        loop = median_time(lambda: fastflow.sample(null_model, x, steps=args.steps, policy=pol, **cond), args.repeat)
        rows.append((name, res.nfe, 1e6 * loop / args.steps))
    eval_ms = statistics.median(eval_ms)
    base = rows[0][2]
    assert len({nfe for _, nfe, _ in rows}) == 1, rows  # same pattern
    print(f"model `{spec.name}`, batch {args.batch}, {args.steps} steps, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"one model evaluation: {eval_ms:.3f} ms (median of {args.repeat * len(policies)})\n")
    print("| policy | NFE | engine µs/step (null model) | bookkeeping µs/step over `fixed` | bookkeeping / one evaluation |")
    print("|---|---|---|---|---|")
    for name, nfe, us in rows:
        extra = us - base
        print(f"| {name} | {nfe} | {us:.1f} | {extra:+.1f} | {100 * extra / 1000 / eval_ms:.3f} % |")


def calibration(spec, model, args):
    """The calibration sample's wall against the same sample's plain all-steps run and
    against a batch's per-sample cost (interleaved, ``--repeat`` rounds, medians)."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((args.batch, *spec.shape), generator=gen)

    def kwargs(n):
        if not spec.num_labels:
            return {}
        label = torch.arange(n) % spec.num_labels
        out = {"label": label}
        if spec.default_guidance is not None:
            out.update(guidance=spec.default_guidance, uncond={"label": torch.full_like(label, spec.null_label)})
        return out

    one, batch = kwargs(1), kwargs(args.batch)
    runs = {  # name: (policy factory, rows)
        "calibration (probes in their steps' calls)": (lambda: fastflow.get_policy("ucb"), 1),
        "calibration without probes (sensitivity=false)": (lambda: fastflow.get_policy("ucb", sensitivity=False), 1),
        "every step, the same sample": (lambda: "none", 1),
        f"every step, a batch of {args.batch}": (lambda: "none", args.batch),
    }
    times = {name: [] for name in runs}
    info = {}
    for r in range(args.repeat + 1):  # round 0 warms up
        for name, (make, n) in runs.items():
            res = fastflow.sample(model, noise[:n], steps=args.steps, policy=make(), model_key=f"bench-{r}",
                                  **(one if n == 1 else batch))
            if r:
                times[name].append(res.wall_seconds)
            info[name] = (sum(res.nfe_per_sample), res.model_calls, n)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    per_eval_batch = med[f"every step, a batch of {args.batch}"] / info[f"every step, a batch of {args.batch}"][0]
    plain = med["every step, the same sample"]
    print(f"model `{spec.name}`, {args.steps} steps, guidance {spec.default_guidance}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"medians of {args.repeat} interleaved rounds\n")
    print("| run | rows | evaluations | model calls | wall s (median) | / the same sample, every step "
          "| ms per sample evaluation | / at the batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (evals, calls, n) in info.items():
        per = med[name] / evals
        print(f"| {name} | {n} | {evals} | {calls} | {med[name]:.3f} | {med[name] / plain:.2f} | "
              f"{1000 * per:.2f} | {per / per_eval_batch:.2f} |")


if __name__ == "__main__":
    main()

"""Measure ``fastflow generate --ray`` on this machine: throughput of 2 workers x 1 thread
against 1 worker x 1 thread, the cost of a learning-merge round against a batch, and the
mean NFE per batch over time with 1 worker, 2 sharing workers and 2 isolated ones.

    .venv/bin/python scripts/bench_generate.py --out bench-generate --repeats 3

Writes bench-generate/bench_generate.json and docs/scale-out-learning.png. Every setting
runs ``--repeats`` times, interleaved (the machine may be shared: medians are reported,
with ``uptime`` before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(out: Path, *, workers: int, samples: int, batch_size: int, policy: str, options: dict,
            share: bool = True, seed: int = 0) -> dict:
    from fastflow.generate import Settings, prepare_out
    from fastflow.generate_jobs import label_jobs
    from fastflow.models import resolve_model
    from fastflow.ray_generate import run_on_ray

    shutil.rmtree(out, ignore_errors=True)
    spec = resolve_model("glyphs")
    settings = Settings(model="glyphs", policy=policy, options=options, batch_size=batch_size)
    prepare_out(out, settings.identity(spec))
    s = run_on_ray(settings, label_jobs(spec, None, samples, seed), out, workers=workers, threads=1,
                   share=share, say=lambda m: None)
    b = sorted(s["batches"], key=lambda x: x["t"])
    steady = steady_rate(b)
    return {"images_per_s": s["images_per_s"], "steady_images_per_s": steady, "wall_seconds": s["wall_seconds"],
            "nfe_mean": s["nfe_mean"], "merge": s.get("merge"), "batches": b}


def steady_rate(batches: list[dict]) -> float | None:
    """Images/s once every worker is running: per worker, the images of its batches after
    its first over the time from its first batch's end to its last's, summed over the
    workers (they run at once). Counting from the first batch of the whole run instead
    would credit the other workers' first batches, computed mostly before that moment."""
    by_worker: dict = {}
    for x in batches:
        by_worker.setdefault(x["worker"], []).append(x)
    rates = [sum(x["images"] for x in bs[1:]) / (bs[-1]["t"] - bs[0]["t"])
             for bs in (sorted(v, key=lambda x: x["t"]) for v in by_worker.values()) if len(bs) > 1]
    return sum(rates) if rates else None


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-generate")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=128, help="images per throughput run")
    ap.add_argument("--curve-samples", type=int, default=160, help="images per learning-curve run")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "scale-out-learning.png"))
    ap.add_argument("--parts", default="throughput,curves", help="what to measure (comma-separated)")
    args = ap.parse_args(argv)
    import ray

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": f"{os.cpu_count()} CPU cores", "uptime_before": uptime(), "throughput": {}, "curves": {}}
    print(result["uptime_before"], file=sys.stderr)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    fixed = {"skip": "2"}  # the same work per image in every run: throughput is not confounded by learning
    parts = set(args.parts.split(","))
    for r in range(args.repeats):
        for workers in ((1, 2) if "throughput" in parts else ()):
            t = time.perf_counter()
            run = one_run(out / f"tp-{workers}", workers=workers, samples=args.samples, batch_size=16,
                          policy="fixed", options=fixed)
            result["throughput"].setdefault(str(workers), []).append(run)
            print(f"repeat {r}: {workers} worker(s) {run['images_per_s']:.2f} images/s end to end, "
                  f"{run['steady_images_per_s']:.2f} steady ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
        for name, workers, share in ((("1 worker", 1, True), ("2 workers, shared", 2, True),
                                      ("2 workers, isolated", 2, False)) if "curves" in parts else ()):
            run = one_run(out / "curve", workers=workers, samples=args.curve_samples, batch_size=4,
                          policy="ucb", options={}, share=share, seed=1000 * r)
            result["curves"].setdefault(name, []).append(run)
            m = run["merge"] or {}
            print(f"repeat {r}: ucb {name}: NFE {run['nfe_mean']:.2f}, {run['wall_seconds']:.0f} s, merge round "
                  f"{m.get('seconds_per_round_median', 0) * 1000:.1f} ms vs batch "
                  f"{m.get('batch_seconds_median', 0):.2f} s", file=sys.stderr)
    ray.shutdown()
    result["uptime_after"] = uptime()
    result["median"] = {}
    if result["throughput"]:
        med = {w: {k: statistics.median(x[k] for x in runs) for k in ("images_per_s", "steady_images_per_s")}
               for w, runs in result["throughput"].items()}
        result["median"].update({
            "throughput": med,
            "ratio_end_to_end": med["2"]["images_per_s"] / med["1"]["images_per_s"],
            "ratio_steady": med["2"]["steady_images_per_s"] / med["1"]["steady_images_per_s"],
            "ratio_per_repeat_steady": [b["steady_images_per_s"] / a["steady_images_per_s"] for a, b in
                                        zip(result["throughput"]["1"], result["throughput"]["2"])],
        })
    if result["curves"]:
        shared = result["curves"]["2 workers, shared"]
        result["median"].update({
            "merge_round_ms": statistics.median(x["merge"]["seconds_per_round_median"] * 1000 for x in shared),
            "batch_seconds": statistics.median(x["merge"]["batch_seconds_median"] for x in shared),
            "nfe_mean": {k: statistics.median(x["nfe_mean"] for x in v) for k, v in result["curves"].items()},
        })
    (out / "bench_generate.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["median"], indent=1))
    if result["curves"]:
        plot(result, args.plot)
    return 0


def plot(result: dict, path: str) -> None:
    """Mean NFE per batch against when it finished (from the first batch's start, so
    worker start-up is left out): a dot per batch, a line per repeat for the mean of the
    last 6 batches finished by any worker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"1 worker": "tab:gray", "2 workers, shared": "tab:blue", "2 workers, isolated": "tab:orange"}
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for name, runs in result["curves"].items():
        for i, run in enumerate(runs):
            b = sorted(run["batches"], key=lambda x: x["t"])
            t0 = min(x["t"] - x["seconds"] for x in b)
            ts = [x["t"] - t0 for x in b]
            ys = [x["nfe_mean"] for x in b]
            ax.plot(ts, ys, ".", color=colors[name], alpha=0.3, markersize=5)
            sm = [statistics.mean(ys[max(0, j - 5):j + 1]) for j in range(len(ys))]
            label = f"{name} (median of runs' mean NFE {statistics.median(r['nfe_mean'] for r in runs):.2f})"
            ax.plot(ts, sm, "-", color=colors[name], linewidth=1.5, alpha=0.85, label=label if i == 0 else None)
    ax.set_xlabel("seconds since the run's first batch started (worker start-up left out)")
    ax.set_ylabel("mean NFE per image in a batch (50 = every step)")
    ax.set_title("Learning across workers: fastflow generate --ray, policy ucb, glyph model, batches of 4\n"
                 "dots: one batch each; lines: mean of the last 6 batches finished, one line per repeat")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

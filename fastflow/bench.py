"""``fastflow bench``: quality against cost for every method, on the same seeds, in one run.

Every method generates the same samples (same noise, labels and guidance). Quality is
measured against the full-step Euler output (PSNR, SSIM) and against a high-accuracy
ODE solution (PSNR), plus class accuracy and a Fréchet distance in the evaluator's
feature space when the model has an evaluator (the glyph demo model). Cost is model
evaluations per sample (NFE; fractional for caches that skip part of the network) and
wall seconds, both also as ratios to the full run measured in the same process.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable




@dataclass
class Ctx:
    spec: object
    model: object
    noise: object  # (N, ...)
    labels: object  # (N,) or None
    guidance: float | None
    steps: int
    batch_size: int
    warm_noise: object  # separate seeds for warm-up / calibration
    warm_labels: object
    progress: Callable[[str], None] = print

    def batches(self, noise=None, labels=None):
        noise = self.noise if noise is None else noise
        labels = self.labels if labels is None else labels
        for lo in range(0, noise.shape[0], self.batch_size):
            hi = min(lo + self.batch_size, noise.shape[0])
            yield noise[lo:hi], (None if labels is None else labels[lo:hi])

    def sample_kwargs(self, labels):
        import torch

        if labels is None:
            return {}
        kw = {"label": labels}
        if self.guidance is not None:
            kw.update(guidance=self.guidance, uncond={"label": torch.full_like(labels, self.spec.null_label)})
        return kw


@dataclass
class Method:
    name: str
    family: str
    setting: str
    run: Callable  # ctx -> (x, nfe_per_sample, wall, extra dict)
    warm: str = ""  # how learning/calibration was done, for the table


@dataclass
class Row:
    method: str
    family: str
    setting: str
    nfe: float
    wall_seconds: float
    extra: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


# -- methods -----------------------------------------------------------------------

def _sample_all(ctx: Ctx, policy, steps=None, solver="euler", noise=None, labels=None, per_batch=None):
    import torch

    import fastflow

    xs, nfes, wall = [], [], 0.0
    for xb, lb in ctx.batches(noise, labels):
        res = fastflow.sample(ctx.model, xb, steps=steps or ctx.steps, policy=policy, solver=solver,
                              model_key=ctx.spec.key, **ctx.sample_kwargs(lb))
        xs.append(res.x)
        nfes += res.nfe_per_sample
        wall += res.wall_seconds
        if per_batch is not None:
            per_batch.append((res.nfe, res.x))
    return torch.cat(xs), sum(nfes) / len(nfes), wall


def euler(steps: int) -> Method:
    return Method(f"euler-{steps}", "euler", f"{steps} steps",
                  lambda ctx: (*_sample_all(ctx, "none", steps=steps), {}))


def multistep(solver: str, steps: int) -> Method:
    return Method(f"{solver}-{steps}", solver, f"{steps} steps",
                  lambda ctx: (*_sample_all(ctx, "none", steps=steps, solver=solver), {}))


def policy_method(name: str, family: str, setting: str, make, *, warm: bool, solver: str = "euler",
                  warm_batches: int = 1, warm_batch_size: int | None = None) -> Method:
    """A fastflow policy. warm: learn on the separate warm-up seeds first (not timed);
    cold: a fresh policy learns on the measured samples themselves (counted).
    ``warm_batch_size`` splits the warm-up samples into smaller batches: a bandit makes
    one decision per batch, so the same samples give it more pulls."""

    def run(ctx):
        policy = make()
        if warm:
            n = min(ctx.warm_noise.shape[0], warm_batches * ctx.batch_size)
            wctx = ctx if warm_batch_size is None else replace(ctx, batch_size=warm_batch_size)
            _sample_all(wctx, policy, solver=solver, noise=ctx.warm_noise[:n], labels=_head(ctx.warm_labels, n))
        curve = []
        x, nfe, wall = _sample_all(ctx, policy, solver=solver, per_batch=curve)
        extra = {"curve_nfe": [c[0] for c in curve]}
        if hasattr(policy, "computed") and policy.computed:
            extra["computed_steps"] = policy.computed
        extra["_curve_x"] = [c[1] for c in curve]
        return x, nfe, wall, extra

    if warm and warm_batch_size is not None:
        how = f"learned on {warm_batches} batch(es) of separate seeds, in batches of {warm_batch_size}"
    else:
        how = f"learned on {warm_batches} batch(es) of separate seeds" if warm else "fresh; learning counted"
    return Method(name, family, setting, run, warm=how)


def _head(t, n):
    return None if t is None else t[:n]


def cache_method(method: str, setting: dict, label: str) -> Method:
    def run(ctx):
        from .baselines import run_cached

        xs, nfes, wall, calls = [], [], 0.0, []
        calib = None
        if method == "magcache":  # once per setting, on separate seeds, not timed
            from .baselines import calibrate_magcache

            calib = calibrate_magcache(ctx.model, ctx.warm_noise[: ctx.batch_size],
                                       _head(ctx.warm_labels, ctx.batch_size), steps=ctx.steps,
                                       guidance=ctx.guidance, null_label=ctx.spec.null_label)
        for xb, lb in ctx.batches():
            res = run_cached(ctx.model, xb, lb, method=method, setting=setting, steps=ctx.steps,
                             guidance=ctx.guidance, null_label=ctx.spec.null_label, calibration=calib)
            xs.append(res.x)
            nfes += [res.nfe] * xb.shape[0]
            calls += [res.calls] * xb.shape[0]
            wall += res.wall_seconds
        import torch

        return torch.cat(xs), sum(nfes) / len(nfes), wall, {"calls": sum(calls) / len(calls)}

    return Method(f"{method}-{label}", method, json.dumps(setting), run,
                  warm="calibrated on separate seeds" if method == "magcache" else "")


#: arm sets of ``ucb`` measured beside its default (tag, arms)
UCB_ARM_SETS = (("fork", "0,2,4,6"),)
#: μ scales of ``ucb-norm`` measured (50 = its default, 1 = the paper's calibration)
UCB_NORM_MU_SCALES = (50.0, 1.0, 0.3)


def method_list(ctx_steps: int, quick: bool, has_transformer: bool, selected: set[str] | None) -> list[Method]:
    import fastflow

    s = ctx_steps
    budgets = [max(3, round(s / r)) for r in ((2.0, 2.65, 3.5, 5.0) if not quick else (2.65,))]
    methods: list[Method] = [euler(s)]
    methods += [euler(b) for b in budgets]
    # --quick (under a minute on 2 cores): one method of each kind; DPM++, fixed and
    # planned-cold are in the full sweep
    for solver in ("unipc", "dpm++") if not quick else ("unipc",):
        methods += [multistep(solver, b) for b in budgets]
    for k in ((1, 2, 3, 4) if not quick else ()):
        methods.append(policy_method(f"fixed-{k}", "fixed", f"skip={k}",
                                     lambda k=k: fastflow.get_policy("fixed", skip=k), warm=False))
    for th in ((0.05, 0.1, 0.2, 0.4) if not quick else (0.1,)):
        methods.append(policy_method(f"threshold-{th}", "threshold", f"threshold={th}",
                                     lambda th=th: fastflow.get_policy("threshold", threshold=th), warm=False))
    methods.append(policy_method("ucb-cold", "ucb", "defaults (tolerance 0.01)", lambda: fastflow.get_policy("ucb"),
                                 warm=False))
    # ucb learns from every sample: it warms up in the measured batch size. The paper's bandit
    # makes one pull per batch, so it warms up in batches of 2 (batch_size/2 times more pulls)
    ucb_warm = dict(warm=True, warm_batches=2 if quick else 8)
    paper_warm = dict(warm=True, warm_batches=1 if quick else 8, warm_batch_size=2)
    methods.append(policy_method("ucb-warm", "ucb", "defaults (tolerance 0.01)", lambda: fastflow.get_policy("ucb"),
                                 **ucb_warm))
    methods.append(policy_method("ucb-paper-warm", "ucb-paper", "the paper's rule (arms 0-4, mu_scale 1)",
                                 lambda: fastflow.get_policy("ucb-paper"), **paper_warm))
    if not quick:  # the paper leaves the arm set open: the bandit with the public fork's arms 0,2,4,6
        for tag, arms in UCB_ARM_SETS:
            methods.append(policy_method(f"ucb-warm-{tag}", "ucb", f"arms={arms}",
                                         lambda arms=arms: fastflow.get_policy("ucb", arms=arms), **ucb_warm))
        for scale in UCB_NORM_MU_SCALES:
            methods.append(policy_method(f"ucb-norm-warm-{scale:g}", "ucb-norm", f"mu_scale={scale:g}",
                                         lambda scale=scale: fastflow.get_policy("ucb-norm", mu_scale=scale),
                                         **paper_warm))
    if not quick:
        methods.append(policy_method("planned-cold", "planned", f"nfe={budgets[1]}",
                                     lambda b=budgets[1]: fastflow.get_policy("planned", nfe=b), warm=False))
    for b in budgets:
        methods.append(policy_method(f"planned-{b}", "planned", f"nfe={b}",
                                     lambda b=b: fastflow.get_policy("planned", nfe=b), warm=True))
        methods.append(policy_method(f"unipc+planned-{b}", "unipc+planned", f"nfe={b}",
                                     lambda b=b: fastflow.get_policy("planned", nfe=b), warm=True, solver="unipc"))
    if has_transformer:
        try:
            from .baselines import default_settings

            settings = default_settings(quick)
            if not quick:  # the three most aggressive of each: the lightest barely skips
                settings = [row for m in dict.fromkeys(r[0] for r in settings)
                            for row in [r for r in settings if r[0] == m][-3:]]
            for method, setting, label in settings:
                methods.append(cache_method(method, setting, label))
        except ImportError:
            pass
    if selected:
        known = {m.name for m in methods} | {m.family for m in methods}
        for name in sorted(selected - known):
            from .errors import UnknownNameError

            raise UnknownNameError("method", name, known)
        methods = [m for m in methods if m.name == f"euler-{s}" or m.name in selected or m.family in selected]
    return methods


# -- metrics -----------------------------------------------------------------------

PSNR_CAP_DB = 100.0  # identical outputs would be +inf; JSON has no inf
#: a wall speed-up above the NFE speed-up by more than this factor cannot be explained: noise
NOISY_WALL = 1.1
#: the all-steps price measured before and after a method differs by more than this: noise
NOISY_SPREAD = 0.25


def _psnr_per_sample(a, b, data_range):
    from .metrics import psnr_per_sample

    return psnr_per_sample(a, b, data_range).clamp_max(PSNR_CAP_DB).tolist()


def _quality(x, ref, ode, ctx: Ctx, evaluator) -> dict:
    import statistics

    rng = 2.0 if ctx.spec.is_image else float(ref.max() - ref.min())
    out = {
        "psnr_full_db": statistics.mean(_psnr_per_sample(x, ref, rng)),
        "psnr_ode_db": statistics.mean(_psnr_per_sample(x, ode, rng)),
    }
    if ctx.spec.is_image:
        from .demo.metrics import ssim

        out["ssim_full"] = float(ssim(x, ref))
    if evaluator is not None:
        out.update(evaluator(x))
    return out


def _make_evaluator(ctx: Ctx, quick: bool):
    """The model's own independent evaluator (class accuracy, feature FID), if any."""
    if ctx.spec.evaluate is None or ctx.labels is None:
        return None
    return lambda x: ctx.spec.evaluate(x, ctx.labels)


def _ode_path(ctx: Ctx, cache_dir: Path, steps: int) -> Path:
    h = hashlib.sha256()
    h.update(str((ctx.spec.key, ctx.guidance, steps, tuple(ctx.noise.shape))).encode())
    h.update(ctx.noise.numpy().tobytes())
    if ctx.labels is not None:
        h.update(ctx.labels.numpy().tobytes())
    return cache_dir / f"ode-{h.hexdigest()[:20]}.pt"


def _ode_reference(ctx: Ctx, cache_dir: Path, steps: int):
    """High-accuracy solution: UniPC with many steps, computed once per (model, seeds)."""
    import torch

    path = _ode_path(ctx, cache_dir, steps)
    if path.exists():
        return torch.load(path), True
    x, _, _ = _sample_all(ctx, "none", steps=steps, solver="unipc")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(x, tmp)
    os.replace(tmp, path)
    return x, False


# -- the run -----------------------------------------------------------------------

def run_bench(*, model_name: str, samples: int, steps: int, batch_size: int, seed: int, methods: set | None,
              quick: bool, out_dir: Path, ode_steps: int, cache_dir: Path, guidance=None, progress=print) -> dict:
    import torch

    from .models import resolve_model

    torch.manual_seed(seed)
    spec = resolve_model(model_name)
    model = spec.build()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((samples, *spec.shape), generator=gen)
    warm_n = min(samples, batch_size * 2) if quick else batch_size * 8  # quick: warm on as many as it measures
    warm_noise = torch.randn((warm_n, *spec.shape), generator=torch.Generator().manual_seed(seed + 1_000_003))
    labels = warm_labels = None
    if spec.num_labels:
        labels = torch.arange(samples) % spec.num_labels
        warm_labels = torch.arange(warm_n) % spec.num_labels
    guidance = spec.default_guidance if guidance is None else guidance
    ctx = Ctx(spec, model, noise, labels, guidance, steps, batch_size, warm_noise, warm_labels, progress)
    has_transformer = hasattr(model, "transformer")
    todo = method_list(steps, quick, has_transformer, methods)

    # one untimed batch first, so lazy initialisation is not billed to the first method;
    # a second one, timed, prices an evaluation for the estimate printed before the run
    _sample_all(ctx, "none", steps=2, noise=noise[:batch_size], labels=_head(labels, batch_size))
    t0 = time.perf_counter()
    _sample_all(ctx, "none", steps=2, noise=noise[:batch_size], labels=_head(labels, batch_size))
    per_eval = (time.perf_counter() - t0) / 2
    n_batches = -(-samples // batch_size)
    # a method evaluates about steps/2.6 times a batch (the full run: steps), a warm one as
    # much again to learn, each is priced by 2 probes of 3 evaluations; plus the reference
    n_warm = sum(1 for m in todo if m.warm.startswith("learned"))
    ode_cached = _ode_path(ctx, cache_dir, ode_steps).exists()
    evals = round(n_batches * (steps + (len(todo) - 1 + n_warm) * steps / 2.6 + (0 if ode_cached else ode_steps))
                  + 3 * (len(todo) + 1))
    progress(f"{len(todo)} methods on {samples} samples: {', '.join(m.name for m in todo)}")
    progress(f"about {evals * per_eval + 20:.0f} s on this machine ({evals} batch evaluations at "
             f"{per_eval * 1000:.0f} ms, and ~20 s to import, load and plot; the high-accuracy reference "
             + ("comes from the cache)" if ode_cached else "is computed now and cached)"))
    progress(f"high-accuracy reference: UniPC, {ode_steps} steps")
    ode, cached = _ode_reference(ctx, cache_dir, ode_steps)
    evaluator = _make_evaluator(ctx, quick)
    rows: list[Row] = []
    ref = None
    curves = {}
    probe_noise, probe_labels = noise[:batch_size], _head(labels, batch_size)

    def probe() -> float:
        """Seconds per evaluation of all samples, timed now: 2 steps of the first batch,
        after one untimed step (the first evaluation after other work runs cold)."""
        _sample_all(ctx, "none", steps=1, noise=probe_noise, labels=probe_labels)
        _, _, w = _sample_all(ctx, "none", steps=2, noise=probe_noise, labels=probe_labels)
        return w / 2 * samples / probe_noise.shape[0]

    after = probe()
    for i, m in enumerate(todo):
        progress(f"[{i + 1}/{len(todo)}] {m.name}")
        t0 = time.perf_counter()
        before = after  # the all-steps cost is priced just before and just after each method
        x, nfe, wall, extra = m.run(ctx)
        after = probe()  # (the probe after one method is the probe before the next)
        extra["full_wall_estimate"] = steps * (before + after) / 2
        extra["probe_spread"] = abs(before - after) / ((before + after) / 2)
        if ref is None:
            ref = x
        curve_x = extra.pop("_curve_x", None)
        if curve_x is not None and m.name in ("ucb-cold", "planned-cold"):
            rng = 2.0 if spec.is_image else float(ref.max() - ref.min())
            lo = 0
            psnrs = []
            for xb in curve_x:
                hi = lo + xb.shape[0]
                vals = _psnr_per_sample(xb, ref[lo:hi], rng)
                psnrs.append(sum(vals) / len(vals))
                lo = hi
            curves[m.name] = {"nfe": extra["curve_nfe"], "psnr_full_db": psnrs}
        extra.pop("curve_nfe", None)
        row = Row(m.name, m.family, m.setting, nfe, wall, extra)
        row.metrics = _quality(x, ref, ode, ctx, evaluator)
        row.extra["warm"] = m.warm
        row.extra["elapsed_seconds"] = time.perf_counter() - t0
        rows.append(row)

    table = []
    for r in rows:
        full = r.extra["full_wall_estimate"]
        speedup_nfe = steps / r.nfe if r.nfe else None
        speedup_wall = full / r.wall_seconds if r.wall_seconds else None
        table.append({
            "method": r.method, "family": r.family, "setting": r.setting, "nfe": r.nfe,
            "speedup_nfe": speedup_nfe, "wall_seconds": r.wall_seconds, "speedup_wall": speedup_wall,
            "speedup_wall_noisy": bool(speedup_wall is not None and speedup_nfe
                                       and (speedup_wall > NOISY_WALL * speedup_nfe
                                            or r.extra["probe_spread"] > NOISY_SPREAD)),
            **r.metrics, "warm": r.extra.get("warm", ""),
            **{k: v for k, v in r.extra.items() if k not in ("warm", "elapsed_seconds")},
        })
    result = {
        "model": spec.name, "model_key": spec.key, "steps": steps, "samples": samples, "batch_size": batch_size,
        "seed": seed, "guidance": guidance, "ode_reference": f"unipc-{ode_steps}", "ode_cached": cached,
        "machine": _machine(), "rows": table, "curves": curves,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1))
    _write_csv(out_dir / "bench.csv", table)
    _plots(result, out_dir)
    return result


def _machine() -> dict:
    import platform

    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}


def _write_csv(path: Path, table: list[dict]) -> None:
    keys = []
    for row in table:
        keys += [k for k in row if k not in keys and not isinstance(row[k], (list, dict))]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for row in table:
            w.writerow(row)


#: families drawn solid in the Pareto plot (the peers are dashed)
FASTFLOW_FAMILIES = {"fixed", "threshold", "ucb", "ucb-paper", "ucb-norm", "planned", "unipc+planned"}


def _plots(result: dict, out_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    families = sorted({r["family"] for r in result["rows"]})
    markers = "os^vD<>pPX*h"
    tab20 = plt.get_cmap("tab20").colors  # 10 hues, dark then light: every family its own colour
    colours = tab20[0::2] + tab20[1::2]
    cap = 80.0  # identical outputs (PSNR 100 in the table) are drawn at the top, marked
    for i, fam in enumerate(families):
        rows = sorted((r for r in result["rows"] if r["family"] == fam), key=lambda r: r["nfe"])
        # a line joins only settings of one budget sweep (same warm-up), never cold and warm
        # runs, and not the full-step reference with its cheaper variants
        swept = [r for r in rows if r["nfe"] < result["steps"] and not r["method"].endswith(("-cold", "-warm"))]
        ours = fam in FASTFLOW_FAMILIES  # fastflow's policies solid, the peers dashed
        for ax, key in zip(axes, ("psnr_full_db", "psnr_ode_db")):
            colour, marker = colours[i % len(colours)], markers[i % len(markers)]
            ax.plot([r["nfe"] for r in rows], [min(r[key], cap) for r in rows], marker=marker, label=fam,
                    color=colour, linestyle="none")
            if len(swept) > 1:
                ax.plot([r["nfe"] for r in swept], [min(r[key], cap) for r in swept], color=colour,
                        linestyle="-" if ours else "--")
            for r in rows:
                if r[key] >= cap:
                    ax.annotate(f"identical to all steps (drawn at {cap:.0f})", (r["nfe"], cap),
                                textcoords="offset points", xytext=(-100, -12), fontsize=7)
                state = next((w for w in ("cold", "warm") if f"-{w}" in r["method"]), None)
                if state:  # a learning policy's two points: which is which
                    ax.annotate(state, (r["nfe"], min(r[key], cap)), textcoords="offset points",
                                xytext=(5, 3), fontsize=7, color=colour)
    for ax, title in zip(axes, ("PSNR vs full-step Euler output (dB)", "PSNR vs high-accuracy ODE solution (dB)")):
        ax.set_xlabel("model evaluations per sample (NFE)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{result['model']}: quality against cost, {result['samples']} samples, {result['steps']}-step schedule")
    fig.tight_layout()
    fig.savefig(out_dir / "pareto.png", dpi=110)
    plt.close(fig)
    if result["curves"] and max(len(c["nfe"]) for c in result["curves"].values()) >= 2:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for name, c in result["curves"].items():
            a1.plot(range(1, len(c["nfe"]) + 1), c["nfe"], marker="o", label=name)
            a2.plot(range(1, len(c["psnr_full_db"]) + 1), [min(p, 80.0) for p in c["psnr_full_db"]], marker="o", label=name)
        a1.set_title("NFE per batch, fresh state")
        a2.set_title("PSNR vs full-step output per batch (dB)")
        from matplotlib.ticker import MaxNLocator

        for a in (a1, a2):
            a.set_xlabel("batch (in the order run; the first one calibrates)")
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
            a.grid(alpha=0.3)
            a.legend()
        fig.suptitle(f"{result['model']}: learning from nothing, batch by batch (cold policies)")
        fig.tight_layout()
        fig.savefig(out_dir / "learning.png", dpi=110)
        plt.close(fig)


def format_table(result: dict) -> str:
    cols = [("method", "{}"), ("nfe", "{:.2f}"), ("speedup_nfe", "{:.2f}x"), ("speedup_wall", "{:.2f}x"),
            ("psnr_full_db", "{:.2f}"), ("ssim_full", "{:.4f}"), ("psnr_ode_db", "{:.2f}"),
            ("class_accuracy", "{:.3f}"), ("fid_feature", "{:.3f}")]
    few = result.get("samples", 0) < 200  # a Fréchet distance of fewer samples is noise, not a measurement
    cols = [(c, f) for c, f in cols if any(c in r for r in result["rows"]) and not (few and c == "fid_feature")]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        cells = []
        for c, f in cols:
            v = r.get(c)
            cell = "—" if v is None else (f.format(v) if not (isinstance(v, float) and math.isinf(v)) else "inf")
            if c == "speedup_wall" and v is not None and r.get("speedup_wall_noisy"):
                cell += " (noisy)"  # the machine's load moved: not a result
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    out += ("\n\nspeedup_wall: the all-steps cost, priced by 2 plain evaluations timed just before and just "
            "after each method, over the method's wall time; (noisy) where it exceeds the NFE speed-up or the "
            "two prices differ by more than 25 %")
    if few:
        out += f"\n\nfeature FID not shown: {result.get('samples')} samples (it needs at least 200 to mean anything)"
    return out

"""The sampling engine: Euler integration that skips network evaluations.

At a step the policy chooses to skip, the velocity is extrapolated from the last two
true velocities (first-order finite difference, FastFlow's estimator)::

    v̂(t) = v_k + (t − t_k) · (v_k − v_p) / (t_k − t_p)

and a run of skipped steps uses the same pair with growing (t − t_k); a policy run with
``order`` 2 takes the quadratic through the last three instead
(:func:`fastflow.estimator.estimate`). The loop calls
the resolved backend and policy objects directly; it makes no device→host transfer
(finite checks and policy rewards are reduced on the device and read once, at the end).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from . import estimator
from .checks import check_finite, check_velocity
from .controller import SkipController, Step
from .errors import FastFlowError, OptionError
from .policy import History, Policy, SampleContext
from .schedule import timesteps as make_timesteps


@dataclass
class SampleResult:
    """What :func:`sample` returns.

    ``nfe`` is the model evaluations per sample (a guided evaluation counts once): an
    int when every sample had the same, else their mean. ``nfe_per_sample`` lists them
    in order. ``calibration_samples`` counts the rows whose run calibrated the policy (every
    step computed): the whole batch for ``planned``'s first, the first row alone for
    ``ucb``'s (it runs them in a call of their own and accelerates the rest; ``trace`` is
    then the accelerated rows').
    """

    x: Any  # final samples, shape of the noise
    nfe: float
    trace: list[Step]
    timesteps: list[float]
    wall_seconds: float = 0.0
    policy: str = ""
    backend: str = ""
    info: dict = field(default_factory=dict)
    nfe_per_sample: list[int] = field(default_factory=list)
    calibration_samples: int = 0  # rows that computed every step to calibrate the policy
    model_calls: int = 0  # calls of the velocity function (a guided call on both branches counts once)

    @property
    def steps(self) -> int:
        return len(self.timesteps) - 1

    @property
    def skipped(self) -> int:
        return self.steps - self.nfe

    @property
    def ms_per_eval(self) -> float:
        return 1000.0 * self.wall_seconds / max(self.nfe, 1)


def resolve_policy(policy: Any, **options) -> Policy:
    if policy is None:
        raise OptionError("policy must be a policy name (e.g. 'ucb', 'none') or a Policy object, got None")
    if isinstance(policy, str):
        from . import get_policy

        return get_policy(policy, **options)
    if options:
        raise OptionError("policy options are only accepted with a policy name, not a policy object")
    if not hasattr(policy, "start"):
        raise OptionError(f"policy must be a name or a Policy object, got {policy!r}")
    return policy


def resolve_backend(backend: Any):
    if isinstance(backend, str):
        from . import get_backend

        return get_backend(backend)
    return backend


def _velocity(fn, guidance, conditioning: dict, uncond):
    """The velocity function of one batch: plain, conditioned, or guided (``guidance``:
    a scale, or a tensor of one scale per row)."""
    if guidance is not None:
        return _guided(fn, guidance, conditioning, uncond)
    if conditioning:
        return lambda x, t: fn(x, t, **conditioning)  # noqa: E731
    return fn


def _rows(d: dict | None, sel, batch: int) -> dict | None:
    """Per-row inputs (tensors whose first dimension is the batch) taken at ``sel`` (a
    slice, or a device index tensor of rows); everything else passes unchanged."""
    if d is None:
        return None
    import torch

    return {k: (v[sel] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch else v)
            for k, v in d.items()}


def _guidance_rows(guidance, sel):
    """The guidance of the rows at ``sel``: a scale is every row's; a per-row tensor is
    taken at them."""
    import torch

    return guidance[sel] if torch.is_tensor(guidance) else guidance


def _guided(fn, guidance, cond: dict, uncond: dict):
    """Wrap ``fn`` so one call evaluates the conditional and unconditional branches as
    one doubled batch and returns the guided velocity v_u + g·(v_c − v_u)."""
    import torch

    if not torch.is_tensor(guidance):
        guidance = float(guidance)

    both = {}
    for key in set(cond) | set(uncond):
        if key not in cond or key not in uncond:
            raise OptionError(
                f"classifier-free guidance needs '{key}' in both the conditioning and uncond"
            )
        c, u = cond[key], uncond[key]
        both[key] = torch.cat([c, u]) if torch.is_tensor(c) else c

    def guided(x, t):
        out = fn(torch.cat([x, x]), torch.cat([t, t]), **both)
        v_c, v_u = out.chunk(2)
        if torch.is_tensor(guidance):  # one scale per row
            return torch.lerp(v_u, v_c, guidance.view(-1, *([1] * (v_c.dim() - 1))).to(v_c.dtype))
        return torch.lerp(v_u, v_c, guidance)

    return guided


def sample(
    model: Any,
    noise: Any,
    *,
    steps: int = 50,
    policy: Any = "ucb",
    backend: Any = "torch",
    shift: float | None = None,
    guidance: float | None = None,
    uncond: dict | None = None,
    model_key: str | None = None,
    policy_options: dict | None = None,
    solver: str = "euler",
    init: Any = None,
    strength: float | None = None,
    **conditioning: Any,
) -> SampleResult:
    """Integrate the flow ODE from ``noise`` (t = 1) to data (t = 0), skipping steps.

    Args:
        model: anything the backend accepts. For the ``torch`` backend: an ``nn.Module``
            or a callable ``(x, t, **conditioning) -> v`` with ``t`` of shape (batch,).
        noise: the starting sample x_1, a tensor of shape (batch, ...).
        steps: number of Euler steps of the schedule.
        policy: a policy name (``"ucb"``, ``"fixed"``, ``"threshold"``, ``"none"``, or one
            a plugin registered) or an object from :func:`fastflow.get_policy`. Passing
            the same object to many calls keeps what it learned.
        backend: a backend name or object.
        shift: FLUX/SD3 time shift of the schedule (``None``: uniform).
        guidance: classifier-free guidance scale; needs ``uncond``.
        uncond: the conditioning of the unconditional branch (same keys as
            ``conditioning``).
        model_key: identifies the model in policy state files (default: the class name).
        policy_options: options for a policy given by name.
        solver: the base ODE solver: ``"euler"`` (default), or the multistep solvers
            ``"unipc"`` and ``"dpm++"`` (diffusers' schedulers in flow-matching mode; needs
            ``pip install diffusers``). Skipped steps feed them the extrapolated velocity.
        init, strength: editing (SDEdit): start from ``init`` (data, same shape as the
            noise) noised to time ≈ ``strength`` in (0, 1], and run the last
            ``round(steps·strength)`` steps of the schedule.
        **conditioning: passed to the model at every evaluation (e.g. ``label=...``).

    Returns:
        :class:`SampleResult` with ``.x``, ``.nfe`` and ``.trace``.

    Example:
        >>> import torch, fastflow
        >>> out = fastflow.sample(lambda x, t: -x, torch.ones(2, 3), steps=10, policy="fixed")
        >>> out.x.shape, out.nfe
        (torch.Size([2, 3]), 4)
    """
    import torch

    if not torch.is_tensor(noise) or noise.dim() < 1 or not noise.is_floating_point():
        raise OptionError(f"noise must be a floating-point torch tensor of shape (batch, ...), got "
                          f"{type(noise).__name__}" + (f" of shape {tuple(noise.shape)} and dtype {noise.dtype}"
                                                      if torch.is_tensor(noise) else "")
                          + "; e.g. torch.randn(16, *shape)")
    pol = resolve_policy(policy, **(policy_options or {}))
    be = resolve_backend(backend)
    fn = be.load(model, device=noise.device)
    if guidance is not None and uncond is None:
        raise OptionError("guidance needs uncond=... (the unconditional branch's inputs)")

    batch = int(noise.shape[0])
    guidance = _check_guidance(guidance, batch, noise.device)
    stepper, ts = make_solver(solver, steps, shift, noise.device)
    key = model_key or _model_key(model)
    starts = None  # per-row first steps of a batch that mixes edit strengths
    if strength is not None or init is not None:
        ts, noise, starts = _edit_start(ts, noise, init, strength, solver)
    ctx = SampleContext(timesteps=ts, model_key=key, batch_size=batch, row_starts=starts,
                        schedule_key=schedule_key(solver, steps, shift, None if starts else strength))
    parts = _parts(pol, ctx, starts, solver, steps, shift)
    started = time.perf_counter()
    x = None if len(parts) == 1 else torch.empty_like(noise)
    nfes, calls, cal_rows, trace = [0] * batch, 0, 0, []
    with torch.inference_mode():
        for rows, part_ctx, calibrating in parts:
            whole = len(rows) == batch
            sel = slice(None) if whole else (slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1))
                                             else torch.tensor(rows, device=noise.device))
            g, cond, unc = ((guidance, conditioning, uncond) if whole else
                            (_guidance_rows(guidance, sel), _rows(conditioning, sel, batch), _rows(uncond, sel, batch)))
            velocity = _velocity(fn, g, cond, unc)
            if stepper is not None and len(parts) > 1:  # a multistep scheduler keeps state: a fresh one per part
                stepper, _ = make_solver(solver, steps, shift, noise.device)
            n = len(rows)

            def velocity_for(index, g=g, c=cond, u=unc, n=n, v=velocity):
                """The velocity of the rows in ``index`` of this part (None: all of them)."""
                return v if index is None else _velocity(fn, _guidance_rows(g, index), _rows(c, index, n),
                                                         _rows(u, index, n))

            xp, part_nfes, part_calls, part_trace, calibrated = _integrate(
                velocity, noise if whole else noise[sel], part_ctx.timesteps, pol, part_ctx, stepper, velocity_for)
            if whole:
                x = xp
            else:
                x[sel] = xp
            for r, nfe in zip(rows, part_nfes):
                nfes[r] = nfe
            calls += part_calls
            cal_rows += n if calibrated else 0
            if not calibrated or not trace:
                trace = part_trace
    if noise.device.type == "cuda":
        torch.cuda.synchronize(noise.device)
    wall = time.perf_counter() - started
    mean_nfe = nfes[0] if len(set(nfes)) == 1 else sum(nfes) / len(nfes)
    return SampleResult(
        x=x, nfe=mean_nfe, trace=trace, timesteps=ts, wall_seconds=wall,
        policy=getattr(pol, "name", type(pol).__name__), backend=getattr(be, "name", str(be)),
        nfe_per_sample=nfes, calibration_samples=cal_rows, model_calls=calls,
    )


def _parts(pol, ctx: SampleContext, starts, solver, steps, shift) -> list[tuple[list[int], SampleContext, bool]]:
    """How the batch runs: (rows, their context, whether they calibrate) per part.

    A batch that mixes edit strengths runs whole when the policy decides per sample
    (each row starts at its own step), else as one part per strength, each on its own
    tail of the schedule. A policy that must calibrate may ask for it on a part's first
    rows alone, so the rest is accelerated by what it learned there."""
    batch = ctx.batch_size
    if starts is None or (hasattr(pol, "per_sample") and pol.per_sample(ctx)):
        groups = [(list(range(batch)), ctx)]
    else:
        groups = []
        for s in sorted(set(starts)):
            rows = [r for r, s_r in enumerate(starts) if s_r == s]
            ts = ctx.timesteps[s:]
            strength = None if s == 0 else (len(ts) - 1) / steps
            groups.append((rows, replace(ctx, timesteps=ts, batch_size=len(rows), row_starts=None,
                                         schedule_key=schedule_key(solver, steps, shift, strength))))
    parts = []
    for rows, g in groups:
        cal = int(pol.calibration_rows(g)) if hasattr(pol, "calibration_rows") else 0
        if 0 < cal < len(rows):
            parts += [(rows[:cal], replace(g, batch_size=cal), True), (rows[cal:], replace(g, batch_size=len(rows) - cal), False)]
        else:
            parts.append((rows, g, False))
    return parts


def _check_guidance(guidance, batch: int, device):
    """A scale, or one scale per row (a sequence or tensor of ``batch`` values)."""
    import torch

    if guidance is None or isinstance(guidance, (int, float)) and not isinstance(guidance, bool):
        return guidance
    try:
        g = torch.as_tensor(guidance, dtype=torch.float32, device=device).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise OptionError(f"guidance must be a number or one number per row, got {guidance!r}") from None
    if g.numel() == 1:
        return float(g)
    if g.numel() != batch:
        raise OptionError(f"guidance has {g.numel()} values for a batch of {batch}; give one scale, or one per row")
    return g


def schedule_key(solver: str, steps: int, shift: float | None, strength: float | None = None) -> str:
    """What a learned policy state is keyed to, beside the model."""
    return (f"{solver}/steps={steps}/shift={shift if shift is not None else 1.0}"
            + (f"/strength={strength}" if strength is not None else ""))


def _edit_start(ts, noise, init, strength, solver):
    """(timesteps, start state, per-row first steps or None) of an edit (SDEdit): the
    last round(steps·strength) steps, from ``init`` noised to their first time. One
    strength per row (a sequence) that are not all equal keep the whole schedule; each
    row starts at its own step (a strength of 1 is a generation: its noise as is)."""
    import torch

    if init is None or strength is None:
        raise OptionError("editing needs both init (the image) and strength")
    if solver != "euler":
        raise OptionError(f"editing runs on the euler solver, not '{solver}'")
    if tuple(init.shape) != tuple(noise.shape):
        raise OptionError(f"init has shape {tuple(init.shape)}, the noise {tuple(noise.shape)}; they must match")
    per_row = torch.is_tensor(strength) or isinstance(strength, (list, tuple))
    values = [float(s) for s in (strength.tolist() if torch.is_tensor(strength) else strength)] if per_row else [strength]
    for s in values:
        if isinstance(s, bool) or not (isinstance(s, (int, float)) and 0 < s <= 1):
            raise OptionError(f"strength must be in (0, 1], got {s!r}")
    if per_row and len(values) != noise.shape[0]:
        raise OptionError(f"strength has {len(values)} values for a batch of {noise.shape[0]}; give one, or one per row")
    steps = len(ts) - 1
    starts = [steps - max(1, round(steps * s)) for s in values]
    if len(set(starts)) == 1:
        ts = ts[starts[0]:]
        t0 = ts[0]
        return ts, noise * t0 + init.to(noise) * (1.0 - t0), None
    t0 = torch.tensor([ts[s] for s in starts], dtype=noise.dtype, device=noise.device).view(-1, *([1] * (noise.dim() - 1)))
    return ts, noise * t0 + init.to(noise) * (1.0 - t0), starts


def _model_key(model: Any) -> str:
    spec_key = getattr(model, "key", None)
    if isinstance(spec_key, str):
        return spec_key
    code = getattr(getattr(model, "__func__", model), "__code__", None)
    if code is not None:  # a function or lambda: its class says nothing, its definition does
        import os

        name = getattr(model, "__qualname__", getattr(model, "__name__", "function"))
        return f"{getattr(model, '__module__', '')}.{name}@{os.path.basename(code.co_filename)}:{code.co_firstlineno}"
    cls = model if isinstance(model, type) else type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


SOLVERS = ("euler", "unipc", "dpm++")


def make_solver(name: str, steps: int, shift: float | None, device):
    """(stepper, timesteps) for a base solver. Euler returns no stepper: the loop does
    its update in place. A multistep solver is a fresh diffusers scheduler in flow mode,
    stepped as ``x = stepper(v, k, x)``; its sigmas are the time grid."""
    if name == "euler":
        return None, make_timesteps(steps, shift)
    if name not in SOLVERS:
        from .errors import UnknownNameError

        raise UnknownNameError("solver", name, SOLVERS)
    if not isinstance(steps, int) or steps < 1:
        raise OptionError(f"steps must be a positive integer, got {steps!r}")
    try:
        from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
    except ImportError:
        from .errors import MissingDependencyError

        raise MissingDependencyError(
            f"solver '{name}' uses diffusers' schedulers: pip install 'fastflow[diffusers]'") from None
    common = dict(num_train_timesteps=1000, use_flow_sigmas=True, prediction_type="flow_prediction",
                  flow_shift=float(shift) if shift else 1.0)
    if name == "unipc":
        sched = UniPCMultistepScheduler(**common)
    else:
        sched = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common)
    sched.set_timesteps(steps, device=device)
    ts = [float(s) for s in sched.sigmas]
    ts[-1] = 0.0
    grid = sched.timesteps

    def stepper(v, k, x):
        return sched.step(v, grid[k], x, return_dict=False)[0]

    return stepper, ts


def _integrate(velocity, noise, ts: list[float], policy: Policy, ctx: SampleContext, stepper=None,
               velocity_for=None):
    """The per-step loop, driven by a :class:`~fastflow.controller.SkipController`.
    Returns (x, model evaluations per row (computed steps and sensitivity probes), model
    calls (a probe that rides in its step's call adds none), trace, whether the run was a
    calibration). A run that decides per sample goes
    to the per-row loop (:mod:`fastflow.rows`) with ``velocity_for``."""
    import torch

    T = len(ts) - 1
    batch = noise.shape[0]
    ctl = SkipController(policy, ts)
    ctl.start(policy, ctx)
    if ctl.rows:
        from .rows import integrate_rows

        ok = False
        try:
            if stepper is not None:
                raise OptionError(f"policy {getattr(policy, 'name', policy)!r} decides per sample, which runs on "
                                  f"the euler solver only; use solver='euler' or the policy's per_sample=false")
            x, nfes, calls = integrate_rows(velocity_for or (lambda index: velocity), noise, ts, ctl, ctx.row_starts)
            ok = True
        finally:
            ctl.close(ok)
        return x, nfes, calls, ctl.row_traces[0], ctl.calibrating
    if ctx.row_starts is not None:
        raise OptionError(f"policy {getattr(policy, 'name', policy)!r} said it decides per sample "
                          f"(per_sample) but its run has no decide_rows; a batch that mixes edit strengths needs it")
    t_vecs = [torch.full((batch,), t, dtype=noise.dtype, device=noise.device) for t in ts[:-1]]
    enter = ctl.enter
    correct = stepper is None and ctl.correct

    x = noise.clone()
    hist = History()
    sums = []  # one 0-d device tensor per computed velocity: NaN/Inf shows up in its sum
    computed_steps: list[int] = []
    slope = None  # of the current skip run: (v_cur − v_prev)/(t_cur − t_prev)
    # a calibration's sensitivity probe rides in the step's own call, the batch doubled
    # (x and x + e): one call instead of two, which matters where a call costs about the
    # same at any batch (a GPU; the one-sample calibration on a CPU)
    probe_velocity = (velocity_for(torch.arange(batch, device=noise.device).repeat(2))
                      if ctl.probe is not None and velocity_for is not None else None)
    calls = 0
    ok = False
    try:
        for k in range(T):
            t, h = ts[k], ts[k + 1] - ts[k]
            if enter(k, hist, hist.v_prev is not None):
                if ctl.order == 2 and hist.v_prev2 is not None:  # the quadratic through three
                    if stepper is None:
                        wa, wb, wc = estimator.quadratic_weights(t, hist.t_prev2, hist.t_prev, hist.t_cur)
                        x.add_(hist.v_prev2, alpha=h * wa).add_(hist.v_prev, alpha=h * wb).add_(hist.v_cur, alpha=h * wc)
                    else:
                        x = stepper(estimator.estimate(hist, t, 2), k, x)
                    continue
                if slope is None:
                    slope = estimator.slope(hist.v_prev, hist.v_cur, hist.t_prev, hist.t_cur)
                if stepper is None:
                    estimator.euler_skip_(x, hist.v_cur, slope, hist.t_cur, t, h)
                else:
                    x = stepper(torch.add(hist.v_cur, slope, alpha=t - hist.t_cur), k, x)
                continue
            e = ctl.probe_at(k) if ctl.probe is not None else None  # calibration: the sensitivity at x + e
            if e is not None and probe_velocity is not None:
                v, v_probe = probe_velocity(torch.cat([x, x + e.to(x.dtype)]), t_vecs[k].repeat(2)).chunk(2)
            else:
                v = velocity(x, t_vecs[k])
                v_probe = None if e is None else velocity(x + e.to(x.dtype), t_vecs[k])
                calls += e is not None
            calls += 1
            if not computed_steps:
                check_velocity(v, x)
            if slope is not None and correct:  # a first-order Euler run just ended
                a = estimator.run_span(ts, hist.k_cur, k)
                x.add_(estimator.run_correction(v, hist.v_prev, hist.v_cur, hist.t_prev, hist.t_cur, t, a))
            slope = None
            sums.append(v.sum())
            computed_steps.append(k)
            ctl.computed(k, v)
            if e is not None:
                ctl.probed(k, v_probe, v)
            if ctl.pending >= 0:  # the error of the extrapolation at this step
                ctl.measure(v, hist, t)
                ctl.settle()
            hist.push(k, t, v)
            if stepper is None:
                x.add_(v, alpha=h)
            else:
                x = stepper(v, k, x)
        check_finite(sums, computed_steps, x, ts)
        ok = True
    finally:
        ctl.close(ok)
    nfe = ctl.nfe + ctl.probes
    return x, [nfe] * batch, calls, ctl.trace, ctl.calibrating


__all__ = ["sample", "SampleResult", "Step", "FastFlowError"]

"""The handle :func:`fastflow.enable` returns, and what it does at each denoiser call:
locate the step on the scheduler, keep a history per guidance branch, and drive the
skip controller (:mod:`fastflow.controller`) — the decisions, errors, trace and NFE are
the controller's; this module adapts a pipeline's calls to it. It is one state machine,
so it is one file: :class:`FastFlowHandle` and the per-call state it steps through.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Any

from . import diffusers_rows, estimator
from .controller import SkipController, Step
from .diffusers_rows import main_tensor as _main_tensor
from .jsonutil import jsonable
from .policy import History, RowHistory, SampleContext

HOOK_NAME = "fastflow"

__all__ = ["FastFlowHandle", "PipelineCall", "HOOK_NAME", "remove_hook"]


# -- records -----------------------------------------------------------------------

@dataclass
class PipelineCall:
    """What the hook did during one pipeline call."""

    index: int
    steps: int  # steps of the pipeline's schedule (from its start index, e.g. img2img strength)
    nfe: int  # steps whose denoiser outputs were computed (all branches of a step count once)
    denoiser_calls: int  # denoiser forward passes actually run (cond and uncond count apart)
    skipped: int  # steps whose outputs were extrapolated
    trace: list  # fastflow.engine.Step(k, t, computed, decision) per step
    timesteps: list[float]  # the sigmas of the schedule, steps + 1 values
    branches: list[str]  # history keys seen ("cond", "uncond", or "#0", "#1" by call order)
    complete: bool  # the call reached its last step
    policy: str = ""
    wall_seconds: float = 0.0  # first denoiser call to the end of the last step
    fallback_calls: int = 0  # branch calls computed inside a skipped step (no history yet)
    note: str = ""
    #: per-sample decisions: each sample's NFE and computed steps (``nfe`` counts the
    #: steps where any sample computed, ``trace`` marks them)
    nfe_per_sample: list[int] | None = None
    computed_per_sample: list[list[int]] | None = None

    @property
    def speedup(self) -> float:
        return self.steps / self.nfe if self.nfe else float("nan")

    def as_dict(self, trace: bool = True) -> dict:
        out = {
            "index": self.index, "steps": self.steps, "nfe": self.nfe,
            "denoiser_calls": self.denoiser_calls, "skipped": self.skipped,
            "speedup_nfe": self.speedup if self.nfe else None, "complete": self.complete,
            "branches": list(self.branches), "policy": self.policy,
            "wall_seconds": self.wall_seconds, "fallback_calls": self.fallback_calls,
        }
        if self.note:
            out["note"] = self.note
        if self.nfe_per_sample is not None:
            out["nfe_per_sample"] = list(self.nfe_per_sample)
        if trace:
            if self.computed_per_sample is not None:
                out["computed_per_sample"] = [list(c) for c in self.computed_per_sample]
            out["timesteps"] = list(self.timesteps)
            out["trace"] = [
                {"k": s.k, "t": s.t, "computed": s.computed, "decision": s.decision} for s in self.trace
            ]
        return out


class _Call:
    """Per-pipeline-call state (dropped at the end of the call, with its tensors)."""

    def __init__(self, sched, sigmas_ref, sig: list[float], start: int, verified: bool):
        self.sched = sched
        self.sigmas_ref = sigmas_ref
        self.sig = sig
        self.start = start
        self.verified = verified
        self.ts: list[float] = []
        self.T = 0
        self.ctl: SkipController | None = None
        self.cur_k = -1
        self.max_k = -1
        self.step_skipped = False
        self.hists: dict[str, History] = {}
        self.templates: dict[str, Any] = {}
        self.order: list[str] = []  # branch keys in first-seen order
        self.step_names: dict = {}
        self.step_calls = 0
        self.calls_per_step = 0  # branch calls of step 0: when the last step has as many, the call ends
        self.denoiser_calls = 0
        self.fallback_calls = 0
        self.batch_size = 0
        self.device = None
        self.started = time.perf_counter()
        self.ended = None
        self.closed = False
        self.passthrough = False  # schedule not understood: compute everything
        self.note = ""
        self.record: PipelineCall | None = None
        # per-sample decisions (a run with per_sample_decisions; fastflow.diffusers_rows)
        self.layout: diffusers_rows.RowLayout | None = None  # set at step 1: rows mode on
        self.rhists: dict[str, RowHistory] = {}
        self.comp: list[int] = []  # samples the model computes at this step
        self.skip: list[int] = []  # samples extrapolated at this step
        self.comp_index = None  # the computing samples, as a device tensor
        self.call_index = None  # their rows in the denoiser call
        self.primary = ""  # the branch whose history steers the step's decisions
        # the last computed step, and the one before the skip run that ends at this step
        # (-1: none ends here): fastflow.estimator.run_correction
        self.last_computed = -1
        self.run_from = -1
        self.euler = False  # a first-order Euler scheduler: corrections go into the output
        self.ctx: SampleContext | None = None
        self.row_from: list[int] = []  # per sample, in rows mode: as run_from (-1: not in a run)
        self.row_ends: dict[int, int] = {}  # samples whose run ends at this step -> run_from
        self.row_steps = 0  # steps (after step 0) where the model ran on some rows

    def set_start(self, start: int, policy) -> None:
        self.start = start
        self.ts = self.sig[start:]
        self.T = len(self.ts) - 1
        if self.ctl is None:
            self.ctl = SkipController(policy, self.ts)
        else:
            self.ctl.rebase(policy, self.ts)


# -- the controller (the handle users hold) ------------------------------------------

class FastFlowHandle:
    """Returned by :func:`enable`. Holds the policy, the per-call records and the hooks.

    * ``handle.policy`` — the policy object (its learning carries over between calls).
    * ``handle.calls`` — one :class:`PipelineCall` per finished pipeline call.
    * ``handle.summary()`` — a printable report; ``handle.to_dict()`` — the same as a dict.
    * ``handle.save(path=None)`` — persist the policy's learning (``ucb``).
    * ``handle.remove()`` — same as :func:`disable` on the pipeline.
    """

    def __init__(self, pipe, policy, denoisers: dict, *, model_key: str | None,
                 schedule_key: str | None, autosave: bool):
        try:
            self._pipe_ref = weakref.ref(pipe)
        except TypeError:  # not weak-referenceable: keep it alive
            self._pipe_ref = lambda p=pipe: p
        self.policy = policy
        self.policy_name = getattr(policy, "name", type(policy).__name__)
        self.denoiser_names = list(denoisers)
        self._denoisers = denoisers  # name -> module
        self._restore: dict[str, tuple[bool, bool]] = {}
        self.model_key = model_key or _model_key(pipe, next(iter(denoisers.values())))
        self._schedule_key = schedule_key
        self.autosave = autosave
        self.calls: list[PipelineCall] = []
        self.active = True
        self._call: _Call | None = None
        self._pending_call = None
        self._warned: set[str] = set()

    # -- public ----------------------------------------------------------------------
    @property
    def pipeline(self):
        return self._pipe_ref()

    @property
    def last(self) -> PipelineCall | None:
        self._settle()
        return self.calls[-1] if self.calls else None

    def to_dict(self, trace: bool = True) -> dict:
        """Per-call steps, evaluations, skipped steps (and traces) plus their means."""
        self._settle()
        calls = [c.as_dict(trace=trace) for c in self.calls]
        done = [c for c in self.calls if c.complete]
        nfe_mean = sum(c.nfe for c in done) / len(done) if done else None
        steps_mean = sum(c.steps for c in done) / len(done) if done else None
        return {
            "policy": self.policy_name,
            "policy_options": jsonable(self.policy.options()) if hasattr(self.policy, "options") else {},
            "model_key": self.model_key,
            "denoisers": list(self.denoiser_names),
            "active": self.active,
            "pipeline_calls": len(self.calls),
            "nfe_mean": nfe_mean,
            "steps_mean": steps_mean,
            "speedup_nfe": (steps_mean / nfe_mean) if nfe_mean else None,
            "calls": calls,
        }

    def summary(self, trace: bool = True) -> str:
        """A report per pipeline call: steps, model evaluations, skipped steps, the trace."""
        d = self.to_dict(trace=False)
        lines = [f"fastflow on {', '.join(d['denoisers'])} with policy {d['policy']} "
                 f"({len(self.calls)} pipeline call{'s' if len(self.calls) != 1 else ''})"]
        for c in self.calls:
            sp = f"{c.steps / c.nfe:.2f}x" if c.nfe else "n/a"
            lines.append(
                f"  call {c.index}: {c.steps} steps, {c.nfe} evaluated, {c.skipped} skipped "
                f"({sp}), {c.denoiser_calls} denoiser calls, branches {'/'.join(c.branches) or '-'}"
                + (f", per sample {min(c.nfe_per_sample)}-{max(c.nfe_per_sample)} evaluated"
                   if c.nfe_per_sample else "")
                + ("" if c.complete else ", incomplete") + (f" [{c.note}]" if c.note else "")
            )
            if trace and c.trace:
                marks = "".join("#" if s.computed else "." for s in c.trace)
                lines.append(f"    trace  {marks}   (# computed, . extrapolated)")
        if d["nfe_mean"] is not None:
            lines.append(f"  mean: {d['nfe_mean']:.2f} evaluations of {d['steps_mean']:.2f} steps "
                         f"({d['speedup_nfe']:.2f}x fewer)")
        return "\n".join(lines)

    __str__ = summary

    def __repr__(self) -> str:
        return (f"<FastFlowHandle policy={self.policy_name} denoisers={self.denoiser_names} "
                f"calls={len(self.calls)} active={self.active}>")

    def save(self, path=None) -> None:
        """Persist the policy's learned state (``ucb``: to ``state=`` or ``path``)."""
        self._settle()
        self.policy.save(path)

    def reset(self) -> None:
        """Forget the call records (the policy keeps what it learned)."""
        self._settle()
        self.calls.clear()

    def remove(self) -> None:
        """Remove the hooks; the pipeline is exactly as it was before :func:`enable`."""
        if not self.active:
            return
        if self._call is not None:
            self._finish_call(self._call, complete=self._reached_end(self._call))
        self._call = None
        for name, module in self._denoisers.items():
            remove_hook(module, *self._restore.get(name, (True, True)))
        self.active = False

    # -- called by the hooks ---------------------------------------------------------
    # The hook calls _before, then (unless it returned an output) the denoiser, then
    # _after. Both run eagerly even when the denoiser is compiled as a whole
    # (torch.compiler.disable), so the decision never enters a compiled graph.
    def _before(self, hook):
        """None: run the denoiser. Otherwise the extrapolated output to return instead."""
        self._pending_call = None
        if not self.active:
            return None
        c, k = self._locate()
        if k < 0:  # no usable schedule, or past the end of a closed call: just run it
            self._pending_call = (c, -1, None, None)
            return None
        name = hook.context_name()
        if k != c.cur_k:
            # the step's first branch steers the decision (two experts, as in Wan 2.2,
            # keep apart histories: after a switch the new one computes two steps first)
            self._enter_step(c, k, hook.tag + (name if name is not None else "#0"))
        n = c.step_names.get(name, 0)
        c.step_names[name] = n + 1
        key = hook.tag + (name if (name is not None and n == 0) else f"{name or ''}#{n}")
        c.step_calls += 1
        if c.layout is not None:
            if key not in c.order:
                c.order.append(key)
            return self._before_rows(c, k, key)
        h = c.hists.get(key)
        if h is None:
            h = c.hists[key] = History()
            c.order.append(key)
        if c.step_skipped and h.v_prev is not None and h.k_cur < k:
            # v̂(t) = v_cur + (t − t_cur)·(v_cur − v_prev)/(t_cur − t_prev) (or the policy's order)
            return _rebuild(c.templates[key], estimator.estimate(h, c.ts[k], c.ctl.order))
        self._pending_call = (c, k, key, h)
        return None

    def _after(self, out, rerun=None):
        """Record a computed output (and the extrapolation error the policy waits for).
        ``rerun(e)`` runs the denoiser again at its main input + e (None: it cannot)."""
        pending, self._pending_call = self._pending_call, None
        if pending is None:
            return out
        c, k, key, h = pending
        if c is None:
            return out
        c.denoiser_calls += 1
        if k < 0:
            if c.closed and c.record is not None:
                c.record.denoiser_calls += 1
            return out
        if c.layout is not None:
            return self._after_rows(c, k, key, out, h)
        v = _main_tensor(out)
        t = c.ts[k]
        if c.step_skipped:
            c.fallback_calls += 1  # a branch with no history yet: computed, the step stays "skipped"
        else:
            c.ctl.measure(v, h, t)
        if not c.batch_size:
            c.batch_size = int(v.shape[0]) if getattr(v, "dim", lambda: 0)() else 1
            c.device = v.device
        if not c.step_skipped and key == c.order[0]:
            ctl = self._ensure_run(c)
            ctl.computed(k, v)  # calibrating policies see the first branch's outputs
            if ctl.probe is not None:  # and may probe the sensitivity there (fastflow.sensitivity)
                e = ctl.probe_at(k)
                probe_out = rerun(e) if e is not None and rerun is not None else None
                if probe_out is not None and tuple(_main_tensor(probe_out).shape) == tuple(v.shape):
                    ctl.probed(k, _main_tensor(probe_out), v)
                    c.denoiser_calls += 1
                elif e is not None:
                    ctl.probe.cancel()
                    self._warn_once("noprobe", "fastflow: the denoiser's input could not be probed (no "
                                               "hidden_states of the output's shape); errors are priced alike at every step")
        if (c.run_from >= 0 and c.euler and c.ctl.correct and not c.step_skipped
                and h.k_cur == c.run_from and h.v_prev is not None):
            # the run just ended: the scheduler's Euler step takes v + correction / h
            a = estimator.run_span(c.ts, h.k_cur, k)
            corr = estimator.run_correction(v, h.v_prev, h.v_cur, h.t_prev, h.t_cur, t, a)
            out = _rebuild(out, corr.div_(c.ts[k + 1] - t).add_(v).to(v.dtype))
        h.push(k, t, v)
        c.templates[key] = out
        if k == c.T - 1 and c.calls_per_step and c.step_calls >= c.calls_per_step:
            self._finish_call(c, complete=True)
        return out

    def _end_of_call(self) -> None:
        """diffusers resets stateful hooks at the end of every pipeline call."""
        c = self._call
        if c is not None and not c.closed:
            self._finish_call(c, complete=self._reached_end(c))

    # -- internals -------------------------------------------------------------------
    def _locate(self):
        """(call state, step index relative to the call's start); starts a new call."""
        pipe = self._pipe_ref()
        sched = getattr(pipe, "scheduler", None)
        sigmas = getattr(sched, "sigmas", None)
        if sched is None or sigmas is None or not hasattr(sched, "step_index"):
            self._warn_once("nosched", f"fastflow: scheduler {type(sched).__name__} exposes no sigmas/step_index; "
                                       f"every step is computed")
            return None, -1
        step_index = sched.step_index
        c = self._call
        new = (
            c is None or c.sched is not sched or c.sigmas_ref is not sigmas
            or (step_index is None and c.max_k > 0)
            or (step_index is not None and c.verified and step_index - c.start < c.cur_k)
        )
        if new:
            if c is not None and not c.closed:
                self._finish_call(c, complete=self._reached_end(c))
            c = self._call = self._begin_call(sched, sigmas, step_index)
        if c.passthrough:
            return c, -1
        if step_index is None:
            k = 0
        else:
            if not c.verified:
                # the first step ran with no index known: it was the step before this one
                self._rebase(c, step_index - 1 if c.max_k >= 0 else step_index)
            k = step_index - c.start
        if not 0 <= k < c.T or c.closed:
            if not c.closed:
                c.passthrough = True
                c.note = f"step index {step_index} outside the schedule; computed everything from there"
            return c, -1
        return c, k

    def _begin_call(self, sched, sigmas, step_index) -> _Call:
        sig = [float(s) for s in sigmas.tolist()]  # once per pipeline call
        begin = getattr(sched, "begin_index", None)
        start = step_index if step_index is not None else (begin if begin is not None else 0)
        c = _Call(sched, sigmas, sig, start, verified=step_index is not None or begin is not None)
        order = getattr(sched, "order", 1)
        if not isinstance(order, int) or order != 1:
            c.passthrough = True
            c.note = (f"{type(sched).__name__} evaluates the model {order} times per step "
                      f"(a multi-stage solver); every step computed")
            self._warn_once("stages", "fastflow: " + c.note)
        c.set_start(start, self.policy)
        c.euler = _is_euler(sched)
        if not _is_flow_schedule(sched):
            self._warn_once("flow", f"fastflow: {type(sched).__name__} is not a flow-matching schedule "
                                    f"(sigma ∉ [0, 1] or no flow prediction); extrapolating on its sigma axis anyway")
        return c

    def _rebase(self, c: _Call, start: int) -> None:
        c.verified = True
        if start == c.start:
            return
        c.set_start(start, self.policy)
        for h in c.hists.values():  # only step 0 has been seen
            if h.k_cur == 0:
                h.t_cur = c.ts[0]

    def _enter_step(self, c: _Call, k: int, primary_key: str) -> None:
        self._finish_step(c)
        if c.cur_k == 0 and not c.calls_per_step:
            c.calls_per_step = c.step_calls
        c.cur_k = k
        c.max_k = max(c.max_k, k)
        c.step_names = {}
        c.step_calls = 0
        if c.layout is None and k > 0 and c.ctl.run is not None and c.ctl.rows:
            self._start_rows(c)
        if c.layout is not None:
            return self._enter_rows(c, k, primary_key)
        primary = c.hists.get(primary_key)
        # a skip run ends early where the step's first branch has no two true outputs
        # (e.g. a second expert taking over): that step is computed
        usable = primary is not None and primary.v_prev is not None and primary.k_cur < k
        # (the policy's run exists: it started at the first output, before any decision)
        c.step_skipped = c.ctl.enter(k, primary, usable)
        c.run_from = -1
        if not c.step_skipped:
            if c.last_computed < k - 1:
                c.run_from = c.last_computed
            c.last_computed = k

    # -- per-sample decisions (fastflow.diffusers_rows) ---------------------------------
    def _start_rows(self, c: _Call) -> None:
        """At step 1 of a run that decides per sample: learn which call rows are which
        sample and move the histories to per-row ones; where the calls cannot be split
        by sample, compute every step (said once)."""
        layout = diffusers_rows.layout_of(self.pipeline, c.batch_size, c.calls_per_step)
        sizes = {tuple(h.v_cur.shape[:1]) for h in c.hists.values() if h.v_cur is not None}
        if layout is None or sizes != {(c.batch_size,)}:
            why = (f"{type(self.pipeline).__name__}'s denoiser calls cannot be split by sample "
                   f"(batch sizes {sorted(s[0] for s in sizes)})")
            c.ctl.start(self.policy, replace(c.ctx, split_rows=False))  # the policy's per-batch run
            if c.ctl.rows:  # it has none
                c.passthrough = True
                c.note = f"{why}; every step computed"
                self._warn_once("rows", f"fastflow: policy {self.policy_name} decides per sample only, but {why}; "
                                        f"every step is computed")
            else:
                c.note = f"{why}; decided per batch"
                self._warn_once("rows", f"fastflow: policy {self.policy_name} decides per sample, but {why}; "
                                        f"it decides per batch there")
            return
        c.layout = layout
        c.rhists = {key: diffusers_rows.from_history(h, layout) for key, h in c.hists.items()}
        c.row_from = [-1] * layout.samples
        c.hists = {}
        c.ctl.start_rows(layout.samples)

    def _enter_rows(self, c: _Call, k: int, primary_key: str) -> None:
        import torch

        hist = c.rhists.get(primary_key)
        if hist is None:  # a new expert: every row computes until it holds two outputs
            hist = c.rhists[primary_key] = RowHistory(c.layout.samples)
        c.primary = primary_key
        c.comp, c.skip = c.ctl.enter_rows(k, hist)
        for r in c.skip:  # where each sample's run began, for its correction
            if c.row_from[r] < 0:
                c.row_from[r] = hist.k_cur[r]
        c.row_ends = {}
        for r in c.comp:
            if c.row_from[r] >= 0:
                c.row_ends[r], c.row_from[r] = c.row_from[r], -1
        c.step_skipped = not c.comp
        c.comp_index = c.call_index = None
        if c.comp and c.skip:
            c.comp_index = torch.tensor(c.comp, device=c.device)
            c.call_index = torch.tensor(c.layout.call_rows(c.comp), device=c.device)
        if c.comp:
            c.row_steps += 1

    def _before_rows(self, c: _Call, k: int, key: str):
        """None (run the denoiser on every row), an output (every row extrapolated), or a
        :class:`~fastflow.diffusers_rows.Gather` (run it on the computing rows)."""
        rh = c.rhists.get(key)
        if c.skip and (rh is None or not all(rh.usable(r) for r in c.skip)):
            self._pending_call = (c, k, key, "fallback")  # a branch with no history for them
            return None
        if not c.comp:
            template = c.templates[key]
            out = _main_tensor(template).new_empty(_main_tensor(template).shape)
            diffusers_rows.fill(c.layout.view(out), rh, c.skip, c.ts[k])
            return _rebuild(template, out)
        if not c.skip:
            self._pending_call = (c, k, key, "whole")
            return None
        self._pending_call = (c, k, key, "rows")
        return diffusers_rows.Gather(c.call_index, c.layout.rows)

    def _after_rows(self, c: _Call, k: int, key: str, out, mode: str):
        """Record the computed rows' outputs (and their errors, for the first branch);
        a gathered call comes back whole, the other rows extrapolated."""
        v = _main_tensor(out)
        t = c.ts[k]
        lay = c.layout
        rh = c.rhists.get(key)
        if rh is None:
            rh = c.rhists[key] = RowHistory(lay.samples)
        ends: list[int] = []
        if c.row_ends and c.euler and c.ctl.correct and mode != "fallback":
            ends = [r for r, f in c.row_ends.items() if rh.k_cur[r] == f and rh.usable(r)]
        step = c.ts[k + 1] - t
        if mode == "rows":
            sub = diffusers_rows.RowLayout(len(c.comp), lay.pairs).view(v)
            full = v.new_empty((lay.rows, *v.shape[1:]))
            view = lay.view(full)
            view.index_copy_(0, c.comp_index, sub)
            diffusers_rows.fill(view, rh, c.skip, t)
            if ends:
                diffusers_rows.correct(view, sub, rh, ends, {r: i for i, r in enumerate(c.comp)}, c.ts, k, step)
            if key == c.primary:
                c.ctl.measure_rows(c.comp, sub, rh, t)
            rh.push(c.comp, c.comp_index, k, t, sub)
            out = _rebuild(out, full)
        else:
            rows = list(range(lay.samples))
            if mode == "fallback":
                c.fallback_calls += 1
            elif key == c.primary:
                c.ctl.measure_rows(rows, lay.view(v), rh, t)
            if ends:
                full = v.clone()
                diffusers_rows.correct(lay.view(full), lay.view(v), rh, ends, None, c.ts, k, step)
            rh.push(rows, None, k, t, lay.view(v))
            if ends:
                out = _rebuild(out, full)
        c.templates[key] = out
        if k == c.T - 1 and c.calls_per_step and c.step_calls >= c.calls_per_step:
            self._finish_call(c, complete=True)
        return out

    def _finish_step(self, c: _Call) -> None:
        """Every decision gets exactly one error, at the next computed step (as in the engine)."""
        if not c.step_skipped and c.cur_k >= 0:
            c.ctl.settle(c.device)

    def _ensure_run(self, c: _Call) -> SkipController:
        if c.ctl.run is None:
            ctx = SampleContext(
                timesteps=list(c.ts), model_key=self.model_key,
                schedule_key=self._schedule_key or _schedule_key(c.sched, c.ts),
                batch_size=c.batch_size or 1,
            )
            c.ctl.start(self.policy, ctx)
            c.ctx = ctx
        return c.ctl

    def _reached_end(self, c: _Call | None) -> bool:
        # the last step was entered: computed, or extrapolated by a policy that may (skip_last)
        return c is not None and not c.passthrough and c.T >= 1 and c.cur_k == c.T - 1

    def _finish_call(self, c: _Call | None, complete: bool) -> None:
        if c is None or c.closed:
            return
        c.closed = True
        c.ended = time.perf_counter()
        ok = False
        try:
            if not c.passthrough and c.cur_k >= 0:
                self._finish_step(c)
                ok = complete
                self._ensure_run(c).close(ok)
        finally:
            # a call that fell back to computing everything computed its remaining steps too
            trace = c.ctl.trace if c.ctl is not None else []
            computed = ((c.ctl.nfe + c.ctl.probes if c.ctl is not None else 0)
                        + (max(0, c.T - 1 - c.cur_k) if c.passthrough else 0))
            per_sample = steps_per_sample = None
            if c.layout is not None and c.ctl is not None:  # steps where any sample computed
                per_sample, computed = list(c.ctl.row_nfe), computed + c.row_steps
                rows = c.ctl.row_traces
                trace = [Step(s.k, s.t, any(tr[i].computed for tr in rows), None) for i, s in enumerate(rows[0])]
                steps_per_sample = [[s.k for s in tr if s.computed] for tr in rows]
            c.record = PipelineCall(
                index=len(self.calls), steps=c.T, nfe=computed, denoiser_calls=c.denoiser_calls,
                skipped=sum(1 for s in trace if not s.computed), trace=list(trace),
                timesteps=list(c.ts), branches=list(c.order), complete=complete,
                policy=self.policy_name, wall_seconds=c.ended - c.started,
                fallback_calls=c.fallback_calls, note=c.note, nfe_per_sample=per_sample,
                computed_per_sample=steps_per_sample,
            )
            self.calls.append(c.record)
            c.hists, c.rhists, c.templates, c.ctl = {}, {}, {}, None  # free the device memory
        if ok and self.autosave and getattr(self.policy, "state_path", None) is not None:
            self.policy.save()

    def _settle(self) -> None:
        """Close a call that reached its last step but whose end diffusers did not signal."""
        c = self._call
        if c is not None and not c.closed and self._reached_end(c):
            self._finish_call(c, complete=True)

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, stacklevel=4)


def remove_hook(module, had_forward: bool, had_registry: bool) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or registry.get_hook(HOOK_NAME) is None:
        return
    registry.remove_hook(HOOK_NAME, recurse=False)
    if not registry.hooks:
        # diffusers leaves the bound method as an instance attribute: drop it if we added it
        if not had_forward and "forward" in vars(module):
            del module.forward
        if not had_registry:
            del module._diffusers_hook


# -- output structure, keys ---------------------------------------------------------------

def _rebuild(template, v):
    """An output shaped like ``template`` (tensor, tuple or BaseOutput) carrying ``v``."""
    if isinstance(template, tuple):
        return (v, *template[1:])
    if isinstance(template, list):
        return [v, *template[1:]]
    if hasattr(template, "to_tuple") and hasattr(template, "keys"):
        keys = list(template.keys())
        return type(template)(**{keys[0]: v, **{k: template[k] for k in keys[1:]}})
    return v


def _is_euler(sched) -> bool:
    """x_{k+1} = x_k + (σ_{k+1} − σ_k)·output: a skip run's correction can ride on the output."""
    cfg = getattr(sched, "config", {}) or {}
    return (type(sched).__name__ == "FlowMatchEulerDiscreteScheduler" and not cfg.get("stochastic_sampling")
            and not cfg.get("invert_sigmas"))


def _is_flow_schedule(sched) -> bool:
    cfg = getattr(sched, "config", {}) or {}
    name = type(sched).__name__
    return ("FlowMatch" in name or bool(cfg.get("use_flow_sigmas"))
            or cfg.get("prediction_type") == "flow_prediction")


def _schedule_key(sched, ts: list[float]) -> str:
    digest = hashlib.sha1(json.dumps([round(t, 4) for t in ts]).encode()).hexdigest()[:10]
    return f"diffusers/{type(sched).__name__}/steps={len(ts) - 1}/sigmas={digest}"


def _model_key(pipe, denoiser) -> str:
    cls = type(getattr(denoiser, "_orig_mod", denoiser))
    cfg = getattr(pipe, "config", None)
    name = getattr(cfg, "_name_or_path", None) if cfg is not None else None
    if name is None and isinstance(cfg, dict):
        name = cfg.get("_name_or_path")
    return f"{cls.__name__}:{name}" if name else f"{cls.__module__}.{cls.__qualname__}"

"""The skip controller: the one place that decides, skips, measures, traces and counts.

Both skip paths drive it — :func:`fastflow.sample`'s Euler loop and the diffusers hook
(which only adapts a pipeline's denoiser calls to it) — so a decision means the same
everywhere. For one sample (one batch) and one policy it owns:

* the policy's :class:`~fastflow.policy.PolicyRun` (``decide``, ``observe``, ``record``,
  ``close``) and the skippable window (``Policy.run_lengths``);
* skip runs: :meth:`enter` says for each step whether it is computed or extrapolated,
  asking the policy at the first step of a possible run;
* the error of each decision: :meth:`measure` adds the extrapolation error of every
  branch computed at the next true step (float32, on the device, from
  :mod:`fastflow.estimator`), :meth:`settle` hands their mean to ``observe``;
* the trace (:class:`Step` per step) and the NFE (computed steps; a step's branches count
  once), and, in a calibration that probes the sensitivity (:mod:`fastflow.sensitivity`),
  the probe evaluations, counted apart.

It never reads a tensor on the host. A run that decides per sample
(``per_sample_decisions``) is driven row by row instead: :meth:`start_rows` gives every
row its own skip run, pending decision, trace and NFE, and :meth:`enter_rows` says which
rows the model computes at a step (the caller gathers them into one sub-batch) and which
are extrapolated from their own history; :meth:`measure_rows` hands each row its own
error. A per-batch run never touches that state and pays nothing for it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from . import estimator


class Step(NamedTuple):
    """One step of a trace: ``computed`` is False where the velocity was extrapolated;
    ``decision`` is what the policy answered after this step (None: not asked)."""

    k: int
    t: float
    computed: bool
    decision: int | None


class SkipController:
    """Skip decisions for one sample; see the module docstring."""

    __slots__ = ("ts", "room", "run", "decide", "observe", "record", "needs_error", "per_sample", "order",
                 "trace", "nfe", "probe", "probes", "pending", "skip_until", "prev_computed", "_err", "_err_n",
                 "rows", "decide_rows", "observe_rows", "correct", "starts", "row_until", "row_prev", "row_pending",
                 "row_nfe", "row_traces")

    def __init__(self, policy, ts: list[float]):
        self._set_schedule(policy, ts)
        self.run = None
        self.order = 1
        self.trace: list[Step] = []
        self.nfe = 0
        self.probe = None  # a calibration's sensitivity probe (fastflow.sensitivity.Probe)
        self.probes = 0  # model evaluations the probe added
        self.pending = -1  # step whose decision awaits its error
        self.skip_until = -1  # steps below this one are extrapolated (the current run)
        self.prev_computed = False
        self._err = None
        self._err_n = 0
        self.rows = False
        self.correct = False

    def start(self, policy, ctx) -> None:
        """Start the policy's run (separate from ``__init__``: a pipeline tells its batch
        size only with its first output)."""
        run = self.run = policy.start(ctx)
        self.decide, self.observe = run.decide, run.observe
        self.record = run.record if run.wants_velocities else None
        self.needs_error = run.needs_error
        self.per_sample = getattr(run, "per_sample_error", False)
        self.order = getattr(run, "order", 1)  # of the extrapolation (fastflow.estimator.estimate)
        # re-integrate a first-order run with the interpolation its end allows (estimator.run_correction)
        self.correct = getattr(policy, "correct", False) and self.order == 1
        self.probe = getattr(run, "probe", None)
        self.rows = getattr(run, "per_sample_decisions", False)
        if self.rows:
            self.decide_rows = run.decide_rows
            self.observe_rows = getattr(run, "observe_rows", None)

    def rebase(self, policy, ts: list[float]) -> None:
        """The schedule turned out to start elsewhere (only step 0 has been seen)."""
        self._set_schedule(policy, ts)
        self.trace = [s._replace(t=ts[s.k]) for s in self.trace]

    def _set_schedule(self, policy, ts: list[float]) -> None:
        self.ts = ts
        self.room = policy.run_lengths(len(ts) - 1) if len(ts) > 1 else [0]

    def enter(self, k: int, hist, usable: bool = True) -> bool:
        """Step ``k`` begins: True if it is extrapolated, False if the model computes it.

        ``hist`` holds the true velocities the decision may look at; ``usable`` is False
        where they cannot extrapolate to step k (fewer than two, or not from before k).
        A skip run ends early at a step that is not usable; that step is computed.
        """
        if k < self.skip_until and usable:
            skipped = True
        else:
            self.skip_until = -1
            skipped = False
            room = self.room[k]
            if room and self.prev_computed and usable:
                decision = self.decide(k, hist)
                if self.needs_error:
                    self.pending = k
                if self.trace:
                    self.trace[-1] = self.trace[-1]._replace(decision=decision)
                n = min(int(decision), room)
                if n > 0:
                    self.skip_until = k + n
                    skipped = True
        self.prev_computed = not skipped
        self.trace.append(Step(k, self.ts[k], not skipped, None))
        if not skipped:
            self.nfe += 1
        return skipped

    # -- per-sample decisions --------------------------------------------------------
    def start_rows(self, batch: int, starts: list[int] | None = None) -> None:
        """Per-row state for a per-sample run; ``starts[r]``: the step row r begins at
        (an edit starts late; default 0 for every row). Steps already entered for the
        whole batch (the diffusers hook learns the batch layout only after step 0) are
        every row's first steps."""
        self.starts = list(starts) if starts is not None else [0] * batch
        self.row_until = [-1] * batch
        self.row_prev = [self.prev_computed] * batch
        self.row_pending = [-1] * batch
        self.row_nfe = [self.nfe] * batch
        self.row_traces: list[list[Step]] = [list(self.trace) for _ in range(batch)]

    def enter_rows(self, k: int, hist) -> tuple[list[int], list[int]]:
        """Step ``k`` begins for every row that has started: (rows the model computes,
        rows extrapolated), each in row order. ``hist`` is the batch's
        :class:`~fastflow.policy.RowHistory`; a row is asked at the first step of a
        possible run, after a computed step, once it holds two true velocities."""
        room = self.room[k]
        comp, skip, ask = [], [], []
        for r, s in enumerate(self.starts):
            if k < s:
                continue
            usable = hist.k_prev[r] >= 0
            if k < self.row_until[r] and usable:
                skip.append(r)
                continue
            self.row_until[r] = -1
            (ask if room and self.row_prev[r] and usable else comp).append(r)
        if ask:
            for r, decision in zip(ask, self.decide_rows(k, ask, hist)):
                if self.needs_error:
                    self.row_pending[r] = k
                trace = self.row_traces[r]
                trace[-1] = trace[-1]._replace(decision=decision)
                n = min(int(decision), room)
                if n > 0:
                    self.row_until[r] = k + n
                    skip.append(r)
                else:
                    comp.append(r)
            comp.sort()
            skip.sort()
        t = self.ts[k]
        for r in comp:
            self.row_prev[r] = True
            self.row_nfe[r] += 1
            self.row_traces[r].append(Step(k, t, True, None))
        for r in skip:
            self.row_prev[r] = False
            self.row_traces[r].append(Step(k, t, False, None))
        return comp, skip

    def measure_rows(self, rows: list[int], v: Any, hist, t: float) -> None:
        """The computed rows' true velocities ``v`` (in the order of ``rows``), before
        ``hist`` takes them: each row with a pending decision gets its own error."""
        if self.observe_rows is None:
            return
        by_k: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            k = self.row_pending[r]
            if k >= 0:
                by_k.setdefault(k, []).append(i)
                self.row_pending[r] = -1
        for k, pos in by_k.items():
            idx = [rows[i] for i in pos]
            err = estimator.row_errors(v[pos] if len(pos) < len(rows) else v, hist, idx, t)
            self.observe_rows(k, idx, err)

    def computed(self, k: int, v: Any) -> None:
        """The true velocity of step ``k``'s first branch (what calibrating policies see)."""
        if self.record is not None:
            self.record(k, v)

    def probe_at(self, k: int) -> Any:
        """At computed step ``k`` of a probing calibration: the perturbation e at which
        the caller evaluates the model once more (then :meth:`probed`), or None."""
        return None if self.probe is None else self.probe.request(k)

    def probed(self, k: int, v_probe: Any, v: Any) -> None:
        self.probe.result(k, v_probe, v)
        self.probes += 1

    def measure(self, v: Any, hist, t: float) -> None:
        """A branch computed at the step after a decision: its extrapolation error,
        from that branch's own history (before it is updated with ``v``)."""
        if self.pending < 0 or hist.v_prev is None:
            return
        e = estimator.history_error(v, hist, t, self.per_sample, self.order)
        if self._err is not None and e.shape != self._err.shape:  # branches of unequal batch
            e, self._err = e.mean(), self._err.mean()
        self._err = e if self._err is None else self._err + e
        self._err_n += 1

    def settle(self, device=None) -> None:
        """Hand the pending decision its error (the mean over the measured branches;
        NaN when no branch could be measured). It stays on the device."""
        if self.pending < 0:
            return
        if self._err_n:
            err = self._err if self._err_n == 1 else self._err / self._err_n
        else:
            import torch

            err = torch.full((), float("nan"), device=device)
        self.observe(self.pending, err)
        self.pending, self._err, self._err_n = -1, None, 0

    def close(self, ok: bool) -> None:
        self.run.close(ok)

    @property
    def calibrating(self) -> bool:
        return getattr(self.run, "calibrating", False)

"""The per-sample loop: Euler integration where every row of the batch decides apart.

Driven by a :class:`~fastflow.controller.SkipController` whose policy run decides per
sample. At each step the controller splits the rows that have started into those the
model computes and those extrapolated; the computed rows are gathered into one sub-batch
(with their conditioning, both guidance branches together: ``velocity_for``), the
others take their own first-order extrapolation from their own last two true velocities
(:class:`~fastflow.policy.RowHistory`). Rows extrapolated from the same pair of steps
share one scalar coefficient, so every row goes through exactly the floating-point
operations it would go through alone: a batch run per sample gives, row for row, what
each sample gives alone (for a model whose rows do not interact).

Unlike the per-batch loop it reads the host once per step that has a decision (which
rows to gather); the policies that decide per sample already read their signal there.
"""

from __future__ import annotations

from typing import Any, Callable

from . import estimator
from .checks import check_finite, check_velocity
from .policy import RowHistory


def integrate_rows(velocity_for: Callable, noise: Any, ts: list[float], ctl, starts: list[int] | None = None):
    """Integrate ``noise`` over the schedule ``ts`` with per-row decisions.

    ``velocity_for(index)`` returns the velocity function of the rows in ``index`` (a
    device index tensor; None: the whole batch). ``starts[r]`` is the step row r begins
    at (its ``noise`` row is its state there). Returns (x, NFE per row, model calls)."""
    import torch

    T = len(ts) - 1
    batch = int(noise.shape[0])
    ctl.start_rows(batch, starts)
    t_vecs = [torch.full((batch,), t, dtype=noise.dtype, device=noise.device) for t in ts[:-1]]
    whole_batch = velocity_for(None)
    x = noise.clone()
    hist = RowHistory(batch)
    sums: list[Any] = []
    computed_steps: list[int] = []
    checked = False
    for k in range(T):
        t, h = ts[k], ts[k + 1] - ts[k]
        comp, skip = ctl.enter_rows(k, hist)
        if skip:
            _extrapolate(x, hist, skip, batch, t, h)
        if not comp:
            continue
        whole = len(comp) == batch
        index = None if whole else torch.tensor(comp, device=x.device)
        xs = x if whole else x.index_select(0, index)
        v = (whole_batch if whole else velocity_for(index))(xs, t_vecs[k][: len(comp)])
        if not checked:
            check_velocity(v, xs)
            checked = True
        sums.append(v.sum())
        computed_steps.append(k)
        ctl.measure_rows(comp, v, hist, t)
        if ctl.correct:
            _correct(xs, v, hist, comp, ts, k)
        if whole:
            x.add_(v, alpha=h)
        else:
            x.index_copy_(0, index, xs.add_(v, alpha=h))
        hist.push(comp, index, k, t, v)
    if sums:
        check_finite(sums, computed_steps, x, ts)
    return x, list(ctl.row_nfe), len(computed_steps)


def _extrapolate(x, hist: RowHistory, rows: list[int], batch: int, t: float, h: float) -> None:
    """x[rows] += h·v̂(t), each row from its own last two true velocities, grouped by the
    steps they were taken at (one scalar coefficient per group, as the per-batch loop)."""
    import torch

    for group in hist.pairs(rows).values():
        t_prev, t_cur = hist.t_prev[group[0]], hist.t_cur[group[0]]
        if len(group) == batch:
            v_prev, v_cur, xs = hist.v_prev, hist.v_cur, x
        else:
            index = torch.tensor(group, device=x.device)
            v_prev, v_cur, xs = (a.index_select(0, index) for a in (hist.v_prev, hist.v_cur, x))
        estimator.euler_skip_(xs, v_cur, estimator.slope(v_prev, v_cur, t_prev, t_cur), t_cur, t, h)
        if len(group) < batch:
            x.index_copy_(0, index, xs)


def _correct(xs, v, hist: RowHistory, comp: list[int], ts: list[float], k: int) -> None:
    """The computed rows whose skip run ends at step k: xs[i] += the run's correction, as
    the per-batch loop adds it for a sample alone. ``xs``/``v`` are in the order of
    ``comp``; ``xs`` may be ``x`` itself (every row computes)."""
    ends = [r for r in comp if hist.k_prev[r] >= 0 and hist.k_cur[r] < k - 1]
    for _, at, _, corr in run_corrections(v, hist, ends, [comp.index(r) for r in ends], ts, k):
        xs.index_copy_(0, at, xs.index_select(0, at).add_(corr))


def run_corrections(v, hist: RowHistory, rows: list[int], positions: list[int], ts: list[float], k: int):
    """For ``rows`` whose skip run ends at step k (``v[positions[i]]``: the true velocity
    of ``rows[i]``; ``hist`` not yet updated), yield per group of rows that share a
    history pair: (their rows, their positions in v, as device tensors; v there; the
    :func:`~fastflow.estimator.run_correction` of their runs). The per-row loop adds the
    correction to the state, the diffusers hook to the output it returns."""
    import torch

    at_of = dict(zip(rows, positions))
    for (_, c), group in hist.pairs(rows).items():
        idx = torch.tensor(group, device=v.device)
        at = torch.tensor([at_of[r] for r in group], device=v.device)
        vg = v.index_select(0, at)
        corr = estimator.run_correction(vg, hist.v_prev.index_select(0, idx), hist.v_cur.index_select(0, idx),
                                        hist.t_prev[group[0]], hist.t_cur[group[0]], ts[k], estimator.run_span(ts, c, k))
        yield idx, at, vg, corr

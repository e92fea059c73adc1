"""Per-sample decisions under the diffusers hook: which rows of a denoiser call belong to
which sample, running the denoiser on some of them, and filling in the others.

A pipeline hands the denoiser one batch per call. Its rows are the samples, except where
classifier-free guidance is concatenated into one call (SD3 and the pipelines built like
it: ``cat([latents] * 2)``), where sample r owns rows r and r + B. :class:`RowLayout` is
that mapping; every per-row history (:class:`~fastflow.policy.RowHistory`) is kept in the
*sample view* (``(B, 2, ...)`` for a concatenated call, the tensor itself otherwise), so
a policy's ``decide_rows`` sees both branches of a sample together.

At a step where some samples compute and others are extrapolated, :func:`gather` slices
every per-row input (a tensor whose leading dimension is the call's batch: latents,
timesteps, text embeddings, pooled projections, FLUX's guidance) to the computing rows;
everything else (position ids, attention kwargs, scalars) passes unchanged.
:func:`fill` writes the extrapolated rows, each from its own last two true outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from . import estimator
from .rows import run_corrections

#: inputs that are never per-row, whatever their leading dimension (FLUX's 2-D ids)
NOT_PER_ROW = frozenset({"img_ids", "txt_ids"})


@dataclass(frozen=True)
class RowLayout:
    """``samples`` samples in a call of ``samples * pairs`` rows (pairs 2: concatenated
    guidance branches, sample r at rows r and r + samples)."""

    samples: int
    pairs: int = 1

    @property
    def rows(self) -> int:
        return self.samples * self.pairs

    def view(self, v: Any) -> Any:
        """The sample view of a call-shaped tensor (no copy)."""
        return v if self.pairs == 1 else v.unflatten(0, (self.pairs, self.samples)).transpose(0, 1)

    def call_rows(self, samples: list[int]) -> list[int]:
        return [r + p * self.samples for p in range(self.pairs) for r in samples]


class Gather(NamedTuple):
    """What the hook runs the denoiser on instead of the whole call: the rows in
    ``index`` (a device tensor) of a call of ``batch`` rows."""

    index: Any
    batch: int


def main_tensor(out):
    """The tensor a denoiser returns: itself, the first of a tuple, or the first field of
    a diffusers ``BaseOutput``."""
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):
        return out[next(iter(out.keys()))]
    return out


def layout_of(pipe, batch: int, calls_per_step: int) -> RowLayout | None:
    """The layout of a pipeline's denoiser calls of ``batch`` rows, or None where it is
    not understood. One call per step under guidance is a concatenated call."""
    if calls_per_step == 1 and bool(getattr(pipe, "do_classifier_free_guidance", False)):
        return RowLayout(batch // 2, 2) if batch % 2 == 0 else None
    return RowLayout(batch)


def gather(args: tuple, kwargs: dict, index: Any, batch: int) -> tuple[tuple, dict]:
    """``args``/``kwargs`` with every per-row tensor cut to the rows in ``index``, also
    inside lists, tuples and dicts (ControlNet residuals, IP-Adapter embeddings in the
    attention kwargs)."""
    import torch

    def cut(name, a):
        if name in NOT_PER_ROW:
            return a
        if torch.is_tensor(a):
            return a.index_select(0, index) if a.dim() >= 1 and a.shape[0] == batch else a
        if isinstance(a, (list, tuple)) and not hasattr(a, "_fields"):
            return type(a)(cut(None, x) for x in a)
        if isinstance(a, dict):
            return {k: cut(k, x) for k, x in a.items()}
        return a

    return tuple(cut(None, a) for a in args), {k: cut(k, a) for k, a in kwargs.items()}


def fill(out_view: Any, hist, rows: list[int], t: float) -> None:
    """Write into ``out_view`` (a sample view) the first-order extrapolation of each of
    ``rows`` to ``t`` from its own history (a :class:`RowHistory` in the sample view);
    rows extrapolated from the same pair of steps share one coefficient, so each gets the
    floating-point operations it would get alone."""
    import torch

    for group in hist.pairs(rows).values():
        index = torch.tensor(group, device=out_view.device)
        v_prev, v_cur = hist.v_prev.index_select(0, index), hist.v_cur.index_select(0, index)
        e = estimator.extrapolate(v_prev, v_cur, hist.t_prev[group[0]], hist.t_cur[group[0]], t)
        out_view.index_copy_(0, index, e.to(out_view.dtype))


def from_history(h, layout: RowLayout):
    """A :class:`RowHistory` holding a whole-batch :class:`History` (every row took the
    same steps so far), in the sample view."""
    from .policy import RowHistory

    rh = RowHistory(layout.samples)
    n = layout.samples
    rh.k_prev, rh.t_prev = [h.k_prev] * n, [h.t_prev] * n
    rh.k_cur, rh.t_cur = [h.k_cur] * n, [h.t_cur] * n
    rh.v_prev = layout.view(h.v_prev).clone() if h.v_prev is not None else None
    rh.v_cur = layout.view(h.v_cur).clone() if h.v_cur is not None else None
    return rh


def correct(out_view: Any, v_view: Any, hist, rows: list[int], vpos: dict | None, ts: list[float], k: int,
            step: float) -> None:
    """For each sample r of ``rows`` whose skip run ends at step k, write v + correction /
    step into ``out_view`` at row r (:func:`fastflow.rows.run_corrections`), the true
    output taken from ``v_view`` at ``vpos[r]`` (None: r), the history not yet updated."""
    positions = rows if vpos is None else [vpos[r] for r in rows]
    for idx, _, v, corr in run_corrections(v_view, hist, rows, positions, ts, k):
        out_view.index_copy_(0, idx, corr.div_(step).add_(v).to(out_view.dtype))

"""FastFlow's estimator and its error: the one copy every skip path uses.

From the last two true velocities (v_p at t_p, v_c at t_c) the velocity at t is
extrapolated to first order (a finite difference)::

    v̂(t) = v_c + (t − t_c) · (v_c − v_p) / (t_c − t_p) = lerp(v_p, v_c, 1 + (t − t_c)/(t_c − t_p))

Where a policy asks for ``order`` 2 and three true velocities are known, the quadratic
through them is extrapolated instead (:func:`quadratic_weights`): exact for a velocity
that is quadratic in t along the path, better than first order where the path curves
smoothly, worse where the network's velocity jitters from step to step
(docs/benchmarks.md measures both on three models).

Its error at a step where the model is consulted again is the mean squared difference
to the true velocity, taken in float32 whatever the model's dtype, either over the whole
batch (a 0-d tensor) or per sample (one value per row). Both stay on the device.
"""

from __future__ import annotations

from typing import Any


def coefficient(t: float, t_prev: float, t_cur: float) -> float:
    """The lerp weight c with v̂(t) = lerp(v_prev, v_cur, c)."""
    return 1.0 + (t - t_cur) / (t_cur - t_prev)


def extrapolate(v_prev: Any, v_cur: Any, t_prev: float, t_cur: float, t: float) -> Any:
    """v̂(t), a new tensor."""
    import torch

    return torch.lerp(v_prev, v_cur, coefficient(t, t_prev, t_cur))


def slope(v_prev: Any, v_cur: Any, t_prev: float, t_cur: float) -> Any:
    """(v_cur − v_prev)/(t_cur − t_prev), a new tensor: fixed over a skip run."""
    return (v_cur - v_prev).div_(t_cur - t_prev)


def euler_skip_(x: Any, v_cur: Any, slope_: Any, t_cur: float, t: float, h: float) -> Any:
    """x += h·v̂(t) in place, with v̂(t) = v_cur + (t − t_cur)·slope written into the
    update so no v̂ tensor is allocated (both sampling loops use it)."""
    return x.add_(v_cur, alpha=h).add_(slope_, alpha=h * (t - t_cur))


def run_span(ts: list[float], c: int, k: int) -> float:
    """Σ_j h_j (t_j − t_c) over the skipped steps c < j < k (``a`` of :func:`run_correction`)."""
    return sum((ts[j + 1] - ts[j]) * (ts[j] - ts[c]) for j in range(c + 1, k))


def run_correction(v: Any, v_prev: Any, v_cur: Any, t_prev: float, t_cur: float, t: float, a: float) -> Any:
    """What the state gains when a skip run's extrapolated velocities are replaced, once
    the model is consulted again at ``t`` (true velocity ``v``), by the line from v_cur
    to v: the run used v̂(t_j) = v_cur + (t_j − t_cur)·s_e with s_e the extrapolation's
    slope, the line has slope s_l = (v − v_cur)/(t − t_cur), so the state moves by
    Σ_j h_j (t_j − t_cur)·(s_l − s_e) = a·(s_l − s_e), with ``a`` = Σ_j h_j (t_j − t_cur)
    over the run's steps (:func:`run_span`). A new tensor. No evaluation is added: the run is re-integrated
    with the interpolation its end makes possible (for a velocity quadratic in t this
    halves the error the run left in the state; exact for one linear in t)."""
    d = (v - v_cur).div_(t - t_cur)
    return d.sub_(slope(v_prev, v_cur, t_prev, t_cur)).mul_(a)


def quadratic_weights(t: float, t_a: float, t_b: float, t_c: float) -> tuple[float, float, float]:
    """(w_a, w_b, w_c) with v̂(t) = w_a·v_a + w_b·v_b + w_c·v_c, the quadratic through the
    true velocities at t_a, t_b, t_c (Lagrange form; the weights sum to 1)."""
    return ((t - t_b) * (t - t_c) / ((t_a - t_b) * (t_a - t_c)),
            (t - t_a) * (t - t_c) / ((t_b - t_a) * (t_b - t_c)),
            (t - t_a) * (t - t_b) / ((t_c - t_a) * (t_c - t_b)))


def estimate(hist, t: float, order: int = 1) -> Any:
    """v̂(t) from a :class:`fastflow.policy.History`, a new tensor: the quadratic through
    its three velocities with ``order`` 2 where it holds three, else first order."""
    if order == 2 and hist.v_prev2 is not None:
        wa, wb, wc = quadratic_weights(t, hist.t_prev2, hist.t_prev, hist.t_cur)
        return (hist.v_prev2 * wa).add_(hist.v_prev, alpha=wb).add_(hist.v_cur, alpha=wc)
    return extrapolate(hist.v_prev, hist.v_cur, hist.t_prev, hist.t_cur, t)


def error(v: Any, v_prev: Any, v_cur: Any, t_prev: float, t_cur: float, t: float,
          per_sample: bool = False) -> Any:
    """MSE(v̂(t), v) in float32: 0-d, or shape (batch,) with ``per_sample``."""
    import torch

    c = (t - t_cur) / (t_cur - t_prev)
    # v − v̂(t) = v − (1 + c)·v_cur + c·v_prev, without materialising v̂
    return _mse(torch.add(v, v_cur, alpha=-(1.0 + c)).add_(v_prev, alpha=c), per_sample)


def _mse(d: Any, per_sample: bool) -> Any:
    """The mean square of a difference tensor in float32: 0-d, or one value per row."""
    import torch

    d = (d if d.dtype == torch.float32 else d.float()).square_()
    return d.flatten(1).mean(1) if per_sample and d.dim() > 1 else d.mean()


def state_error(vs: list[Any], ts: list[float], p: int, c: int, k: int, e: int) -> Any:
    """E = Σ_{k ≤ i < e} h_i (v̂_i − v_i): the error a skip run of steps k..e−1 leaves in
    the state, extrapolating from the true velocities at p < c (``vs``: true velocities
    of steps 0..e−1 at least). A new float32 tensor of the state's shape. Policies price
    runs by it whether or not the run is corrected at its end (``correct``): the
    uncorrected error is also what the model is next evaluated at, and ranks runs better
    than the corrected error alone (docs/benchmarks.md, "Correcting a skip run")."""
    out = None
    for i in range(k, e):
        term = (extrapolate(vs[p], vs[c], ts[p], ts[c], ts[i]) - vs[i]).float() * (ts[i + 1] - ts[i])
        out = term if out is None else out + term
    return out


def run_errors(vs: list[Any], ts: list[float], runs: list[tuple[int, int, int, int]],
               budget: int = 1 << 22) -> tuple[Any, Any]:
    """Many skip runs of one full trajectory at once. Each run (p, c, k, e) extrapolates
    steps k..e−1 from the true velocities at p < c, and the model is consulted again at
    e < len(vs) (or e = len(vs): the run reaches the end, nothing consults it). Returns two
    float64 tensors of shape (runs, rows) on the device: per row, the mean square of the
    run's error in the state (:func:`state_error`) and MSE(v̂_e, v_e), the error a policy
    can measure when the run ends (NaN for a run that reaches the end).

    Both errors are linear in a few vectors of the trajectory: with P_i = Σ_{j<i} h_j v_j,
    E = α·v_c − β·v_p − P_e + P_k and v_e − v̂_e = v_e − (1 + γ)·v_c + γ·v_p (α, β, γ
    from the times alone). So their squared norms are quadratic forms in the Gram matrix
    of (v_0 .. v_{T−1}, P_0 .. P_T), the v centred on their mean (the weights of each
    error sum to 0): one matrix product over the features (float64, in pieces of about
    ``budget`` elements; on the CPU where the device has no float64), then a few scalars
    per run. The forms cancel: an error 1e-11 of the velocities' mean square comes out
    to about 1e-5 of itself (tests/test_estimator.py), far below anything a policy
    prices. A calibration prices its few thousand (step, history, arm) cells in about a
    millisecond, and the cost does not grow with the runs. No runs: two empty tensors."""
    import torch

    T = len(vs)
    bad = [r for r in runs if not (0 <= r[0] < r[1] < r[2] < r[3] <= T)]
    if bad:
        raise ValueError(f"run {bad[0]} is not (p, c, k, e) with p < c < k < e <= {T}")
    rows = vs[0].shape[0] if vs[0].dim() else 1
    if not runs:
        empty = torch.zeros(0, rows, dtype=torch.float64, device=vs[0].device)
        return empty, empty.clone()
    flat = torch.stack([v.reshape(rows, -1) for v in vs], 1)  # (rows, T, features)
    dev = flat.device
    if dev.type == "mps":  # no float64 there
        flat = flat.cpu()
    f64 = dict(dtype=torch.float64, device=flat.device)
    h = torch.tensor([ts[i + 1] - ts[i] for i in range(T)], **f64)
    lower = torch.ones(T, T, **f64).tril_(-1)  # P_i = Σ_{j<i} h_j v_j, i = 0..T
    prefix = torch.cat([lower, torch.ones(1, T, **f64)]) * h
    features = flat.shape[2]
    gram = torch.zeros(rows, 2 * T + 1, 2 * T + 1, **f64)
    width = max(1, budget // max(1, rows * T))
    for f in range(0, features, width):
        V = flat[:, :, f:f + width].to(torch.float64)
        V = V - V.mean(1, keepdim=True)  # both errors' weights sum to 0: shifting every v alike
        Z = torch.cat([V, prefix @ V], 1)  # changes neither, and centred the forms round less
        gram.add_(Z @ Z.transpose(1, 2))
    n = len(runs)
    p, c, k, e = torch.tensor(runs, dtype=torch.long, device=flat.device).unbind(1)
    t = torch.tensor(ts[:T + 1], **f64)
    cum = torch.cat([torch.zeros(1, **f64), h.cumsum(0)])
    tcum = torch.cat([torch.zeros(1, **f64), (h * t[:T]).cumsum(0)])
    gap = t[c] - t[p]
    dH, B = cum[e] - cum[k], (tcum[e] - tcum[k]) - t[c] * (cum[e] - cum[k])
    ones = torch.ones(n, **f64)
    state = _quadratic(gram, [(c, dH + B / gap), (p, -B / gap), (T + e, -ones), (T + k, ones)])
    gamma = (t[e] - t[c]) / gap
    nxt = _quadratic(gram, [(e.clamp(max=T - 1), ones), (c, -(1 + gamma)), (p, gamma)])
    nxt[e == T] = float("nan")  # the run reaches the end: no velocity there to compare with
    return state.div_(features).to(dev), nxt.div_(features).to(dev)


def _quadratic(gram: Any, terms: list) -> Any:
    """‖Σ_a w_a z_{i_a}‖² per run and row, clamped at 0 (rounding), shape (runs, rows);
    ``terms``: (index per run, weight per run) pairs into the rows' Gram matrices."""
    out = 0
    for ia, wa in terms:
        for ib, wb in terms:
            out = out + (wa * wb).unsqueeze(1) * gram[:, ia, ib].T
    return out.clamp_(min=0)


def history_error(v: Any, hist, t: float, per_sample: bool = False, order: int = 1) -> Any:
    """:func:`error` of the extrapolation from a :class:`fastflow.policy.History`, of the
    given ``order`` (see :func:`estimate`)."""
    if order == 2 and hist.v_prev2 is not None:
        return _mse(v - estimate(hist, t, 2), per_sample)
    return error(v, hist.v_prev, hist.v_cur, hist.t_prev, hist.t_cur, t, per_sample)


def row_errors(v: Any, hist, rows: list[int], t: float) -> Any:
    """Per-row MSE (float32, shape ``(len(rows),)``) of each row's own first-order
    extrapolation to ``t`` against its true velocity ``v`` (``v[i]`` is row ``rows[i]``'s),
    from a :class:`fastflow.policy.RowHistory` (before it takes ``v``)."""
    import torch

    index = torch.tensor(rows, device=v.device)
    v_prev, v_cur = hist.v_prev.index_select(0, index), hist.v_cur.index_select(0, index)
    c = torch.tensor([(t - hist.t_cur[r]) / (hist.t_cur[r] - hist.t_prev[r]) for r in rows],
                     dtype=v.dtype, device=v.device).view(-1, *([1] * (v.dim() - 1)))
    # v − v̂(t) = v − v_cur − c·(v_cur − v_prev)
    return _mse(v - v_cur - c * (v_cur - v_prev), True)

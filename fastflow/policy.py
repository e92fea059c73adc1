"""The skip-policy protocol and the options every policy shares.

A :class:`Policy` lives as long as the user keeps it (its learning carries across
samples and calls). For each sample (one batch) the engine calls
:meth:`Policy.start`, which returns a :class:`PolicyRun`; the per-step loop then calls
the run's methods directly:

* ``decide(k, hist)`` after a computed step when step ``k`` could be skipped: how many
  steps to skip, starting at ``k``. The engine clamps the answer to the skippable window
  and never past the last step.
* ``observe(k, err)`` (only when ``run.needs_error``): at the next computed step after a
  decision made at ``k``, ``err`` is the mean squared error between the extrapolated and
  the true velocity there (float32, :mod:`fastflow.estimator`) — a 0-d tensor left on the
  device, or one value per sample (shape ``(batch,)``) when ``run.per_sample_error``;
  read it in ``close``.
* ``record(k, v)`` (only when ``run.wants_velocities``): every computed velocity, left on
  the device (used by calibration runs that look at the whole trajectory).
* ``close(ok)`` once, when the sample ends (``ok`` is false if it failed).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import OptionError


@dataclass
class SampleContext:
    """What a policy may know about the sample it is about to steer."""

    timesteps: list[float]  # steps + 1 times, from 1 to 0
    model_key: str
    schedule_key: str
    batch_size: int
    #: the step each row starts at, where a batch mixes edit strengths (None: all at 0);
    #: only a policy that decides per sample sees such a batch whole
    row_starts: list[int] | None = None
    #: the caller can run the model on some rows only (False: decide per batch)
    split_rows: bool = True

    @property
    def steps(self) -> int:
        return len(self.timesteps) - 1


class History:
    """The last three true (model-computed) velocities, newest ``cur``, then ``prev``, then
    ``prev2`` (what a second-order extrapolation needs); mutated in place by the engine.
    It holds references, not copies."""

    __slots__ = ("k_prev2", "t_prev2", "v_prev2", "k_prev", "t_prev", "v_prev", "k_cur", "t_cur", "v_cur")

    def __init__(self) -> None:
        self.k_prev2 = self.k_prev = self.k_cur = -1
        self.t_prev2 = self.t_prev = self.t_cur = 0.0
        self.v_prev2 = self.v_prev = self.v_cur = None

    def push(self, k: int, t: float, v: Any) -> None:
        """A new true velocity ``v`` at step ``k`` (time ``t``); the others move back one."""
        self.k_prev2, self.t_prev2, self.v_prev2 = self.k_prev, self.t_prev, self.v_prev
        self.k_prev, self.t_prev, self.v_prev = self.k_cur, self.t_cur, self.v_cur
        self.k_cur, self.t_cur, self.v_cur = k, t, v


class RowHistory:
    """The last two true velocities of every row of a batch whose rows decide apart
    (per-sample decisions): ``v_cur`` and ``v_prev`` are batch-shaped tensors, row r's
    taken at steps ``k_cur[r]`` and ``k_prev[r]`` (times ``t_cur[r]``, ``t_prev[r]``;
    -1 and 0.0 where the row has none yet). Updated by the engine's per-row loop
    (:mod:`fastflow.rows`), in place."""

    __slots__ = ("k_prev", "t_prev", "v_prev", "k_cur", "t_cur", "v_cur")

    def __init__(self, batch: int) -> None:
        self.k_prev, self.k_cur = [-1] * batch, [-1] * batch
        self.t_prev, self.t_cur = [0.0] * batch, [0.0] * batch
        self.v_prev = self.v_cur = None

    def push(self, rows: list[int], index: Any, k: int, t: float, v: Any) -> None:
        """True velocities ``v`` at step ``k`` for ``rows`` (``index``: the same rows as a
        device tensor, or None when they are the whole batch, in order)."""
        if index is None:  # the whole batch: move references, copy nothing
            self.v_prev, self.v_cur = self.v_cur, v
        else:
            if self.v_cur is None:
                self.v_cur = v.new_zeros((len(self.k_cur), *v.shape[1:]))
            if self.v_prev is None:
                self.v_prev = self.v_cur.clone()
            else:
                self.v_prev.index_copy_(0, index, self.v_cur.index_select(0, index))
            self.v_cur.index_copy_(0, index, v)
        for r in rows:
            self.k_prev[r], self.t_prev[r] = self.k_cur[r], self.t_cur[r]
            self.k_cur[r], self.t_cur[r] = k, t

    def usable(self, r: int) -> bool:
        """Row r holds two true velocities (it can be extrapolated)."""
        return self.k_prev[r] >= 0

    def pairs(self, rows: list[int]) -> dict[tuple[int, int], list[int]]:
        """``rows`` grouped by the steps of their two true velocities: rows of a group
        share every scalar of their extrapolation, so one set of operations serves them
        all, as it would serve each alone."""
        groups: dict[tuple[int, int], list[int]] = {}
        for r in rows:
            groups.setdefault((self.k_prev[r], self.k_cur[r]), []).append(r)
        return groups


class PolicyRun:
    """Per-sample decisions. The default computes every step.

    A run that decides per row sets ``per_sample_decisions`` and implements
    ``decide_rows(k, rows, hist)`` (one skip length per row of ``rows``, from a
    :class:`RowHistory`) instead of ``decide``; with ``needs_error`` its
    ``observe_rows(k, rows, err)`` gets the rows' own errors (shape ``(len(rows),)``)
    for the decisions they took at step ``k``.
    """

    needs_error = False
    per_sample_error = False
    wants_velocities = False
    order = 1  # extrapolation order of skipped steps: 1 (two true velocities) or 2 (three)
    calibrating = False  # this run computes every step to calibrate (reported as such)
    per_sample_decisions = False  # decide_rows instead of decide (fastflow.rows)

    def decide(self, k: int, hist: History) -> int:
        return 0

    def observe(self, k: int, err: Any) -> None:
        pass

    def record(self, k: int, v: Any) -> None:
        pass

    def close(self, ok: bool = True) -> None:
        pass


class PlannedRun(PolicyRun):
    """A run that follows a plan made before the sample: ``plan[k]`` steps skipped
    from step ``k`` (``fixed``, and ``planned`` once it has calibrated)."""

    __slots__ = ("plan", "order")

    def __init__(self, plan, order: int = 1):
        self.plan, self.order = plan, order

    def decide(self, k: int, hist: History) -> int:
        return self.plan[k]


class Policy:
    """Base class of skip policies.

    Options common to all policies:

    * ``window_start``, ``window_end`` — fractions of the schedule (by step index) outside
      which nothing is skipped. Default 0 and 1: the whole schedule.
    * ``warmup`` — leading steps always computed (at least 2: extrapolation needs two
      true velocities). Default 2.
    * ``correct`` — when the model is consulted after a first-order skip run on the Euler
      solver, re-integrate the run with the line from its last true velocity to the new
      one instead of the extrapolation (no evaluation added; ``estimator.run_correction``).
      Default true (the paper's ``ucb-paper``: false).

    The last step of the schedule is computed (so every decision is followed by a true
    evaluation) unless the policy sets ``skip_last``: then a run may extrapolate to the
    end, and nothing measures it afterwards, so only a policy that prices such a run from
    its calibration should (``ucb``).
    """

    name = "base"
    skip_last = False  # whether a skip run may reach the end of the schedule

    def __init__(self, *, window_start: float = 0.0, window_end: float = 1.0, warmup: int = 2, correct=True):
        self.window_start = opt_float("window_start", window_start, lo=0.0, hi=1.0)
        self.window_end = opt_float("window_end", window_end, lo=0.0, hi=1.0)
        if self.window_end < self.window_start:
            raise OptionError(
                f"window_end ({self.window_end}) must not be below window_start ({self.window_start})"
            )
        self.warmup = opt_int("warmup", warmup, lo=2)
        self.correct = opt_bool("correct", correct)
        self._skippable_cache: dict[int, list[int]] = {}

    def run_lengths(self, steps: int) -> list[int]:
        """For each step k, how many consecutive steps from k may be skipped (0: none)."""
        cached = self._skippable_cache.get(steps)
        if cached is not None:
            return cached
        lo = max(self.warmup, _ceil(self.window_start * steps))
        hi = min(steps - (0 if self.skip_last else 1), _ceil(self.window_end * steps))
        lengths = [0] * (steps + 1)
        for k in range(hi - 1, lo - 1, -1):
            lengths[k] = lengths[k + 1] + 1
        self._skippable_cache[steps] = lengths
        return lengths

    def start(self, ctx: SampleContext) -> PolicyRun:
        return PolicyRun()

    def per_sample(self, ctx: SampleContext) -> bool:
        """Whether this policy's run for ``ctx`` decides per sample (``decide_rows``).
        The engine runs a batch that mixes edit strengths whole only then (else one
        part per strength). Default False."""
        return False

    def calibration_rows(self, ctx: SampleContext) -> int:
        """Rows of the coming batch that should calibrate alone (every step computed)
        before the rest of the batch starts; 0 (the default): the batch stays whole."""
        return 0

    def learned(self) -> str | None:
        """One or two lines on what the policy has learned, for summaries (None: nothing)."""
        return None

    def options(self) -> dict:
        """The options this policy was built with (for summaries and state keys)."""
        return {"window_start": self.window_start, "window_end": self.window_end, "warmup": self.warmup,
                "correct": self.correct}

    def save(self, path=None) -> None:
        """Persist learned state, if the policy has any."""

    # -- sharing learning between processes (``fastflow generate --ray``) ----------------
    #: True where :meth:`delta` and :meth:`absorb` are implemented, so workers that each
    #: run a copy of this policy can pool what they learn. A policy that leaves it False
    #: learns per worker (``fastflow generate`` says so).
    mergeable = False

    def delta(self) -> Any:
        """What this policy learned since the last :meth:`delta` or :meth:`absorb`: a
        picklable value that adds with ``+`` (deltas of copies of the same policy, on the
        same model and schedule, sum to everything they learned), or None if nothing.

        Learned statistics must be additive for this (a bandit's pull counts and reward
        sums are): the merge actor keeps ``total = total + delta`` and hands the total back."""
        return None

    def absorb(self, merged: Any) -> None:
        """Decide from now on with ``merged``: the sum of every copy's deltas since they
        started (this copy's own included). What this copy learned since its last
        :meth:`delta` is kept and goes into its next delta; what it loaded from its
        state file at the start is kept too, so it is never counted twice."""
        raise NotImplementedError(f"policy {self.name!r} cannot merge learning (mergeable is False)")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def skips_until_computed(computed, steps: int) -> list[int]:
    """For each step k, how many steps from k to the next step in ``computed``
    (0 where k itself is computed): what ``decide(k)`` returns for a fixed plan."""
    wanted = set(computed)
    skips = [0] * (steps + 1)
    for k in range(steps - 1, -1, -1):
        skips[k] = 0 if k in wanted else skips[k + 1] + 1
    return skips


def _ceil(x: float) -> int:
    import math

    return int(math.ceil(x - 1e-9))


# -- option parsing: accept Python values or the strings of --option KEY=VALUE -------

def opt_float(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
              lo_open: bool = False) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"option {name} must be a number, got {value!r}") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise OptionError(f"option {name} must be a finite number, got {value!r}")
    if (lo is not None and (out < lo or (lo_open and out == lo))) or (hi is not None and out > hi):
        if hi is None:
            rng = f"a finite number {'>' if lo_open else '>='} {lo:g}"
        elif lo is None:
            rng = f"a finite number <= {hi:g}"
        else:
            rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise OptionError(f"option {name} must be {rng}, got {value!r}")
    return out


def opt_int(name: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    try:
        out = int(value) if not isinstance(value, float) or value.is_integer() else None
        if isinstance(value, bool) or out is None:
            raise ValueError
    except (TypeError, ValueError):
        raise OptionError(f"option {name} must be an integer, got {value!r}") from None
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        raise OptionError(f"option {name} must be an integer in [{lo}, {hi if hi is not None else 'inf'}], got {value!r}")
    return out


def opt_int_list(name: str, value: Any, *, lo: int = 0) -> list[int]:
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
    elif isinstance(value, Sequence):
        parts = list(value)
    else:
        raise OptionError(f"option {name} must be a comma-separated list of integers, got {value!r}")
    try:
        out = [opt_int(name, p, lo=lo) for p in parts]
    except OptionError:
        raise OptionError(f"option {name} must be a comma-separated list of integers >= {lo}, e.g. "
                          f"{name}=0,1,2,4; got {value!r}") from None
    if not out:
        raise OptionError(f"option {name} must list at least one integer")
    return out


def opt_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise OptionError(f"option {name} must be true or false, got {value!r}")


def accepted_options(factory) -> dict[str, Any]:
    """Option name → default, read from the factory's signature (for help and errors)."""
    out: dict[str, Any] = {}
    target = factory.__init__ if inspect.isclass(factory) else factory
    for cls in (inspect.getmro(factory) if inspect.isclass(factory) else ()):
        if "__init__" in vars(cls):
            for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
                if p.kind == p.KEYWORD_ONLY and p.name not in out:
                    out[p.name] = p.default
    if not inspect.isclass(factory):
        for p in inspect.signature(target).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                out.setdefault(p.name, p.default)
    return out

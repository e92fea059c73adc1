"""UCB1 bandits with additive statistics, as the bandit policies keep them.

A bandit's statistics are counts N(a) and reward sums S(a) per arm; the mean reward is
Q(a) = S(a)/N(a). Both are additive, so what two processes learned from the same
starting point merges exactly: on disk + (here − where we started). That is how state
files are merged under their lock and how workers share learning.
"""

from __future__ import annotations

import math

from .errors import OptionError, StateFileError
from .policy import Policy, opt_float, opt_int_list
from .state import locked, read_state, write_state


class UCB1:
    """One bandit: UCB1 choice argmax_a Q(a) + γ·sqrt(ln n / N(a)), each arm once first."""

    __slots__ = ("counts", "sums", "gamma")

    def __init__(self, n_arms: int, gamma: float):
        self.counts = [0] * n_arms
        self.sums = [0.0] * n_arms
        self.gamma = gamma

    @property
    def values(self) -> list[float]:
        return [s / c if c else 0.0 for s, c in zip(self.sums, self.counts)]

    def choose(self) -> int:
        counts = self.counts
        for i, c in enumerate(counts):
            if c == 0:
                return i
        log_n = math.log(sum(counts))
        g = self.gamma
        scores = [s / c + g * math.sqrt(log_n / c) for s, c in zip(self.sums, counts)]
        return max(range(len(scores)), key=scores.__getitem__)

    def greedy(self) -> int:
        """The arm with the best mean (untried arms last)."""
        vals = [s / c if c else -math.inf for s, c in zip(self.sums, self.counts)]
        return max(range(len(vals)), key=vals.__getitem__)

    def update(self, arm: int, reward: float, count: int = 1) -> None:
        """``count`` pulls of ``arm`` whose rewards sum to ``reward * count``."""
        self.counts[arm] += count
        self.sums[arm] += reward * count


def tables(bandits: list[UCB1]) -> list[dict]:
    """The JSON form: one {"counts": [...], "sums": [...]} per bandit."""
    return [{"counts": list(b.counts), "sums": list(b.sums)} for b in bandits]


def snapshot(bandits: list[UCB1]) -> list[tuple[list[int], list[float]]]:
    return [(list(b.counts), list(b.sums)) for b in bandits]


def merge(bandits: list[UCB1], base, disk) -> None:
    """Make ``bandits`` what ``disk`` holds plus what was learned here since ``base``
    (both from :func:`snapshot`); counts and sums add exactly."""
    for b, (c0, s0), (cd, sd) in zip(bandits, base, disk):
        b.counts = [d + (c - z) for c, z, d in zip(b.counts, c0, cd)]
        b.sums = [d + (s - z) for s, z, d in zip(b.sums, s0, sd)]


class BanditStats:
    """What bandits learned over some span, as one additive value: pull counts and reward
    sums per bandit and arm, the samples they came from, and the calibration extras
    (``scale`` or ``mu``; where two differ, the left operand's is kept, as a state file
    keeps its own). ``a + b`` is exact for counts; sums add as floats do."""

    __slots__ = ("key", "counts", "sums", "samples", "extra")

    def __init__(self, key: dict, counts: list[list[int]], sums: list[list[float]], samples: int = 0,
                 extra: dict | None = None):
        self.key, self.counts, self.sums, self.samples = key, counts, sums, samples
        self.extra = dict(extra or {})

    def __add__(self, other: "BanditStats | None") -> "BanditStats":
        if other is None:
            return self
        if other.key != self.key or len(other.counts) != len(self.counts):
            raise OptionError(f"cannot merge learning for {other.key} into learning for {self.key}: "
                              f"every worker must run the same model, schedule and policy options")
        extra = {k: (self.extra.get(k) if self.extra.get(k) is not None else other.extra.get(k))
                 for k in {**self.extra, **other.extra}}
        return BanditStats(
            self.key,
            [[a + b for a, b in zip(ca, cb)] for ca, cb in zip(self.counts, other.counts)],
            [[a + b for a, b in zip(sa, sb)] for sa, sb in zip(self.sums, other.sums)],
            self.samples + other.samples, extra)

    def __radd__(self, other) -> "BanditStats":  # None + stats, and sum(deltas) (which starts from 0)
        return self if other is None or (isinstance(other, int) and other == 0) else self.__add__(other)

    def __eq__(self, other) -> bool:
        return isinstance(other, BanditStats) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k in self.__slots__:
            setattr(self, k, state[k])

    def __repr__(self) -> str:
        return (f"BanditStats({sum(map(sum, self.counts))} pulls over {len(self.counts)} bandits, "
                f"{self.samples} samples)")


def shifted(tables, old, new):
    """``tables`` + (``new`` − ``old``), all in :func:`snapshot` form."""
    return [([t + (n - o) for t, o, n in zip(ct, co, cn)], [t + (n - o) for t, o, n in zip(st, so, sn)])
            for (ct, st), (co, so), (cn, sn) in zip(tables, old, new)]


def read_tables(rows, n_bandits: int, n_arms: int) -> list[tuple[list[int], list[float]]]:
    """Validated (counts, sums) per bandit from a state file's rows; ValueError naming
    what is wrong. Old files stored means ("values"): they are turned into sums."""
    if not isinstance(rows, list) or len(rows) != n_bandits:
        raise ValueError(f"'bandits' must list {n_bandits} bandits")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"bandit {i} is not an object")
        counts = row.get("counts")
        if "sums" in row:
            sums = row["sums"]
        elif "values" in row and isinstance(row["values"], list) and isinstance(counts, list):
            sums = [_number(v, f"bandit {i} values") * _count(c, i) for v, c in zip(row["values"], counts)]
        else:
            raise ValueError(f"bandit {i} has no 'sums'")
        if not isinstance(counts, list) or not isinstance(sums, list) or len(counts) != n_arms or len(sums) != n_arms:
            raise ValueError(f"bandit {i} must have {n_arms} counts and sums (one per arm)")
        out.append(([_count(c, i) for c in counts], [_number(s, f"bandit {i} sums") for s in sums]))
    return out


def _count(c, i: int) -> int:
    if isinstance(c, bool) or not isinstance(c, int) or c < 0:
        raise ValueError(f"bandit {i} has a count {c!r}; counts are non-negative integers")
    return c


def _number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{what} holds {v!r}; they must be finite numbers")
    return float(v)


# -- what every bandit policy shares: one bandit per step, persisted and merged ----------


class BanditPolicy(Policy):
    """One :class:`UCB1` per step index over skip counts (``arms``) — or, with
    ``contexts`` G > 1, one per (step index, gap of the history pair: 1..G steps) — with
    a state file that is loaded once, and on :meth:`save` merged with what is on disk
    under a lock.

    Subclasses calibrate (``_calibrated`` says whether they have) and say what else the
    state holds (``_extra_state`` / ``_load_extra``) and which stored options must match
    (``_stored_options``).
    """

    contexts = 1  # bandits per step index (by the gap of the history pair)

    def __init__(self, *, arms, gamma, state=None, **common):
        super().__init__(**common)
        self.arms = opt_int_list("arms", arms, lo=0)
        if len(set(self.arms)) != len(self.arms):
            raise OptionError(f"option arms lists a skip count twice: {self.arms}")
        self.gamma = opt_float("gamma", gamma, lo=0.0)
        if state is not None and not isinstance(state, (str, bytes)) and not hasattr(state, "__fspath__"):
            raise OptionError(f"option state must be a file path, got {state!r}")
        self.state_path = state
        self.samples = 0
        self.key: dict | None = None
        self.bandits: list[UCB1] | None = None
        self._steps = 0
        self._base: list = []
        self._samples_base = 0
        self._loaded = read_state(state, self.name) if state is not None else None
        if self._loaded is not None:
            self._check_stored(self._loaded, state)

    # -- binding to a model and schedule -------------------------------------------------
    def _bind_key(self, ctx) -> None:
        key = {"model": ctx.model_key, "schedule": ctx.schedule_key, "steps": ctx.steps}
        if self.key is None:
            self._bind(key)
        elif key != self.key:
            raise OptionError(
                f"this {self.name} policy learned on {self.key}; the new sample uses {key}. "
                f"Use a fresh policy (or another state file) for another model or schedule."
            )

    def _bind(self, key: dict) -> None:
        self.key, self._steps = key, key["steps"]
        self.bandits = [UCB1(len(self.arms), self.gamma) for _ in range((self._steps + 1) * self.contexts)]
        data = self._loaded
        if data is not None:
            if data.get("key") != key:
                raise StateFileError(
                    f"state file {self.state_path} was learned for {data.get('key')}, but this run "
                    f"is {key}. Pass another --state path for this model and schedule."
                )
            self._adopt(data, self.state_path)
        self._base, self._samples_base = snapshot(self.bandits), self.samples
        # what was loaded (never part of a delta) and the point the next delta counts from
        self._origin, self._origin_samples = self._base, self.samples
        self._sync, self._sync_samples = self._base, self.samples

    def _adopt(self, data: dict, path) -> None:
        try:
            rows = read_tables(data.get("bandits"), len(self.bandits), len(self.arms))
            samples = data.get("samples", 0)
            if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
                raise ValueError(f"'samples' is {samples!r}; it must be a non-negative integer")
            self._load_extra(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise StateFileError(
                f"state file {path} is damaged ({exc}); it was left untouched. "
                f"Move it away or pass another --state path."
            ) from None
        for b, (counts, sums) in zip(self.bandits, rows):
            b.counts, b.sums = counts, sums
        self.samples = samples

    def _check_stored(self, data: dict, path) -> None:
        stored = data.get("options", {})
        if not isinstance(stored, dict):
            raise StateFileError(f"state file {path} is damaged ('options' is not an object); it was left "
                                 f"untouched. Move it away or pass another --state path.")
        for name, mine in self._stored_options().items():
            if stored.get(name, mine if name != "arms" else None) != mine:
                raise StateFileError(
                    f"state file {path} was learned with {name}={stored.get(name)!r}, not {mine!r}. "
                    f"Use the same {name} or another --state path."
                )

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"key": self.key, "options": {**self._stored_options(), "gamma": self.gamma},
                "samples": self.samples, "bandits": tables(self.bandits or []), **self._extra_state()}

    def save(self, path=None) -> None:
        """Save what was learned, merged with what the file holds now: counts and reward
        sums learned by other processes since this policy loaded are kept (additive)."""
        path = path if path is not None else self.state_path
        if path is None:
            raise OptionError("no state path: pass state=PATH to the policy or a path to save()")
        if self.key is None:
            return  # nothing learned yet
        with locked(path):
            disk = read_state(path, self.name)
            if disk is not None:
                self._check_stored(disk, path)
                if disk.get("key") != self.key:
                    raise StateFileError(f"state file {path} now holds learning for {disk.get('key')}, "
                                         f"not {self.key}; it was left untouched. Pass another --state path.")
                try:
                    rows = read_tables(disk.get("bandits"), len(self.bandits), len(self.arms))
                except ValueError as exc:
                    raise StateFileError(f"state file {path} is damaged ({exc}); it was left untouched.") from None
                merge(self.bandits, self._base, rows)
                outside = int(disk.get("samples", 0)) - self._samples_base  # other processes' samples
                self.samples = self._samples_base + outside + (self.samples - self._samples_base)
                # what other processes saved is now here: the merge bases move with it
                self._origin, self._sync = (shifted(b, self._base, rows) for b in (self._origin, self._sync))
                self._origin_samples += outside
                self._sync_samples += outside
                self._merge_extra(disk)
            write_state(path, self.name, self.state_dict())
            self._base, self._samples_base = snapshot(self.bandits), self.samples

    # -- sharing learning between workers (Policy.delta / absorb) ---------------------------
    mergeable = True

    def delta(self) -> BanditStats | None:
        """Counts, reward sums and samples learned since the last delta or absorb (None
        before the first sample); the calibration extras ride along."""
        if self.key is None:
            return None
        out = BanditStats(
            self.key,
            [[c - z for c, z in zip(b.counts, c0)] for b, (c0, _) in zip(self.bandits, self._sync)],
            [[s - z for s, z in zip(b.sums, s0)] for b, (_, s0) in zip(self.bandits, self._sync)],
            self.samples - self._sync_samples, self._extra_state())
        self._sync, self._sync_samples = snapshot(self.bandits), self.samples
        return out

    def absorb(self, merged: BanditStats | None) -> None:
        """Become what was loaded + ``merged`` (all workers' deltas) + what was learned here
        since the last delta (which stays in the next delta)."""
        if merged is None:
            return
        if self.key is None:
            self._bind(merged.key)
        elif merged.key != self.key:
            raise OptionError(f"this {self.name} policy learned on {self.key}; the merged learning is for "
                              f"{merged.key}. Every worker must run the same model and schedule.")
        if len(merged.counts) != len(self.bandits) or any(len(c) != len(self.arms) for c in merged.counts):
            raise OptionError(f"the merged learning has {len(merged.counts)} bandits; this {self.name} policy "
                              f"has {len(self.bandits)} of {len(self.arms)} arms. Every worker must use the same options.")
        for b, (c0, s0), (cs, ss), mc, ms in zip(self.bandits, self._origin, self._sync, merged.counts, merged.sums):
            unsynced_c = [c - z for c, z in zip(b.counts, cs)]
            unsynced_s = [s - z for s, z in zip(b.sums, ss)]
            base_c = [o + m for o, m in zip(c0, mc)]
            base_s = [o + m for o, m in zip(s0, ms)]
            b.counts = [x + u for x, u in zip(base_c, unsynced_c)]
            b.sums = [x + u for x, u in zip(base_s, unsynced_s)]
        unsynced_samples = self.samples - self._sync_samples
        self._sync_samples = self._origin_samples + merged.samples
        self.samples = self._sync_samples + unsynced_samples
        self._sync = [([o + m for o, m in zip(c0, mc)], [o + m for o, m in zip(s0, ms)])
                      for (c0, s0), mc, ms in zip(self._origin, merged.counts, merged.sums)]
        self._merge_extra(merged.extra)

    # -- what it learned ---------------------------------------------------------------------
    def bandit(self, k: int, k_prev: int) -> UCB1:
        """The bandit deciding at step k, after computed steps k_prev < k − 1."""
        return self.bandits[self.bandit_index(k, k_prev)]

    def bandit_index(self, k: int, k_prev: int) -> int:
        g = self.contexts
        return k * g + min(k - 1 - k_prev, g) - 1 if g > 1 else k

    def schedule(self) -> list[int]:
        """The skip count each bandit currently prefers (greedy, no exploration)."""
        return [self.arms[b.greedy()] for b in (self.bandits or [])]

    def greedy_path(self) -> list[int]:
        """The steps a sample computes when every consulted bandit takes its best arm."""
        if not self.bandits:
            return []
        steps, room = self._steps, self.run_lengths(self._steps)
        computed, k = [], 0
        while k < steps:
            computed.append(k)
            k += 1
            if k < steps and room[k] and len(computed) >= 2:
                b = self.bandit(k, computed[-2])
                if sum(b.counts):
                    k += min(self.arms[b.greedy()], room[k])
        return computed

    def learned(self) -> str | None:
        if not self.bandits or not any(sum(b.counts) for b in self.bandits):
            return None
        path = self.greedy_path()
        return (f"learned from {self.samples} sample{'' if self.samples == 1 else 's'}: its greedy schedule computes {len(path)} of "
                f"{self._steps} steps ({_ranges(path)})")

    # -- hooks for subclasses --------------------------------------------------------------
    def _stored_options(self) -> dict:
        return {"arms": self.arms}

    def _extra_state(self) -> dict:
        return {}

    def _load_extra(self, data: dict) -> None:
        pass

    def _merge_extra(self, disk: dict) -> None:
        pass


def _ranges(ks: list[int]) -> str:
    """0,1,2,5,7,8 → '0-2, 5, 7-8'"""
    out, i = [], 0
    while i < len(ks):
        j = i
        while j + 1 < len(ks) and ks[j + 1] == ks[j] + 1:
            j += 1
        out.append(str(ks[i]) if i == j else f"{ks[i]}-{ks[j]}")
        i = j + 1
    return ", ".join(out)

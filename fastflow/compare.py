"""Run and compare: the one summary schema of a policy run beside the all-steps
reference, for registered models, exports and diffusers pipelines alike.

The runners (:mod:`fastflow.commands.run` for models and exports,
:mod:`fastflow.pipeline_run` for pipelines) sample; this module turns what they measured
into the summary ``fastflow run`` prints and writes (``summary.json``, ``--json``):

* :func:`resolve_policy_with_state` — the policy, with a state file where one is given
  (a policy that keeps no state says so, naming the flag);
* :func:`cost` — NFE per sample, calibration apart, model calls, speed-up, wall time;
* :func:`comparison` — PSNR and max abs error against the reference, and the wall
  speed-up when both were timed in the same run (flagged when the NFE cannot explain it);
* :func:`write_summary` — standard JSON (non-finite numbers become null).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import OptionError
from .jsonutil import json_text, jsonable

#: a wall speed-up above the NFE speed-up by more than this factor is noise, not a result
NOISY_WALL = 1.1
#: interleaved timings whose wall/NFE efficiencies spread wider than this (max − min over
#: the median) are noise too
NOISY_SPREAD = 0.3


def keeps_state(policy_name: str) -> bool:
    """Whether the registered policy learns into a state file (takes ``state=``)."""
    from .plugins import get_plugins
    from .policy import accepted_options

    return "state" in accepted_options(get_plugins().get("policies", policy_name).obj)


def state_format(policy_name: str):
    """The registered policy's ``STATE_FORMAT`` (None if it names none): what its learning
    means, so a cached state learned otherwise is kept apart."""
    from .plugins import get_plugins

    return getattr(get_plugins().get("policies", policy_name).obj, "STATE_FORMAT", None)


def resolve_policy_with_state(policy: Any, options: dict | None, state_path=None):
    """The policy object for ``policy`` (a name or an object) and its options, learning
    from and into ``state_path`` when given."""
    from .engine import resolve_policy

    options = dict(options or {})
    if state_path is not None:
        if not isinstance(policy, str):
            raise OptionError("a state file needs a policy name; pass state= to your policy object instead")
        if not keeps_state(policy):
            raise OptionError(f"policy '{policy}' keeps no learned state; drop --state")
        options["state"] = str(state_path)
    return resolve_policy(policy, **options)


def cost(policy, nfe_per_sample: list, nfe_full: int, *, model_calls: int, calibration_samples: int,
         wall_seconds: float) -> dict:
    """The cost half of a summary: what the policy evaluated, per sample and in all."""
    mean = sum(nfe_per_sample) / len(nfe_per_sample)
    after = nfe_per_sample[calibration_samples:]
    return {
        "policy": getattr(policy, "name", type(policy).__name__),
        "policy_options": jsonable(policy.options()) if hasattr(policy, "options") else {},
        "nfe_mean": mean,
        "nfe_per_sample": list(nfe_per_sample),
        "nfe_min": min(nfe_per_sample),
        "nfe_max": max(nfe_per_sample),
        "nfe_full": nfe_full,
        "model_calls": model_calls,
        "calibration_samples": calibration_samples,
        "calibration_nfe": sum(nfe_per_sample[:calibration_samples]),
        "nfe_mean_after_calibration": sum(after) / len(after) if after else None,
        "learned": policy.learned() if hasattr(policy, "learned") else None,
        "speedup_nfe": nfe_full / mean if mean else None,
        "wall_seconds": wall_seconds,
        "ms_per_eval": 1000.0 * wall_seconds / max(model_calls, 1),
    }


def comparison(x, ref, data_range: float | None, *, speedup_nfe: float | None, wall_seconds: float,
               reference_wall_seconds: float | None, timings: list | None = None) -> dict:
    """The quality half: ``x`` against the all-steps ``ref`` (same seeds), and the wall
    speed-up when the reference was timed beside the policy (``None``: it was not, e.g.
    it came from a cache).

    ``timings``: (reference seconds, policy seconds, reference evaluations, policy
    evaluations, what was timed) of each interleaved timing: a batch, or a repetition of
    one. Each gives a wall/NFE efficiency — the wall speed-up over the NFE speed-up of that
    timing, 1.0 when skipping costs nothing beside the evaluations it saves; their median
    and spread are reported. Timings of the same work (the same batch timed again) must
    agree: if they spread wide, the wall figure is flagged as noisy. (Different batches may
    differ for real: one that calibrates on a row alone runs that row at batch 1.)"""
    from .metrics import max_abs_error, psnr

    p = psnr(x, ref, data_range)
    out: dict[str, Any] = {"psnr_db": p if math.isfinite(p) else None, "max_abs_error": max_abs_error(x, ref)}
    if reference_wall_seconds is None:
        out.update(speedup_wall=None, reference_wall_seconds=None,  # the keys stay, for scripts
                   speedup_wall_note="not measured: the all-steps reference came from the cache")
        return out
    speedup = reference_wall_seconds / wall_seconds if wall_seconds > 0 else None
    out.update({"reference_wall_seconds": reference_wall_seconds, "speedup_wall": speedup})
    timed = [((rw / pw) / (rn / pn), what) for rw, pw, rn, pn, what in (timings or []) if pw > 0 and pn > 0 and rn > 0]
    eff = sorted(e for e, _ in timed)
    same: dict = {}
    for e, what in timed:
        same.setdefault(what, []).append(e)
    repeated = max(same.values(), key=len, default=[])
    if eff:
        median = eff[len(eff) // 2] if len(eff) % 2 else (eff[len(eff) // 2 - 1] + eff[len(eff) // 2]) / 2
        out.update({"wall_efficiency_median": median, "wall_efficiency_spread": [eff[0], eff[-1]],
                    "wall_timings": len(eff)})
    if speedup is not None and speedup_nfe is not None and speedup > NOISY_WALL * speedup_nfe:
        out["speedup_wall_note"] = ("noisy: above the NFE speed-up, which bounds it; the machine's load "
                                    "changed during the run")
    elif len(eff) == 1:
        out["speedup_wall_note"] = ("noisy: one timing only, at the mercy of the machine's load (a run "
                                    "under 20 s of one or two batches is timed again; this one was not)")
    elif len(repeated) > 1 and (max(repeated) - min(repeated)) / min(repeated) > NOISY_SPREAD:
        out["speedup_wall_note"] = (f"noisy: {len(repeated)} timings of the same batch disagree (wall/NFE efficiency "
                                    f"{min(repeated):.2f}-{max(repeated):.2f}): the run is too short to time, or "
                                    f"the machine's load changed")
    return out


def write_summary(out: Path, summary: dict, *, state=None, state_note: str | None = None) -> dict:
    """Add where the learning and the outputs went, write ``OUT/summary.json``, return it."""
    if state is not None:
        summary["state"] = str(state)
        if state_note is not None:
            summary["state_note"] = state_note
    summary["out"] = str(out)
    (Path(out) / "summary.json").write_text(json_text(summary, indent=1))
    return summary

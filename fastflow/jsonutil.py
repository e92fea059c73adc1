"""JSON as fastflow writes it: standard (no NaN or Infinity) and with option values
that JSON can hold."""

from __future__ import annotations

import json
import math


def jsonable(d: dict) -> dict:
    """Option values as JSON values (anything else as its str)."""
    return {k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v)) for k, v in d.items()}


def json_text(obj, indent=None) -> str:
    """Standard JSON: a non-finite number (which JSON cannot hold) becomes null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), indent=indent, allow_nan=False)

"""Policy state files: JSON, versioned, keyed to model and schedule, written atomically.

A file that exists but cannot be read, is not a fastflow state file, or belongs to
another policy, model or schedule is an error that names it; it is never overwritten.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import StateFileError

FORMAT = "fastflow.policy-state"
VERSION = 1


def read_state(path: str | os.PathLike, policy: str) -> dict | None:
    """The state stored at ``path`` for ``policy``, or ``None`` if no file is there."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_dir():
        raise StateFileError(f"state file {path} is a directory; give a file path to --state")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFileError(
            f"state file {path} is unreadable ({exc}); it was left untouched. "
            f"Move it away or pass another --state path."
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StateFileError(
            f"{path} is not a fastflow policy state file; it was left untouched. "
            f"Pass another --state path."
        )
    if data.get("version") != VERSION:
        raise StateFileError(
            f"state file {path} has format version {data.get('version')!r}; this fastflow "
            f"reads version {VERSION}. Pass another --state path to start fresh."
        )
    if data.get("policy") != policy:
        raise StateFileError(
            f"state file {path} belongs to policy '{data.get('policy')}', not '{policy}'. "
            f"Pass another --state path or --policy {data.get('policy')}."
        )
    return data


def write_state(path: str | os.PathLike, policy: str, payload: dict) -> None:
    """Write ``payload`` atomically: a temporary file in the same folder, then rename."""
    path = Path(path)
    data = {"format": FORMAT, "version": VERSION, "policy": policy, **payload}
    text = json.dumps(data, indent=1, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise

"""Policy state files: JSON, versioned, keyed to model and schedule, written atomically.

A file that exists but cannot be read, is not a fastflow state file, or belongs to
another policy, model or schedule is an error that names it; it is never overwritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import tempfile
from pathlib import Path

from .errors import StateFileError

FORMAT = "fastflow.policy-state"
VERSION = 1


def read_state(path: str | os.PathLike, policy: str) -> dict | None:
    """The state stored at ``path`` for ``policy``, or ``None`` if no file is there."""
    if not isinstance(path, (str, os.PathLike)):
        from .errors import OptionError

        raise OptionError(f"option state must be a file path, got {path!r}")
    path = Path(path)
    if not path.exists():
        return None
    if path.is_dir():
        raise StateFileError(f"state file {path} is a directory; give a file path to --state")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
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


def _no_constant(name: str):
    raise ValueError(f"it holds {name}, which is not a finite number")


def write_state(path: str | os.PathLike, policy: str, payload: dict) -> None:
    """Write ``payload`` atomically: a temporary file in the same folder, then rename.

    A symlink is written through (its target is replaced, the link stays); an existing
    file keeps its mode; NaN and Infinity are refused (they are not JSON)."""
    path = Path(os.path.realpath(path))
    data = {"format": FORMAT, "version": VERSION, "policy": policy, **payload}
    try:
        text = json.dumps(data, indent=1, sort_keys=True, allow_nan=False)
    except ValueError:
        raise StateFileError(f"refusing to write a non-finite number (NaN or Infinity) into {path}; "
                             f"the learning that produced it is broken, so the file was left as it was") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def check_writable(path: str | os.PathLike) -> None:
    """Refuse, before any work, a state path that could not be saved to."""
    real = Path(os.path.realpath(path))
    if real.is_dir():
        raise StateFileError(f"state file {path} is a directory; give a file path to --state")
    if real.exists() and not os.access(real, os.W_OK):
        raise StateFileError(f"state file {path} is not writable by you; make it writable "
                             f"(chmod u+w) or pass another --state path")
    parent = real.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise StateFileError(f"cannot create state file {path}: {parent} is not a writable folder; "
                             f"pass another --state path")


@contextlib.contextmanager
def locked(path: str | os.PathLike):
    """An exclusive lock for read-merge-write of ``path`` (a lock file beside it, so
    the atomic rename of the state file never invalidates the lock)."""
    real = Path(os.path.realpath(path))
    real.parent.mkdir(parents=True, exist_ok=True)
    with open(real.parent / f".{real.name}.lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_stale_temps(path: Path) -> None:
    """Temporary files an interrupted save left (we hold the lock, so none is live)."""
    for old in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            old.unlink()
        except OSError:
            pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/fastflow, or ~/.cache/fastflow."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastflow"

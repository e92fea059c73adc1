"""The jobs of ``fastflow generate``: from a label spec and a count, or from a JSONL file;
each ``{"id", "seed", "label", "prompt"}`` with a stable id (the file's, else the label or
prompt and the seed), checked before any work."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from .errors import OptionError

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def parse_labels(spec, text: str) -> list[int]:
    """``0-9,A-Z`` → class indices: comma-separated labels (names or indices) and ranges
    ``FIRST-LAST`` of them; a name that holds a dash (``up-right``) is a name first."""
    from .modelspec import label_index

    if not spec.num_labels:
        raise OptionError(f"model '{spec.name}' is unconditional; drop --labels")
    out = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            raise OptionError(f"--labels '{text}' has an empty entry; write e.g. --labels 0-9,A-Z")
        try:
            out.append(label_index(spec, part))
            continue
        except OptionError:
            if part.count("-") != 1:
                raise
        lo, hi = (label_index(spec, side) for side in part.split("-"))
        if hi < lo:
            raise OptionError(f"--labels range '{part}' runs backwards; write it first-last")
        out.extend(range(lo, hi + 1))
    return out


def label_jobs(spec, labels: list[int] | None, samples: int, seed: int) -> list[dict]:
    """``samples`` jobs cycling through ``labels`` (all classes if None), seeds seed, seed+1, ..."""
    if spec.num_labels:
        pool = labels or list(range(spec.num_labels))
        return [make_job(spec, pool[i % len(pool)], None, seed + i) for i in range(samples)]
    return [make_job(spec, None, None, seed + i) for i in range(samples)]


def make_job(spec, label: int | None, prompt: str | None, seed: int, job_id: str | None = None) -> dict:
    if job_id is None:
        if prompt is not None:
            slug = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-")[:24] or "prompt"
            job_id = f"{slug}-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}-{seed}"
        elif label is not None:
            name = spec.label_names[label] if label < len(spec.label_names) else str(label)
            job_id = f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}-{seed}"
        else:
            job_id = f"sample-{seed}"
    return {"id": job_id, "seed": int(seed), "label": label, "prompt": prompt}


def read_jobs(path, spec) -> list[dict]:
    """One JSON object per line: ``label`` (name or index) or ``prompt``, ``seed``, and an
    optional ``id``. Errors name the file, the line and the fix."""
    from .modelspec import label_index

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(f"--jobs {path} cannot be read ({getattr(exc, 'strerror', None) or exc}); "
                          f"give a readable JSONL file (one job per line)") from None
    jobs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--jobs {path} line {n}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise OptionError(f"{where} is not JSON ({exc}); write one object per line, "
                              f'e.g. {{"label": "A", "seed": 1}}') from None
        if not isinstance(obj, dict):
            raise OptionError(f"{where} is not a JSON object; write e.g. {{\"label\": \"A\", \"seed\": 1}}")
        seed = obj.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise OptionError(f"{where} needs a \"seed\": a non-negative integer (got {seed!r})")
        if ("label" in obj) == ("prompt" in obj):
            raise OptionError(f"{where} needs exactly one of \"label\" and \"prompt\"")
        if "prompt" in obj:
            raise OptionError(f"{where} has a prompt; model '{spec.name}' takes labels (prompts go with "
                              f"--model PIPELINE --prompts FILE)")
        try:
            label = label_index(spec, obj["label"]) if spec.num_labels else None
            if not spec.num_labels:
                raise OptionError(f"model '{spec.name}' is unconditional; drop \"label\"")
        except OptionError as exc:
            raise OptionError(f"{where}: {exc}") from None
        job_id = obj.get("id")
        if job_id is not None and (not isinstance(job_id, str) or not _SAFE_ID.match(job_id)):
            raise OptionError(f"{where}: id {job_id!r} must be 1-128 letters, digits, '.', '_' or '-' "
                              f"(it names the image file)")
        jobs.append(make_job(spec, label, None, seed, job_id))
    if not jobs:
        raise OptionError(f"--jobs {path} holds no jobs; write one JSON object per line")
    return jobs


def check_ids(jobs: list[dict], source: str) -> None:
    seen, dup = set(), []
    for j in jobs:
        (dup.append(j["id"]) if j["id"] in seen else seen.add(j["id"]))
    if dup:
        raise OptionError(f"{source} gives the id(s) {', '.join(sorted(set(dup))[:5])} to more than one job; "
                          f"every job needs its own id (or its own seed)")

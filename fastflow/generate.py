"""Dataset-scale generation (``fastflow generate``): the output folder and the manifest
that commits finished batches, the batch step both runners share, the in-process runner
and the metadata table. The jobs are made in :mod:`fastflow.generate_jobs`; the Ray
runner (:mod:`fastflow.ray_generate`) reuses all of this.

A job is ``{"id", "seed", "label", "prompt"}``; its noise comes from its own seed, so an
image does not depend on which batch or worker made it. A batch is committed when its
files are written and then its rows are recorded in ``manifest/<batch>.json`` (written to
a temporary file, synced, renamed: a batch file is all there or absent). A re-run of the
same command skips committed ids; ``metadata.parquet`` is built from the manifest at the
end, one row per id.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import FastFlowError, MissingDependencyError, OptionError

MANIFEST = "manifest"
IMAGES = "images"
METADATA = "metadata.parquet"
SETTINGS_FILE = "generate.json"
#: set to a file path, the batch step exits its process once (that file marks it done)
#: after writing a batch's files and before committing them: the crash tests use it
DIE_ONCE_ENV = "FASTFLOW_GENERATE_DIE_ONCE"


@dataclass
class Settings:
    """What every batch is sampled with: the same knobs as ``fastflow run``."""

    model: str = "glyphs"
    policy: str = "ucb"
    options: dict = field(default_factory=dict)
    backend: str = "torch"
    steps: int = 50
    solver: str = "euler"
    shift: float | None = None
    guidance: float | None = None
    batch_size: int = 16
    state: str | None = None
    pipeline: bool = False  # prompts through a diffusers pipeline (fastflow/generate_pipeline.py)

    def spec(self):
        """The registered model (a ModelSpec), or for a pipeline its stand-in."""
        if self.pipeline:
            return PipelineSpec(name=str(self.model), key=f"pipeline:{self.model}")
        from .models import resolve_model

        return resolve_model(self.model)

    def identity(self, spec) -> dict:
        """What a folder's images were made with; a resume must match it."""
        return {"model": spec.key, "policy": self.policy, "options": dict(sorted(self.options.items())),
                "backend": self.backend, "steps": self.steps, "solver": self.solver,
                "shift": self.resolved_shift(spec), "guidance": self.resolved_guidance(spec)}

    def resolved_shift(self, spec):
        return spec.default_shift if self.shift is None else self.shift

    def resolved_guidance(self, spec):
        return spec.default_guidance if self.guidance is None else self.guidance


@dataclass
class PipelineSpec:
    """What the runners need to know of a diffusers pipeline (a ModelSpec's stand-in)."""

    name: str
    key: str
    default_shift: float | None = None
    default_guidance: float | None = None
    num_labels: int = 0
    label_names: list = field(default_factory=list)


# -- the output folder and its manifest --------------------------------------------------------

def prepare_out(out_dir, identity: dict) -> Path:
    """Create --out (refusing one that cannot be written) and pin what it is made with."""
    out = Path(out_dir)
    try:
        (out / MANIFEST).mkdir(parents=True, exist_ok=True)
        (out / IMAGES).mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out / MANIFEST, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OptionError(f"--out {out_dir} cannot be written ({exc.strerror or exc}); pass a writable folder") from None
    pinned = out / SETTINGS_FILE
    if pinned.exists():
        try:
            before = json.loads(pinned.read_text())
        except (OSError, ValueError):
            before = None
        if before != json.loads(json.dumps(identity)):
            diff = [k for k in identity if not isinstance(before, dict) or before.get(k) != identity[k]]
            raise OptionError(f"--out {out_dir} holds images made with other settings (not the same: "
                              f"{', '.join(diff) or SETTINGS_FILE}); resume with the same command, or pass another --out")
    else:
        atomic_write(pinned, json.dumps(identity, indent=1, sort_keys=True).encode())
    for stale in [*(out / MANIFEST).glob(".*.tmp"), *(out / IMAGES).glob(".*.tmp")]:  # a killed run's
        stale.unlink(missing_ok=True)
    return out


def committed_rows(out: Path) -> dict[str, dict]:
    """id → metadata row of every committed job (the manifest is the truth)."""
    rows: dict[str, dict] = {}
    for path in sorted((out / MANIFEST).glob("*.json")):
        try:
            batch = json.loads(path.read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError):
            raise FastFlowError(f"manifest file {path} is damaged; move it away and re-run "
                                f"(its jobs will be made again)") from None
        for row in batch:
            rows.setdefault(row["id"], row)
    return rows


def pending_jobs(jobs: list[dict], done: dict[str, dict]) -> list[dict]:
    """The jobs not yet committed; a committed id whose job changed is an error."""
    todo = []
    for j in jobs:
        row = done.get(j["id"])
        if row is None:
            todo.append(j)
        elif (row["seed"], row["label"], row["prompt"]) != (j["seed"], j["label"], j["prompt"]):
            raise OptionError(f"id {j['id']} was already made from seed {row['seed']}, label {row['label']}, "
                              f"prompt {row['prompt']!r}; this job differs. Give it another id or another --out")
    return todo


def batch_path(out: Path, ids: list[str]) -> Path:
    return out / MANIFEST / f"{hashlib.sha256(chr(0).join(ids).encode()).hexdigest()[:24]}.json"


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_sample(out: Path, spec, job_id: str, x) -> str:
    """A sample as a PNG (an image, or a clip as its frames side by side); other data as
    .npy. Returns the path relative to ``out``."""
    import io

    import numpy as np

    arr = x.detach().float().cpu().numpy()
    image_like = spec.is_image or (arr.ndim == 4 and arr.shape[0] in (1, 3) and spec.data_range == 2.0)
    buf = io.BytesIO()
    if image_like:
        from PIL import Image

        if arr.ndim == 4:  # (C, frames, H, W) → (C, H, frames·W)
            arr = np.concatenate(list(arr.transpose(1, 0, 2, 3)), axis=2)
        pix = np.clip((arr + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(pix[..., 0] if pix.shape[2] == 1 else pix).save(buf, format="PNG")
        name = f"{job_id}.png"
    else:
        np.save(buf, arr)
        name = f"{job_id}.npy"
    atomic_write(out / IMAGES / name, buf.getvalue())
    return f"{IMAGES}/{name}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def already_committed(out: Path, jobs: list[dict]) -> dict | None:
    """A batch's result if its manifest entry exists (a retried task), else None."""
    commit = batch_path(out, [j["id"] for j in jobs])
    if not commit.exists():
        return None
    return {"rows": json.loads(commit.read_text())["rows"], "seconds": 0.0, "calibration": 0, "already": True}


def commit_batch(out: Path, jobs: list[dict], rows: list[dict], die_once: str | None = None) -> None:
    """The commit: the batch's files are made durable, then its manifest entry is written."""
    _fsync_dir(out / IMAGES)
    if die_once:  # crash tests: the files are written, the batch is not committed
        _die_once(die_once)
    atomic_write(batch_path(out, [j["id"] for j in jobs]), json.dumps({"rows": rows}).encode())
    _fsync_dir(out / MANIFEST)


def _die_once(marker: str) -> None:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # one process, once
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(17)


# -- one batch ------------------------------------------------------------------------------

def make_policy(settings: Settings):
    import fastflow

    options = dict(settings.options)
    if settings.state is not None:
        options["state"] = settings.state
    return fastflow.get_policy(settings.policy, **options)


def check_state_key(policy, settings: Settings, spec) -> None:
    """Bind a learning policy to this model and schedule now, so a state file learned for
    another one is refused before any sampling (start, then close as not run)."""
    from .engine import schedule_key
    from .policy import SampleContext
    from .schedule import timesteps

    shift = settings.resolved_shift(spec)
    ctx = SampleContext(timesteps=timesteps(settings.steps, shift), model_key=spec.key,
                        schedule_key=schedule_key(settings.solver, settings.steps, shift),
                        batch_size=settings.batch_size)
    policy.start(ctx).close(ok=False)


class BatchStep:
    """The model, backend and policy of one process, and the step that turns a batch of
    jobs into committed files. Built once per process (per Ray worker)."""

    def __init__(self, settings: Settings, out, policy=None, die_once: str | None = None):
        import fastflow
        from .models import resolve_model

        self.settings, self.out = settings, Path(out)
        self.spec = resolve_model(settings.model)
        self.guidance = settings.resolved_guidance(self.spec)
        self.shift = settings.resolved_shift(self.spec)
        self.policy = policy if policy is not None else make_policy(settings)
        self.backend = fastflow.get_backend(settings.backend)
        try:
            self.model = self.spec.build()
        except (OSError, ValueError) as exc:
            raise OptionError(f"cannot load model '{self.spec.name}': {exc}") from None
        self.die_once = die_once
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def __call__(self, jobs: list[dict]) -> dict:
        """Sample, write, commit. A batch already committed (a retried task) is not redone."""
        import torch

        import fastflow

        done = already_committed(self.out, jobs)
        if done is not None:
            return done
        started = time.perf_counter()
        spec = self.spec
        noise = torch.stack([torch.randn(spec.shape, generator=torch.Generator().manual_seed(j["seed"]))
                             for j in jobs]).to(self.device)  # each job's own seed, on the CPU
        kwargs = {}
        if spec.num_labels:
            lab = torch.tensor([j["label"] for j in jobs], device=self.device)
            kwargs["label"] = lab
            if self.guidance is not None:
                kwargs.update(guidance=self.guidance, uncond={"label": torch.full_like(lab, spec.null_label)})
        res = fastflow.sample(self.model, noise, steps=self.settings.steps, policy=self.policy,
                              backend=self.backend, shift=self.shift, solver=self.settings.solver,
                              model_key=spec.key, **kwargs)
        rows = []
        for j, x, nfe in zip(jobs, res.x, res.nfe_per_sample):
            name = spec.label_names[j["label"]] if j["label"] is not None and j["label"] < len(spec.label_names) else None
            rows.append({"id": j["id"], "seed": j["seed"], "label": j["label"], "label_name": name,
                         "prompt": j["prompt"], "policy": self.settings.policy, "nfe": int(nfe),
                         "file": write_sample(self.out, spec, j["id"], x)})
        commit_batch(self.out, jobs, rows, self.die_once)
        return {"rows": rows, "seconds": time.perf_counter() - started, "calibration": res.calibration_samples,
                "already": False}


# -- the in-process runner ------------------------------------------------------------------------

def run_in_process(settings: Settings, jobs: list[dict], out_dir, *, say=None, make_step=None) -> dict:
    """Generate every pending job in this process, batch by batch; a line per batch to ``say``.
    ``make_step(settings, out, policy=, die_once=)`` builds the batch step (default
    :class:`BatchStep`; :func:`fastflow.generate_pipeline.make_step` also takes pipelines)."""
    require_pyarrow()
    say = say or (lambda msg: print(f"fastflow: {msg}", file=sys.stderr, flush=True))
    policy = make_policy(settings)
    if settings.state is not None and not settings.pipeline:  # before the model loads: a state
        check_state_key(policy, settings, settings.spec())  # file for another model fails now
    out = Path(out_dir)
    todo = pending_jobs(jobs, committed_rows(out))
    if settings.pipeline and make_step is None:
        raise OptionError("a pipeline's batch step is fastflow.generate_pipeline.make_step: pass make_step=")
    step = (make_step or BatchStep)(settings, out, policy=policy, die_once=os.environ.get(DIE_ONCE_ENV))
    bs = settings.batch_size
    batches = [todo[i:i + bs] for i in range(0, len(todo), bs)]
    say(f"{len(jobs) - len(todo)} of {len(jobs)} jobs already done in {out}; making {len(todo)} in "
        f"{len(batches)} batch(es) of up to {bs}, policy {settings.policy}, in this process")
    started = time.perf_counter()
    log, last_save = [], started
    for b, batch in enumerate(batches, 1):
        r = step(batch)
        nfes = [row["nfe"] for row in r["rows"]]
        log.append({"worker": 0, "batch": b, "images": len(nfes), "nfe_mean": sum(nfes) / len(nfes),
                    "seconds": r["seconds"], "t": time.perf_counter() - started, "calibration": r["calibration"]})
        spent = time.perf_counter() - started
        say(f"batch {b}/{len(batches)}: {len(nfes)} images, NFE {log[-1]['nfe_mean']:.1f}, {r['seconds']:.1f} s; "
            f"about {spent / b * (len(batches) - b):.0f} s left")
        if settings.state is not None and time.perf_counter() - last_save > 30:
            step.policy.save(settings.state)  # learning survives a crash too
            last_save = time.perf_counter()
    if settings.state is not None:
        step.policy.save(settings.state)
    return finish(out, jobs, settings, step.spec, step.policy, log, time.perf_counter() - started,
                  workers=1, ray=None)


# -- the end: metadata and the summary ------------------------------------------------------------

def require_pyarrow():
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise MissingDependencyError("fastflow generate writes metadata.parquet with pyarrow: "
                                     "pip install 'fastflow[ray]' (or pip install pyarrow)") from None


COLUMNS = ("id", "seed", "label", "label_name", "prompt", "policy", "nfe", "file")


def write_metadata(out: Path, jobs: list[dict]) -> tuple[Path, int]:
    """metadata.parquet from the manifest: one row per committed id, the jobs' order
    first. Fails naming the jobs that are not done."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = committed_rows(out)
    missing = [j["id"] for j in jobs if j["id"] not in done]
    if missing:
        raise FastFlowError(f"{len(missing)} job(s) are not done (e.g. {', '.join(missing[:3])}); "
                            f"re-run the same command to make them")
    order = [j["id"] for j in jobs] + sorted(set(done) - {j["id"] for j in jobs})
    schema = pa.schema([("id", pa.string()), ("seed", pa.int64()), ("label", pa.int64()),
                        ("label_name", pa.string()), ("prompt", pa.string()), ("policy", pa.string()),
                        ("nfe", pa.int64()), ("file", pa.string())])
    table = pa.Table.from_pylist([{k: done[i].get(k) for k in COLUMNS} for i in order], schema=schema)
    fd, tmp = tempfile.mkstemp(prefix=".metadata.", suffix=".tmp", dir=out)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out / METADATA)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out / METADATA, len(order)


def finish(out: Path, jobs, settings: Settings, spec, policy, log: list[dict], wall: float, *,
           workers: int, ray, merge: dict | None = None) -> dict:
    path, rows = write_metadata(out, jobs)
    images = sum(b["images"] for b in log)
    nfe = sum(b["nfe_mean"] * b["images"] for b in log) / images if images else None
    summary = {
        "images": images, "skipped_done": len(jobs) - images, "jobs": len(jobs), "rows": rows,
        "wall_seconds": wall, "images_per_s": images / wall if images and wall > 0 else None,
        "nfe_mean": nfe, "nfe_full": settings.steps,
        "speedup_nfe": settings.steps / nfe if nfe else None,
        "calibration_samples": sum(b.get("calibration", 0) for b in log),
        "policy": settings.policy, "policy_options": {k: str(v) for k, v in settings.options.items()},
        "model": spec.name, "steps": settings.steps, "batch_size": settings.batch_size,
        "workers": workers, "ray": ray, "batches": log,
        "learned": policy.learned() if policy is not None and hasattr(policy, "learned") else None,
        "state": settings.state, "out": str(out), "metadata": str(path),
    }
    if merge is not None:
        summary["merge"] = merge
    return summary


def summary_lines(s: dict) -> list[str]:
    """The human summary."""
    lines = [f"images     {s['images']} made" + (f", {s['skipped_done']} already done" if s["skipped_done"] else "")
             + f"; {s['rows']} rows in {s['metadata']}"]
    if s["images_per_s"]:
        lines.append(f"throughput {s['images_per_s']:.2f} images/s ({s['wall_seconds']:.1f} s, {s['workers']} "
                     f"worker(s){', Ray ' + s['ray'] if s['ray'] else ', in this process'})")
    if s["nfe_mean"]:
        lines.append(f"NFE        {s['nfe_mean']:.2f} of {s['nfe_full']} per image = {s['speedup_nfe']:.2f}x fewer "
                     f"evaluations (policy {s['policy']}; {s['calibration_samples']} calibration sample(s))")
    if s.get("merge"):
        m = s["merge"]
        lines.append(f"learning   {m['note']}")
    if s.get("learned"):
        lines.append(f"learned    {s['learned']}")
    lines.append(f"state      {s['state'] + ' (merged learning saved)' if s['state'] else 'not kept (pass --state PATH)'}")
    lines.append(f"outputs    {s['out']}")
    return lines


def settings_dict(settings: Settings) -> dict:
    return asdict(settings)

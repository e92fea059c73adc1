"""``fastflow generate --ray``: the jobs as a Ray Dataset, ``map_batches`` over a pool of
stateful workers (the model loaded once per worker), and the workers' learning merged
through one small actor.

Each worker runs its own copy of the policy. After every batch it pushes what its copy
learned since the last push (:meth:`fastflow.policy.Policy.delta`) to the
:class:`MergeStore` actor, which keeps ``total = total + delta``; every ``sync_every``
batches the push returns the total and the worker absorbs it
(:meth:`~fastflow.policy.Policy.absorb`), so it decides with what every worker learned.
A worker that starts late or is restarted absorbs the total before its first batch.

Loss-free: a batch is committed by its manifest file (:mod:`fastflow.generate`). Ray
Data's actor pools restart a dead worker and retry its batch (``max_restarts=-1``,
``max_task_retries=-1`` by default in Ray 2.60); a retried batch that was already
committed is returned as it is, one that was not is made again.

Ray is imported only here, and only when ``--ray`` is given.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .errors import MissingDependencyError
from .generate import (DIE_ONCE_ENV, Settings, check_state_key, committed_rows, finish, make_policy, pending_jobs,
                       require_pyarrow, settings_dict)
from .generate_pipeline import make_step


def require_ray():
    """Ray Data, or the pip command that installs it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingDependencyError("--ray needs Ray Data, which is not installed: pip install 'fastflow[ray]'") from None
    return ray


class MergeStore:
    """The merged learning of every worker: the sum of their deltas (a Ray actor)."""

    def __init__(self):
        self.total = None
        self.pushes = 0
        self.seconds = 0.0  # time spent adding, inside the actor

    def push(self, delta, want_total: bool = True):
        started = time.perf_counter()
        if delta is not None:
            self.total = delta if self.total is None else self.total + delta
        self.pushes += 1
        self.seconds += time.perf_counter() - started
        return self.total if want_total else None

    def get(self):
        return self.total

    def stats(self) -> dict:
        return {"pushes": self.pushes, "actor_seconds": self.seconds}


class GenerateWorker:
    """One Ray Data worker: a :class:`BatchStep` (model, backend, policy) built once."""

    def __init__(self, settings: dict, out: str, store, sync_every: int, threads: int, die_once: str | None):
        import socket

        import torch

        torch.set_num_threads(threads)
        self.step = make_step(Settings(**settings), out, die_once=die_once)
        self.policy = self.step.policy
        self.store = store if getattr(self.policy, "mergeable", False) else None
        self.sync_every = sync_every
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.batches = 0
        if self.store is not None:  # a late or restarted worker starts from everything learned so far
            import ray

            self.policy.absorb(ray.get(self.store.get.remote()))

    def __call__(self, batch: dict) -> dict:
        import ray

        jobs = [{"id": str(i), "seed": int(s), "label": None if int(lab) < 0 else int(lab), "prompt": p or None}
                for i, s, lab, p in zip(batch["id"], batch["seed"], batch["label"], batch["prompt"])]
        r = self.step(jobs)
        merge_s = 0.0
        self.batches += 0 if r["already"] else 1
        if self.store is not None and not r["already"]:
            started = time.perf_counter()
            sync = self.batches % self.sync_every == 0
            total = ray.get(self.store.push.remote(self.policy.delta(), sync))
            if sync:
                self.policy.absorb(total)
            merge_s = time.perf_counter() - started
        n = len(r["rows"])
        mean = sum(row["nfe"] for row in r["rows"]) / max(n, 1)
        return {"id": [row["id"] for row in r["rows"]], "nfe": [row["nfe"] for row in r["rows"]],
                "worker": [self.name] * n, "batch": [self.batches] * n, "done_at": [time.time()] * n,
                "seconds": [r["seconds"]] * n, "merge_seconds": [merge_s] * n, "batch_nfe": [mean] * n,
                "calibration": [r["calibration"]] * n, "already": [r["already"]] * n}


def run_on_ray(settings: Settings, jobs: list[dict], out_dir, *, address: str = "local", workers: int = 2,
               threads: int = 1, sync_every: int = 1, share: bool = True, say=None) -> dict:
    """Generate every pending job on a Ray cluster (``address`` "local" starts one here).
    ``share=False``: each worker learns alone (what the benchmark compares sharing with)."""
    ray = require_ray()
    require_pyarrow()
    say = say or (lambda msg: print(f"fastflow: {msg}", file=sys.stderr, flush=True))
    spec = settings.spec()
    policy = make_policy(settings)  # the driver's copy: it absorbs the total and saves it
    if settings.state is not None and not settings.pipeline:
        check_state_key(policy, settings, spec)
    out = Path(out_dir).resolve()
    todo = pending_jobs(jobs, committed_rows(out))
    started_ray = False
    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=max(os.cpu_count() or 1, workers * threads), include_dashboard=False,
                     logging_level="WARNING")
        else:
            ray.init(address=address, logging_level="WARNING")
        started_ray = True
    try:
        return _run(ray, settings, spec, policy, jobs, todo, out, workers, threads, sync_every, say, address,
                    share)
    finally:
        if started_ray:
            ray.shutdown()


def _run(ray, settings, spec, policy, jobs, todo, out, workers, threads, sync_every, say, address, share):
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    gpus = ray.cluster_resources().get("GPU", 0) >= 1
    mergeable = getattr(policy, "mergeable", False) and share
    note = (f"each worker's {settings.policy} learning is pushed to a merge actor after every batch and the "
            f"total absorbed every {sync_every} batch(es)" if mergeable else
            f"each of the {workers} workers learns on its own (--no-share)" if share is False and
            getattr(policy, "mergeable", False) else
            f"policy {settings.policy} cannot merge learning: each of the {workers} workers learns on its own")
    say(f"{len(jobs) - len(todo)} of {len(jobs)} jobs already done in {out}; making {len(todo)} on Ray with "
        f"{workers} worker(s) x {threads} thread(s){' and 1 GPU each' if gpus else ''}; {note}")
    if not mergeable and settings.state is not None:
        say(f"--state {settings.state} is not written: workers that do not merge have no one learning to save")
    store = ray.remote(num_cpus=0)(MergeStore).remote() if mergeable else None
    log: dict = {}
    started, started_wall = time.perf_counter(), time.time()
    if todo:
        items = [{"id": j["id"], "seed": j["seed"], "label": -1 if j["label"] is None else j["label"],
                  "prompt": j["prompt"] or ""} for j in todo]
        # one block per batch: a task is one batch (balanced across workers, retried alone)
        blocks = -(-len(items) // settings.batch_size)
        ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            GenerateWorker, batch_size=settings.batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=threads,
            num_gpus=1 if gpus else None, batch_format="numpy",
            fn_constructor_kwargs=dict(settings=settings_dict(settings), out=str(out), store=store,
                                       sync_every=sync_every, threads=threads,
                                       die_once=os.environ.get(DIE_ONCE_ENV)))
        last_save = time.perf_counter()
        for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(block["id"])):
                key = (str(block["worker"][i]), int(block["batch"][i]))
                entry = log.setdefault(key, {"worker": key[0], "batch": key[1], "images": 0,
                                             "nfe_mean": float(block["batch_nfe"][i]),
                                             "seconds": float(block["seconds"][i]),
                                             "merge_seconds": float(block["merge_seconds"][i]),
                                             "calibration": int(block["calibration"][i]),
                                             "t": float(block["done_at"][i]) - started_wall})  # when it finished
                entry["images"] += 0 if bool(block["already"][i]) else 1
            if store is not None and settings.state is not None and time.perf_counter() - last_save > 30:
                policy.absorb(ray.get(store.get.remote()))  # learning survives a crash of the run too
                policy.save(settings.state)
                last_save = time.perf_counter()
    wall = time.perf_counter() - started
    merge = {"note": note, "mergeable": mergeable, "sync_every": sync_every}
    if store is not None:
        policy.absorb(ray.get(store.get.remote()))
        if settings.state is not None:
            policy.save(settings.state)
        merge.update(ray.get(store.stats.remote()))
        ray.kill(store)  # the run's merged learning is saved; the actor ends with the run
    batches = sorted((b for b in log.values() if b["images"]), key=lambda b: b["t"])
    rounds = [b["merge_seconds"] for b in batches if b["merge_seconds"] > 0]
    if rounds:
        merge["seconds_per_round_median"] = sorted(rounds)[len(rounds) // 2]
        merge["batch_seconds_median"] = sorted(b["seconds"] for b in batches)[len(batches) // 2]
    return finish(out, jobs, settings, spec, policy if mergeable else None, batches, wall,
                  workers=workers, ray=address, merge=merge)

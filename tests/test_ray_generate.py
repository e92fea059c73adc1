"""fastflow generate on a local Ray cluster (2 CPUs, no dashboard): every id exactly once,
the workers' learning merged into one state, and a worker killed mid-batch losing nothing."""

import json
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'fastflow[ray]')")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (pip install 'fastflow[ray]')")

from fastflow.generate import DIE_ONCE_ENV, Settings, prepare_out  # noqa: E402
from fastflow.generate_jobs import label_jobs  # noqa: E402
from fastflow.models import resolve_model  # noqa: E402
from fastflow.ray_generate import run_on_ray  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Ray's workers put the driver's working directory first on sys.path: started from a
    # source checkout, they would import its fastflow/ rather than the installed package
    # (which the non-editable CI install must test), as any user's would from a folder
    # holding a fastflow/ directory.
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("ray-cwd"))
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        yield
    finally:
        ray.shutdown()
        os.chdir(here)


def generate(out, samples, state=None, batch_size=8, **kw):
    spec = resolve_model("gmm")
    settings = Settings(model="gmm", batch_size=batch_size, state=state)
    prepare_out(out, settings.identity(spec))
    jobs = label_jobs(spec, None, samples, 0)
    return jobs, run_on_ray(settings, jobs, out, workers=2, threads=1, say=lambda m: None, **kw)


def rows(out):
    return pq.read_table(Path(out) / "metadata.parquet").to_pylist()


@pytest.mark.slow
def test_two_workers_share_learning_and_make_every_id_once(cluster, tmp_path):
    state = tmp_path / "ucb.json"
    jobs, s = generate(tmp_path / "set", 96, state=str(state))
    got = rows(tmp_path / "set")
    assert [r["id"] for r in got] == [j["id"] for j in jobs]  # every id once, in the jobs' order
    assert all((tmp_path / "set" / r["file"]).is_file() for r in got)
    assert len({b["worker"] for b in s["batches"]}) == 2  # both workers did batches
    assert s["images"] == 96 and s["merge"]["pushes"] == 12  # a push per batch of 8
    saved = json.loads(state.read_text())
    assert saved["samples"] == 96  # both workers' learning in one state, each image once
    counts = sum(sum(b["counts"]) for b in saved["bandits"])
    assert counts > 96 * 5 and saved["scale"] > 0
    assert s["nfe_mean"] < 25 and s["speedup_nfe"] > 2
    # the same command again: nothing to do, the table unchanged
    _, again = generate(tmp_path / "set", 96, state=str(state))
    assert again["images"] == 0 and again["skipped_done"] == 96 and rows(tmp_path / "set") == got
    assert json.loads(state.read_text())["samples"] == 96


@pytest.mark.slow
def test_a_worker_killed_mid_batch_loses_nothing(cluster, tmp_path, monkeypatch):
    """The first batch a worker makes kills its process after the batch's files are
    written and before they are committed (os._exit); Ray restarts the worker and retries
    the batch. Every id ends up in the table exactly once."""
    marker = tmp_path / "killed"
    monkeypatch.setenv(DIE_ONCE_ENV, str(marker))
    jobs, s = generate(tmp_path / "set", 64)
    assert marker.exists()  # a worker really died
    dead_pid = int(marker.read_text())
    got = rows(tmp_path / "set")
    assert sorted(r["id"] for r in got) == sorted(j["id"] for j in jobs) and len(got) == 64
    assert len(list((tmp_path / "set" / "manifest").glob("*.json"))) == 8  # one commit per batch, none twice
    assert s["images"] == 64
    assert all(not b["worker"].endswith(f":{dead_pid}") for b in s["batches"])  # the dead one delivered nothing
    with pytest.raises(ProcessLookupError):
        os.kill(dead_pid, 0)


@pytest.mark.slow
def test_a_policy_that_cannot_merge_runs_per_worker_and_says_so_once(cluster, tmp_path):
    spec = resolve_model("gmm")
    settings = Settings(model="gmm", policy="fixed", options={"skip": "2"}, batch_size=4)
    prepare_out(tmp_path / "set", settings.identity(spec))
    said = []
    s = run_on_ray(settings, label_jobs(spec, None, 16, 0), tmp_path / "set", workers=2, say=said.append)
    assert sum("cannot merge" in m for m in said) == 1 and not s["merge"]["mergeable"]
    assert [r["nfe"] for r in rows(tmp_path / "set")] == [18] * 16

"""fastflow generate in this process (no Ray): jobs and ids, NFE per image, resume,
metadata, errors as a user meets them; and the merge of learning, exactly."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import fastflow
from fastflow.bandit import UCB1
from fastflow.generate import DIE_ONCE_ENV, Settings, check_state_key, run_in_process
from fastflow.models import resolve_model
from fastflow.ray_generate import MergeStore

pq = pytest.importorskip("pyarrow.parquet", reason="metadata.parquet needs pyarrow (pip install 'fastflow[ray]')")


def invoke(args, cwd):
    from fastflow.cli import cli

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, ["generate", *args], catch_exceptions=False)
    finally:
        os.chdir(old)


def table(out):
    return pq.read_table(Path(out) / "metadata.parquet").to_pylist()


# -- the merge of learning ------------------------------------------------------------------


def bound_policy(state=None):
    """A ucb policy bound to the GMM model and the 50-step Euler schedule."""
    pol = fastflow.get_policy("ucb", **({"state": str(state)} if state else {}))
    check_state_key(pol, Settings(model="gmm", steps=50), resolve_model("gmm"))
    return pol


def pull(pol, b, arm, reward, count):
    pol.bandits[b].update(arm, reward, count)
    pol.samples += count


def test_merging_k_workers_equals_learning_sequentially_exactly(tmp_path):
    """Three workers each learn from their share of the pulls and sync through the merge
    store every few pulls; one policy learns from all pulls in order. Counts and reward
    sums are equal exactly (dyadic rewards: float addition is then exact in any order),
    in every worker after the last sync, in the store, and in the saved state file."""
    seed_state = tmp_path / "seed.json"
    first = bound_policy(seed_state)
    for b, arm in ((5, 1), (9, 3), (20, 0)):  # learning that was on disk before the run
        pull(first, b, arm, 0.75, 4)
    first.save()
    rng = random.Random(0)
    pulls = [(rng.randrange(len(first.bandits)), rng.randrange(7), rng.randint(-96, 96) / 32, rng.randint(1, 16))
             for _ in range(1500)]
    sequential = bound_policy(seed_state)
    for p in pulls:
        pull(sequential, *p)

    store = MergeStore()
    workers = [bound_policy(seed_state) for _ in range(3)]
    for i, p in enumerate(pulls):
        w = workers[rng.randrange(3)]
        pull(w, *p)
        if i % 7 == 0:
            w.absorb(store.push(w.delta()))
    for w in workers:
        store.push(w.delta())
    for w in workers:
        w.absorb(store.get())
        assert [b.counts for b in w.bandits] == [b.counts for b in sequential.bandits]
        assert [b.sums for b in w.bandits] == [b.sums for b in sequential.bandits]
        assert w.samples == sequential.samples
    assert store.get().samples == sum(p[3] for p in pulls) and store.get().samples + 12 == sequential.samples
    nothing_new = sum(w.delta() for w in workers)  # deltas add with sum() too
    assert sum(map(sum, nothing_new.counts)) == 0 and nothing_new.samples == 0  # all was synced

    state = tmp_path / "merged.json"
    state.write_text(seed_state.read_text())  # the run's --state starts from the seed learning
    driver = bound_policy(state)
    driver.absorb(store.get())
    driver.save()
    saved = json.loads(state.read_text())
    assert [r["counts"] for r in saved["bandits"]] == [b.counts for b in sequential.bandits]
    assert [r["sums"] for r in saved["bandits"]] == [b.sums for b in sequential.bandits]
    assert saved["samples"] == sequential.samples


def test_merged_learning_from_real_sampling_equals_its_pulls_replayed(monkeypatch):
    """Two ucb workers sample the GMM model and sync; replaying every pull they made into
    one fresh policy gives the same counts exactly and the same sums to rounding."""
    import torch

    log = []
    original = UCB1.update

    def recording(self, arm, reward, count=1):
        log.append((self, arm, reward, count))
        original(self, arm, reward, count)

    monkeypatch.setattr(UCB1, "update", recording)
    spec = resolve_model("gmm")
    model = spec.build()
    store = MergeStore()
    workers = [bound_policy(), bound_policy()]
    index = {id(b): (k, i) for k, w in enumerate(workers) for i, b in enumerate(w.bandits)}
    for round_ in range(4):
        for k, w in enumerate(workers):
            noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(100 * round_ + k))
            fastflow.sample(model, noise, steps=50, policy=w, model_key=spec.key, label=torch.arange(8))
            w.absorb(store.push(w.delta()))
    monkeypatch.setattr(UCB1, "update", original)
    replay = bound_policy()
    for bandit, arm, reward, count in log:
        replay.bandits[index[id(bandit)][1]].update(arm, reward, count)
    merged = store.get()
    assert merged.counts == [b.counts for b in replay.bandits]
    assert sum(map(sum, merged.counts)) > 1000  # it really learned
    for ms, b in zip(merged.sums, replay.bandits):
        assert ms == pytest.approx(b.sums, rel=1e-12, abs=1e-9)
    assert merged.samples == 64 and merged.extra["scale"] is not None


def test_policies_declare_whether_they_merge():
    assert fastflow.get_policy("ucb").mergeable and fastflow.get_policy("ucb-paper").mergeable
    fixed = fastflow.get_policy("fixed")
    assert not fixed.mergeable and fixed.delta() is None
    with pytest.raises(NotImplementedError):
        fixed.absorb(object())


# -- the in-process runner ----------------------------------------------------------------------


def test_every_image_has_the_policy_nfe_and_one_row(tmp_path):
    res = invoke(["--out", "set", "--model", "gmm", "--labels", "mode0-mode3,mode7", "--samples", "12",
                  "--batch-size", "5", "--policy", "fixed", "--option", "skip=2", "--json"], tmp_path)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    rows = table(tmp_path / "set")
    assert [r["nfe"] for r in rows] == [18] * 12  # fixed skip=2 on 50 steps: 18 evaluations each
    assert summary["images"] == 12 and summary["nfe_mean"] == 18 and summary["ray"] is None
    assert [r["label"] for r in rows] == [0, 1, 2, 3, 7] * 2 + [0, 1]
    assert [r["seed"] for r in rows] == list(range(12))
    assert len({r["id"] for r in rows}) == 12 and all(r["policy"] == "fixed" for r in rows)
    for r in rows:
        assert (tmp_path / "set" / r["file"]).is_file()
    assert len(list((tmp_path / "set" / "manifest").glob("*.json"))) == 3  # 5 + 5 + 2


def test_a_rerun_skips_what_is_done_and_a_crash_loses_only_its_batch(tmp_path):
    """A first run commits 8 images; a second, for 20, dies after writing the files of its
    first batch but before committing them; the same command again finishes: every id
    once, nothing made twice that was committed."""
    base = ["--out", "set", "--model", "gmm", "--batch-size", "4", "--state", "ucb.json"]
    assert invoke(base + ["--samples", "8"], tmp_path).exit_code == 0
    first = {r["id"]: r for r in table(tmp_path / "set")}
    marker = tmp_path / "died"
    env = {**os.environ, DIE_ONCE_ENV: str(marker)}
    cmd = [sys.executable, "-c", "from fastflow.cli import main; main()", "generate", *base, "--samples", "20"]
    crashed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert crashed.returncode == 17 and marker.exists(), crashed.stderr
    assert len(list((tmp_path / "set" / "manifest").glob("*.json"))) == 2  # the uncommitted batch is not there
    done = subprocess.run(cmd + ["--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["images"] == 12 and summary["skipped_done"] == 8 and summary["rows"] == 20
    rows = table(tmp_path / "set")
    assert sorted(r["id"] for r in rows) == sorted({r["id"] for r in rows}) and len(rows) == 20
    assert all(rows[i] == first[rows[i]["id"]] for i in range(8))  # committed rows are never redone
    assert json.loads((tmp_path / "ucb.json").read_text())["samples"] == 20  # every image learned from once
    assert "import ray" not in (Path(fastflow.__file__).parent / "generate.py").read_text()


@pytest.mark.slow  # the glyph model loads in ~5 s and samples slowly
def test_glyph_images_are_pngs_and_jobs_files_name_their_ids(tmp_path):
    from PIL import Image

    (tmp_path / "jobs.jsonl").write_text('{"label": "A", "seed": 3, "id": "first-A"}\n\n{"label": 7, "seed": 3}\n')
    res = invoke(["--out", "set", "--jobs", "jobs.jsonl", "--steps", "6", "--batch-size", "2"], tmp_path)
    assert res.exit_code == 0, res.output
    rows = table(tmp_path / "set")
    assert [(r["id"], r["label_name"], r["seed"]) for r in rows] == [("first-A", "A", 3), ("7-3", "7", 3)]
    with Image.open(tmp_path / "set" / rows[0]["file"]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    assert "2 made" in res.output and "metadata.parquet" in res.output


@pytest.mark.parametrize("args, says", [
    (["--labels", "0-9,AA"], "unknown label 'AA'"),
    (["--labels", "Z-A"], "runs backwards"),
    (["--jobs", "missing.jsonl"], "--jobs missing.jsonl cannot be read"),
    (["--jobs", "dup.jsonl"], "gives the id(s) x to more than one job"),
    (["--jobs", "bad.jsonl"], "line 2 is not JSON"),
    (["--workers", "2"], "--workers needs --ray"),
    (["--labels", "A", "--jobs", "dup.jsonl"], "drop --labels/--samples"),
    (["--policy", "ucb", "--option", "tolerance=-1"], "tolerance"),
    (["--model", "gmm", "--labels", "mode1-mode9"], "unknown label 'mode9'"),
    (["--model", "no-such-model"], "no-such-model"),
])
def test_bad_input_is_named_with_its_fix_and_exit_2(tmp_path, args, says):
    (tmp_path / "dup.jsonl").write_text('{"label": "A", "seed": 1, "id": "x"}\n{"label": "B", "seed": 2, "id": "x"}\n')
    (tmp_path / "bad.jsonl").write_text('{"label": "A", "seed": 1}\n{label: B}\n')
    res = invoke(["--out", "set", *args], tmp_path)
    assert res.exit_code == 2 and says in res.output, res.output
    assert not (tmp_path / "set" / "metadata.parquet").exists()


def test_an_unwritable_out_and_other_settings_in_out_are_refused(tmp_path):
    (tmp_path / "file").write_text("")
    res = invoke(["--out", "file/set", "--model", "gmm"], tmp_path)
    assert res.exit_code == 2 and "--out file/set cannot be written" in res.output
    assert invoke(["--out", "set", "--model", "gmm", "--samples", "4"], tmp_path).exit_code == 0
    res = invoke(["--out", "set", "--model", "gmm", "--samples", "4", "--steps", "20"], tmp_path)
    assert res.exit_code == 2 and "other settings (not the same: steps)" in res.output


def test_missing_ray_is_named_with_the_extra_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    res = invoke(["--out", "set", "--model", "gmm", "--ray", "local", "--workers", "2"], tmp_path)
    assert res.exit_code == 2 and "pip install 'fastflow[ray]'" in res.output
    assert not (tmp_path / "set").exists()


def test_the_in_process_path_does_not_import_ray(tmp_path):
    code = ("import sys; from fastflow.cli import main\n"
            "try:\n main(['generate', '--out', 'set', '--model', 'gmm', '--samples', '4'])\n"
            "except SystemExit: pass\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\nprint('no ray')")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "no ray" in done.stdout, done.stderr


def test_run_in_process_reports_throughput_and_the_state(tmp_path):
    from fastflow.generate import prepare_out
    from fastflow.generate_jobs import label_jobs

    spec = resolve_model("gmm")
    settings = Settings(model="gmm", batch_size=8, state=str(tmp_path / "s.json"))
    prepare_out(tmp_path / "o", settings.identity(spec))
    lines = []
    s = run_in_process(settings, label_jobs(spec, None, 24, 0), tmp_path / "o", say=lines.append)
    assert len(lines) == 4 and "batch 3/3" in lines[-1]
    assert s["images"] == 24 and s["images_per_s"] > 0 and s["calibration_samples"] == 1
    assert s["nfe_mean"] == pytest.approx(sum(r["nfe"] for r in table(tmp_path / "o")) / 24)
    assert s["speedup_nfe"] > 2 and Path(s["state"]).is_file()


@pytest.mark.slow  # loads the glyph pipeline
def test_prompts_through_a_pipeline_become_pngs_with_their_nfe(tmp_path):
    from PIL import Image

    (tmp_path / "prompts.txt").write_text("A\n\n7\n")
    args = ["--out", "set", "--model", "glyphs", "--prompts", "prompts.txt", "--samples", "4", "--batch-size", "2",
            "--steps", "20", "--policy", "fixed", "--option", "skip=2", "--json"]
    res = invoke(args, tmp_path)
    assert res.exit_code == 0, res.output
    rows = table(tmp_path / "set")
    assert [(r["prompt"], r["seed"]) for r in rows] == [("A", 0), ("7", 1), ("A", 2), ("7", 3)]
    assert [r["nfe"] for r in rows] == [8] * 4  # fixed skip=2 on 20 steps through the pipeline hook
    with Image.open(tmp_path / "set" / rows[0]["file"]) as im:
        assert im.size == (32, 32)
    assert json.loads(res.stdout)["images"] == 4
    res = invoke(["--out", "other", "--model", "glyphs", "--prompts", "prompts.txt", "--labels", "A"], tmp_path)
    assert res.exit_code == 2 and "exclude each other" in res.output

"""`fastflow bench` quick mode end to end: structure, exact NFE, files."""

import csv
import json

import pytest
from click.testing import CliRunner

import fastflow
from fastflow.cli import cli

from conftest import calibration_nfe

pytestmark = pytest.mark.slow  # exports, wheels, subprocesses: seconds each

@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = CliRunner().invoke(cli, ["bench", "--model", "gmm", "--quick", "--samples", "16", "--batch-size", "4",
                                      "--steps", "20", "--ode-steps", "60", "--out", str(out),
                                      "--cache-dir", str(out / "cache"), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out


def test_table_structure_and_files(quick):
    result, out = quick
    rows = {r["method"]: r for r in result["rows"]}
    assert result["rows"][0]["method"] == "euler-20"  # the reference comes first
    for name in ("euler-8", "unipc-8", "threshold-0.1", "ucb-cold", "ucb-warm",
                 "ucb-paper-warm", "planned-8", "unipc+planned-8"):  # --quick's list
        assert name in rows, name
    assert not {"dpm++-8", "fixed-2", "planned-cold"} & set(rows)  # the full sweep's, not --quick's
    for r in result["rows"]:
        for key in ("nfe", "speedup_nfe", "wall_seconds", "speedup_wall", "psnr_full_db", "psnr_ode_db"):
            assert isinstance(r[key], float), (r["method"], key)
    for f in ("bench.json", "bench.csv", "pareto.png", "learning.png"):
        assert (out / f).stat().st_size > 0, f
    with open(out / "bench.csv") as fh:
        assert [r["method"] for r in csv.DictReader(fh)] == [r["method"] for r in result["rows"]]


def test_nfe_figures_are_exact(quick):
    result, _ = quick
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["euler-20"]["nfe"] == 20 and rows["euler-20"]["psnr_full_db"] == 100.0  # identical (capped)
    assert rows["euler-8"]["nfe"] == 8 and rows["unipc-8"]["nfe"] == 8
    assert rows["planned-8"]["nfe"] == 8 and rows["unipc+planned-8"]["nfe"] == 8
    # ucb calibrates on the first sample of the first batch of 4 (every step and the
    # sensitivity probes) and accelerates the other 3
    cal = calibration_nfe(fastflow.get_policy("ucb"), 20)
    first = result["curves"]["ucb-cold"]["nfe"][0]
    assert first < cal and (4 * first - cal) % 3 == 0 and len(result["curves"]["ucb-cold"]["nfe"]) == 4


def test_full_sweep_methods_have_exact_nfe(tmp_path):
    """Methods only the full sweep runs, picked with --methods (no --quick)."""
    result = CliRunner().invoke(cli, ["bench", "--model", "gmm", "--samples", "16", "--batch-size", "4", "--steps", "20",
                                      "--ode-steps", "60", "--methods", "fixed-2,planned-cold,dpm++-8",
                                      "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads(result.stdout)["rows"]}
    assert rows["fixed-2"]["nfe"] == 8  # 0,1 then 4,7,10,13,16 and 19
    assert rows["dpm++-8"]["nfe"] == 8
    # cold policies pay for learning on the measured samples: the first sample computes every
    # step and the sensitivity probes, the other 15 follow the plan it made
    assert rows["planned-cold"]["nfe"] == pytest.approx((calibration_nfe(fastflow.get_policy("planned"), 20) + 15 * 8) / 16)


def test_wall_speedup_is_the_all_steps_price_timed_beside_each_row_over_its_time(quick):
    """Each row's all-steps cost is priced just before and after it (the same machine
    load), so a row that did 20 of 20 evaluations is near 1x; a figure the evaluations
    cannot explain, or whose two prices disagree, is flagged, not reported as a result."""
    from fastflow.bench import NOISY_SPREAD, NOISY_WALL

    result, _ = quick
    for r in result["rows"]:
        assert r["full_wall_estimate"] > 0 and r["probe_spread"] >= 0
        assert r["speedup_wall"] == pytest.approx(r["full_wall_estimate"] / r["wall_seconds"], rel=1e-12)
        noisy = r["speedup_wall"] > NOISY_WALL * r["speedup_nfe"] or r["probe_spread"] > NOISY_SPREAD
        assert r["speedup_wall_noisy"] is noisy, r["method"]


def test_bandit_warm_up_in_small_batches_gives_one_pull_per_batch():
    import torch

    import fastflow
    from fastflow.bench import Ctx, policy_method

    spec = fastflow.get_model("gmm")
    model = spec.build()
    gen = torch.Generator().manual_seed(0)
    noise, warm = torch.randn(8, *spec.shape, generator=gen), torch.randn(16, *spec.shape, generator=gen)
    ctx = Ctx(spec, model, noise, None, None, 12, 8, warm, None, progress=lambda *_: None)
    made = []

    def make():
        made.append(fastflow.get_policy("ucb-paper", mu=0.01, arms="0,1"))
        return made[-1]

    m = policy_method("ucb-warm", "ucb", "", make, warm=True, warm_batches=2, warm_batch_size=2)
    x, _, _, _ = m.run(ctx)
    assert x.shape == noise.shape and "batches of 2" in m.warm
    # 16 warm-up samples in batches of 2 + 1 measured batch of 8 = 9 samples as the policy sees them;
    # the first bandit consulted (step 2) is asked once per sample
    assert made[0].samples == 9 and sum(made[0].bandits[2].counts) == 9

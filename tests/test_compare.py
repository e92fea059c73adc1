"""fastflow.compare: the one summary schema, its cost and comparison halves, and the
rule that keeps an unexplainable wall figure from being shown as a result."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")

from fastflow.compare import comparison, cost, json_text  # noqa: E402


class _Policy:
    name = "p"

    def options(self):
        return {"k": 1, "obj": object()}

    def learned(self):
        return "something"


def test_cost_counts_calibration_apart():
    c = cost(_Policy(), [50, 10, 10, 12], 50, model_calls=82, calibration_samples=1, wall_seconds=2.0)
    assert c["nfe_mean"] == 20.5 and c["speedup_nfe"] == 50 / 20.5
    assert c["calibration_nfe"] == 50 and c["nfe_mean_after_calibration"] == pytest.approx(32 / 3)
    assert (c["nfe_min"], c["nfe_max"], c["learned"]) == (10, 50, "something")
    assert c["ms_per_eval"] == pytest.approx(1000 * 2.0 / 82)
    assert c["policy_options"]["k"] == 1 and isinstance(c["policy_options"]["obj"], str)  # JSON-able


def test_comparison_psnr_and_identical_outputs():
    ref = torch.zeros(2, 4)
    x = ref + 0.1
    out = comparison(x, ref, 2.0, speedup_nfe=2.0, wall_seconds=1.0, reference_wall_seconds=None)
    assert out["psnr_db"] == pytest.approx(10 * math.log10(4 / 0.01)) and out["max_abs_error"] == pytest.approx(0.1)
    assert out["speedup_wall_note"].startswith("not measured")
    same = comparison(ref, ref, 2.0, speedup_nfe=1.0, wall_seconds=1.0, reference_wall_seconds=1.0)
    assert same["psnr_db"] is None  # identical: +inf is not JSON
    json.loads(json_text(same))


def test_consistent_interleaved_timings_give_a_result():
    # every timing: 2x fewer evaluations, 1.9x less wall time -> efficiency 0.95
    timings = [(1.9, 1.0, 100, 50, 1), (3.8, 2.0, 200, 100, 1), (0.95, 0.5, 50, 25, 1)]
    out = comparison(torch.ones(3), torch.ones(3), 2.0, speedup_nfe=2.0, wall_seconds=3.5,
                     reference_wall_seconds=6.65, timings=timings)
    assert out["speedup_wall"] == pytest.approx(1.9)
    assert out["wall_efficiency_median"] == pytest.approx(0.95) and out["wall_timings"] == 3
    assert out["wall_efficiency_spread"] == pytest.approx([0.95, 0.95])
    assert "speedup_wall_note" not in out


def test_disagreeing_timings_or_a_wall_above_the_nfe_bound_are_flagged_noisy():
    spread = [(1.9, 1.0, 100, 50, 1), (1.0, 1.0, 100, 50, 1), (1.9, 1.0, 100, 50, 1)]  # one ran under load
    out = comparison(torch.ones(3), torch.ones(3), 2.0, speedup_nfe=2.0, wall_seconds=3.0,
                     reference_wall_seconds=4.8, timings=spread)
    assert out["speedup_wall_note"].startswith("noisy: 3 timings of the same batch disagree")
    # different batches may differ for real (one calibrates a row alone): reported, not flagged
    batches = [(1.9, 1.0, 100, 50, 1), (1.0, 1.0, 100, 50, 2), (1.9, 1.0, 100, 50, 3)]
    apart = comparison(torch.ones(3), torch.ones(3), 2.0, speedup_nfe=2.0, wall_seconds=3.0,
                       reference_wall_seconds=4.8, timings=batches)
    assert "speedup_wall_note" not in apart and apart["wall_efficiency_spread"] == pytest.approx([0.5, 0.95])
    above = comparison(torch.ones(3), torch.ones(3), 2.0, speedup_nfe=2.0, wall_seconds=1.0,
                       reference_wall_seconds=2.5)
    assert above["speedup_wall_note"].startswith("noisy: above the NFE speed-up")
    one = comparison(torch.ones(3), torch.ones(3), 2.0, speedup_nfe=2.0, wall_seconds=1.0,
                     reference_wall_seconds=0.4, timings=[(0.4, 1.0, 100, 50, 1)])  # 0.4x: one timing
    assert one["speedup_wall_note"].startswith("noisy: one timing only") and one["speedup_wall"] == pytest.approx(0.4)


def test_a_short_run_is_timed_several_times_interleaved(tmp_path):
    from click.testing import CliRunner

    from fastflow.cli import cli

    result = CliRunner().invoke(cli, ["run", "--model", "gmm", "--samples", "4", "--steps", "12", "--policy", "fixed",
                                      "--no-state", "--json", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    s = json.loads(result.output)
    assert s["wall_timings"] == 3  # one batch, timed twice more (reference and policy interleaved)
    lo, hi = s["wall_efficiency_spread"]
    assert lo <= s["wall_efficiency_median"] <= hi
    assert s["nfe_per_sample"] == [6] * 4  # steps 0, 1, 4, 7, 10, 11; the repetitions are not samples

"""scripts/gpu_speed.py, the prepared GPU measurement of issue 18, runs its code paths on
a CPU: every variant timed, whole samples under none/fixed/ucb with exact NFE, files written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_speed_script_on_cpu(tmp_path, one_torch_thread):
    spec = importlib.util.spec_from_file_location("gpu_speed", ROOT / "scripts" / "gpu_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--device", "cpu", "--no-compile", "--quick", "--batch", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_speed.json").read_text())
    assert [r["variant"] for r in data["per_eval"]] == ["torch eager fp32", "torch eager bf16"]
    assert all(r["rows"] == 4 for r in data["per_eval"])  # guidance doubles the batch of 2
    bf16 = next(r for r in data["per_eval"] if r["variant"] == "torch eager bf16")
    assert 0 < bf16["max_abs_err_vs_fp32"] < 0.5
    nfe = {r["policy"]: r["nfe"] for r in data["samples"]}
    assert nfe["none"] == 8 and nfe["fixed"] == 4  # 8 steps: fixed computes 0, 1, 4, 7
    # a cold batch calibrating on both rows: every step and the probes on each
    import fastflow
    from fastflow import sensitivity

    full = 8 + len(sensitivity.probe_steps(8, fastflow.get_policy("ucb").run_lengths(8)))
    assert nfe["ucb cold (calibrate=2)"] == full and nfe["ucb cold (calibrate=1)"] < full
    assert all(r["syncs_per_sample"] is None for r in data["samples"])  # counted on CUDA only
    assert "| torch eager bf16 | fixed | 4.00 |" in (tmp_path / "gpu_speed.md").read_text()

"""The example plugin in plugins/fastflow-egreedy, installed as a third party would."""

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution

import pytest

try:
    distribution("fastflow-egreedy")
    INSTALLED = True
except PackageNotFoundError:
    INSTALLED = False

pytestmark = pytest.mark.skipif(
    not INSTALLED and not os.environ.get("CI"),
    reason="example plugin not installed: pip install ./plugins/fastflow-egreedy",
)
EXE = shutil.which("fastflow") or os.path.join(os.path.dirname(sys.executable), "fastflow")


def fastflow_cmd(*args, env=None):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})))


def test_installed_in_ci():
    assert INSTALLED, "CI must pip install ./plugins/fastflow-egreedy"


def test_listed_by_fastflow_plugins():
    proc = fastflow_cmd("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    row = rows["egreedy"]
    assert row["distribution"] == "fastflow-egreedy" and row["version"] == "0.1.0"
    assert row["registers"]["policies"] == ["egreedy"] and "error" not in row


@pytest.mark.slow
def test_runs_end_to_end(tmp_path):
    proc = fastflow_cmd("run", "--model", "gmm", "--policy", "egreedy", "--option", "epsilon=0.2",
                        "--samples", "32", "--batch-size", "4", "--steps", "30", "--json", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["policy"] == "egreedy" and s["nfe_mean"] < 30 and s["psnr_db"] > 20


def test_blocked_by_fastflow_load_plugins(tmp_path):
    proc = fastflow_cmd("run", "--model", "gmm", "--policy", "egreedy", "--samples", "2", "--out", str(tmp_path),
                        env={"FASTFLOW_LOAD_PLUGINS": ""})
    assert proc.returncode == 2 and "unknown policy 'egreedy'" in proc.stderr

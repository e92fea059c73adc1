"""The wheel installs everything under the fastflow namespace and nothing generic."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow  # exports, wheels, subprocesses: seconds each

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("fastflow-*.whl")
    return path


def test_wheel_installs_only_the_fastflow_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"fastflow", next(t for t in tops if t.endswith(".dist-info"))}
    for generic in ("backends/", "policies/", "plugins/", "tests/", "docs/"):
        assert not any(n.startswith(generic) for n in names), generic
    for module in ("fastflow/backends/torch_backend.py", "fastflow/policies/ucb.py",
                   "fastflow/policies/fixed.py", "fastflow/hookspecs.py", "fastflow/models/analytic.py"):
        assert module in names
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("dist-info/entry_points.txt"))).decode()
    assert "fastflow = fastflow.cli:main" in entry_points


def test_every_mapped_package_has_an_init():
    for folder in ("fastflow", "backends", "policies", "fastflow/models"):
        assert (ROOT / folder / "__init__.py").exists(), folder


def test_imported_from_where_the_install_put_it():
    """With FASTFLOW_EXPECT_INSTALLED (CI's non-editable run), fastflow must come from
    site-packages, not from the source tree."""
    import os

    import fastflow
    import fastflow.policies.ucb

    here = Path(fastflow.policies.ucb.__file__).resolve()
    if os.environ.get("FASTFLOW_EXPECT_INSTALLED"):
        assert "site-packages" in str(here) and here.parent.parent.name == "fastflow", here
    else:  # editable: fastflow.policies maps onto the repository's policies/ folder
        assert here == ROOT / "policies" / "ucb.py"

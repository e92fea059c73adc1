import os

import pytest

import fastflow.plugins


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    """Every test sees a freshly built plugin manager (environment changes take effect)."""
    fastflow.plugins.reset_plugins()
    yield
    fastflow.plugins.reset_plugins()


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """`fastflow run` keeps learning in the user cache: each test gets its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread (and leave the other core to the rest)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def host_reads(monkeypatch):
    """Counts tensor reads on the host (item, tolist, bool, float, int): on a GPU each is a
    device→host sync, so the CPU count stands in for the syncs a loop would make."""
    import torch

    counter = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, **k):
            counter["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return counter


@pytest.fixture
def no_entry_points(monkeypatch):
    """Only the built-in plugins: installed third-party plugins are blocked."""
    monkeypatch.setenv("FASTFLOW_LOAD_PLUGINS", "")


def calibration_nfe(policy, steps: int) -> int:
    """Evaluations of a calibration row: every step, and the sensitivity probes."""
    from fastflow.sensitivity import probe_steps

    return steps + len(probe_steps(steps, policy.run_lengths(steps)))


def linear_velocity(a, b):
    """v(x, t) = a + b·t, independent of x: the extrapolation of FastFlow is exact for it."""

    def v(x, t):
        return a + b * t.view(-1, *([1] * (x.dim() - 1)))

    return v


collect_ignore = []
if os.environ.get("FASTFLOW_SKIP_PACKAGING"):
    collect_ignore.append("test_packaging.py")

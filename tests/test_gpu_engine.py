"""The engine on a GPU: no device→host synchronisation inside the per-step loop.

Skips without CUDA; scripts/gpu-check.sh runs it on a GPU machine.
"""

import warnings

import pytest

torch = pytest.importorskip("torch")

import fastflow  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def count_syncs(fn):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


@pytest.mark.parametrize("policy,options", [("none", {}), ("fixed", {"skip": 2}), ("ucb-paper", {"mu": 1e-3}),
                                            ("planned", {"nfe": 12})])
def test_syncs_per_sample_do_not_grow_with_the_steps(policy, options):
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64)).cuda()
    model = lambda x, t: net(x) * t.view(-1, 1)  # noqa: E731
    pol = fastflow.get_policy(policy, **options)
    x = torch.randn(8, 64, device="cuda")
    counts = {}
    for steps in (20, 60):
        pol = fastflow.get_policy(policy, **options)
        fastflow.sample(model, x, steps=steps, policy=pol)  # calibration sample for planned
        counts[steps] = count_syncs(lambda: fastflow.sample(model, x, steps=steps, policy=pol))
    assert counts[20] == counts[60], counts  # a constant number per sample, none per step
    assert counts[60] <= 4, counts


def test_cuda_graph_outputs_survive_the_next_replay():
    """torch-compile on CUDA replays CUDA graphs into the same memory; the sampler keeps
    the last two velocities, so a run must equal eager (each output is its own copy)."""
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("inductor needs a C++ compiler (g++)")
    net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.SiLU(), torch.nn.Linear(32, 32)).cuda().eval()
    x = torch.randn(4, 32, device="cuda")
    eager = fastflow.sample(lambda x, t: net(x) * t.view(-1, 1), x, steps=12, policy="fixed")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            return self.net(x) * t.view(-1, 1)

    be = fastflow.get_backend("torch-compile")
    graphs = fastflow.sample(Net(), x, steps=12, policy="fixed", backend=be)
    assert graphs.nfe == eager.nfe
    assert torch.allclose(graphs.x, eager.x, atol=1e-4, rtol=1e-4)

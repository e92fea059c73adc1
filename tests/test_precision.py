"""The network in bf16 behind the sampler's float32 state (``fastflow run --dtype bf16``):
what goes in and comes out is float32, the weights are not, the rounding is the only
difference, and the command line refuses the combinations it cannot honour."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

import fastflow  # noqa: E402
from fastflow.precision import at_precision, torch_dtype  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(4, 4, generator=g) * 0.5)
        self.seen = []

    def forward(self, x, t, scale=None, extra=()):
        self.seen.append((x.dtype, t.dtype, None if scale is None else scale.dtype,
                          [e.dtype for e in extra], ))
        y = torch.tanh(x @ self.w) * t.view(-1, 1)
        return y if scale is None else y * scale.view(-1, 1)


def test_inputs_and_weights_are_cast_outputs_come_back_in_the_callers_dtype():
    ref = Net()
    net = at_precision(Net(), "bf16")
    x, t = torch.randn(3, 4), torch.rand(3)
    scale, label = torch.full((3,), 2.0), torch.arange(3)
    out = net(x, t, scale=scale, extra=[label, torch.ones(3)])
    assert out.dtype == torch.float32 and net.inner.w.dtype == torch.bfloat16
    assert net.inner.seen[-1] == (torch.bfloat16, torch.bfloat16, torch.bfloat16, [torch.int64, torch.bfloat16])
    want = ref(x, t, scale=scale)
    err = float((out - want).abs().max())
    assert 0 < err < 0.05  # bf16 rounding: not exact, and not more than a few ulps of 2


def test_fp32_is_the_module_itself_and_names_are_checked():
    net = Net()
    assert at_precision(net, "fp32") is net and at_precision(net, torch.float32) is net
    assert torch_dtype("BF16") is torch.bfloat16 and torch_dtype("float16") is torch.float16
    with pytest.raises(fastflow.OptionError, match="dtype must be one of fp32, bf16 or fp16, got 'int8'"):
        torch_dtype("int8")
    with pytest.raises(fastflow.OptionError, match="needs an nn.Module"):
        at_precision(lambda x, t: -x, "bf16")


def test_sampling_keeps_the_state_in_float32_and_counts_the_same_evaluations():
    noise = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    full = fastflow.sample(Net(), noise, steps=12, policy="fixed")
    low = fastflow.sample(at_precision(Net(), "bf16"), noise, steps=12, policy="fixed")
    assert low.x.dtype == torch.float32 and low.nfe == full.nfe < 12  # the same fixed schedule
    assert 0 < float((low.x - full.x).abs().max()) < 0.05


def _run(tmp_path, *args):
    from click.testing import CliRunner

    from fastflow.cli import cli

    return CliRunner().invoke(cli, ["run", "--samples", "2", "--steps", "6", "--batch-size", "2", "--no-state",
                                    "--out", str(tmp_path / "o"), *args])


@pytest.mark.slow
def test_cli_runs_the_glyph_network_in_bf16_beside_a_bf16_reference(tmp_path):
    runs = {}
    for dtype in ("fp32", "bf16"):
        res = _run(tmp_path, "--model", "glyphs", "--policy", "fixed", "--dtype", dtype, "--json")
        assert res.exit_code == 0, res.output
        runs[dtype] = json.loads(res.output)
    s = runs["bf16"]
    assert s["dtype"] == "bf16" and runs["fp32"]["dtype"] == "fp32" and s["backend"] == "torch"
    assert s["nfe_mean"] == runs["fp32"]["nfe_mean"] < 6  # the same schedule
    # its reference is the bf16 network's own (keyed apart): fidelity measures the skipping alone
    assert s["psnr_db"] != runs["fp32"]["psnr_db"]
    table = _run(tmp_path, "--model", "glyphs", "--policy", "fixed", "--dtype", "bf16")
    assert "torch (bf16)" in table.output


@pytest.mark.parametrize("args,needle", [
    (["--model", "gmm", "--dtype", "bf16"], "model 'gmm' is not one"),
    (["--model", "gmm", "--dtype", "bf16", "--backend", "onnxruntime"], "--backend torch or torch-compile"),
])
def test_cli_refuses_what_it_cannot_run_in_bf16_before_sampling(tmp_path, args, needle):
    res = _run(tmp_path, *args)
    assert res.exit_code == 2 and needle in res.output, res.output
    assert not (tmp_path / "o").exists()

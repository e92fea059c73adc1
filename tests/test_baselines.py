"""diffusers caching baselines (fastflow.baselines) on a tiny random-init GlyphFlow (CPU, fast)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import fastflow  # noqa: E402
from fastflow import baselines  # noqa: E402
from fastflow.demo.model import TINY_CONFIG, GlyphFlow  # noqa: E402
from fastflow.errors import OptionError  # noqa: E402

NULL = 36
STEPS = 8
NEVER_SKIP = [
    ("fbcache", {"threshold": 0.0}),
    ("taylorseer", {"cache_interval": 1, "disable_cache_before_step": 1}),
    ("taylorseer", {"cache_interval": 1, "disable_cache_before_step": 1, "scope": "blocks"}),
    ("magcache", {"max_skip_steps": 0}),
]
AGGRESSIVE = [
    ("fbcache", {"threshold": 0.5}),
    ("taylorseer", {"cache_interval": 3, "max_order": 1, "disable_cache_before_step": 2}),
    ("taylorseer", {"cache_interval": 3, "max_order": 2, "disable_cache_before_step": 2, "scope": "blocks"}),
    ("taylorseer", {"cache_interval": 3, "disable_cache_before_step": 2, "scope": "lite"}),
    ("magcache", {"threshold": 0.5, "max_skip_steps": 4, "retention_ratio": 0.1}),
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GlyphFlow(TINY_CONFIG).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 3, 32, 32, generator=g)
    calib = (torch.randn(2, 3, 32, 32, generator=g), torch.tensor([5, 20]))
    return noise, torch.tensor([3, 17]), calib


def _reference(model, noise, labels, guidance):
    kw = {} if guidance is None else {"guidance": guidance, "uncond": {"label": torch.full_like(labels, NULL)}}
    return fastflow.sample(model, noise, steps=STEPS, policy="none", label=labels, **kw)


def _run(model, batch, method, setting, guidance=3.0, calibration=None):
    noise, labels, calib = batch
    return baselines.run_cached(model, noise, labels, method=method, setting=setting, steps=STEPS,
                                guidance=guidance, null_label=NULL, calibration=calibration or calib)


@pytest.mark.parametrize("guidance", [3.0, None])
@pytest.mark.parametrize("method,setting", NEVER_SKIP)
def test_never_skipping_reproduces_plain_euler(model, batch, method, setting, guidance):
    noise, labels, _ = batch
    ref = _reference(model, noise, labels, guidance)
    out = _run(model, batch, method, setting, guidance)
    assert torch.equal(out.x, ref.x)
    assert out.nfe == STEPS and out.calls == STEPS
    assert out.info["block_runs"] == [STEPS] * len(out.info["block_runs"])


@pytest.mark.parametrize("method,setting", AGGRESSIVE)
def test_aggressive_settings_skip_work(model, batch, method, setting):
    out = _run(model, batch, method, setting)
    assert out.x.shape == batch[0].shape and torch.isfinite(out.x).all()
    assert out.calls == STEPS
    assert 0 < out.nfe < STEPS


def _model_state(model):
    return {name: sorted(m.__dict__) for name, m in model.named_modules()}


def test_hooks_are_removed(model, batch):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    t, lab = torch.tensor([0.9, 0.5, 0.1]), torch.tensor([1, 2, NULL])
    with torch.inference_mode():
        before = model(x, t, label=lab)
    state = _model_state(model)
    for method, setting in AGGRESSIVE:
        _run(model, batch, method, setting)
        with torch.inference_mode():
            after = model(x, t, label=lab)
        assert torch.equal(before, after), method
        assert _model_state(model) == state, method
        assert not model.transformer.is_cache_enabled


def test_state_is_reset_between_runs(model, batch):
    a = _run(model, batch, *AGGRESSIVE[2])
    b = _run(model, batch, *AGGRESSIVE[2])
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe


def test_block_count_matches_an_independent_flop_count(model, batch):
    """The MAC counter agrees, block by block, with torch's FlopCounterMode (which counts
    the matmuls really dispatched), and a naive pre-hook on the blocks would not."""
    from torch.utils.flop_counter import FlopCounterMode

    noise, labels, _ = batch
    names = [n for n, _ in baselines.transformer_blocks(model.transformer)]

    def block_flops(fc):
        counts = fc.get_flop_counts()
        return [sum(v.values()) for n in names for k, v in counts.items() if k.endswith("transformer." + n)]

    with FlopCounterMode(display=False) as fc:
        _reference(model, noise, labels, 3.0)
    full = block_flops(fc)
    for method, setting in (AGGRESSIVE[0], AGGRESSIVE[1], AGGRESSIVE[4]):  # head kept / partial / all
        naive = []
        handles = [b.register_forward_pre_hook(lambda *a: naive.append(1))
                   for _, b in baselines.transformer_blocks(model.transformer)]
        try:
            with FlopCounterMode(display=False) as fc:
                out = _run(model, batch, method, setting, calibration=[1.0] * STEPS)
        finally:
            for h in handles:
                h.remove()
        # FlopCounterMode also saw run_cached's batch-1 reference pass: 1/4 of a (2x2)-row call
        measured = [f / fu * STEPS - 0.25 for f, fu in zip(block_flops(fc), full)]
        assert out.info["block_runs"] == pytest.approx(measured, abs=1e-6), method
        assert out.nfe == pytest.approx(sum(measured) / len(measured), abs=1e-6)
        assert len(naive) == len(names) * (STEPS + 1)  # fires for skipped blocks too


def test_magcache_calibration(model, batch):
    noise, labels, calib = batch
    ratios = baselines.calibrate_magcache(model, *calib, steps=STEPS, guidance=3.0, null_label=NULL)
    assert len(ratios) == STEPS and ratios[0] == 1.0
    assert all(0.1 < r < 10 for r in ratios)
    out = _run(model, batch, "magcache", {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2})
    assert out.info["mag_ratios"] == ratios and out.info["mag_ratios_len"] == STEPS
    assert torch.isfinite(out.x).all() and out.nfe <= STEPS
    # precomputed ratios give the same run
    again = _run(model, batch, "magcache", {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2},
                 calibration=ratios)
    assert torch.equal(out.x, again.x)


def test_bad_input(model, batch):
    with pytest.raises(OptionError, match="unknown caching method"):
        _run(model, batch, "teacache", {})
    with pytest.raises(OptionError, match="no setting"):
        _run(model, batch, "fbcache", {"treshold": 0.1})
    with pytest.raises(OptionError, match="calibration"):
        noise, labels, _ = batch
        baselines.run_cached(model, noise, labels, method="magcache", setting={}, steps=STEPS,
                             guidance=None, null_label=NULL)
    model.transformer.enable_cache(baselines.make_config("fbcache", {"threshold": 0.1}, steps=STEPS))
    try:
        with pytest.raises(OptionError, match="already has a cache"):
            _run(model, batch, "fbcache", {"threshold": 0.1})
    finally:
        model.transformer.disable_cache()


def test_default_settings():
    quick = baselines.default_settings(quick=True)
    full = baselines.default_settings(quick=False)
    # --quick runs one peer (under a minute in all): the strongest, at a setting of the full sweep
    assert [m for m, _, _ in quick] == ["taylorseer"]
    assert all(any(q[:2] == f[:2] for f in full) for q in quick)
    for method in baselines.METHODS:
        assert 3 <= sum(m == method for m, _, _ in full) <= 4
    for method, setting, label in quick + full:
        baselines.make_config(method, setting, steps=50, mag_ratios=[1.0] * 50)
        assert label
    assert len({label for _, _, label in full}) == len(full)

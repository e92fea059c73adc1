"""Outputs recorded before the skip controller was rewritten must not change by a bit.

``fixed``, ``ucb``, ``planned`` and ``threshold`` on the same seeds, through
``fastflow.sample`` (the analytic GMM and the shipped glyph model) and through
``fastflow.enable`` on the glyph pipeline: every sample's bytes (sha256), its NFE and the
computed-step pattern are compared with tests/data/recorded_outputs.json.

Bit-identical holds on one CPU: float kernels (oneDNN, SIMD width) differ between CPUs,
so the recording is kept per CPU model, kernel instruction set and torch version, and a machine with none skips
and says how to make one. Re-record (only for a change that is meant to alter outputs,
and say so in the commit; or on a new machine, from a commit whose outputs are trusted):
``python tests/test_recorded_outputs.py --record`` (it adds or replaces this machine's;
with ``--only`` it drops the other machines' recordings, which such a change makes stale).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

RECORD = Path(__file__).parent / "data" / "recorded_outputs.json"
POLICIES = {
    "fixed": {"skip": 2},
    "ucb": {},
    "planned": {"nfe": 12},
    "threshold": {"threshold": 0.15},
}


def _digest(x) -> str:
    return hashlib.sha256(x.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def _pattern(trace) -> str:
    return "".join("c" if s.computed else "." for s in trace)


def _engine_case(model_name: str, policy: str, steps: int, n: int) -> dict:
    import torch

    import fastflow
    from fastflow.models import resolve_model

    spec = resolve_model(model_name)
    model = spec.build()
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(n, *spec.shape, generator=g)
    labels = torch.arange(n) % spec.num_labels
    kw = {}
    if spec.default_guidance is not None:
        kw = {"guidance": spec.default_guidance, "uncond": {"label": torch.full_like(labels, spec.null_label)}}
    pol = fastflow.get_policy(policy, **POLICIES[policy])
    outs = []
    for _ in range(2):  # a second call: what the policy learned in the first steers it
        r = fastflow.sample(model, noise, steps=steps, policy=pol, label=labels, model_key=spec.key, **kw)
        outs.append({"sha256": [_digest(row) for row in r.x], "nfe_per_sample": list(r.nfe_per_sample),
                     "trace": _pattern(r.trace)})
    return {"calls": outs}


def _pipeline_case(policy: str, steps: int, n: int) -> dict:
    import torch

    import fastflow
    from fastflow.demo.pipeline import glyph_pipeline

    pipe = glyph_pipeline(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    handle = fastflow.enable(pipe, policy, **POLICIES[policy])
    outs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(99)
        x = pipe(labels=list(range(n)), num_inference_steps=steps, generator=g).images
        c = handle.last
        outs.append({"sha256": [_digest(row) for row in x], "nfe": c.nfe, "denoiser_calls": c.denoiser_calls,
                     "trace": _pattern(c.trace)})
    fastflow.disable(pipe)
    return {"calls": outs}


CASES = {
    **{f"engine/gmm/{p}": (lambda p=p: _engine_case("gmm", p, 20, 8)) for p in POLICIES},
    **{f"engine/glyphs/{p}": (lambda p=p: _engine_case("glyphs", p, 20, 3)) for p in POLICIES},
    **{f"pipeline/glyphs/{p}": (lambda p=p: _pipeline_case(p, 20, 3)) for p in POLICIES},
}


def machine() -> str:
    """The CPU model, the instruction set torch dispatches to (AVX2 and AVX-512 kernels
    of the same torch differ in bytes, even on CPUs of one name) and torch's version."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} / {torch.backends.cpu.get_cpu_capability()} / torch {torch.__version__}"


def _compute(name: str) -> dict:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order
    try:
        return CASES[name]()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_are_bit_identical_to_the_recording(name):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    by_machine = json.loads(RECORD.read_text())
    here = machine()
    if here not in by_machine:
        pytest.skip(f"outputs were recorded on {sorted(by_machine)}, not on this machine ({here}); bytes differ "
                    f"between CPUs: run python tests/{Path(__file__).name} --record from a trusted commit")
    recorded = by_machine[here]
    assert name in recorded, f"{name} has no recording; run python {Path(__file__).name} --record"
    assert _compute(name) == recorded[name]


if __name__ == "__main__" and "--record" in sys.argv:
    import os
    import tempfile

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp()  # no learned state from this machine's cache
    RECORD.parent.mkdir(exist_ok=True)
    by_machine = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    if "--only" in sys.argv:  # a change meant to alter outputs: other machines' recordings are stale
        by_machine = {}
    by_machine[machine()] = {n: _compute(n) for n in sorted(CASES)}
    RECORD.write_text(json.dumps(by_machine, indent=1) + "\n")
    print(f"recorded {len(CASES)} cases for {machine()} in {RECORD}")

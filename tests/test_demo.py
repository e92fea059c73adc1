"""Tests of the embedded demo model, its data generator and the evaluator (fast, CPU)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastflow
from fastflow.demo import DEFAULT_CLASSIFIER_PATH, DEFAULT_WEIGHTS_DIR, NULL_LABEL, DemoModelError
from fastflow.demo import glyphs, metrics

# -- data ----------------------------------------------------------------------------------------------


def test_render_is_deterministic_by_seed():
    labels = [0, 10, 35, 24, 7]
    a = glyphs.render_batch(labels, seed=123)
    b = glyphs.render_batch(labels, seed=123)
    c = glyphs.render_batch(labels, seed=124)
    assert a.dtype == np.uint8 and a.shape == (5, 32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # image k depends only on (seed, start_index + k): chunking does not change the data
    part = glyphs.render_batch(labels[2:], seed=123, start_index=2)
    assert np.array_equal(a[2:], part)


def test_make_dataset_is_balanced_and_deterministic():
    x1, y1 = glyphs.make_dataset(72, seed=3)
    x2, y2 = glyphs.make_dataset(72, seed=3)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert sorted(np.bincount(y1, minlength=36).tolist()) == [2] * 36


def test_classes_are_distinct_and_contrasted():
    # same seed and index (same colours, pose, background): only the glyph differs
    imgs = np.stack([glyphs.render_batch([lab], seed=7)[0] for lab in range(36)]).astype(np.int16)
    flat = imgs.reshape(36, -1)
    diffs = np.abs(flat[:, None, :] - flat[None, :, :]).mean(-1)
    off_diag = diffs[~np.eye(36, dtype=bool)]
    assert off_diag.min() > 1.0  # every pair of classes renders differently
    # the glyph stands out of its background
    x, _ = glyphs.make_dataset(36, seed=11)
    lum = x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert (lum.reshape(36, -1).std(1) > 15).all()


def test_labels_and_chars():
    assert glyphs.CHARS[glyphs.char_to_label("q")] == "Q"
    assert glyphs.label_to_char(9) == "9"
    with pytest.raises(ValueError):
        glyphs.render_batch([36], seed=0)


def test_package_import_does_not_load_torch():
    code = ("import sys, fastflow; before = 'torch' in sys.modules; import fastflow.demo; "
            "assert ('torch' in sys.modules) == before, 'fastflow.demo imported torch'; "
            "assert 'diffusers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- metrics ---------------------------------------------------------------------------------------


def test_psnr_analytic():
    a = torch.zeros(4, 3, 32, 32)
    assert math.isinf(metrics.psnr(a, a))
    b = a + 0.1  # mse 0.01 -> 10 log10(2^2 / 0.01)
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-6)
    per = metrics.psnr(a, torch.cat([b[:2], a[:2] + 0.2]), reduction="none")
    assert per.shape == (4,)
    assert per[2].item() == pytest.approx(10 * math.log10(4 / 0.04), abs=1e-4)
    g = torch.Generator().manual_seed(0)
    noisy = a + 0.05 * torch.randn(a.shape, generator=g)
    assert metrics.psnr(a, noisy) == pytest.approx(10 * math.log10(4 / 0.0025), abs=0.1)


def test_ssim_analytic():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-9)
    assert metrics.ssim(x, x, reduction="none").shape == (3,)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    s = metrics.ssim(x, noisy)
    assert 0.0 < s < 0.9
    y = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    assert abs(metrics.ssim(x, y)) < 0.1  # independent images: no shared structure
    n = 0.3 * torch.randn(2, 3, 32, 32, generator=g)
    assert metrics.ssim(0.2 + n, 0.2 - n) < -0.5  # same local means, anti-correlated structure
    # constant images: SSIM reduces to the luminance term (2 mu_a mu_b + c1) / (mu_a^2 + mu_b^2 + c1)
    a, b = torch.full((1, 3, 16, 16), 0.5), torch.full((1, 3, 16, 16), -0.5)
    c1 = (0.01 * 2) ** 2
    assert metrics.ssim(a, b) == pytest.approx((2 * -0.25 + c1) / (0.5 + c1), abs=1e-9)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 16))
    assert metrics.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)
    shift = np.zeros(16)
    shift[0] = 3.0
    assert metrics.frechet_distance(f, f + shift) == pytest.approx(9.0, abs=1e-6)
    # rank-deficient covariances (fewer samples than dimensions) stay finite and non-negative
    d = metrics.frechet_distance(rng.normal(size=(8, 32)), rng.normal(size=(8, 32)))
    assert np.isfinite(d) and d >= 0


def test_image_grid(tmp_path):
    imgs = torch.rand(5, 3, 32, 32) * 2 - 1
    grid = metrics.image_grid(imgs, nrow=3, padding=2)
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3) and grid.dtype == np.uint8
    path = metrics.save_image_grid(imgs, str(tmp_path / "g.png"), nrow=3, labels=[0, 1, 2, 10, 35])
    from PIL import Image

    assert Image.open(path).size[0] == 3 * (64 + 2) + 2


# -- classifier ----------------------------------------------------------------------------------


def test_shipped_classifier_accuracy():
    from fastflow.demo.classifier import load_classifier

    clf = load_classifier()
    # 360 held-out glyphs from a seed used neither for training nor for validation
    x, y = glyphs.make_dataset(360, glyphs.EVAL_SEED + 99)
    acc = metrics.class_accuracy(glyphs.to_tensor(x), y, classifier=clf)
    assert acc >= 0.98
    feats = metrics.features(glyphs.to_tensor(x[:8]), classifier=clf)
    assert feats.shape == (8, 256)


def test_classifier_load_errors(tmp_path):
    from fastflow.demo.classifier import load_classifier

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(DemoModelError, match="nope.safetensors"):
        load_classifier(str(missing))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DemoModelError, match="bad.safetensors"):
        load_classifier(str(bad))


# -- flow model ----------------------------------------------------------------------------------

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from fastflow.demo.train import train_glyph_flow

    out = tmp_path_factory.mktemp("tiny") / "glyph-flow"
    train_glyph_flow(str(out), tiny=True, steps=2, progress=False, log_every=0)
    return out


def test_tiny_training_produces_loadable_model(tiny_dir):
    from fastflow.demo.evaluate import sample_euler
    from fastflow.demo.model import load_glyph_flow

    cfg = json.loads((tiny_dir / "glyph_flow.json").read_text())
    assert cfg["format"] == "fastflow-glyph-flow" and cfg["training"]["completed"][-1]["steps"] == 2
    assert (tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    model = load_glyph_flow(str(tiny_dir))
    assert model.dtype == torch.float32 and not model.training
    x = torch.randn(3, 3, 32, 32)
    v = model(x, torch.tensor([1.0, 0.5, 0.0]), label=torch.tensor([0, 35, NULL_LABEL]))
    assert v.shape == (3, 3, 32, 32) and torch.isfinite(v).all()
    v2 = model(x, 0.5, label=torch.tensor([1, 2, 3]))  # scalar t broadcasts
    assert v2.shape == x.shape
    out = sample_euler(model, [0, 1], seed=0, steps=2, guidance=2.0)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    # the evaluator's sampler is the engine's Euler with every step computed, clamped to [-1, 1]
    from fastflow.demo.evaluate import initial_noise

    lab = torch.tensor([0, 1])
    ref = fastflow.sample(model, initial_noise(2, 0, 32), steps=2, policy="none", label=lab, guidance=2.0,
                          uncond={"label": torch.full_like(lab, NULL_LABEL)})
    torch.testing.assert_close(out, ref.x.clamp(-1, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_staged_recipe_resumes_exactly(tmp_path, monkeypatch):
    """Running stage 2 from a saved stage-1 model equals running both stages in one process."""
    from fastflow.demo import train
    from fastflow.demo.model import TINY_CONFIG, load_glyph_flow

    two = [{"steps": 2, "lr": 1e-3, "warmup_steps": 1}, {"steps": 2, "lr": 5e-4, "warmup_steps": 1}]
    kw = dict(config=TINY_CONFIG, batch_size=4, num_data=16, progress=False, log_every=0, amp=False, threads=1)
    monkeypatch.setitem(train.RECIPE, "stages", two)
    train.train_glyph_flow(str(tmp_path / "full"), **kw)
    monkeypatch.setitem(train.RECIPE, "stages", two[:1])
    train.train_glyph_flow(str(tmp_path / "s1"), **kw)
    monkeypatch.setitem(train.RECIPE, "stages", two)
    train.train_glyph_flow(str(tmp_path / "s2"), init_from=str(tmp_path / "s1"), start_stage=2, **kw)
    a = load_glyph_flow(str(tmp_path / "full")).state_dict()
    b = load_glyph_flow(str(tmp_path / "s2")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    done = json.loads((tmp_path / "s2" / "glyph_flow.json").read_text())["training"]["completed"]
    assert [h["stage"] for h in done] == [1, 2]


def test_time_sampling_laws():
    from fastflow.demo.train import parse_time_sampling

    g = torch.Generator().manual_seed(0)
    u = parse_time_sampling("uniform")(20000, g)
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.01
    t = parse_time_sampling("logit-normal(2, 0.5)")(20000, g)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 2.0) < 0.02 and abs(logit.std().item() - 0.5) < 0.02
    # the recipe's default law is the plain sigmoid of a standard normal, bit for bit
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(parse_time_sampling("logit-normal(0, 1)")(64, g1), torch.sigmoid(torch.randn(64, generator=g2)))
    with pytest.raises(ValueError, match="unknown time sampling"):
        parse_time_sampling("beta(2, 2)")


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    from fastflow.demo.model import TINY_CONFIG, GlyphFlow
    from fastflow.demo.train import make_optimizers

    model = GlyphFlow(TINY_CONFIG)
    muon, adam = make_optimizers(model, "muon", 1e-3)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adam, torch.optim.AdamW)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adam = {id(p) for g in adam.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert not in_muon & in_adam and in_muon | in_adam == set(names)  # every parameter in exactly one
    assert in_muon and all("transformer_blocks." in names[i] and p.ndim == 2
                           for g in muon.param_groups for p in g["params"] for i in [id(p)])
    adam_names = {names[i] for i in in_adam}
    assert {"transformer.x_embedder.weight", "transformer.proj_out.weight"} <= adam_names
    assert any(n.startswith("label_embed") for n in adam_names)
    (only,) = make_optimizers(model, "adamw", 1e-3)
    assert isinstance(only, torch.optim.AdamW) and len(only.param_groups[0]["params"]) == len(names)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        make_optimizers(model, "sgd", 1e-3)


def test_muon_training_runs_and_is_recorded(tmp_path):
    from fastflow.demo.train import train_glyph_flow

    out = tmp_path / "m"
    train_glyph_flow(str(out), tiny=True, steps=3, optimizer="muon", progress=False, log_every=1)
    training = json.loads((out / "glyph_flow.json").read_text())["training"]
    assert training["optimizer"] == "muon" and training["completed"][-1]["steps"] == 3
    with pytest.raises(ValueError, match="unknown optimizer"):
        train_glyph_flow(str(tmp_path / "x"), tiny=True, steps=1, optimizer="lion", progress=False)


def test_diverging_training_stops_with_a_clear_error(tmp_path):
    from fastflow.demo.train import train_glyph_flow

    with pytest.raises(FloatingPointError, match="training diverged.*--lr"):
        train_glyph_flow(str(tmp_path / "m"), tiny=True, steps=3, lr=float("inf"), progress=False, log_every=1)


@pytest.mark.slow
def test_parallel_rendering_is_identical():
    a, la = glyphs.make_dataset(4200, 7)
    b, lb = glyphs.make_dataset(4200, 7, workers=2)
    assert np.array_equal(a, b) and np.array_equal(la, lb)


def test_patchify_roundtrip():
    from fastflow.demo.model import TINY_CONFIG, GlyphFlow

    m = GlyphFlow(TINY_CONFIG)
    x = torch.randn(2, 3, 32, 32)
    tok = m.patchify(x)
    assert tok.shape == (2, 64, 48)
    assert torch.equal(m.unpatchify(tok), x)
    assert torch.equal(tok[0, 1], x[0, :, 0:4, 4:8].reshape(-1))  # token 1 = row 0, column 1


def test_load_errors_name_the_path(tiny_dir, tmp_path):
    from fastflow.demo.model import load_glyph_flow

    missing = tmp_path / "does-not-exist"
    with pytest.raises(DemoModelError, match="does-not-exist"):
        load_glyph_flow(str(missing))

    def broken(name):
        d = tmp_path / name
        shutil.copytree(tiny_dir, d)
        return d

    d = broken("no-config")
    os.remove(d / "glyph_flow.json")
    with pytest.raises(DemoModelError, match="no-config"):
        load_glyph_flow(str(d))

    d = broken("bad-json")
    (d / "glyph_flow.json").write_text("{not json")
    with pytest.raises(DemoModelError, match="bad-json"):
        load_glyph_flow(str(d))

    d = broken("no-embed")
    os.remove(d / "label_embedding.safetensors")
    with pytest.raises(DemoModelError, match="label_embedding"):
        load_glyph_flow(str(d))

    d = broken("truncated")
    w = d / "transformer" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(DemoModelError, match="truncated"):
        load_glyph_flow(str(d))

    d = broken("bad-embed")
    (d / "label_embedding.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(DemoModelError, match="bad-embed"):
        load_glyph_flow(str(d))


def _dir_size(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def test_embedded_weights_ship_and_load():
    from fastflow.demo.model import load_glyph_flow

    assert _dir_size(DEFAULT_WEIGHTS_DIR) <= 20 * 1024 * 1024
    assert os.path.getsize(DEFAULT_CLASSIFIER_PATH) <= 5 * 1024 * 1024
    model = load_glyph_flow()
    assert model.config["null_label"] == NULL_LABEL and model.config["num_classes"] == 36
    with torch.no_grad():
        v = model(torch.randn(2, 3, 32, 32), torch.tensor([0.9, 0.1]), label=torch.tensor([5, NULL_LABEL]))
    assert v.shape == (2, 3, 32, 32) and torch.isfinite(v).all()


@pytest.mark.slow
def test_embedded_model_generates_recognisable_glyphs():
    """A cheap quality regression test: 36 samples (one per class), 12 Euler steps with
    guidance. The shipped weights score 0.81 / 0.69 / 0.61 here with seeds 0 / 1 / 2
    (chance: 0.028; the previous weights scored 0.56 / 0.61 / 0.56, the ones before 0.36);
    the issue's bar of 0.90 at 50 steps is not reached yet (docs/demo-model.md)."""
    from fastflow.demo.evaluate import sample_euler
    from fastflow.demo.model import load_glyph_flow

    model = load_glyph_flow()
    labels = torch.arange(36)
    imgs = sample_euler(model, labels, seed=0, steps=12)
    assert metrics.class_accuracy(imgs, labels) >= 0.6

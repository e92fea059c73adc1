"""The command line as a user types it."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from fastflow.cli import cli

JSON_KEYS = {"policy", "backend", "model", "steps", "samples", "nfe_mean", "nfe_full", "speedup_nfe",
             "wall_seconds", "ms_per_eval"}
COMPARE_KEYS = {"psnr_db", "max_abs_error", "reference_wall_seconds", "speedup_wall"}


def invoke(*args, **kw):
    return CliRunner().invoke(cli, list(args), **kw)


def run_json(tmp_path, *args):
    result = invoke("run", "--model", "gmm", "--samples", "8", "--steps", "20", "--out", str(tmp_path / "o"),
                    "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_help_teaches():
    result = invoke("--help")
    assert result.exit_code == 0 and "fastflow run --policy ucb" in result.output
    result = invoke("run", "--help")
    for opt in ("--model", "--backend", "--policy", "--option", "--steps", "--samples", "--batch-size",
                "--seed", "--guidance", "--state", "--out", "--json", "--compare / --no-compare"):
        assert opt in result.output


def test_json_contract(tmp_path):
    s = run_json(tmp_path, "--policy", "fixed", "--option", "skip=3")
    assert JSON_KEYS | COMPARE_KEYS <= set(s)
    assert s["policy"] == "fixed" and s["backend"] == "torch" and s["model"] == "gmm"
    assert s["nfe_full"] == 20 and s["nfe_mean"] == 2 + 5  # 0,1 then 5,9,13,17 and 19
    assert s["speedup_nfe"] == pytest.approx(20 / 7)
    assert s["psnr_db"] > 20 and s["max_abs_error"] > 0
    assert (tmp_path / "o" / "samples.npy").exists() and (tmp_path / "o" / "summary.json").exists()


def test_no_compare_and_reference_identity(tmp_path):
    s = run_json(tmp_path, "--policy", "fixed", "--no-compare")
    assert not COMPARE_KEYS & set(s)
    s = run_json(tmp_path, "--policy", "none")
    assert s["nfe_mean"] == 20 and s["psnr_db"] is None and s["max_abs_error"] == 0  # identical


def test_table_output(tmp_path):
    result = invoke("run", "--model", "gmm", "--samples", "4", "--steps", "10", "--policy", "fixed",
                    "--out", str(tmp_path))
    assert result.exit_code == 0
    assert "NFE per sample" in result.output and "PSNR vs all steps" in result.output


def test_ucb_state_file_round_trip_through_the_cli(tmp_path):
    state = tmp_path / "ucb.json"
    first = run_json(tmp_path, "--policy", "ucb", "--state", str(state), "--batch-size", "2")
    # the first sample calibrates alone (all 20 steps and the sensitivity probes); every
    # other sample is accelerated
    import fastflow
    from conftest import calibration_nfe

    cal = calibration_nfe(fastflow.get_policy("ucb"), 20)
    assert first["calibration_samples"] == 1 and first["calibration_nfe"] == cal
    assert first["nfe_per_sample"][0] == cal and max(first["nfe_per_sample"][1:]) < 20
    assert first["nfe_mean"] == sum(first["nfe_per_sample"]) / len(first["nfe_per_sample"])
    assert first["nfe_mean_after_calibration"] == sum(first["nfe_per_sample"][1:]) / (len(first["nfe_per_sample"]) - 1)
    data = json.loads(state.read_text())
    assert data["samples"] == first["samples"] and data["scale"] > 0 and first["state"] == str(state)
    again = run_json(tmp_path, "--policy", "ucb", "--option", f"state={state}", "--batch-size", "2")
    assert again["calibration_samples"] == 0 and max(again["nfe_per_sample"]) < 20
    assert json.loads(state.read_text())["samples"] == 2 * first["samples"]  # --option state= saves too


def test_learning_is_kept_in_the_user_cache_unless_told_otherwise(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    first = run_json(tmp_path, "--policy", "ucb")
    assert first["state"].startswith(str(cache / "fastflow")) and first["calibration_samples"] == 1
    again = run_json(tmp_path, "--policy", "ucb")
    assert again["state"] == first["state"] and again["calibration_samples"] == 0
    other = run_json(tmp_path, "--policy", "ucb", "--option", "tolerance=0.01")  # other options, other file
    assert other["state"] != first["state"] and other["calibration_samples"] == 1
    fresh = run_json(tmp_path, "--policy", "ucb", "--no-state")
    assert "state" not in fresh and fresh["calibration_samples"] == 1
    assert len(list((cache / "fastflow").glob("ucb-*.json"))) == 2
    assert "state" not in run_json(tmp_path, "--policy", "fixed")  # keeps nothing, writes nothing


def test_the_human_summary_says_what_calibration_cost_and_what_was_learned(tmp_path):
    result = invoke("run", "--model", "gmm", "--steps", "20", "--samples", "8", "--batch-size", "4",
                    "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert "calibration" in result.output and "1 sample(s) with every step computed and 5 sensitivity probe(s) (25 evaluations)" in result.output
    assert "learned" in result.output and "greedy schedule computes" in result.output
    assert "(min " in result.output and "max 25)" in result.output  # the calibration sample


@pytest.mark.parametrize("args,needle", [
    (["--option", "tolerance=0.1", "--option", "tolerance=0.2"], "--option tolerance is given twice"),
    (["--state", "a.json", "--option", "state=b.json"], "disagree"),
    (["--state", "a.json", "--no-state"], "exclude each other"),
    (["--policy", "fixed", "--state", "a.json"], "keeps no learned state"),
    (["--policy", "ucb", "--option", "tolerance=inf"], "tolerance must be a finite number"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--shift", "inf"], "--shift must be a finite number"),
    (["--seed", str(2**64)], "--seed"),
    (["--strength", "0.5"], "--strength only applies with --edit"),
    (["--height", "64"], "--height applies to diffusers pipelines"),
])
def test_state_and_option_misuse_exits_2(tmp_path, args, needle):
    result = invoke("run", "--model", "gmm", "--steps", "10", "--samples", "2", "--out", str(tmp_path / "o"), *args)
    assert result.exit_code == 2 and needle in result.output, result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,needle", [
    (["--policy", "ubc"], "unknown policy 'ubc'. Did you mean 'ucb'? Known policies: fixed, none, planned, threshold, ucb, ucb-norm, ucb-paper"),
    (["--backend", "troch"], "unknown backend 'troch'. Did you mean 'torch'?"),
    (["--model", "gmn"], "unknown model 'gmn'. Did you mean 'gmm'?"),
    (["--policy", "fixed", "--option", "skip=-1"], "option skip must be an integer in [0, inf], got '-1'"),
    (["--policy", "fixed", "--option", "skip"], "--option expects KEY=VALUE"),
    (["--policy", "fixed", "--option", "speed=3"], "policy 'fixed' has no option speed"),
    (["--policy", "ucb", "--option", "gamma=fast"], "option gamma must be a number"),
    (["--label", "9"], "unknown --label '9'"),
    (["--policy", "fixed", "--state", "s.json"], "policy 'fixed' keeps no learned state"),
    (["--steps", "0"], "0 is not in the range 1<=x<=10000"),
    (["--policy", "ucb", "--option", "tolernce=0.01"], "has no option tolernce. Did you mean 'tolerance'?"),
    (["--policy", "ucb", "--option", "tolerance=-1"], "option tolerance must be a finite number > 0, got '-1'"),
    (["--policy", "ucb", "--option", "arms=a,b"], "option arms must be a comma-separated list of integers >= 0"),
    (["--edit", "any.png", "--label", "mode1"], "--edit takes an image, and model 'gmm' does not generate images"),
    (["--model", "./no-such-export"], "--model ./no-such-export: no such folder"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, no_entry_points, args, needle):
    result = invoke("run", "--model", "gmm", "--samples", "2", "--out", str(tmp_path), *args)
    assert result.exit_code == 2, result.output
    assert needle in result.output


def test_unreadable_state_file_exits_2_and_is_left_untouched(tmp_path):
    state = tmp_path / "broken.json"
    state.write_text("{oops")
    result = invoke("run", "--model", "gmm", "--samples", "2", "--state", str(state), "--out", str(tmp_path))
    assert result.exit_code == 2
    assert str(state) in result.output and "unreadable" in result.output
    assert state.read_text() == "{oops"


def test_plugins_command(tmp_path):
    result = invoke("plugins", "--json")
    rows = json.loads(result.output)
    ucb = next(r for r in rows if r["name"] == "fastflow.policies.ucb")
    assert ucb["registers"]["policies"] == ["ucb"] and ucb["distribution"] == "fastflow"
    paper = next(r for r in rows if r["name"] == "fastflow.policies.ucb_paper")
    assert paper["registers"]["policies"] == ["ucb-paper", "ucb-norm"]
    assert "ucb" in invoke("plugins").output and "arms = '0,1,2,3,4,6,8'" in invoke("policies").output


@pytest.mark.slow
def test_the_installed_console_script(tmp_path):
    """The `fastflow` executable, as a user types it, in a fresh process."""
    env = dict(os.environ, FASTFLOW_LOAD_PLUGINS="")
    exe = os.path.join(os.path.dirname(sys.executable), "fastflow")
    proc = subprocess.run([exe, "run", "--model", "gmm", "--policy", "ucb", "--samples", "32", "--steps", "20",
                           "--batch-size", "8", "--json", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert s["policy"] == "ucb" and s["nfe_mean"] < 20
    proc = subprocess.run([exe, "run", "--policy", "nope"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "unknown policy 'nope'" in proc.stderr


def test_run_a_diffusers_pipeline_folder(tmp_path):
    pytest.importorskip("transformers")
    from diffusers_tiny import tiny_pipeline

    folder = tmp_path / "tiny-flux"
    tiny_pipeline("flux").save_pretrained(folder)
    result = invoke("run", "--model", str(folder), "--prompt", "a red square", "--policy", "fixed",
                    "--steps", "8", "--height", "32", "--width", "32", "--json", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["nfe_mean"] == 4 and s["nfe_full"] == 8 and s["psnr_db"] is not None
    assert list((tmp_path / "o").glob("*.png"))
    result = invoke("run", "--model", str(folder), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "--prompt" in result.output


def test_demo_train_command_runs_a_tiny_training(tmp_path):
    result = invoke("demo", "train", "--out", str(tmp_path / "m"), "--tiny", "--no-progress", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "glyph_flow.json").exists()


@pytest.mark.slow
def test_pipeline_denoiser_exported_and_swapped_in_from_the_cli(tmp_path):
    """fastflow export --prompt, then run --export: ONNX Runtime inside the diffusers loop."""
    pytest.importorskip("onnxruntime")
    from diffusers_tiny import tiny_pipeline

    folder = tmp_path / "tiny-flux"
    tiny_pipeline("flux").save_pretrained(folder)
    exp = tmp_path / "denoiser"
    result = invoke("export", "--backend", "onnx", "--model", str(folder), "--prompt", "a cat",
                    "--height", "32", "--width", "32", "--out", str(exp))
    assert result.exit_code == 0, result.output
    args = ["run", "--model", str(folder), "--prompt", "a cat", "--policy", "fixed", "--steps", "8",
            "--height", "32", "--width", "32", "--json"]
    torch_run = invoke(*args, "--out", str(tmp_path / "t"))
    ort_run = invoke(*args, "--backend", "onnxruntime", "--export", str(exp), "--out", str(tmp_path / "o"))
    assert torch_run.exit_code == 0 and ort_run.exit_code == 0, ort_run.output
    a, b = json.loads(torch_run.stdout), json.loads(ort_run.stdout)
    assert a["nfe_mean"] == b["nfe_mean"] == 4
    import numpy as np
    from PIL import Image

    (pa,), (pb,) = sorted((tmp_path / "t").glob("*.png"))[:1], sorted((tmp_path / "o").glob("*.png"))[:1]
    ia = np.asarray(Image.open(pa), dtype=np.float64)
    ib = np.asarray(Image.open(pb), dtype=np.float64)
    mse = ((ia - ib) ** 2).mean()
    assert mse == 0 or 10 * np.log10(255**2 / mse) >= 40
    bad = invoke("run", "--model", str(folder), "--prompt", "a cat", "--backend", "onnxruntime", "--out", str(tmp_path))
    assert bad.exit_code == 2 and "--export DIR" in bad.output


@pytest.mark.parametrize("case", ["label", "strength", "missing_image", "not_an_image", "wrong_size",
                                  "corrupt_weights", "edit_without_label"])
def test_glyph_model_bad_input_exits_2_naming_it(tmp_path, case):
    from PIL import Image

    img = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(img)
    args = {
        "label": (["--label", "?"], "unknown --label '?'"),
        "strength": (["--edit", str(img), "--label", "A", "--strength", "1.5"], "--strength must be in (0, 1]"),
        "missing_image": (["--edit", str(tmp_path / "nope.png"), "--label", "A"], "does not exist"),
        "not_an_image": (["--edit", str(tmp_path / "junk.png"), "--label", "A"], "is not a readable image"),
        "wrong_size": (["--edit", str(tmp_path / "big.png"), "--label", "A"], "needs 32x32 RGB"),
        "corrupt_weights": (["--model", str(tmp_path / "weights")], str(tmp_path / "weights")),
        "edit_without_label": (["--edit", str(img)], "--edit needs --label"),
    }[case]
    (tmp_path / "junk.png").write_bytes(b"not a png")
    Image.new("RGB", (64, 48)).save(tmp_path / "big.png")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "glyph_flow.json").write_text("{broken")
    result = invoke("run", "--samples", "1", "--out", str(tmp_path / "o"), *args[0])
    assert result.exit_code == 2, result.output
    assert args[1] in result.output


def test_edit_writes_before_and_after(tmp_path):
    from PIL import Image

    img = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (20, 20, 200)).save(img)
    result = invoke("run", "--edit", str(img), "--label", "B", "--strength", "0.5", "--steps", "10",
                    "--policy", "fixed", "--json", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    # strength 0.5 of 10 steps runs the last 5; fixed skip=2 computes 0, 1, skips 2-3, computes 4
    assert s["nfe_full"] == 5 and s["nfe_mean"] == 3 and s["speedup_nfe"] == pytest.approx(5 / 3)
    for name in ("before.png", "after.png", "after_reference.png", "grid.png"):
        assert (tmp_path / "o" / name).exists(), name
    plain = invoke("run", "--edit", str(img), "--label", "B", "--strength", "0.5", "--steps", "10",
                   "--policy", "none", "--json", "--out", str(tmp_path / "o2"))
    s = json.loads(plain.stdout)
    assert s["nfe_mean"] == 5 and s["speedup_nfe"] == 1.0  # every step it ran was computed: no speed-up


def test_a_reused_out_folder_never_mixes_two_runs(tmp_path):
    run_json(tmp_path, "--policy", "fixed")
    assert (tmp_path / "o" / "reference.npy").exists()
    run_json(tmp_path, "--policy", "fixed", "--no-compare")
    assert not (tmp_path / "o" / "reference.npy").exists() and (tmp_path / "o" / "samples.npy").exists()


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_an_unwritable_out_is_refused_before_sampling(tmp_path, where):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "o" if where == "under_a_file" else "/proc/fastflow-out"
    result = invoke("run", "--model", "gmm", "--steps", "10", "--samples", "2", "--out", str(out),
                    "--state", str(tmp_path / "s.json"))
    assert result.exit_code == 2 and "cannot be written" in result.output, result.output
    assert not (tmp_path / "s.json").exists()  # nothing ran, nothing learned was saved


@pytest.mark.parametrize("args,needle", [
    (["--prompt", ""], "--prompt is empty"),
    (["--steps", "20000"], "--steps"),
])
def test_more_usage_errors_exit_2(tmp_path, args, needle):
    result = invoke("run", "--samples", "2", "--out", str(tmp_path / "o"), *args)
    assert result.exit_code == 2 and needle in result.output, result.output


def test_a_16_bit_png_keeps_its_depth(tmp_path):
    import numpy as np
    from PIL import Image

    import fastflow
    from fastflow.run_outputs import read_image

    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    x = read_image(str(path), fastflow.get_model("glyphs"))
    assert x.shape == (1, 3, 32, 32) and abs(float(x.mean())) < 0.01  # mid-grey, not clipped to white


def test_bench_refuses_an_unknown_method_with_a_suggestion(tmp_path):
    result = invoke("bench", "--model", "gmm", "--methods", "eulr", "--samples", "8", "--out", str(tmp_path / "b"))
    assert result.exit_code == 2 and "unknown method 'eulr'. Did you mean 'euler'" in result.output, result.output


def test_run_prompt_prints_its_summary_as_a_table(tmp_path):
    # the glyph model as a diffusers pipeline: --prompt "A" draws the glyph A
    result = invoke("run", "--prompt", "A", "--steps", "6", "--policy", "fixed", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert "NFE per sample" in result.output and "PSNR vs all steps" in result.output
    assert "pipeline calls" in result.output and "None" not in result.output


def test_guidance_is_applied_as_given(tmp_path):
    # gmm has a null label, so guidance is allowed; the scale reaches the samples
    plain = run_json(tmp_path, "--policy", "none", "--guidance", "1", "--no-compare")
    guided = run_json(tmp_path, "--policy", "none", "--guidance", "3", "--no-compare")
    assert plain["guidance"] == 1.0 and guided["guidance"] == 3.0
    import numpy as np

    a = np.load(tmp_path / "o" / "samples.npy")
    run_json(tmp_path, "--policy", "none", "--guidance", "1", "--no-compare")
    b = np.load(tmp_path / "o" / "samples.npy")
    assert not np.allclose(a, b)  # guidance 3 moved the samples away from guidance 1's


def test_the_default_run_as_make_run_does_it(tmp_path):
    """`fastflow run --policy ucb` on the embedded glyph model: the table, class accuracy, grid.png."""
    from PIL import Image

    result = invoke("run", "--policy", "ucb", "--samples", "4", "--steps", "8", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert table.splitlines()[0].split() == ["model", "glyphs"]
    assert "class accuracy" in table and "(all steps:" in table
    assert "calibration" in table and "PSNR vs all steps" in table and "feature FID" not in table  # 4 samples
    # not a terminal: a line per stage on stderr
    assert "fastflow: sampling 4 samples in 1 batch(es)" in result.stderr
    again = invoke("run", "--policy", "ucb", "--samples", "4", "--steps", "8", "--out", str(tmp_path / "o2"))
    assert "reference comes from the cache" in again.stderr and "not measured" in again.stdout
    import numpy as np

    assert np.array_equal(np.load(tmp_path / "o" / "reference.npy"), np.load(tmp_path / "o2" / "reference.npy"))
    with Image.open(tmp_path / "o" / "grid.png") as im:
        assert im.size[0] >= 4 * 32 and im.size[1] >= 2 * 32  # accelerated and reference rows of 4 glyphs


def test_models_and_pipelines_report_in_one_summary_schema(tmp_path):
    """One run-and-compare path: the cost and comparison fields mean the same for a
    registered model and for a diffusers pipeline (fastflow.compare builds both)."""
    model = run_json(tmp_path, "--policy", "fixed", "--option", "skip=1")
    result = invoke("run", "--prompt", "AB", "--steps", "8", "--policy", "fixed", "--option", "skip=1", "--json",
                    "--out", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    pipe = json.loads(result.output)
    shared = ["policy", "policy_options", "backend", "model", "steps", "nfe_mean", "nfe_per_sample", "nfe_min",
              "nfe_max", "nfe_full", "model_calls", "calibration_samples", "calibration_nfe",
              "nfe_mean_after_calibration", "learned", "speedup_nfe", "wall_seconds", "ms_per_eval", "psnr_db",
              "max_abs_error", "out"]
    for s in (model, pipe):
        missing = [k for k in shared if k not in s]
        assert not missing, missing
        assert s["speedup_nfe"] == s["nfe_full"] / s["nfe_mean"]
    assert model["nfe_per_sample"] == [11] * 8 and model["nfe_full"] == 20  # 2 warm-up + 9 of the 18 skippable
    assert pipe["nfe_per_sample"] == [5, 5] and pipe["nfe_full"] == 8  # one call, two glyphs, the same schedule


def test_clips_and_points_get_a_picture_too(tmp_path):
    """grid.png for the clip model (each clip as its frames in a row, a white line between
    them) and for the GMM (a scatter of the points beside their all-steps twins)."""
    from PIL import Image

    clips = invoke("run", "--model", "clips", "--samples", "4", "--steps", "10", "--out", str(tmp_path / "c"), "--json")
    assert clips.exit_code == 0, clips.output
    s = json.loads(clips.stdout)
    assert s["picture"] == "clips" and s["grid"] == str(tmp_path / "c" / "grid.png")
    with Image.open(s["grid"]) as im:
        im = im.convert("RGB")
        strip = (8 * 16 + 7) * 2  # 8 frames of 16 px and 7 one-px lines, at scale 2
        assert im.width >= 150 + 4 * (strip + 4) + 4 and im.height == 30 + 2 * (32 + 4) + 18 + 4 + 4
        for row in (31, 31 + 36):  # the accelerated row, then the all-steps row
            assert im.getpixel((150 + 32, row + 5)) == (255, 255, 255)  # the line after frame 1
            assert im.getpixel((150 + 10, row + 5)) != (255, 255, 255)  # inside frame 1
    points = invoke("run", "--model", "gmm", "--samples", "8", "--out", str(tmp_path / "g"))
    assert points.exit_code == 0, points.output
    assert "(largest coordinate difference)" in points.output
    with Image.open(tmp_path / "g" / "grid.png") as im:
        assert im.width >= 520 and im.height == 520 + 56

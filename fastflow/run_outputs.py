"""What ``fastflow run`` writes and prints: the ``--out`` folder (checked before any
sampling, cleared of an earlier run's files), the all-steps reference cached in the user
cache, images and sheets, the model's own metrics, and the summary table."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .errors import UsageFailure
from .state import user_cache_dir


#: The files a run writes into --out; an earlier run's copies are removed first, so a
#: reused folder never holds one run's samples beside another run's reference.
RUN_OUTPUTS = ("samples.npy", "reference.npy", "summary.json", "grid.png", "before.png", "after.png",
               "after_reference.png")


def check_out(out_dir) -> Path:
    """Prove, before any sampling, that --out can be written: create it (and any missing
    parents) and a file in it, then remove what the probe created."""
    import tempfile

    out = Path(out_dir)
    missing = [p for p in [out, *out.parents] if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".fastflow-write-test-"):
            pass
    except OSError as exc:
        raise UsageFailure(f"--out {out_dir} cannot be written ({exc.strerror or exc}); pass a writable folder") from None
    finally:
        for p in missing:  # deepest first
            try:
                p.rmdir()
            except OSError:
                pass
    return out


def clear_outputs(out: Path) -> None:
    """Remove an earlier run's outputs (after sampling, so a failed run loses nothing)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_OUTPUTS:
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass


def reference_path(*ident) -> Path:
    """Where the all-steps output of these exact inputs is cached (it is deterministic)."""
    import hashlib

    from . import __version__

    h = hashlib.sha256(__version__.encode())
    for part in ident:
        if hasattr(part, "numpy"):
            h.update(part.detach().cpu().numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return user_cache_dir() / "reference" / f"{h.hexdigest()[:24]}.npy"


def load_reference(path: Path, shape):
    import numpy as np
    import torch

    try:
        arr = np.load(path)
    except (OSError, ValueError):
        return None  # absent or damaged: computed again (and rewritten)
    return torch.from_numpy(arr) if tuple(arr.shape) == tuple(shape) else None


def store_reference(path: Path, x) -> None:
    import os
    import tempfile

    import numpy as np

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".ref-", suffix=".npy", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, x.detach().cpu().numpy())
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs time next run


def read_image(path: str, spec):
    """An image file as a (1, C, H, W) tensor in [-1, 1]; exit 2 naming the file if it
    is missing, unreadable or not the model's size."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: keep its depth
                grey = np.asarray(im, dtype=np.float32)
                peak = 65535.0 if im.mode.startswith("I;16") or grey.max() > 255 else 255.0
                arr = np.repeat((grey / peak * 255.0)[..., None], 3, axis=2)
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    except FileNotFoundError:
        raise UsageFailure(f"--edit image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UsageFailure(f"--edit image {path} is not a readable image ({exc})") from None
    c, h, w = spec.shape
    if arr.shape != (h, w, c):
        raise UsageFailure(f"--edit image {path} is {arr.shape[1]}x{arr.shape[0]}; model '{spec.name}' "
                           f"needs {w}x{h} RGB")
    import torch

    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1.0


#: Fewer samples than this make a Fréchet distance noise, not a measurement.
FID_MIN_SAMPLES = 200


def picture_outputs(spec, x, ref, label_list, out: Path, edit, summary: dict) -> dict:
    """grid.png, a picture of every sample beside its all-steps twin, titled and labelled:
    images and clips (frames left to right) as a sheet, 2-D points as a scatter; nothing
    for other shapes."""
    from .demo.sheet import clip_strips, comparison_sheet, points_sheet

    nfe, full = summary["nfe_mean"], summary["nfe_full"]
    title = (f"{spec.name}: policy {summary['policy']}, {nfe:.1f} of {full} evaluations per sample "
             f"({summary['speedup_nfe']:.2f}x fewer)")
    if summary.get("psnr_db") is not None:
        title += f", {summary['psnr_db']:.1f} dB vs all steps"
    names = spec.label_names or []
    captions = [names[i] if i < len(names) else str(i) for i in label_list] if label_list is not None else None
    rows = (f"fastflow {summary['policy']}, {nfe:.1f} NFE", f"all {full} steps")
    path = out / "grid.png"
    if spec.is_image:
        return {**image_outputs(spec, x, ref, out, edit, title, captions, rows), "picture": "images"}
    if x.dim() == 5 and x.shape[1] in (1, 3) and spec.data_range == 2.0:  # clips (N, C, frames, H, W)
        comparison_sheet(str(path), clip_strips(x), None if ref is None else clip_strips(ref),
                         title=title + f"; each tile: {x.shape[2]} frames, left to right", captions=captions,
                         row_labels=rows, columns=4)
        return {"grid": str(path), "picture": "clips"}
    if x.dim() == 2 and x.shape[1] == 2:  # points in the plane
        points_sheet(str(path), x, ref, title=title, labels=rows)
        return {"grid": str(path), "picture": "points"}
    return {}


def image_outputs(spec, x, ref, out: Path, edit, title: str, captions, rows) -> dict:
    """grid.png for images, and with ``edit`` the input and both outputs apart."""
    from .demo.metrics import save_image_grid
    from .demo.sheet import comparison_sheet

    comparison_sheet(str(out / "grid.png"), x, ref, title=title, captions=captions, row_labels=rows)
    result = {"grid": str(out / "grid.png")}
    if edit is not None:
        save_image_grid(edit, str(out / "before.png"), nrow=1)
        save_image_grid(x, str(out / "after.png"), nrow=min(12, x.shape[0]))
        if ref is not None:
            save_image_grid(ref, str(out / "after_reference.png"), nrow=min(12, x.shape[0]))
    return result


def model_metrics(spec, x, ref, label_list) -> dict:
    """The model's own evaluator (class accuracy; a feature FID only where the sample
    count makes it a measurement), on the samples and on the all-steps reference."""
    import torch

    if spec.evaluate is None or label_list is None:
        return {}
    labels = torch.tensor(label_list)
    metrics = spec.evaluate(x, labels)
    result = {"class_accuracy": metrics.get("class_accuracy")}
    if "fid_feature" in metrics:
        if x.shape[0] >= FID_MIN_SAMPLES:
            result["fid_feature"] = metrics["fid_feature"]
        else:
            result["fid_feature"] = None
            result["fid_note"] = f"not shown: a feature FID needs at least {FID_MIN_SAMPLES} samples"
    if ref is not None:
        result["class_accuracy_reference"] = spec.evaluate(ref, labels).get("class_accuracy")
    return result


def warm_up(model, x, spec, label_list, backend) -> float:
    """One evaluation before the timed ones, so lazy initialisation (a session, a
    compilation) is billed to neither the policy nor the reference; returns its seconds."""
    import time

    import torch

    started = time.perf_counter()
    fn = backend.load(model, device=x.device)
    with torch.inference_mode():  # inputs made inside it, as the sampler's are: a compiled graph guards on that
        cond = {} if label_list is None else {"label": torch.tensor(label_list[: x.shape[0]])}
        fn(x.clone(), torch.ones(x.shape[0]), **cond)
    return time.perf_counter() - started


def save_tensor(path: Path, x) -> None:
    import numpy as np

    np.save(path, x.detach().cpu().numpy())


class NullStream:
    def write(self, *_):
        pass

    def flush(self):
        pass

    def isatty(self):
        return False


def print_summary(s: dict) -> None:
    """The human summary; it reads only what both the model and the pipeline runs write."""
    nfe = f"{s['nfe_mean']:.2f} of {s['nfe_full']}"
    if s.get("nfe_min") is not None and s["nfe_min"] != s["nfe_max"]:
        nfe += f" (min {s['nfe_min']}, max {s['nfe_max']})"
    if s.get("strength") is not None and s.get("steps") and s["nfe_full"] != s["steps"]:
        nfe += f" (an edit at strength {s['strength']:g} runs the last {s['nfe_full']} of the {s['steps']} steps)"
    rows = [
        ("model", s.get("model")), ("policy", s.get("policy")), ("backend", s.get("backend", "torch") + (f" ({s['dtype']})" if s.get("dtype") not in (None, "fp32") else "")),
        ("steps", s.get("steps")), ("samples" if "samples" in s else "pipeline calls", s.get("samples", s.get("runs"))),
        ("NFE per sample", nfe),
        ("speed-up (NFE)", f"{s['speedup_nfe']:.2f}x"),
    ]
    if s.get("calibration_samples"):
        after = s.get("nfe_mean_after_calibration")
        probes = s["calibration_nfe"] - s["calibration_samples"] * s["nfe_full"]
        rows.append(("calibration", f"{s['calibration_samples']} sample(s) with every step computed"
                                    + (f" and {probes} sensitivity probe(s)" if probes > 0 else "")
                                    + f" ({s['calibration_nfe']} evaluations); the rest: "
                                    + (f"{after:.2f} NFE = {s['nfe_full'] / after:.2f}x" if after else
                                       "none: every sample of this run calibrated; a run that keeps its "
                                       "state starts from what it learned")))
    if s.get("learned"):
        rows.append(("learned", s["learned"]))
    if s.get("wall_seconds") is not None:
        rows.append(("wall time", f"{s['wall_seconds']:.2f} s"))
    if s.get("ms_per_eval") is not None:
        rows.append(("ms per evaluation", f"{s['ms_per_eval']:.2f}"))
    if s.get("backend_warmup_seconds") is not None and s["backend_warmup_seconds"] >= 1.0:
        rows.append(("backend warm-up", f"{s['backend_warmup_seconds']:.1f} s (loading/compiling, before any timed "
                                        f"evaluation; not in the wall times)"))
    if "psnr_db" in s:
        p = s["psnr_db"]
        if s.get("reference_wall_seconds") is not None:
            rows.append(("reference wall time", f"{s['reference_wall_seconds']:.2f} s"))
        if s.get("speedup_wall_note", "").startswith("noisy"):
            rows.append(("speed-up (wall)", f"{s['speedup_wall']:.2f}x — {s['speedup_wall_note']}"))
        elif s.get("speedup_wall") is not None:
            rows.append(("speed-up (wall)", f"{s['speedup_wall']:.2f}x (policy and reference timed batch by batch)"))
            if s.get("wall_efficiency_median") is not None:
                lo, hi = s["wall_efficiency_spread"]
                rows.append(("wall / NFE", f"{s['wall_efficiency_median']:.2f} median of {s['wall_timings']} "
                                           f"interleaved timings ({lo:.2f}-{hi:.2f}; 1.00: skipping costs nothing "
                                           f"beyond the evaluations it saves)"))
        elif s.get("speedup_wall_note"):
            rows.append(("speed-up (wall)", s["speedup_wall_note"]))
        rows.append(("PSNR vs all steps", "identical" if p is None else f"{p:.2f} dB (same seeds, every step computed)"))
        if s.get("max_abs_error") is not None:
            rows.append(("max abs error", f"{s['max_abs_error']:.3g}" + {
                "images": " (largest pixel difference; images span -1..1)",
                "clips": " (largest pixel difference; frames span -1..1)",
                "points": " (largest coordinate difference)"}.get(s.get("picture"), " (largest element difference)")))
    if s.get("class_accuracy") is not None:
        rows.append(("class accuracy", f"{s['class_accuracy']:.3f}" + (
            f" (all steps: {s['class_accuracy_reference']:.3f})" if "class_accuracy_reference" in s else "")
            + " (the model's evaluator agrees with the requested class)"))
        if s.get("fid_feature") is not None:
            rows.append(("feature FID", f"{s['fid_feature']:.3f} (to 1024 real glyphs; lower is better)"))
    if s.get("state"):
        rows.append(("state", s["state"] + (" (learning kept here; --no-state to start fresh)"
                                            if s.get("state_note") == "cache" else "")))
    if s.get("out"):
        rows.append(("outputs", s["out"]))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")

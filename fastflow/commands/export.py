"""``fastflow export``."""

from __future__ import annotations

import json

import click

from ..artifact import DEFAULT_PROFILE, TRT_OPSET
from ..errors import FastFlowError, UsageFailure
from ..export import run_export
from ..exporting import log_stderr
from ..hookspecs import hookimpl
from ..modelspec import DEFAULT_MODEL

@hookimpl
def register_commands(cli):
    @cli.command("export")
    @click.option("--backend", type=click.Choice(["onnx", "trt"]), default="onnx", show_default=True,
                  help="onnx: an ONNX graph for the onnxruntime backend; trt: a TensorRT engine (GPU).")
    @click.option("--model", default=DEFAULT_MODEL, show_default=True, metavar="NAME|DIR",
                  help="A registered model name; for --backend trt also an ONNX export directory.")
    @click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
                  help="Export directory (default: fastflow-export/MODEL-BACKEND).")
    @click.option("--precision", type=click.Choice(["fp16", "bf16", "fp32"]), default=None,
                  help="TensorRT engine precision (default fp16; ONNX graphs are fp32).")
    @click.option("--min-batch", default=DEFAULT_PROFILE[0], show_default=True, type=click.IntRange(min=1),
                  help="Smallest batch the TensorRT engine accepts.")
    @click.option("--opt-batch", default=DEFAULT_PROFILE[1], show_default=True, type=click.IntRange(min=1),
                  help="Batch the TensorRT engine is tuned for (guidance doubles the batch).")
    @click.option("--max-batch", default=DEFAULT_PROFILE[2], show_default=True, type=click.IntRange(min=1),
                  help="Largest batch the TensorRT engine accepts.")
    @click.option("--opset", default=None, type=click.IntRange(min=7),
                  help=f"ONNX opset (default: the exporter's; {TRT_OPSET} for the graph a TensorRT engine is built from).")
    @click.option("--tolerance", default=None, type=click.FloatRange(min=0, min_open=True),
                  help="Max abs error allowed against PyTorch, scaled by max(1, |v|max) "
                       "(default 1e-3 for ONNX; TensorRT 1e-2 fp32, 5e-2 fp16, 0.2 bf16).")
    @click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
    @click.option("--prompt", default=None, help="Export the denoiser of a diffusers pipeline (--model glyphs, "
                  "a folder or Hub id) as it is called for this prompt; run it with fastflow run --export DIR.")
    @click.option("--height", default=None, type=click.IntRange(min=8), help="With --prompt: image height.")
    @click.option("--width", default=None, type=click.IntRange(min=8), help="With --prompt: image width.")
    def export(backend, model, out_dir, precision, min_batch, opt_batch, max_batch, opset, tolerance, as_json,
               prompt, height, width):
        """Export a model to ONNX or build a TensorRT engine, verified against PyTorch.

        \b
        Examples:
          fastflow export --backend onnx --model glyphs --out exports/glyphs-onnx
          fastflow run --backend onnxruntime --model exports/glyphs-onnx
          fastflow export --backend trt --model glyphs --out exports/glyphs-trt --precision fp16
          fastflow export --backend trt --model exports/glyphs-onnx --out exports/glyphs-trt-fp32 --precision fp32

        The export directory holds the graph (model.onnx) or engine (model.plan) and
        fastflow-export.json; files appear only once verified. Exits with status 2 when
        the model, a dependency or the verification fails.
        """
        if prompt is not None:  # a pipeline's denoiser, swapped in by run --export
            if backend != "onnx":
                raise UsageFailure("--prompt exports a pipeline denoiser to ONNX: use --backend onnx")
            if out_dir is None:
                raise UsageFailure("--prompt needs --out DIR")
            from ..pipeline_run import export_pipeline_denoiser

            try:
                exp = export_pipeline_denoiser(model, prompt, out_dir, height=height, width=width,
                                               log=(lambda m: None) if as_json else log_stderr)
            except FastFlowError as exc:
                raise UsageFailure(str(exc)) from None
            click.echo(json.dumps({**exp.meta, "dir": str(exp.dir)}, indent=1) if as_json else f"exported {exp.dir}")
            return
        try:
            exp = run_export(backend, model, out_dir, precision=precision, opset=opset, tolerance=tolerance,
                             min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                             log=(lambda m: None) if as_json else log_stderr)
        except FastFlowError as exc:
            raise UsageFailure(str(exc)) from None
        if as_json:
            click.echo(json.dumps({**exp.meta, "dir": str(exp.dir)}, indent=1))
            return
        m = exp.meta
        rows = [("export", str(exp.dir)), ("file", f"{exp.file.name} ({m['file_size'] / 1e6:.1f} MB)"),
                ("model", m.get("model")), ("backend", f"{m['backend']} (run with --backend {exp.runtime_backend})"),
                ("inputs", ", ".join(f"{s.name} {s.describe()}" for s in exp.inputs)),
                ("outputs", ", ".join(f"{s.name} {s.describe()}" for s in exp.outputs))]
        if m["backend"] == "onnx":
            rows.append(("opset", m.get("opset")))
        else:
            rows += [("precision", m.get("precision")), ("profile", "{min}..{max} (opt {opt})".format(**m["profile"])),
                     ("TensorRT", m.get("tensorrt_version")),
                     ("GPU", f"{m['gpu']['name']} (sm {m['gpu']['compute_capability']})")]
        err = m.get("max_abs_error")
        rows.append(("max abs error", "not verified" if err is None else f"{err:.3g} (tolerance {m['tolerance']:g})"))
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            click.echo(f"{k:<{width}}  {v}")

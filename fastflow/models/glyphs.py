"""``glyphs``: the embedded demo model — a class-conditional FluxTransformer2DModel
trained here on rendered 32×32 glyphs (0-9, A-Z). See docs/demo-model.md."""

from __future__ import annotations

import hashlib
import json
import os

from fastflow.hookspecs import hookimpl
from fastflow.modelspec import ModelSpec

from fastflow.demo import CHARS  # the one alphabet (the demo package imports nothing heavy)


def weights_key(directory: str) -> str:
    """A short hash of the weight files, so policy state follows the weights."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            if name.endswith((".safetensors", ".json")):
                with open(os.path.join(root, name), "rb") as fh:
                    h.update(name.encode())
                    h.update(fh.read())
    return h.hexdigest()[:16]


def glyph_spec(directory: str | None = None, name: str = "glyphs") -> ModelSpec:
    from fastflow.demo import DEFAULT_WEIGHTS_DIR

    directory = directory or DEFAULT_WEIGHTS_DIR

    def build():
        from fastflow.demo.model import load_glyph_flow

        return load_glyph_flow(directory)

    key = f"glyphs-{weights_key(directory)}" if os.path.isdir(directory) else "glyphs-missing"
    guidance = 4.0
    config = os.path.join(directory, "glyph_flow.json")
    if os.path.isfile(config):
        try:
            with open(config) as fh:
                guidance = float(json.load(fh).get("default_guidance", guidance))
        except (OSError, ValueError, TypeError):
            pass  # load_glyph_flow reports a damaged directory when the model is built
    return ModelSpec(
        name=name, build=build, shape=(3, 32, 32), num_labels=36, null_label=36,
        default_guidance=guidance, description="class-conditional FLUX-family transformer on 32x32 glyphs (embedded)",
        key=key, label_names=list(CHARS), is_image=True, evaluate=evaluate_glyphs,
    )


_REAL_FEATURES = None


def evaluate_glyphs(samples, labels) -> dict:
    """Class accuracy of the shipped classifier on ``samples`` (vs the requested
    ``labels``) and the Fréchet distance of its features to 1024 real held-out glyphs."""
    global _REAL_FEATURES
    from fastflow.demo.glyphs import EVAL_SEED, make_dataset, to_tensor
    from fastflow.demo.metrics import class_accuracy, features, frechet_distance

    if _REAL_FEATURES is None:
        real, _ = make_dataset(1024, seed=EVAL_SEED)
        _REAL_FEATURES = features(to_tensor(real))
    fid = None  # a Fréchet distance needs at least two samples to fit a covariance
    if samples.shape[0] >= 2:
        fid = float(frechet_distance(features(samples), _REAL_FEATURES))
    return {"class_accuracy": float(class_accuracy(samples, labels)), "fid_feature": fid}


@hookimpl
def register_models(register):
    register(glyph_spec())


@hookimpl
def register_commands(cli):
    import click

    @cli.group()
    def demo():
        """The embedded glyph model: retrain it, or measure it with the shipped classifier."""

    passthrough = {"ignore_unknown_options": True, "allow_extra_args": True}

    @demo.command(context_settings=passthrough, add_help_option=False)
    @click.pass_context
    def train(ctx):
        """Reproduce the weights from a seed (about 40 min on 2 CPU cores). --help lists options.

        \b
        Example: fastflow demo train --out my-glyphs --seed 0
        """
        from fastflow.demo.train import main

        ctx.exit(main(ctx.args))

    @demo.command(context_settings=passthrough, add_help_option=False)
    @click.pass_context
    def evaluate(ctx):
        """Class accuracy and feature FID of full-step samples. --help lists options.

        \b
        Example: fastflow demo evaluate --n 360 --grid grid.png
        """
        from fastflow.demo.evaluate import main

        ctx.exit(main(ctx.args))

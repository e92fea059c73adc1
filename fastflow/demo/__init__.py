"""The embedded demo model of fastflow: a small class-conditional flow-matching
model of 32x32 RGB glyphs (digits 0-9 and letters A-Z), built on diffusers'
``FluxTransformer2DModel``, plus an independent classifier-based evaluator.

Conventions (shared with the sampling engine): ``t = 1`` is noise, ``t = 0`` is
data, ``x_t = t * noise + (1 - t) * data``, the model predicts
``v = noise - data`` and an Euler step is ``x <- x + (t_next - t) * v``.
Images are float tensors (B, 3, 32, 32) in [-1, 1].

This package module deliberately imports neither torch nor diffusers; the
submodules do:

* :mod:`fastflow.demo.glyphs` - procedural data (numpy + Pillow only)
* :mod:`fastflow.demo.model` - ``GlyphFlow``, ``load_glyph_flow``, ``save_glyph_flow``
* :mod:`fastflow.demo.train` - ``train_glyph_flow`` (``python -m fastflow.demo.train``)
* :mod:`fastflow.demo.classifier` - the evaluation classifier
* :mod:`fastflow.demo.metrics` - accuracy, features, Frechet distance, PSNR, SSIM, PNG grids
* :mod:`fastflow.demo.evaluate` - a reference Euler + CFG sampler and the quality report
"""

from __future__ import annotations

import os

__all__ = [
    "DemoModelError", "DEFAULT_WEIGHTS_DIR", "DEFAULT_CLASSIFIER_PATH", "NUM_CLASSES", "NULL_LABEL", "CHARS",
    "GlyphFlow", "load_glyph_flow", "save_glyph_flow", "train_glyph_flow", "sample_euler", "load_classifier",
]

CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
NUM_CLASSES = len(CHARS)
#: label used for the unconditional branch of classifier-free guidance
NULL_LABEL = NUM_CLASSES

_HERE = os.path.dirname(os.path.abspath(__file__))
#: directory of the embedded flow model weights
DEFAULT_WEIGHTS_DIR = os.path.join(_HERE, "weights", "glyph-flow")
#: file of the embedded evaluation classifier weights
DEFAULT_CLASSIFIER_PATH = os.path.join(_HERE, "weights", "glyph-classifier.safetensors")


class DemoModelError(ValueError):
    """A demo model (flow model or classifier) directory/file is missing or corrupt.

    The message names the offending path and what is wrong with it.
    """


_LAZY = {
    "GlyphFlow": "model",
    "load_glyph_flow": "model",
    "save_glyph_flow": "model",
    "train_glyph_flow": "train",
    "sample_euler": "evaluate",
    "load_classifier": "classifier",
}


def __getattr__(name: str):
    """Lazy access to the torch-based API (``from fastflow.demo import load_glyph_flow``)."""
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)

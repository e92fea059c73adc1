"""``glyphs``: the embedded demo model — a class-conditional FluxTransformer2DModel
trained here on rendered 32×32 glyphs (0-9, A-Z). See docs/demo-model.md."""

from __future__ import annotations

import hashlib
import os

from fastflow.hookspecs import hookimpl
from fastflow.models import ModelSpec

CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


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
    return ModelSpec(
        name=name, build=build, shape=(3, 32, 32), num_labels=36, null_label=36,
        default_guidance=3.0, description="class-conditional FLUX-family transformer on 32x32 glyphs (embedded)",
        key=key, label_names=list(CHARS), is_image=True,
    )


@hookimpl
def register_models(register):
    register(glyph_spec())

"""Named models for ``fastflow run --model NAME``, registered through ``register_models``."""

from __future__ import annotations

from fastflow.modelspec import DEFAULT_MODEL, ModelSpec, check_labels

__all__ = ["ModelSpec", "check_labels", "resolve_model", "DEFAULT_MODEL"]


def resolve_model(name: str) -> ModelSpec:
    """A registered model name, or a folder of glyph-model weights (``glyph_flow.json``)."""
    import os

    from fastflow.plugins import get_plugins

    models = get_plugins().registry("models")
    if name not in models and os.path.isfile(os.path.join(str(name), "glyph_flow.json")):
        from .glyphs import glyph_spec

        return glyph_spec(str(name))
    return get_plugins().get("models", name).obj

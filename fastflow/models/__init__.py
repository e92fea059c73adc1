"""Named models for ``fastflow run --model NAME``, registered through ``register_models``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class ModelSpec:
    """A model the CLI can load by name and sample from.

    Attributes:
        name: what ``--model`` takes.
        build: returns the velocity model (``(x, t, label=...) -> v``) on the CPU.
        shape: shape of one sample, e.g. ``(3, 32, 32)``.
        num_labels: class labels 0..num_labels-1 accepted as ``label`` (0: unconditional).
        null_label: the label of the unconditional branch for guidance, if any.
        default_guidance: guidance scale the CLI uses unless ``--guidance`` is given.
        default_shift: schedule shift the CLI uses unless ``--shift`` is given.
        key: identity for policy state files (change it when the weights change).
        label_names: printable name of each label.
        is_image: samples are images in [-1, 1] (PNG outputs, PSNR with range 2).
        data_range: the range samples span, PSNR's peak (default 2 for images; None:
            the reference's own range).
        evaluate: optional ``(samples, labels) -> dict`` of quality metrics (e.g.
            ``class_accuracy``, ``fid_feature``) from an independent evaluator.
    """

    name: str
    build: Callable[[], Any]
    shape: tuple
    num_labels: int = 0
    null_label: int | None = None
    default_guidance: float | None = None
    default_shift: float | None = None
    description: str = ""
    key: str = ""
    label_names: list[str] = field(default_factory=list)
    is_image: bool = False
    evaluate: Callable[[Any, Any], dict] | None = None
    data_range: float | None = None

    def __post_init__(self):
        if not self.key:
            self.key = self.name
        if self.data_range is None and self.is_image:
            self.data_range = 2.0


def resolve_model(name: str) -> ModelSpec:
    """A registered model name, or a folder of glyph-model weights (``glyph_flow.json``)."""
    import os

    from fastflow.plugins import get_plugins

    models = get_plugins().registry("models")
    if name not in models and os.path.isfile(os.path.join(str(name), "glyph_flow.json")):
        from .glyphs import glyph_spec

        return glyph_spec(str(name))
    return get_plugins().get("models", name).obj


def check_labels(owner: Any, label, batch: int, null_label: int) -> None:
    """Refuse a label tensor that is not one class (0..null_label) per sample, naming it.

    Eager calls only (a traced or exported graph has no room for it); values are read on
    the host only when the labels live there (no device sync on a GPU); and a tensor is
    read once: the sampling loop passes the same one at every step (``owner`` remembers it).
    """
    import torch

    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or label is getattr(owner, "_checked_labels", None):
        return
    from fastflow.errors import OptionError

    if label.numel() != batch:
        raise OptionError(f"label has {label.numel()} entries for a batch of {batch}; give one label per sample")
    if label.device.type == "cpu" and batch and not (0 <= int(label.min()) and int(label.max()) <= null_label):
        raise OptionError(f"label holds {int(label.min())}..{int(label.max())}; this model's labels are "
                          f"0..{null_label - 1} ({null_label} is the unconditional label)")
    owner._checked_labels = label

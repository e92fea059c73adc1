"""What a registered model is (:class:`ModelSpec`) and the label check the shipped
models share; the registry that resolves names lives in :mod:`fastflow.models`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

#: the model ``fastflow run`` (and ``bench``, ``export``) use unless told ``--model``
DEFAULT_MODEL = "glyphs"


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


def label_index(spec: ModelSpec, text: str) -> int:
    """The class index that ``text`` names for ``spec``: a label name (any case) or an
    index 0..num_labels-1. OptionError naming the label and the known ones otherwise."""
    from fastflow.errors import OptionError

    names = {n.lower(): i for i, n in enumerate(spec.label_names)}
    text = str(text).strip()
    if text.lower() in names:
        return names[text.lower()]
    if text.isdigit() and int(text) < spec.num_labels:
        return int(text)
    if not spec.num_labels:
        raise OptionError(f"model '{spec.name}' is unconditional; it takes no label (got '{text}')")
    known = ", ".join(spec.label_names) if spec.label_names else f"0..{spec.num_labels - 1}"
    raise OptionError(f"unknown label '{text}' for model '{spec.name}'. Known labels: {known}")

"""``GlyphFlow``: a class-conditional flow model of 32x32 glyphs built on
diffusers' :class:`~diffusers.FluxTransformer2DModel`.

Pixels are packed into non-overlapping ``p x p`` patches (``3*p*p`` channels
per token, channel order ``(c, py, px)`` as in ``FluxPipeline._pack_latents``)
and fed to the transformer as its image stream, with ``img_ids`` built like
``FluxPipeline._prepare_latent_image_ids`` (``[0, row, col]``).  The class label
replaces the text encoders: a learned embedding gives ``num_text_tokens``
tokens of ``encoder_hidden_states`` (with all-zero ``txt_ids``, as FluxPipeline
uses) and the ``pooled_projections`` vector.  Label ``NULL_LABEL`` (36) is the
unconditional label for classifier-free guidance.

Time: ``FluxTransformer2DModel.forward`` multiplies ``timestep`` by 1000
internally (FluxPipeline passes ``sigma = timestep / 1000``), so our ``t`` in
[0, 1] (1 = noise) is passed unchanged, exactly like FluxPipeline's sigma.

On-disk layout written by :func:`save_glyph_flow`::

    DIR/glyph_flow.json                 model + recipe config (format "fastflow-glyph-flow")
    DIR/label_embedding.safetensors     the label embedding tables
    DIR/transformer/config.json         FluxTransformer2DModel.save_pretrained
    DIR/transformer/diffusion_pytorch_model.safetensors
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from torch import nn

from fastflow.modelspec import check_labels
from . import DEFAULT_WEIGHTS_DIR, NULL_LABEL, NUM_CLASSES, DemoModelError

FORMAT = "fastflow-glyph-flow"
FORMAT_VERSION = 1
CONFIG_NAME = "glyph_flow.json"
LABEL_EMBED_NAME = "label_embedding.safetensors"
TRANSFORMER_DIR = "transformer"
TRANSFORMER_WEIGHTS = "diffusion_pytorch_model.safetensors"

#: the configuration of the embedded model (see docs/demo-model.md)
DEFAULT_CONFIG: dict[str, Any] = {
    "image_size": 32,
    "channels": 3,
    "patch_size": 4,
    "num_classes": NUM_CLASSES,
    "null_label": NULL_LABEL,
    "num_text_tokens": 4,
    "position_features": 4,
    "init": "adaln-zero",
    "prediction": "v",
    "x0_min_t": 0.05,
    "default_guidance": 4.0,
    "default_shift": None,
    "transformer": {
        "num_layers": 2,
        "num_single_layers": 4,
        "attention_head_dim": 32,
        "num_attention_heads": 6,
        "joint_attention_dim": 96,
        "pooled_projection_dim": 96,
        "axes_dims_rope": [4, 14, 14],
    },
}

#: a very small configuration for tests (trains for a few steps in seconds)
TINY_CONFIG: dict[str, Any] = {
    **DEFAULT_CONFIG,
    # random output layers: an adaLN-zero model outputs exactly 0 before training, which
    # would make the comparisons of the tests that use this config vacuous
    "init": "random",
    "patch_size": 4,
    "num_text_tokens": 2,
    "transformer": {
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 16,
        "pooled_projection_dim": 16,
        "axes_dims_rope": [4, 6, 6],
    },
}


class LabelEmbedder(nn.Module):
    """Maps labels (0..num_classes, the last being the null label) to the
    transformer's text inputs: ``encoder_hidden_states`` (B, T, joint_dim) and
    ``pooled_projections`` (B, pooled_dim)."""

    def __init__(self, num_embeddings: int, num_tokens: int, joint_dim: int, pooled_dim: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.joint_dim = joint_dim
        self.tokens = nn.Embedding(num_embeddings, num_tokens * joint_dim)
        self.pooled = nn.Embedding(num_embeddings, pooled_dim)
        nn.init.normal_(self.tokens.weight, std=1.0)
        nn.init.normal_(self.pooled.weight, std=1.0)

    def forward(self, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ehs = self.tokens(label).view(label.shape[0], self.num_tokens, self.joint_dim)
        return ehs, self.pooled(label)


def _image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _position_features(g: int, k: int) -> torch.Tensor:
    """Fixed Fourier features (g*g, 4k) of each token's (row, col) on a g x g grid."""
    if k <= 0:
        return torch.zeros(g * g, 0)
    pos = (torch.arange(g, dtype=torch.float64) + 0.5) / g
    freqs = torch.arange(1, k + 1, dtype=torch.float64) * torch.pi
    f1 = torch.cat([torch.sin(pos[:, None] * freqs), torch.cos(pos[:, None] * freqs)], dim=1)  # (g, 2k)
    rows = f1[:, None, :].expand(g, g, 2 * k)
    cols = f1[None, :, :].expand(g, g, 2 * k)
    return torch.cat([rows, cols], dim=-1).reshape(g * g, 4 * k).float()


def _build_transformer(config: dict[str, Any]):
    from diffusers import FluxTransformer2DModel

    p = config["patch_size"]
    tc = config["transformer"]
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=config["channels"] * p * p + 4 * int(config.get("position_features", 0)),
        out_channels=config["channels"] * p * p,
        num_layers=tc["num_layers"],
        num_single_layers=tc["num_single_layers"],
        attention_head_dim=tc["attention_head_dim"],
        num_attention_heads=tc["num_attention_heads"],
        joint_attention_dim=tc["joint_attention_dim"],
        pooled_projection_dim=tc["pooled_projection_dim"],
        guidance_embeds=False,
        axes_dims_rope=tuple(tc["axes_dims_rope"]),
    )


def _adaln_zero_init(transformer) -> None:
    """DiT's adaLN-Zero: zero the modulation (shift/scale/gate) projections of every block and of the
    output norm, and the output projection, so that each block starts as the identity and v starts at 0."""
    with torch.no_grad():
        for block in transformer.transformer_blocks:
            for lin in (block.norm1.linear, block.norm1_context.linear):
                lin.weight.zero_()
                lin.bias.zero_()
        for block in transformer.single_transformer_blocks:
            block.norm.linear.weight.zero_()
            block.norm.linear.bias.zero_()
        for lin in (transformer.norm_out.linear, transformer.proj_out):
            lin.weight.zero_()
            lin.bias.zero_()


class GlyphFlow(nn.Module):
    """Velocity model ``v = model(x, t, label=label)``.

    ``x``: (B, 3, 32, 32) in [-1, 1]; ``t``: (B,) (or a scalar) in [0, 1],
    1 = noise; ``label``: (B,) long in [0, 36], 36 = null label.  Returns
    ``v`` (B, 3, 32, 32), the predicted ``noise - data``, in ``x``'s dtype.
    """

    def __init__(self, config: dict[str, Any] | None = None, transformer=None):
        super().__init__()
        config = copy.deepcopy(DEFAULT_CONFIG if config is None else config)
        self.config = config
        self.image_size = int(config["image_size"])
        self.channels = int(config["channels"])
        self.patch_size = int(config["patch_size"])
        self.num_classes = int(config["num_classes"])
        self.null_label = int(config["null_label"])
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        tc = config["transformer"]
        if transformer is None:
            transformer = _build_transformer(config)
            if config.get("init", "adaln-zero") == "adaln-zero":
                _adaln_zero_init(transformer)
        self.transformer = transformer
        self.label_embed = LabelEmbedder(
            self.num_classes + 1, int(config["num_text_tokens"]), int(tc["joint_attention_dim"]),
            int(tc["pooled_projection_dim"]),
        )
        g = self.image_size // self.patch_size
        self.register_buffer("img_ids", _image_ids(g, g), persistent=False)
        self.register_buffer("txt_ids", torch.zeros(int(config["num_text_tokens"]), 3), persistent=False)
        # absolute position: Flux only has RoPE (relative), so fixed Fourier features of the token's
        # grid position are appended to each patch token's channels
        self.register_buffer("pos_features", _position_features(g, int(config.get("position_features", 0))),
                             persistent=False)

    # -- packing -------------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        p, c, g = self.patch_size, self.channels, self.image_size // self.patch_size
        x = tokens.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, g * p, g * p)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.img_ids.device

    def forward(self, x: torch.Tensor, t, label: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        if x.shape[1:] != (self.channels, self.image_size, self.image_size):
            raise ValueError(
                f"expected x of shape (B, {self.channels}, {self.image_size}, {self.image_size}), got {tuple(x.shape)}"
            )
        dtype = self.dtype
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        t = t.reshape(b).to(dtype)
        if label is None:
            label = torch.full((b,), self.null_label, dtype=torch.long, device=x.device)
        label = torch.as_tensor(label)
        check_labels(self, label, b, self.null_label)
        label = label.to(x.device).long().reshape(b)
        ehs, pooled = self.label_embed(label)
        tokens = self.patchify(x.to(dtype))
        if self.pos_features.shape[1]:
            tokens = torch.cat([tokens, self.pos_features.to(dtype).expand(b, -1, -1)], dim=-1)
        out = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=ehs.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=t,  # the transformer multiplies by 1000 itself (FluxPipeline passes sigma)
            img_ids=self.img_ids.to(dtype),
            txt_ids=self.txt_ids.to(dtype),
            return_dict=False,
        )[0]
        out = self.unpatchify(out)
        if self.config.get("prediction", "v") == "x0":
            # the network predicts the clean image; convert to the velocity (x_t - x0) / t,
            # with t clamped away from 0 as in "Back to Basics" (JiT) x-prediction
            tmin = float(self.config.get("x0_min_t", 0.05))
            out = (x.to(out.dtype) - out) / t.clamp_min(tmin).view(b, 1, 1, 1).to(out.dtype)
        return out.to(x.dtype)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- save / load -----------------------------------------------------------------------------------
# keys of glyph_flow.json that describe a saved file rather than the model
_RECORD_KEYS = ("format", "format_version", "storage_dtype", "parameters", "training", "checkpoint")


def save_glyph_flow(model: GlyphFlow, directory: str | os.PathLike, *, fp16: bool = True,
                    extra: dict[str, Any] | None = None) -> str:
    """Write ``model`` to ``directory`` (created if needed); weights stored in
    float16 when ``fp16`` (they load back as float32 by default).  ``extra`` is
    merged into the JSON config (e.g. a training-recipe summary)."""
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    store_dtype = torch.float16 if fp16 else torch.float32
    tr = copy.deepcopy(model.transformer)
    with torch.no_grad():  # cast tensor by tensor (ModelMixin.to() warns about dtype casts)
        for t in list(tr.parameters()) + list(tr.buffers()):
            t.data = t.data.to("cpu", store_dtype)
    tr.save_pretrained(os.path.join(directory, TRANSFORMER_DIR), safe_serialization=True)
    emb = {k: v.detach().to("cpu", store_dtype).contiguous() for k, v in model.label_embed.state_dict().items()}
    save_file(emb, os.path.join(directory, LABEL_EMBED_NAME), metadata={"format": FORMAT})
    model_cfg = {k: v for k, v in model.config.items() if k not in _RECORD_KEYS}
    cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, **model_cfg,
           "storage_dtype": "float16" if fp16 else "float32",
           "parameters": count_parameters(model)}
    if extra:
        cfg.update(extra)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=False)
        f.write("\n")
    return directory


def read_glyph_flow_config(directory: str | os.PathLike) -> dict[str, Any]:
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise DemoModelError(f"glyph-flow model directory not found: {directory}")
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise DemoModelError(f"not a glyph-flow model directory: {directory} has no {CONFIG_NAME}")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise DemoModelError(f"corrupt glyph-flow config {path}: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise DemoModelError(f"corrupt glyph-flow config {path}: 'format' is not {FORMAT!r}")
    missing = [k for k in ("image_size", "channels", "patch_size", "num_classes", "null_label",
                           "num_text_tokens", "transformer") if k not in cfg]
    if missing:
        raise DemoModelError(f"corrupt glyph-flow config {path}: missing keys {missing}")
    return cfg


def load_glyph_flow(directory: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> GlyphFlow:
    """Load a :class:`GlyphFlow` saved by :func:`save_glyph_flow`.

    ``directory=None`` loads the embedded weights (``fastflow/demo/weights/glyph-flow``).
    Raises :class:`DemoModelError` naming the path when something is missing or corrupt.
    The model is returned in eval mode with gradients disabled.
    """
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    directory = os.fspath(DEFAULT_WEIGHTS_DIR if directory is None else directory)
    cfg = read_glyph_flow_config(directory)
    tdir = os.path.join(directory, TRANSFORMER_DIR)
    for need in (os.path.join(tdir, "config.json"), os.path.join(tdir, TRANSFORMER_WEIGHTS),
                 os.path.join(directory, LABEL_EMBED_NAME)):
        if not os.path.isfile(need):
            raise DemoModelError(f"glyph-flow model directory {directory} is incomplete: missing {need}")
    try:
        transformer = FluxTransformer2DModel.from_pretrained(tdir, torch_dtype=dtype, low_cpu_mem_usage=False)
    except Exception as e:  # diffusers raises a variety of errors for bad files
        raise DemoModelError(f"cannot load the transformer from {tdir}: {type(e).__name__}: {e}") from e
    try:
        model = GlyphFlow(cfg, transformer=transformer)
    except Exception as e:
        raise DemoModelError(f"glyph-flow config in {directory} does not match its transformer: {e}") from e
    epath = os.path.join(directory, LABEL_EMBED_NAME)
    try:
        emb = load_file(epath)
    except Exception as e:
        raise DemoModelError(f"corrupt label embedding file {epath}: {type(e).__name__}: {e}") from e
    try:
        model.label_embed.load_state_dict({k: v.to(dtype) for k, v in emb.items()}, strict=True)
    except Exception as e:
        raise DemoModelError(f"label embedding file {epath} does not match the config: {e}") from e
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise DemoModelError(f"glyph-flow weights in {directory} contain non-finite values ({name})")
    model = model.to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    return model

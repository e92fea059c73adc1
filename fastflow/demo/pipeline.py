"""``GlyphPipeline``: the demo model as a diffusers pipeline, so that
``fastflow.enable(pipe, policy=...)`` (and ``fastflow run --prompt``) can run it.

Components (``pipe.components``):

* ``transformer`` — the :class:`~diffusers.FluxTransformer2DModel` of a
  :class:`~fastflow.demo.model.GlyphFlow` (the module fastflow hooks);
* ``label_embed`` — :class:`GlyphLabelEmbedding`, a diffusers ``ModelMixin`` around
  GlyphFlow's label embedder; its config also carries the glyph geometry (image size,
  channels, patch size, null label) and the model's default guidance and shift, so
  ``GlyphPipeline(**pipe.components)`` rebuilds the same pipeline;
* ``scheduler`` — :class:`~diffusers.FlowMatchEulerDiscreteScheduler` with ``shift=1``
  and no dynamic shifting, given the engine's time grid
  (:func:`fastflow.schedule.timesteps`) as explicit sigmas: 1 − k/T for the uniform
  schedule.

The denoising loop is the engine's (:func:`fastflow.sample`) written as a diffusers
loop: at each step **one** transformer call on the doubled batch ``[cond, uncond]``
(labels, then the null label), with GlyphFlow's packing, ids, label embedding and
timestep convention (t = sigma in [0, 1], 1 = noise; the transformer scales it by 1000),
guidance ``torch.lerp(v_u, v_c, g)``, then ``scheduler.step`` (Euler:
x ← x + (σ_next − σ)·v). With the same noise (``latents=``) it reproduces
``fastflow.sample(model, noise, steps=T, guidance=g, uncond={"label": null}, label=labels)``.

Prompts are characters of ``fastflow.demo.CHARS`` (0-9, A-Z, case-insensitive): ``"A"``,
``"HELLO"`` (one image per character; whitespace is ignored) or ``["A", "7"]``.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Sequence

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from . import CHARS, NULL_LABEL, NUM_CLASSES
from ..precision import torch_dtype
from .model import GlyphFlow, LabelEmbedder

__all__ = ["GlyphPipeline", "GlyphLabelEmbedding", "glyph_pipeline", "prompt_to_labels", "engine_timesteps"]

OUTPUT_TYPES = ("pt", "np", "pil")


class GlyphLabelEmbedding(ModelMixin, ConfigMixin):
    """Label → the transformer's text inputs, as a diffusers model (GlyphFlow's
    :class:`~fastflow.demo.model.LabelEmbedder` inside, under ``embedder``).

    ``forward(label)`` returns ``(encoder_hidden_states (B, num_tokens, joint_dim),
    pooled_projections (B, pooled_dim))``. The config also records the geometry and
    defaults of the glyph model the pipeline needs.
    """

    @register_to_config
    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        null_label: int = NULL_LABEL,
        num_tokens: int = 4,
        joint_dim: int = 64,
        pooled_dim: int = 64,
        image_size: int = 32,
        channels: int = 3,
        patch_size: int = 4,
        default_guidance: float = 3.0,
        default_shift: float | None = None,
        position_features: int = 0,
        prediction: str = "v",
    ):
        super().__init__()
        self.embedder = LabelEmbedder(num_classes + 1, num_tokens, joint_dim, pooled_dim)

    def forward(self, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedder(label)

    @classmethod
    def from_glyph_flow(cls, model: GlyphFlow) -> "GlyphLabelEmbedding":
        """A wrapper sharing ``model.label_embed`` (no copy of its weights)."""
        cfg = model.config
        emb = model.label_embed
        out = cls(
            num_classes=int(model.num_classes), null_label=int(model.null_label),
            num_tokens=int(emb.num_tokens), joint_dim=int(emb.joint_dim),
            pooled_dim=int(emb.pooled.embedding_dim), image_size=int(model.image_size),
            channels=int(model.channels), patch_size=int(model.patch_size),
            default_guidance=float(cfg.get("default_guidance") or 3.0),
            default_shift=None if cfg.get("default_shift") is None else float(cfg["default_shift"]),
            position_features=int(cfg.get("position_features", 0)),
            prediction=str(cfg.get("prediction", "v")),
        )
        out.embedder = emb  # the wrapper has no weights of its own
        return out


def engine_timesteps(steps: int, shift: float | None = None) -> list[float]:
    """The engine's ``steps + 1`` times (:func:`fastflow.schedule.timesteps`)."""
    from fastflow.schedule import timesteps

    return timesteps(steps, shift)


def prompt_to_labels(prompt: str | Sequence[str]) -> list[int]:
    """``"A"`` → ``[10]``; ``"hello"`` / ``["H", "e", ...]`` → one label per character.

    Characters are ``0-9`` and ``A-Z`` (case-insensitive); whitespace in a string is
    ignored. Anything else raises :class:`ValueError` naming the offending characters.
    """
    if isinstance(prompt, str):
        chars = [c for c in prompt if not c.isspace()]
    elif isinstance(prompt, (list, tuple)):
        chars = []
        for item in prompt:
            if not isinstance(item, str) or len(item.strip()) != 1:
                raise ValueError(f"each prompt of a list must be one character of {CHARS}, got {item!r}")
            chars.append(item.strip())
    else:
        raise ValueError(f"prompt must be a string or a list of characters, got {type(prompt).__name__}")
    if not chars:
        raise ValueError(f"the prompt holds no character; give characters of {CHARS}")
    bad = sorted({c for c in chars if c.upper() not in CHARS})
    if bad:
        raise ValueError(
            f"the glyph model cannot draw {', '.join(repr(c) for c in bad)}: "
            f"prompts are characters of {CHARS} (case-insensitive)"
        )
    return [CHARS.index(c.upper()) for c in chars]


class GlyphPipeline(DiffusionPipeline):
    """Class-conditional glyph generation (32×32 RGB, characters 0-9 and A-Z).

    >>> pipe = glyph_pipeline()                                   # embedded weights
    >>> images = pipe("A", num_inference_steps=50).images         # (1, 3, 32, 32) in [-1, 1]
    """

    model_cpu_offload_seq = "label_embed->transformer"

    def __init__(self, transformer, label_embed: GlyphLabelEmbedding, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, label_embed=label_embed, scheduler=scheduler)

    # -- construction ---------------------------------------------------------------------
    @staticmethod
    def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
        """A flow-matching Euler scheduler that keeps the sigmas it is given unshifted."""
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

    @classmethod
    def from_glyph_flow(cls, model: GlyphFlow, scheduler: FlowMatchEulerDiscreteScheduler | None = None) -> "GlyphPipeline":
        """A pipeline around ``model``'s own modules (shared, not copied)."""
        if not isinstance(model, GlyphFlow):
            raise TypeError(f"from_glyph_flow needs a GlyphFlow, got {type(model).__name__}")
        return cls(transformer=model.transformer, label_embed=GlyphLabelEmbedding.from_glyph_flow(model),
                   scheduler=scheduler or cls.make_scheduler())

    # -- helpers ------------------------------------------------------------------------------
    def _packer(self) -> GlyphFlow:
        """A GlyphFlow around this pipeline's modules: its patchify/unpatchify and ids."""
        g = self.__dict__.get("_glyph_packer")
        if g is not None and g.transformer is self.transformer and g.label_embed is self.label_embed.embedder:
            return g
        c = self.label_embed.config
        cfg = {
            "image_size": c.image_size, "channels": c.channels, "patch_size": c.patch_size,
            "num_classes": c.num_classes, "null_label": c.null_label, "num_text_tokens": c.num_tokens,
            "default_guidance": c.default_guidance, "default_shift": c.default_shift,
            "position_features": c.position_features, "prediction": c.prediction,
            "transformer": {"joint_attention_dim": c.joint_dim, "pooled_projection_dim": c.pooled_dim},
        }
        with torch.random.fork_rng(devices=[]):  # its unused label table must not consume the global RNG
            g = GlyphFlow(copy.deepcopy(cfg), transformer=self.transformer)
        g.label_embed = self.label_embed.embedder
        object.__setattr__(self, "_glyph_packer", g)  # not a pipeline component
        return g

    def resolve_labels(self, prompt=None, labels=None) -> list[int]:
        """Labels from a prompt (characters) or given directly (ints, null label allowed)."""
        if (prompt is None) == (labels is None):
            raise ValueError("give exactly one of prompt (characters) or labels (class indices)")
        if prompt is not None:
            return prompt_to_labels(prompt)
        if torch.is_tensor(labels):
            labels = labels.reshape(-1).tolist()
        elif isinstance(labels, int):
            labels = [labels]
        labels = [int(v) for v in labels]
        top = int(self.label_embed.config.null_label)
        bad = [v for v in labels if not 0 <= v <= top]
        if not labels or bad:
            raise ValueError(f"labels must be class indices in 0..{top} ({top}: unconditional), got {bad or labels}")
        return labels

    # -- the loop ---------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        labels=None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ):
        """Generate one glyph per prompt character (or per label).

        Args:
            prompt: characters of ``0-9A-Z`` (case-insensitive): ``"A"``, ``"HELLO"``, ``["A", "7"]``.
            labels: class indices instead of a prompt (``0..35``; ``36`` is unconditional).
            num_inference_steps: Euler steps of the engine's uniform grid (shifted by the
                model's ``default_shift`` if it has one).
            guidance_scale: classifier-free guidance ``v_u + g·(v_c − v_u)`` (default: the
                model's, 3.0).
            latents: the starting noise, (B, 3, 32, 32); default drawn with ``generator``.
            output_type: ``"pt"`` — the samples as a tensor (B, 3, 32, 32) in the model's
                data range [-1, 1], not clamped (what ``fastflow.sample`` returns);
                ``"np"`` — (B, 32, 32, 3) float in [0, 1]; ``"pil"`` — a list of PIL images.

        Returns:
            :class:`~diffusers.pipelines.pipeline_utils.ImagePipelineOutput` (``.images``),
            or ``(images,)`` with ``return_dict=False``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        cfg = self.label_embed.config
        label_list = self.resolve_labels(prompt, labels)
        batch = len(label_list)
        g = float(cfg.default_guidance if guidance_scale is None else guidance_scale)
        device = self._execution_device
        dtype = self.transformer.dtype
        packer = self._packer()
        shape = (batch, int(cfg.channels), int(cfg.image_size), int(cfg.image_size))

        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape} (one per label), got {tuple(latents.shape)}")
            latents = latents.to(device)
        x = latents.clone()

        # the doubled batch [cond, uncond]; GlyphFlow.forward packs it exactly as the
        # engine path does (patches, position features, ids) and calls self.transformer
        label = torch.tensor(label_list, dtype=torch.long, device=device)
        both = torch.cat([label, torch.full_like(label, int(cfg.null_label))])

        sched = self.scheduler
        sigmas = engine_timesteps(num_inference_steps, cfg.default_shift)[:-1]
        sched.set_timesteps(sigmas=sigmas, device=device)
        sched.set_begin_index(0)
        self._num_timesteps = len(sched.timesteps)

        with self.progress_bar(total=num_inference_steps) as bar:
            for i, t in enumerate(sched.timesteps):
                x_in = torch.cat([x, x])
                t_in = sched.sigmas[i].to(device=device, dtype=dtype).expand(2 * batch)
                v_c, v_u = packer(x_in, t_in, both).to(x.dtype).chunk(2)
                v = torch.lerp(v_u, v_c, g)
                x = sched.step(v, t, x, return_dict=False)[0]
                bar.update()

        self.maybe_free_model_hooks()  # ends fastflow's pipeline call (stateful hooks reset)

        if output_type == "pt":
            images: Any = x
        else:
            arr = (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
            images = self.numpy_to_pil(arr) if output_type == "pil" else arr
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def glyph_pipeline(directory: str | os.PathLike | None = None, device: str | torch.device | None = "cpu",
                   dtype: torch.dtype | str | None = None) -> GlyphPipeline:
    """The pipeline of a saved glyph model (default: the embedded weights,
    ``fastflow/demo/weights/glyph-flow``); see :func:`fastflow.demo.model.load_glyph_flow`.

    ``device=None``: CUDA when available, else the CPU. ``dtype``: a torch dtype or
    ``"fp32"``/``"bf16"``/``"fp16"`` (default float32). A missing or damaged model
    directory raises :class:`fastflow.demo.DemoModelError` (a ``ValueError``) naming it.
    """
    from .model import load_glyph_flow

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = torch.float32
    else:
        dtype = torch_dtype(dtype)  # an OptionError (a ValueError) for an unknown name
    return GlyphPipeline.from_glyph_flow(load_glyph_flow(directory, device=device, dtype=dtype))

"""Tiny, randomly initialised diffusers pipelines built from configs — no downloads.

For tests and smoke runs of :mod:`fastflow.diffusers_hook`: every component (denoiser,
VAE, text encoders, tokenizers) is constructed in code, the tokenizers from a small
vocabulary written here. The outputs are noise-like pictures; what matters is that the
pipelines run their real code paths (schedulers, guidance, packing, VAE decode) in well
under a second on a CPU.

>>> from diffusers_tiny import tiny_pipeline, tiny_inputs
>>> pipe = tiny_pipeline("flux")                                 # doctest: +SKIP
>>> pipe(**tiny_inputs("flux"), num_inference_steps=8).images.shape   # doctest: +SKIP
(1, 8, 8, 3)

Needs ``transformers`` (``pip install fastflow[dev]``).
"""

from __future__ import annotations

import string

FAMILIES = ("flux", "flux-kontext", "flux-img2img", "sd3", "wan", "wan2.2", "chroma")

_WORDS = ["a", "the", "cat", "dog", "photo", "of", "painting", "red", "blue", "bad", "ugly", "blurry",
          "squirrel", "burger", "eating", "dance", "monkey", "make", "it", "night", "low", "quality"]


def clip_tokenizer(max_length: int = 16):
    """A CLIP BPE tokenizer over letters and a few words (ids < 128)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for w in _WORDS:
        vocab.setdefault(w + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 32):
    """A T5 (Unigram) tokenizer over letters and a few words (ids < 128)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0) for w in _WORDS]
    pieces += [("▁" + ch, -3.0) for ch in string.ascii_lowercase]
    pieces += [(ch, -4.0) for ch in string.ascii_lowercase + string.digits]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_config(**kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=1, vocab_size=128, hidden_act="gelu",
        projection_dim=32, max_position_embeddings=32, **kw,
    )


def _t5_encoder():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )).eval()


def _vae_kl(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()


def tiny_pipeline(family: str, seed: int = 0, scheduler=None):
    """A tiny pipeline of ``family`` (one of :data:`FAMILIES`), weights seeded by ``seed``.

    ``scheduler`` replaces the default ``FlowMatchEulerDiscreteScheduler``.
    The global torch RNG is left as it was.
    """
    import torch

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny pipeline family {family!r}; known: {', '.join(FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _BUILDERS[family](scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux(scheduler, cls_name="FluxPipeline"):
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()
    cls = getattr(diffusers, cls_name)
    return cls(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(),
        text_encoder=CLIPTextModel(_clip_config()).eval(), tokenizer=clip_tokenizer(),
        text_encoder_2=_t5_encoder(), tokenizer_2=t5_tokenizer(),
        transformer=transformer, vae=_vae_kl(1), image_encoder=None, feature_extractor=None,
    )


def _sd3(scheduler):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16,
    ).eval()
    return StableDiffusion3Pipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=CLIPTextModelWithProjection(_clip_config()).eval(), tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config()).eval(), tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_encoder(), tokenizer_3=t5_tokenizer(),
        transformer=transformer, vae=_vae_kl(4),
    )


def _wan(scheduler, experts=1):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
    ).eval()

    def transformer():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=1, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ).eval()

    two = experts == 2  # Wan 2.2: a high-noise and a low-noise expert, switched at boundary_ratio
    return WanPipeline(
        tokenizer=t5_tokenizer(), text_encoder=_t5_encoder(), transformer=transformer(), vae=vae,
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer_2=transformer() if two else None, boundary_ratio=0.6 if two else None,
    )


def _chroma(scheduler):
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8],
        approximator_hidden_dim=32, approximator_layers=1, approximator_num_channels=16,
    ).eval()
    return ChromaPipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), text_encoder=_t5_encoder(),
        tokenizer=t5_tokenizer(), transformer=transformer, vae=_vae_kl(1),
        image_encoder=None, feature_extractor=None,
    )


_BUILDERS = {
    "flux": _flux,
    "flux-kontext": lambda s: _flux(s, "FluxKontextPipeline"),
    "flux-img2img": lambda s: _flux(s, "FluxImg2ImgPipeline"),
    "sd3": _sd3,
    "wan": _wan,
    "wan2.2": lambda s: _wan(s, experts=2),
    "chroma": _chroma,
}


def tiny_inputs(family: str) -> dict:
    """Call arguments that keep a tiny pipeline tiny (8×8 pixels, short prompts)."""
    common = {"prompt": "a photo of a cat", "max_sequence_length": 16, "output_type": "pt"}
    if family == "flux":
        return {**common, "height": 8, "width": 8, "guidance_scale": 3.5}
    if family == "flux-kontext":
        from PIL import Image

        return {**common, "height": 8, "width": 8, "guidance_scale": 2.5, "image": Image.new("RGB", (8, 8), (90, 30, 200)),
                "max_area": 64, "_auto_resize": False, "prompt": "make it night"}
    if family == "flux-img2img":
        from PIL import Image

        return {**common, "height": 8, "width": 8, "guidance_scale": 3.5, "strength": 0.6,
                "image": Image.new("RGB", (8, 8), (200, 120, 40))}
    if family == "sd3":
        return {**common, "height": 8, "width": 8, "guidance_scale": 5.0}
    if family in ("wan", "wan2.2"):
        return {**common, "height": 16, "width": 16, "num_frames": 5, "guidance_scale": 5.0,
                "negative_prompt": "bad quality"}
    if family == "chroma":
        return {**common, "height": 8, "width": 8, "guidance_scale": 4.0, "negative_prompt": "blurry"}
    raise ValueError(f"unknown tiny pipeline family {family!r}; known: {', '.join(FAMILIES)}")

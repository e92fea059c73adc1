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

FAMILIES = ("flux", "flux-kontext", "flux-img2img", "sd3", "wan", "wan2.2", "chroma", "ltx", "qwenimage", "cogview4",
            "lumina2")

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


def qwen2_tokenizer():
    """A byte-level BPE (Qwen2) tokenizer: one token per byte, no merges (ids < 260)."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|endoftext|>": 0}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    specials = ["<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=specials)


def gemma_tokenizer():
    """A Gemma (BPE) tokenizer: one token per printable character, no merges (ids < 110)."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "▁": 5}
    for ch in string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[])


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


def _ltx(scheduler):
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline
    from diffusers import LTXVideoTransformer3DModel

    # spatial compression 4·2 = 8, temporal 2: 32×32×5 pixels give 4×4×3 latents
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, False, False, False),
        decoder_spatio_temporal_scaling=(True, False, False, False),
        decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=4, patch_size_t=1,
    ).eval()
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, num_layers=1, caption_channels=32,
    ).eval()
    return LTXPipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_t5_encoder(),
        tokenizer=t5_tokenizer(), transformer=transformer,
    )


def _qwenimage(scheduler):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 260, "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        image_token_id=259, video_token_id=259, vision_start_token_id=259, vision_end_token_id=259,
    )).eval()
    # vae scale factor 2**len(temperal_downsample) = 4, latents packed 2×2: 16×16 pixels give 2×2 tokens
    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ).eval()
    return QwenImagePipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
        tokenizer=qwen2_tokenizer(), transformer=transformer,
    )


def _cogview4(scheduler):
    from diffusers import AutoencoderKL, CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    text_encoder = GlmModel(GlmConfig(
        vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0,
    )).eval()
    # vae scale factor 2**(len(block_out_channels) - 1) = 2: 16×16 pixels give 8×8 latents, 4×4 patches
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(4, 4), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=1, sample_size=16,
    ).eval()
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=32, time_embed_dim=8, condition_dim=4,
    ).eval()
    scheduler = scheduler or FlowMatchEulerDiscreteScheduler(
        base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True, time_shift_type="linear",
    )
    return CogView4Pipeline(
        tokenizer=t5_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler,
    )


def _lumina2(scheduler):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=112, hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, sliding_window=8, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )).eval()
    # the pipeline takes a vae scale factor of 8: three downsamplings, 32×32 pixels give 4×4 latents
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=1, sample_size=32, shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()
    transformer = Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=16, num_layers=1, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(64, 16, 16),
        cap_feat_dim=16,
    ).eval()
    return Lumina2Pipeline(
        transformer=transformer, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=text_encoder, tokenizer=gemma_tokenizer(),
    )


_BUILDERS = {
    "flux": _flux,
    "flux-kontext": lambda s: _flux(s, "FluxKontextPipeline"),
    "flux-img2img": lambda s: _flux(s, "FluxImg2ImgPipeline"),
    "sd3": _sd3,
    "wan": _wan,
    "wan2.2": lambda s: _wan(s, experts=2),
    "chroma": _chroma,
    "ltx": _ltx,
    "qwenimage": _qwenimage,
    "cogview4": _cogview4,
    "lumina2": _lumina2,
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
    if family == "ltx":
        return {**common, "height": 32, "width": 32, "num_frames": 5, "guidance_scale": 3.0,
                "negative_prompt": "bad quality"}
    if family == "qwenimage":
        return {**common, "height": 16, "width": 16, "true_cfg_scale": 4.0, "negative_prompt": "blurry"}
    if family == "cogview4":
        return {**common, "height": 16, "width": 16, "guidance_scale": 5.0, "negative_prompt": "blurry"}
    if family == "lumina2":  # character tokens: a short system prompt, a longer sequence
        return {**common, "height": 32, "width": 32, "guidance_scale": 4.0, "negative_prompt": "blurry",
                "system_prompt": "draw", "max_sequence_length": 48}
    raise ValueError(f"unknown tiny pipeline family {family!r}; known: {', '.join(FAMILIES)}")

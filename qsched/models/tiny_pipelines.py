"""Tiny random pipelines of the non-FLUX families, for tests and smoke runs (no hub, seconds on a CPU).

Why: every algorithm must run on an SDXL-style UNet (convolutions, two CLIP text encoders whose sequences
start with a BOS token) and on a PixArt-style DiT (T5 text, no BOS), not only on flux-tiny. The
architectures keep the real models' structure (SDXL-Turbo's block types, ``text_time`` conditioning,
linear ``proj_in``/``proj_out``) at a size that generates a 32×32 image in milliseconds. They reuse
flux-tiny's word-level tokenizers, so all tiny worlds share one vocabulary. The PixArt-α one lives in
:mod:`qsched.models.tiny_pixart`; the PixArt-Σ one here reuses its parts.
"""
from __future__ import annotations

import torch

from qsched.runtime.generation import GenerationSettings

SDXL_TEXT_LENGTH = 16
SDXL_CLIP_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        max_position_embeddings=SDXL_TEXT_LENGTH, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                        hidden_act="gelu", projection_dim=32)
# SDXL-Turbo's UNet layout (DownBlock2D, then cross-attention blocks; text_time added conditioning) at toy width.
SDXL_UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                        transformer_layers_per_block=(1, 1), cross_attention_dim=64, use_linear_projection=True,
                        addition_embed_type="text_time", addition_time_embed_dim=8,
                        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=16)
SDXL_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                       up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 32, 32], latent_channels=4,
                       layers_per_block=1, norm_num_groups=8, sample_size=32)
TINY_SDXL_SETTINGS = GenerationSettings(steps=2, height=32, width=32, guidance_scale=0.0)
TINY_PIXART_SETTINGS = GenerationSettings(steps=2, height=32, width=32, guidance_scale=4.5, max_sequence_length=16)


def build_tiny_sdxl_pipeline(seed: int = 0, words: list[str] | None = None):
    """A randomly initialised ``StableDiffusionXLPipeline`` (Euler ancestral, as SDXL-Turbo): 32×32 images,
    8×8 latents, two CLIP encoders (causal, BOS-first) whose penultimate states concatenate to the
    64-wide cross-attention context."""
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline, \
        UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from qsched.tinyworld.model import SPECIAL_TOKENS, build_tokenizer

    if words is None:
        from qsched.tinyworld.world import VOCAB as words
    torch.manual_seed(seed)
    vocab_size = len(SPECIAL_TOKENS) + len(set(words) - set(SPECIAL_TOKENS))
    clip = CLIPTextConfig(vocab_size=vocab_size, **SDXL_CLIP_CONFIG)
    tokenizers = [build_tokenizer(words, with_bos=True) for _ in range(2)]
    for tok in tokenizers:
        tok.model_max_length = SDXL_TEXT_LENGTH
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**SDXL_VAE_CONFIG), text_encoder=CLIPTextModel(clip),
        text_encoder_2=CLIPTextModelWithProjection(clip), tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
        unet=UNet2DConditionModel(**SDXL_UNET_CONFIG),
        scheduler=EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                  beta_end=0.012, timestep_spacing="trailing"),
        add_watermarker=False)
    for name in ("vae", "text_encoder", "text_encoder_2", "unet"):
        getattr(pipe, name).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_pixart_pipeline(seed: int = 0, words: list[str] | None = None):
    """The tiny random PixArt-α pipeline of :mod:`qsched.models.tiny_pixart` (T5 text: no BOS)."""
    from qsched.models.tiny_pixart import build_tiny_pixart_pipeline as build

    return build(seed, words)


def build_tiny_pixart_sigma_pipeline(seed: int = 0, words: list[str] | None = None, scheduler=None):
    """A randomly initialised ``PixArtSigmaPipeline``: the tiny PixArt-α parts (T5 text, no BOS; 32×32
    images) with PixArt-Σ's transformer options (no resolution/aspect conditioning, ``interpolation_scale``
    2) and, unless ``scheduler`` is given, PixArt-Σ's shipped scheduler (DPM-Solver++)."""
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    from qsched.models.shipped_configs import build_scheduler
    from qsched.models.tiny_pixart import PIXART_TRANSFORMER_CONFIG

    alpha = build_tiny_pixart_pipeline(seed, words)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(**{**PIXART_TRANSFORMER_CONFIG, "use_additional_conditions": False,
                                              "interpolation_scale": 2}).eval()
    pipe = PixArtSigmaPipeline(tokenizer=alpha.tokenizer, text_encoder=alpha.text_encoder, vae=alpha.vae,
                               transformer=transformer, scheduler=scheduler or build_scheduler("pixart-sigma"))
    pipe.set_progress_bar_config(disable=True)
    return pipe

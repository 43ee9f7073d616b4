"""Tiny random PixArt-α pipeline for tests and smoke runs of the cache search (no hub, seconds on a CPU).

The FLUX counterpart is :func:`qsched.tinyworld.model.build_tiny_pipeline`. This one reuses its
word-level tokenizer and T5 config so the two tiny worlds speak the same vocabulary.
"""
from __future__ import annotations

import torch

PIXART_TRANSFORMER_CONFIG = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=2, cross_attention_dim=32, sample_size=8, patch_size=2,
                                 caption_channels=64, norm_type="ada_norm_single", num_embeds_ada_norm=1000)
PIXART_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                         up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 32, 32], latent_channels=4,
                         layers_per_block=1, norm_num_groups=8, sample_size=32)


def build_tiny_pixart_pipeline(seed: int = 0, words: list[str] | None = None):
    """A randomly initialised PixArtAlphaPipeline: 2 ``BasicTransformerBlock`` s (ada_norm_single), 32×32
    images (8×8 latents, 16 image tokens), DPM-Solver++ scheduler. Call it with ``clean_caption=False``,
    ``use_resolution_binning=False`` and ``max_sequence_length=16``."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from qsched.tinyworld.model import SPECIAL_TOKENS, T5_CONFIG, build_tokenizer

    if words is None:
        from qsched.tinyworld.world import VOCAB as words
    torch.manual_seed(seed)
    vocab_size = len(SPECIAL_TOKENS) + len(set(words) - set(SPECIAL_TOKENS))
    pipe = PixArtAlphaPipeline(
        tokenizer=build_tokenizer(words, with_bos=False),
        text_encoder=T5EncoderModel(T5Config(vocab_size=vocab_size, **T5_CONFIG)),
        vae=AutoencoderKL(**PIXART_VAE_CONFIG),
        transformer=PixArtTransformer2DModel(**PIXART_TRANSFORMER_CONFIG),
        scheduler=DPMSolverMultistepScheduler(),
    )
    for name in ("vae", "text_encoder", "transformer"):
        getattr(pipe, name).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_call_kwargs(steps: int = 4, seed: int = 0, guidance_scale: float = 4.5) -> dict:
    """Keyword arguments for a deterministic tiny PixArt call (tensor output)."""
    return dict(num_inference_steps=steps, height=32, width=32, guidance_scale=guidance_scale, output_type="pt",
                clean_caption=False, use_resolution_binning=False, max_sequence_length=16,
                generator=torch.Generator("cpu").manual_seed(seed))

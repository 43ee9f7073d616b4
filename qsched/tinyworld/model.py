"""flux-tiny: a complete diffusers ``FluxPipeline`` small enough to train and search on two CPU cores.

Same architecture family as FLUX.1-schnell (double- and single-stream blocks, joint attention, rotary
positions, CLIP pooled + T5 sequence conditioning, flow-matching Euler sampler), scaled down for the
32×32 shape world. Tokenizers are word-level over the world's vocabulary and built in code, so nothing is
downloaded. ``train_v2.py`` trains it (``SHIPPED_*_CONFIG``: a 2×-downsampling VAE, 64 image tokens); the
trained weights ship in ``weights/``. ``train.py`` trained the previous generation (v1) at the compact shape
the tests build.
"""
from __future__ import annotations

from pathlib import Path

import torch

from qsched.core.errors import ModelNotFoundError
from qsched.runtime.generation import GenerationSettings

WEIGHTS_DIR = Path(__file__).parent / "weights"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]  # eos id 3: CLIP's pooling looks eos up by id
IMAGE_SIZE = 32
TEXT_LENGTH = 16

# The compact shape (4x-downsampling VAE, 16 image tokens): what the test suite and smoke runs build at random
# init (a quarter of the shipped model's tokens keeps the suite fast), and what v1 was trained at.
TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=32, num_layers=2, num_single_layers=4, attention_head_dim=32,
                          num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
                          guidance_embeds=False, axes_dims_rope=[8, 12, 12])
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                  up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[32, 64, 64], latent_channels=8,
                  layers_per_block=1, norm_num_groups=16, sample_size=IMAGE_SIZE, use_quant_conv=False,
                  use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0)
# The shipped model (v2, train_v2.py): 2x-downsampling VAE, 64 image tokens of 2x2 latent patches (4x4 px each).
SHIPPED_TRANSFORMER_CONFIG = dict(TRANSFORMER_CONFIG, in_channels=16)
SHIPPED_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                          up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 32], latent_channels=4,
                          layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE, use_quant_conv=False,
                          use_post_quant_conv=False, mid_block_add_attention=False, shift_factor=0.0,
                          scaling_factor=1.0)
CLIP_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   max_position_embeddings=TEXT_LENGTH, projection_dim=64, pad_token_id=0, bos_token_id=2, eos_token_id=3)
T5_CONFIG = dict(d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2, pad_token_id=0, eos_token_id=3,
                 decoder_start_token_id=0, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                 is_gated_act=True, relative_attention_num_buckets=8, relative_attention_max_distance=16)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
# The shipped model samples with a time shift of 3 (more of its few steps at high noise, where the layout is
# decided): chosen on a validation draw, +4.7 points judged accuracy at 4 steps on the acceptance draw
# (benchmarks/tiny_sampler.py, docs/results.md). Its training is unchanged (logit-normal σ).
SHIPPED_SCHEDULER_CONFIG = {**SCHEDULER_CONFIG, "shift": 3.0}
TINY_SETTINGS = GenerationSettings(steps=4, height=IMAGE_SIZE, width=IMAGE_SIZE, guidance_scale=0.0,
                                   max_sequence_length=TEXT_LENGTH)


def build_tokenizer(words: list[str], with_bos: bool):
    """A word-level tokenizer over ``words``: CLIP-style (``<bos> … <eos>``) or T5-style (``… <eos>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(set(words) - set(SPECIAL_TOKENS)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "<bos> $A <eos>" if with_bos else "$A <eos>"
    core.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in ("<bos>", "<eos>")])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=TEXT_LENGTH, padding_side="right")


def build_tiny_pipeline(seed: int = 0, words: list[str] | None = None, shipped: bool = False,
                        transformer_config: dict | None = None):
    """A randomly initialised flux-tiny pipeline (deterministic in ``seed``): the compact shape, or with
    ``shipped`` the shipped model's architecture (T5 without dropout, since train_v2 trains it);
    ``transformer_config`` replaces the transformer's (train_v2's width/depth ablations)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if words is None:
        from qsched.tinyworld.world import VOCAB as words
    torch.manual_seed(seed)
    vocab_size = len(SPECIAL_TOKENS) + len(set(words) - set(SPECIAL_TOKENS))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(SHIPPED_SCHEDULER_CONFIG if shipped else SCHEDULER_CONFIG)),
        vae=AutoencoderKL(**(SHIPPED_VAE_CONFIG if shipped else VAE_CONFIG)),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, **CLIP_CONFIG)),
        tokenizer=build_tokenizer(words, with_bos=True),
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=vocab_size, **T5_CONFIG,
                                                **({"dropout_rate": 0.0} if shipped else {}))),
        tokenizer_2=build_tokenizer(words, with_bos=False),
        transformer=FluxTransformer2DModel(**(transformer_config
                                              or (SHIPPED_TRANSFORMER_CONFIG if shipped else TRANSFORMER_CONFIG))),
    )
    for name in ("vae", "text_encoder", "text_encoder_2", "transformer"):
        getattr(pipe, name).eval()  # inference mode, as from_pretrained gives (T5 has dropout); training opts in
    return pipe


def load_embedded(weights_dir: Path = WEIGHTS_DIR, **components):
    """The trained flux-tiny pipeline shipped in the package (no network, fp32 compute); ``components``
    (e.g. a quantized ``transformer``) replace the shipped ones without loading them."""
    from diffusers import FluxPipeline

    if not (Path(weights_dir) / "model_index.json").is_file():
        raise ModelNotFoundError(f"the embedded flux-tiny weights are missing from {weights_dir}; "
                                 "reinstall qsched or retrain them with `python -m qsched.tinyworld.train_v2`")
    # weights ship in fp16 to stay small; compute runs in fp32 (what the reported numbers use)
    pipe = FluxPipeline.from_pretrained(str(weights_dir), local_files_only=True, use_safetensors=True,
                                        torch_dtype=torch.float32, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export_weights(source_dir: Path, weights_dir: Path = WEIGHTS_DIR) -> None:
    """Write a trained pipeline into the package as fp16 safetensors (what ``load_embedded`` reads)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(source_dir), local_files_only=True, use_safetensors=True,
                                        torch_dtype=torch.float16)
    pipe.save_pretrained(str(weights_dir), safe_serialization=True)

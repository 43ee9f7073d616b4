"""Model-family adapters: the only place where FLUX, SDXL-style UNets and PixArt-style DiTs differ.

An adapter says which pipeline attribute holds the denoiser, which layers are quantizable, which
metric group ("content": text/cross-attention and feed-forward; "quality": everything else) a layer
belongs to, and which layers read the text encoder's token sequence directly (for MixDQ's BOS-aware
handling). Every algorithm works on module paths through this interface.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from torch import nn

QUANTIZABLE = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class ModelAdapter:
    family: str
    denoiser_attr: str
    content_patterns: tuple[str, ...] = field(default_factory=tuple)
    #: Layers whose input row i is a per-token function of text token i alone (the text encoder's output,
    #: or a per-token projection of it), and the pipeline's tokenizers that produce that sequence.
    text_layers: tuple[str, ...] = field(default_factory=tuple)
    text_tokenizers: tuple[str, ...] = field(default_factory=tuple)

    def denoiser(self, pipe) -> nn.Module:
        return getattr(pipe, self.denoiser_attr)

    def quantizable_layers(self, denoiser: nn.Module) -> dict[str, nn.Module]:
        """Every linear and 2-D conv by module path; nothing is skipped silently (recipes exclude explicitly)."""
        from qsched.runtime.qlayers import QuantLayer

        return {name: m for name, m in denoiser.named_modules()
                if isinstance(m, QUANTIZABLE + (QuantLayer,)) and name}

    def layer_group(self, name: str, overrides: dict[str, str] | None = None) -> str:
        """The metric group of a layer; recipe overrides (glob pattern → group) win."""
        for pattern, group in (overrides or {}).items():
            if fnmatch.fnmatch(name, pattern):
                return group
        return "content" if any(re.search(p, name) for p in self.content_patterns) else "quality"

    def text_encoder_emits_bos(self, pipe) -> bool:
        """Whether every tokenizer feeding the text sequence puts a BOS token first (CLIP does, T5 does not)."""
        tokenizers = [t for t in (getattr(pipe, n, None) for n in self.text_tokenizers) if t is not None]
        return bool(tokenizers) and all(
            getattr(t, "bos_token_id", None) is not None and t("a").input_ids[:1] == [t.bos_token_id]
            for t in tokenizers)

    def bos_layers(self, pipe) -> dict[str, tuple[int, ...]]:
        """Candidates for FP BOS rows: text layers -> token positions (``(0,)``), when the pipeline's text
        sequence starts with a BOS. A candidate still has to show a prompt-independent row there during
        calibration (:mod:`calibrate.fp_tokens`): a bidirectional encoder's BOS row depends on the prompt."""
        if not self.text_layers or not self.text_encoder_emits_bos(pipe):
            return {}
        return {name: (0,) for name in self.quantizable_layers(self.denoiser(pipe))
                if any(re.search(p, name) for p in self.text_layers)}


# Content layers: text/cross-attention and feed-forward, per MixDQ's decoupling.
# Text layers: FLUX's context_embedder reads T5 (no BOS); SDXL's cross-attention K/V read the two CLIP
# encoders' states; PixArt's caption projection is per token, so its attn2 K/V qualify too (T5: no BOS).
FLUX = ModelAdapter("flux", "transformer", (r"\.ff\.", r"\.ff_context\.", r"\.add_[qkv]_proj$", r"\.to_add_out$",
                                            r"\.proj_mlp$", r"^context_embedder$"),
                    text_layers=(r"^context_embedder$",), text_tokenizers=("tokenizer_2",))
UNET = ModelAdapter("unet", "unet", (r"\.attn2\.", r"\.ff\."),
                    text_layers=(r"\.attn2\.to_[kv]$",), text_tokenizers=("tokenizer", "tokenizer_2"))
PIXART = ModelAdapter("pixart", "transformer", (r"\.attn2\.", r"\.ff\.", r"^caption_projection\."),
                      text_layers=(r"^caption_projection\.linear_[12]$", r"\.attn2\.to_[kv]$"),
                      text_tokenizers=("tokenizer",))

_BY_CLASS = {"FluxTransformer2DModel": FLUX, "UNet2DConditionModel": UNET, "PixArtTransformer2DModel": PIXART}


def adapter_for(pipe_or_denoiser) -> ModelAdapter:
    """Pick the adapter from the denoiser's class (a pipeline or a bare denoiser is accepted)."""
    for attr in ("transformer", "unet"):
        den = getattr(pipe_or_denoiser, attr, None)
        if isinstance(den, nn.Module):
            return adapter_for(den)
    name = type(pipe_or_denoiser).__name__
    if name not in _BY_CLASS:
        raise ValueError(f"no adapter for denoiser class {name}; supported: {sorted(_BY_CLASS)}")
    return _BY_CLASS[name]

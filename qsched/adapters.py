"""Model-family adapters: the only place where FLUX, SDXL-style UNets and PixArt-style DiTs differ.

An adapter says which pipeline attribute holds the denoiser, which layers are quantizable, and which
metric group ("content": text/cross-attention and feed-forward; "quality": everything else) a layer
belongs to. Every algorithm works on module paths through this interface.
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

    def denoiser(self, pipe) -> nn.Module:
        return getattr(pipe, self.denoiser_attr)

    def quantizable_layers(self, denoiser: nn.Module) -> dict[str, nn.Module]:
        """Every linear and 2-D conv by module path; nothing is skipped silently (recipes exclude explicitly)."""
        from calibrate.qlayers import QuantLayer

        return {name: m for name, m in denoiser.named_modules()
                if isinstance(m, QUANTIZABLE + (QuantLayer,)) and name}

    def layer_group(self, name: str, overrides: dict[str, str] | None = None) -> str:
        """The metric group of a layer; recipe overrides (glob pattern → group) win."""
        for pattern, group in (overrides or {}).items():
            if fnmatch.fnmatch(name, pattern):
                return group
        return "content" if any(re.search(p, name) for p in self.content_patterns) else "quality"


# Content layers: text/cross-attention and feed-forward, per MixDQ's decoupling.
FLUX = ModelAdapter("flux", "transformer", (r"\.ff\.", r"\.ff_context\.", r"\.add_[qkv]_proj$", r"\.to_add_out$",
                                            r"\.proj_mlp$", r"^context_embedder$"))
UNET = ModelAdapter("unet", "unet", (r"\.attn2\.", r"\.ff\."))
PIXART = ModelAdapter("pixart", "transformer", (r"\.attn2\.", r"\.ff\.", r"^caption_projection\."))

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

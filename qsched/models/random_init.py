"""Full-size registry pipelines at random init, built from the configs shipped in the package.

For measuring speed and memory at real scale without a download. Tokenizers are word-level and built in
code (the real vocabularies are data files on the hub); text quality is irrelevant at random init.
"""
from __future__ import annotations

import re

import torch

from qsched.models.shipped_configs import build_component, build_scheduler, components, load_component_config


def _tokenizer(max_length: int, with_bos: bool):
    from qsched.models.prompts import HELD_OUT_PROMPTS, REAL_MODEL_PROMPTS
    from qsched.tinyworld.model import build_tokenizer

    words = sorted({w for p in REAL_MODEL_PROMPTS + HELD_OUT_PROMPTS for w in re.findall(r"\w+|[^\w\s]", p.lower())})
    tok = build_tokenizer(words, with_bos=with_bos)
    tok.model_max_length = max_length
    return tok


def build_random_pipeline(model: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0, device: str = "cpu",
                          width_scale: float = 1.0, **given):
    """The registry ``model`` pipeline with random weights (deterministic in ``seed``) at hidden-width
    ``width_scale``; ``given`` components (e.g. a quantized denoiser) are used instead of building them."""
    import diffusers

    torch.manual_seed(seed)
    index = load_component_config(model, "model_index")
    parts = {}
    for name in components(model):
        if name in given:
            continue
        parts[name] = build_scheduler(model) if name == "scheduler" else build_component(model, name, device, dtype,
                                                                                      width_scale)
    for name, (_, cls_name) in ((k, v) for k, v in index.items() if not k.startswith("_") and isinstance(v, list)):
        if name.startswith("tokenizer"):
            # CLIP tokenizers emit <bos>; T5 ones do not. Real models keep 77 CLIP tokens.
            clip = "CLIP" in cls_name
            parts[name] = _tokenizer(77 if clip else 512, with_bos=clip)
    pipe_cls = getattr(diffusers, index["_class_name"])
    optional = {k: None for k in getattr(pipe_cls, "_optional_components", []) if k not in parts and k not in given}
    return pipe_cls(**parts, **given, **optional)

"""Registry architectures at reduced width: ``qcompile --init random --width-scale F``.

Why: a rehearsal of a full-size compile on a machine that cannot hold the real model. Depth is kept exactly
(FLUX.1-schnell keeps its 19 double and 38 single blocks, 502 linears, its projections and head layout);
only widths shrink. Widths are scaled through the **number of attention heads**, rounded to the nearest
integer and at least one, so every head keeps its real size (FLUX's 128 with its rotary axes, PixArt's 72,
the UNet's and the text encoders' 64). Everything another component reads is derived from the scaled
component it comes from (FLUX's ``joint_attention_dim`` is the scaled T5 width, its
``pooled_projection_dim`` the scaled CLIP width), so the scaled pipeline runs as the real one does. The
effective scale of each component is ``heads' / heads``; the VAE's channels scale by ``F`` in multiples
of its normalisation groups.

Model-specific knowledge lives here, keyed by component class, as a table of rules.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from qsched.core.errors import QschedError


def check_width_scale(width_scale: float | None, init: str, model: str | None = None) -> None:
    """The CLI's and ``compile()``'s check, before any work: a number in (0, 1], with ``--init random`` and a
    model whose configs are shipped."""
    if width_scale is None:
        return
    if isinstance(width_scale, bool) or not isinstance(width_scale, (int, float)) or not 0.0 < width_scale <= 1.0:
        raise QschedError(f"--width-scale {width_scale!r} must lie in (0, 1] (1 is the real width); "
                          "for example --width-scale 0.125")
    if init != "random":
        raise QschedError("--width-scale needs --init random: it shrinks a registry architecture built at random "
                          "init, and cannot shrink pretrained weights")
    from qsched.models.shipped_configs import SHIPPED

    if model is not None and model not in SHIPPED:
        raise QschedError(f"--width-scale shrinks a registry architecture from its shipped configs, one of "
                          f"{', '.join(sorted(SHIPPED))}; got --model {model!r}")


def _heads(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def _keep_order(original: list[int], scaled: list[int], step: int) -> list[int]:
    """``scaled`` made to rise wherever ``original`` rises (by ``step``) and stay equal where it does: a UNet's
    or VAE's blocks that change width have a shortcut projection, which must not vanish at small widths."""
    out = list(scaled)
    for i in range(1, len(out)):
        if original[i] > original[i - 1]:
            out[i] = max(out[i], out[i - 1] + step)
        elif original[i] == original[i - 1]:
            out[i] = out[i - 1]
    return out


def _ratio(value: int, new_heads: int, heads: int, multiple: int = 1) -> int:
    """``value`` scaled by the head ratio, rounded to a positive multiple of ``multiple``."""
    return max(multiple, round(value * new_heads / heads / multiple) * multiple)


def _clip_text(cfg: dict, scale: float, _widths: dict) -> dict:
    heads = cfg["num_attention_heads"]
    h = _heads(heads, scale)
    head_dim = cfg["hidden_size"] // heads
    cfg.update(num_attention_heads=h, hidden_size=h * head_dim,
               intermediate_size=_ratio(cfg["intermediate_size"], h, heads),
               projection_dim=_ratio(cfg.get("projection_dim", cfg["hidden_size"]), h, heads))
    return cfg


def _t5(cfg: dict, scale: float, _widths: dict) -> dict:
    heads = cfg["num_heads"]
    h = _heads(heads, scale)
    cfg.update(num_heads=h, d_model=_ratio(cfg["d_model"], h, heads), d_ff=_ratio(cfg["d_ff"], h, heads))
    return cfg


def _flux(cfg: dict, scale: float, widths: dict) -> dict:
    cfg["num_attention_heads"] = _heads(cfg["num_attention_heads"], scale)  # head dim (rotary axes) kept
    cfg["joint_attention_dim"] = widths["T5EncoderModel"]["d_model"]
    cfg["pooled_projection_dim"] = widths["CLIPTextModel"]["hidden_size"]  # the pipeline's pooler_output
    return cfg


def _pixart(cfg: dict, scale: float, widths: dict) -> dict:
    h = _heads(cfg["num_attention_heads"], scale)
    cfg.update(num_attention_heads=h, cross_attention_dim=h * cfg["attention_head_dim"],
               caption_channels=widths["T5EncoderModel"]["d_model"])
    return cfg


def _unet(cfg: dict, scale: float, widths: dict) -> dict:
    # diffusers' SD UNets name the *number of heads* per block ``attention_head_dim``; heads are 64 wide
    heads = cfg["attention_head_dim"]
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(cfg["block_out_channels"])
    new = _keep_order(heads, [_heads(n, scale) for n in heads], 1)
    cfg["block_out_channels"] = [_ratio(c, n2, n, cfg.get("norm_num_groups") or 32)
                                 for c, n, n2 in zip(cfg["block_out_channels"], heads, new)]
    cfg["attention_head_dim"] = new
    texts = [widths[k] for k in ("CLIPTextModel", "CLIPTextModelWithProjection") if k in widths]
    cfg["cross_attention_dim"] = sum(t["hidden_size"] for t in texts)
    if cfg.get("addition_embed_type") == "text_time":
        pooled = widths["CLIPTextModelWithProjection"]["projection_dim"]
        cfg["projection_class_embeddings_input_dim"] = pooled + 6 * cfg["addition_time_embed_dim"]
    return cfg


def _vae(cfg: dict, scale: float, _widths: dict) -> dict:
    groups = cfg.get("norm_num_groups") or 32
    channels = cfg["block_out_channels"]
    cfg["block_out_channels"] = _keep_order(channels, [max(groups, round(c * scale / groups) * groups)
                                                       for c in channels], groups)
    return cfg


#: Component class -> rule. Text encoders first: the others read their scaled widths.
_RULES: dict[str, Callable[[dict, float, dict], dict]] = {
    "CLIPTextModel": _clip_text, "CLIPTextModelWithProjection": _clip_text, "T5EncoderModel": _t5,
    "FluxTransformer2DModel": _flux, "PixArtTransformer2DModel": _pixart, "UNet2DConditionModel": _unet,
    "AutoencoderKL": _vae,
}
_TEXT = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")


def class_of(cfg: dict) -> str:
    return cfg.get("_class_name") or (cfg.get("architectures") or [""])[0]


def scale_configs(configs: dict[str, dict[str, Any]], scale: float) -> dict[str, dict[str, Any]]:
    """Every component config of one pipeline (name -> config dict) at width ``scale``; fresh copies.
    ``scale == 1`` returns them unchanged. A component class with no rule stops with one line."""
    out = copy.deepcopy(configs)
    if scale == 1:
        return out
    order = sorted(out, key=lambda n: class_of(out[n]) not in _TEXT)
    widths: dict[str, dict] = {}
    for name in order:
        cls = class_of(out[name])
        if name == "scheduler" or not cls:
            continue
        rule = _RULES.get(cls)
        if rule is None:
            raise QschedError(f"--width-scale cannot shrink a {cls} (component {name!r}); it knows "
                              f"{', '.join(sorted(_RULES))}; use --width-scale 1")
        out[name] = rule(out[name], scale, widths)
        widths.setdefault(cls, out[name])
    return out

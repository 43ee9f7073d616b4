"""Analytic multiply-accumulate (MAC) counts of a denoiser, per cacheable component, and of a cache schedule.

Why analytic: the search prices thousands of schedules, so MACs must be a sum over a table, not a profiled
run; and "skip this component" must save exactly that component's MACs. The table comes from layer shapes
and token counts only:

* a linear layer applied to T tokens costs ``T · in · out`` MACs (bias adds are not MACs);
* a 2-D convolution (only the patch embedding occurs) costs ``positions · in/groups · kh · kw · out``,
  with positions = image tokens;
* an attention costs ``Tq · Tk · inner`` for ``Q·Kᵀ`` plus the same for ``P·V`` (inner = heads · head_dim).

Every linear/conv of the denoiser is assigned a token kind (image, text, joint = image + text, or one
per sample for timestep/AdaLN modulation) by the family rules below; a layer no rule knows raises, so a
new architecture cannot be priced silently wrong. Elementwise work (norms, activations, gates, rotary
embeddings, softmax) is not counted, matching ``torch.utils.flop_counter`` (flops = 2 · MACs).

Families without rules here (UNets: the resolution changes from block to block, so one token count per
kind does not exist) are priced by :func:`measured_module_macs` instead: the same per-module formulas,
with each module's rows, positions and attention lengths read from the shapes of one real denoiser call.

All counts are per sample and per denoiser evaluation; :meth:`CostModel.schedule_macs` multiplies by the
batch and by ``passes`` (2 for classifier-free guidance, whose two branches PixArt batches together).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from qsched.runtime.cache_schedule import CacheSchedule, _denoiser, block_layout

SAMPLE, IMAGE, TEXT, JOINT = "sample", "image", "text", "joint"

# (regex on the module path, token kind); first match wins. Token kind may also be an int (fixed count).
_FLUX_RULES: list[tuple[str, str | int]] = [
    (r"^time_text_embed\.", SAMPLE),
    (r"\.norm1(_context)?\.linear$", SAMPLE),
    (r"^single_transformer_blocks\.\d+\.norm\.linear$", SAMPLE),
    (r"^norm_out\.linear$", SAMPLE),
    (r"^x_embedder$", IMAGE),
    (r"^proj_out$", IMAGE),
    (r"^context_embedder$", TEXT),
    (r"^transformer_blocks\.\d+\.attn\.(add_[qkv]_proj|to_add_out)$", TEXT),
    (r"^transformer_blocks\.\d+\.ff_context\.", TEXT),
    (r"^transformer_blocks\.\d+\.attn\.(to_[qkv]|to_out\.0)$", IMAGE),
    (r"^transformer_blocks\.\d+\.ff\.", IMAGE),
    (r"^single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out)$", JOINT),
]
_FLUX_ATTENTION = [(r"^(single_)?transformer_blocks\.\d+\.attn$", JOINT, JOINT)]

_PIXART_RULES: list[tuple[str, str | int]] = [
    (r"^adaln_single\.emb\.resolution_embedder\.", 2),  # height and width, embedded as two rows per sample
    (r"^adaln_single\.", SAMPLE),
    (r"^caption_projection\.", TEXT),
    (r"^pos_embed\.proj$", IMAGE),
    (r"^proj_out$", IMAGE),
    (r"^transformer_blocks\.\d+\.attn1\.(to_[qkv]|to_out\.0)$", IMAGE),
    (r"^transformer_blocks\.\d+\.attn2\.(to_q|to_out\.0)$", IMAGE),
    (r"^transformer_blocks\.\d+\.attn2\.to_[kv]$", TEXT),
    (r"^transformer_blocks\.\d+\.ff\.", IMAGE),
]
_PIXART_ATTENTION = [(r"^transformer_blocks\.\d+\.attn1$", IMAGE, IMAGE),
                     (r"^transformer_blocks\.\d+\.attn2$", IMAGE, TEXT)]

_FAMILIES = {"FluxTransformer2DModel": (_FLUX_RULES, _FLUX_ATTENTION),
             "PixArtTransformer2DModel": (_PIXART_RULES, _PIXART_ATTENTION)}


@dataclass(frozen=True)
class TokenCounts:
    """Sequence lengths seen by the denoiser for one sample: image (latent patches) and text tokens."""

    image: int
    text: int

    def count(self, kind: str | int) -> int:
        if isinstance(kind, int):
            return kind
        return {SAMPLE: 1, IMAGE: self.image, TEXT: self.text, JOINT: self.image + self.text}[kind]


def token_counts(pipe, height: int, width: int, max_sequence_length: int | None = None) -> TokenCounts:
    """Token counts a pipeline call at ``height × width`` produces (text: the padded prompt length)."""
    den = _denoiser(pipe)
    name = type(den).__name__
    vsf = int(getattr(pipe, "vae_scale_factor", 8))
    if name == "FluxTransformer2DModel":
        # FluxPipeline packs 2×2 latent patches into one token; latents are rounded to a multiple of 2
        lh, lw = 2 * (int(height) // (vsf * 2)), 2 * (int(width) // (vsf * 2))
        return TokenCounts(image=(lh // 2) * (lw // 2), text=int(max_sequence_length or 512))
    if name == "PixArtTransformer2DModel":
        p = int(den.config.patch_size)
        return TokenCounts(image=(int(height) // vsf // p) * (int(width) // vsf // p),
                           text=int(max_sequence_length or 120))
    raise ValueError(f"no token-count rule for {name}; supported: {sorted(_FAMILIES)}")


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear layer, quantized or not; None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if getattr(module, "kind", None) == "linear" and hasattr(module, "compute_dtype"):  # calibrate.QuantLayer
        w = module.weight if getattr(module, "weight_bits", None) is None else module.qweight
        return int(w.shape[1]), int(w.shape[0])
    return None


def _conv_macs_per_position(module: nn.Module) -> int | None:
    if isinstance(module, nn.Conv2d):
        out_c, in_per_group, kh, kw = module.weight.shape
        return int(out_c * in_per_group * kh * kw)
    if getattr(module, "kind", None) == "conv2d" and hasattr(module, "compute_dtype"):
        w = module.weight if getattr(module, "weight_bits", None) is None else module.qweight
        out_c, in_per_group, kh, kw = w.shape
        return int(out_c * in_per_group * kh * kw)
    return None


def _is_leaf_compute(module: nn.Module) -> bool:
    return _linear_shape(module) is not None or _conv_macs_per_position(module) is not None


def _match(rules, path):
    for pattern, *kinds in rules:
        if re.search(pattern, path):
            return kinds
    return None


def module_macs(model, tokens: TokenCounts) -> dict[str, int]:
    """MACs per sample and evaluation of every linear, conv and attention module of the denoiser, by path.

    Attention entries count only the two attention matmuls (their projections are separate entries).
    """
    den = _denoiser(model)
    family = _FAMILIES.get(type(den).__name__)
    if family is None:
        raise ValueError(f"no MAC rules for {type(den).__name__}; supported: {sorted(_FAMILIES)}")
    rules, attention_rules = family
    out: dict[str, int] = {}
    unknown = []
    for path, module in den.named_modules():
        if not path:
            continue
        attn = _match(attention_rules, path)
        if attn is not None:
            q_kind, k_kind = attn
            inner = _linear_shape(module.to_q)[1]
            out[path] = 2 * tokens.count(q_kind) * tokens.count(k_kind) * inner
            continue
        if not _is_leaf_compute(module):
            continue
        kind = _match(rules, path)
        if kind is None:
            unknown.append(path)
            continue
        n = tokens.count(kind[0])
        shape = _linear_shape(module)
        out[path] = n * shape[0] * shape[1] if shape is not None else n * _conv_macs_per_position(module)
    if unknown:
        raise ValueError(f"no token rule for layer(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} of "
                         f"{type(den).__name__}; extend cache_search.cost rules")
    return out


class _Measured(Exception):
    """Stops the measuring run after the denoiser's first call."""


def measured_module_macs(pipe, settings) -> tuple[dict[str, int], TokenCounts]:
    """MACs per sample of every linear, conv and attention module of ``pipe``'s denoiser, from the shapes of
    its first call in a run at ``settings`` (the same formulas as :func:`module_macs`: rows · in ·
    out, positions · per-position MACs, 2 · Tq · Tk · inner). Also the image and text lengths seen by the
    first attention layer that reads text (0 when none does)."""
    import dataclasses

    import torch

    from qsched.runtime.generation import call_arguments

    def call():
        with torch.inference_mode():
            pipe(["a"], **call_arguments(pipe, dataclasses.replace(settings, steps=2)), output_type="latent")

    return measure_denoiser_macs(_denoiser(pipe), call)


def measure_denoiser_macs(den: nn.Module, call) -> tuple[dict[str, int], TokenCounts]:
    """:func:`measured_module_macs` of whatever ``call()`` runs ``den`` on: MACs per sample of every linear, conv
    and attention module in ``den``'s first call (a real pipeline call, or ``den`` called directly on meta-device
    inputs, which prices a model without weights), and the image and text lengths its first text-reading
    attention saw."""
    import torch
    from diffusers.models.attention_processor import Attention

    macs: dict[str, int] = {}
    seen = {"batch": None, "done": False, "image": 0, "text": 0}

    def leaf_hook(path):
        def hook(module, args, out):
            if seen["done"] or not isinstance(out, torch.Tensor):
                return
            shape = _linear_shape(module)
            if shape is not None:
                rows = out.numel() // out.shape[-1]
                macs[path] = macs.get(path, 0) + rows * shape[0] * shape[1]
            else:
                positions = out.shape[0] * out.shape[-2] * out.shape[-1]
                macs[path] = macs.get(path, 0) + positions * _conv_macs_per_position(module)
        return hook

    def attention_hook(path):
        def hook(module, args, kwargs):
            if seen["done"]:
                return
            hidden = args[0] if args else kwargs.get("hidden_states")
            context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            tq = hidden.shape[-2] * hidden.shape[-1] if hidden.ndim == 4 else hidden.shape[1]
            tk = context.shape[1] if context is not None else tq
            if context is not None and not seen["text"]:
                seen["image"], seen["text"] = int(tq), int(tk)
            if context is not None and getattr(module, "add_q_proj", None) is not None:
                tq = tk = tq + tk  # joint attention (FLUX, SD3): text and image attend together
            macs[path] = macs.get(path, 0) + 2 * hidden.shape[0] * tq * tk * _linear_shape(module.to_q)[1]
        return hook

    def denoiser_pre(module, args, kwargs):
        if seen["batch"] is None:
            first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            seen["batch"] = int(first.shape[0])

    def denoiser_post(module, args, out):
        seen["done"] = True
        raise _Measured  # one denoiser call is all it takes: skip the rest of the run

    handles = [den.register_forward_pre_hook(denoiser_pre, with_kwargs=True), den.register_forward_hook(denoiser_post)]
    for path, module in den.named_modules():
        if isinstance(module, Attention) or (hasattr(module, "to_q") and hasattr(module, "to_k")):
            handles.append(module.register_forward_pre_hook(attention_hook(path), with_kwargs=True))
        elif path and _is_leaf_compute(module):
            handles.append(module.register_forward_hook(leaf_hook(path)))
    try:
        call()
    except _Measured:
        pass
    finally:
        for h in handles:
            h.remove()
    batch = seen["batch"] or 1
    return {k: v // batch for k, v in macs.items()}, TokenCounts(seen["image"], seen["text"])


@dataclass
class CostModel:
    """MAC table of one denoiser at one resolution: per cacheable component, plus the always-run rest."""

    components: dict[tuple[str, str], int]
    overhead: int
    tokens: TokenCounts
    per_module: dict[str, int] = field(default_factory=dict, repr=False)

    @classmethod
    def from_model(cls, model, tokens: TokenCounts) -> "CostModel":
        return cls.from_table(model, module_macs(model, tokens), tokens)

    @classmethod
    def from_pipeline(cls, pipe, height: int, width: int, max_sequence_length: int | None = None) -> "CostModel":
        return cls.from_model(pipe, token_counts(pipe, height, width, max_sequence_length))

    @classmethod
    def for_pipeline(cls, pipe, settings) -> "CostModel":
        """Analytic when the denoiser's family has rules here, else measured from one real call."""
        if type(_denoiser(pipe)).__name__ in _FAMILIES:
            return cls.from_pipeline(pipe, settings.height, settings.width, settings.max_sequence_length)
        per_module, tokens = measured_module_macs(pipe, settings)
        return cls.from_table(pipe, per_module, tokens)

    @classmethod
    def from_table(cls, model, per_module: dict[str, int], tokens: TokenCounts) -> "CostModel":
        """Per-module MACs assigned to the cacheable components that contain them; the rest is overhead."""
        components = {(b, c): 0 for b, comps in block_layout(model) for c in comps}
        prefixes = {f"{b}.{c}": (b, c) for b, c in components}
        overhead = 0
        for path, macs in per_module.items():
            owner = next((key for prefix, key in prefixes.items()
                          if path == prefix or path.startswith(prefix + ".")), None)
            if owner is None:
                overhead += macs
            else:
                components[owner] += macs
        return cls(components, overhead, tokens, per_module)

    @property
    def step_macs(self) -> int:
        """One uncached denoiser evaluation of one sample."""
        return self.overhead + sum(self.components.values())

    def schedule_macs(self, schedule: CacheSchedule, batch: int = 1, passes: int = 1) -> int:
        """Exact denoiser MACs of a sampling run under ``schedule`` (reused components cost nothing)."""
        missing = [s for s in schedule.slots if s not in self.components]
        if missing:
            raise ValueError(f"schedule component(s) {missing[:3]} are not in this cost model")
        col = np.array([self.components[s] for s in schedule.slots], dtype=np.int64)
        computed = int(((~schedule.table) * col[None, :]).sum())
        return (schedule.steps * self.overhead + computed) * int(batch) * int(passes)

    def no_cache_macs(self, steps: int, batch: int = 1, passes: int = 1) -> int:
        return steps * self.step_macs * int(batch) * int(passes)

    def mac_fraction(self, schedule: CacheSchedule) -> float:
        """Schedule MACs relative to the uncached run (1.0 = no saving)."""
        return self.schedule_macs(schedule) / self.no_cache_macs(schedule.steps)

    def to_dict(self) -> dict:
        return {"tokens": {"image": self.tokens.image, "text": self.tokens.text}, "overhead": self.overhead,
                "step_macs": self.step_macs,
                "components": {f"{b}.{c}": m for (b, c), m in self.components.items()}}

"""Token rows kept in floating point: MixDQ's BOS-aware text-embedding quantization, made generic.

A CLIP text encoder is causal, so its first token (BOS) sees only itself: that row of the text sequence
is the same for every prompt, and in trained encoders it is a huge outlier. If a cross-attention key or
value projection quantizes its input per tensor, that one row sets the activation range and every real
word is quantized coarsely. So, for layers that read the text sequence directly (the adapter's text
layers), the BOS row's output is computed once in FP and stored with the layer, the other rows go
through the quantized layer, and the activation range is collected without the BOS row.

Nothing is taken on trust: the rows are captured during the FP calibration run, and a layer only gets
FP rows when its input there was the same in every calibrated sequence. A BOS from a bidirectional
encoder (T5) fails this and is reported. All-zero rows are tolerated: SDXL zeroes the unconditional
embedding under classifier-free guidance (``force_zeros_for_empty_prompt``), and at run time a row that
does not match the stored input simply keeps the quantized result (:func:`qsched.runtime.qlayers.substitute_fp_tokens`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from qsched.runtime.qlayers import FP_TOKEN_RTOL


@dataclass
class FPTokens:
    """One layer's FP rows: token positions, the constant input rows there, and the FP layer's output on them."""

    positions: tuple[int, ...]
    inputs: torch.Tensor   # [P, in_features]
    outputs: torch.Tensor  # [P, out_features]


@dataclass
class FPTokenReport:
    """What the capture decided, per candidate layer (plain data for the manifest)."""

    applied: dict[str, list[int]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    note: str = ""  # why there were no candidates at all, if so

    def to_dict(self) -> dict:
        return {"applied": dict(sorted(self.applied.items())), "rejected": dict(sorted(self.rejected.items())),
                "note": self.note}


def drop_rows(x: torch.Tensor, positions: tuple[int, ...]) -> torch.Tensor:
    """``x`` without the token rows at ``positions`` (dim -2); unchanged if it is not a token sequence."""
    if not positions or x.dim() < 3 or x.shape[-2] <= max(positions):
        return x
    keep = torch.ones(x.shape[-2], dtype=torch.bool, device=x.device)
    keep[list(positions)] = False
    return x[..., keep, :]


@contextmanager
def record_rows(layers: dict[str, nn.Module], positions: dict[str, tuple[int, ...]]):
    """Collect each layer's input rows at its positions over the block: ``{name: [tensor [n, P, in], ...]}``."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in positions}

    def hook(_module, args, name):
        x, pos = args[0], positions[name]
        if x.dim() >= 3 and x.shape[-2] > max(pos):
            rows[name].append(x[..., list(pos), :].detach().reshape(-1, len(pos), x.shape[-1]).float().cpu())

    handles = [layers[n].register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in positions]
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()


def fp_tokens_from_rows(module: nn.Module, positions: tuple[int, ...], rows: list[torch.Tensor],
                        n_prompts: int) -> FPTokens | str:
    """The layer's :class:`FPTokens` if every recorded row matches one constant row (or is zero), else
    the reason it does not qualify."""
    if n_prompts < 2:
        return "calibrated on fewer than 2 prompts: cannot tell a prompt-independent row"
    if not rows:
        return "never saw a token sequence long enough to hold these positions"
    seen = torch.cat(rows)                                         # [M, P, in]
    magnitude = seen.abs().amax(-1)                                # [M, P]
    ref = seen[magnitude.sum(-1).argmax()]                         # the non-zero row (zeros are CFG's unconditional half)
    tol = FP_TOKEN_RTOL * ref.abs().amax(-1)                       # [P]
    if not bool((tol > 0).all()):
        return "the row is all zeros"
    deviation = (seen - ref).abs().amax(-1)                        # [M, P]
    ok = (deviation <= tol) | (magnitude <= tol)
    if not bool(ok.all()):
        worst = float((deviation / ref.abs().amax(-1)).masked_fill(ok, 0).max())
        return (f"input at token position(s) {list(positions)} varies across prompts (deviates by {worst:.3g} of "
                f"its magnitude): not a prompt-independent BOS row")
    weight = next(module.parameters())
    with torch.no_grad():
        out = module(ref.to(weight.device, weight.dtype))
    return FPTokens(tuple(positions), ref.to(weight.dtype).clone(), out.detach().clone())

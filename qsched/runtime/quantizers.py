"""Reference quantizers: the arithmetic every other part of qsched agrees on.

Weights: symmetric round-to-nearest per output channel (optionally per group of input features), codes in
[-(2^(b-1)-1), 2^(b-1)-1] so that zero is exact and the range is symmetric. The scale is either the
absolute maximum over qmax (``"max"``, plain RTN) or the clipped maximum that minimises each row's squared
rounding error (``"mse"``): at 3-4 bits a few outlier weights otherwise waste most of the levels (on
flux-tiny, weight SQNR 11.6 -> 14.1 dB at 3 bits). Only the scale changes; codes, packing and runtimes
are the same. Activations: asymmetric per
tensor with a static scale and zero point from calibration statistics. The FP8 (e4m3) format, at the end
of this module, has per-channel weight scales and symmetric static per-tensor activation scales. All are
plain torch functions so that the simulated model, the packed artifact and the runtimes share one definition.
"""
from __future__ import annotations

import torch


def weight_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View a weight as [out, groups, group_size] (conv kernels are flattened per output channel)."""
    flat = weight.reshape(weight.shape[0], -1)
    size = flat.shape[1] if not group_size else group_size
    if flat.shape[1] % size:
        raise ValueError(f"group size {group_size} does not divide the input width {flat.shape[1]}")
    return flat.reshape(flat.shape[0], -1, size)


WEIGHT_SCALES = ("max", "mse")
#: clipping ratios the "mse" scale tries, from the unclipped maximum down to half of it
MSE_CLIP_RATIOS = tuple(1.0 - 0.02 * i for i in range(26))


def weight_scale(grouped: torch.Tensor, bits: int, method: str = "max") -> torch.Tensor:
    """Per-row scales [out, groups] of an fp32 ``[out, groups, size]`` weight (see the module docstring).

    ``"mse"`` tries :data:`MSE_CLIP_RATIOS` of the row's maximum and keeps, per row, the ratio with the
    least squared rounding error (the unclipped maximum on ties, so it is never worse than ``"max"``)."""
    if method not in WEIGHT_SCALES:
        raise ValueError(f"unknown weight scale {method!r}: expected one of {', '.join(WEIGHT_SCALES)}")
    qmax = weight_qmax(bits)
    best = grouped.abs().amax(dim=-1).clamp(min=1e-12) / qmax
    if method == "max":
        return best
    least = _rounding_error(grouped, best, qmax)
    unclipped = best.clone()
    for ratio in MSE_CLIP_RATIOS[1:]:
        scale = unclipped * ratio
        error = _rounding_error(grouped, scale, qmax)
        better = error < least
        best = torch.where(better, scale, best)
        least = torch.where(better, error, least)
    return best


def _rounding_error(grouped: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    step = scale.unsqueeze(-1)
    return ((torch.round(grouped / step).clamp(-qmax, qmax) * step - grouped) ** 2).sum(dim=-1)


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None = None,
                    scale_method: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric quantization; returns int8 codes (weight's shape) and fp32 scales [out, groups].
    ``scale_method``: ``"max"`` (plain RTN) or ``"mse"`` (clipped to the least rounding error)."""
    grouped = _grouped(weight.detach().float(), group_size)
    qmax = weight_qmax(bits)
    scale = weight_scale(grouped, bits, scale_method)
    codes = torch.round(grouped / scale.unsqueeze(-1)).clamp(-qmax, qmax).to(torch.int8)
    return codes.reshape(weight.shape), scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, group_size: int | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize_weight` in ``dtype`` (computed in fp32, then cast, so it is reproducible)."""
    grouped = _grouped(codes, group_size).float() * scale.float().unsqueeze(-1)
    return grouped.reshape(codes.shape).to(dtype)


def activation_qparams(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """Scale and zero point of an asymmetric ``bits``-wide quantizer covering [lo, hi] (which always holds 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    levels = 2**bits - 1
    scale = max(hi - lo, 1e-8) / levels
    zero_point = int(round(-lo / scale))
    return scale, min(max(zero_point, 0), levels)


def fake_quantize_activation(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """Quantize then dequantize ``x`` per tensor; the computation runs in fp32 and returns x's dtype."""
    levels = 2**bits - 1
    q = torch.clamp(torch.round(x.float() / scale) + zero_point, 0, levels)
    return ((q - zero_point) * scale).to(x.dtype)


# FP8 (e4m3). Hopper and Ada tensor cores multiply e4m3 at the int8 rate, and e4m3's floating grid fits
# bell-shaped weights and activations without a zero point. Weights: one scale per output channel, codes
# ``w / scale`` rounded to the nearest e4m3 value (``scale = amax / 448``, so the largest weight of each row
# lands on e4m3's largest finite value). Activations: symmetric per tensor with a static scale from the
# calibrated range, ``max(|lo|, |hi|) / 448``, clamped to ±448 before the cast (e4m3fn has no infinity; an
# out-of-range value must saturate, not become NaN). These are the formulas ``torch._scaled_mm`` computes
# with, so the simulation, the artifact and the native runtime share them.

#: the FP8 format's dtype: ``torch.float8_e4m3fn`` (4 exponent bits, 3 mantissa bits, no infinities)
FP8_DTYPE = torch.float8_e4m3fn
#: e4m3fn's largest finite magnitude
FP8_MAX = 448.0


def quantize_weight_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes (``weight``'s shape, :data:`FP8_DTYPE`) and fp32 scales ``[out, 1]``, one per output channel."""
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    scale = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    codes = (flat / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes.reshape(weight.shape), scale


def fp8_act_scale(lo: float, hi: float) -> float:
    """The static per-tensor e4m3 scale of an activation calibrated to [lo, hi]: ``max(|lo|, |hi|) / 448``."""
    return max(abs(float(lo)), abs(float(hi)), 1e-8) / FP8_MAX


def quantize_activation_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The e4m3 codes of ``x / scale`` (fp32 division, saturated to ±448 before the cast)."""
    return torch.div(x.float(), scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fake_quantize_activation_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Quantize ``x`` to e4m3 with a per-tensor ``scale`` and back (fp32 arithmetic; returns x's dtype)."""
    return (quantize_activation_fp8(x, scale).float() * scale).to(x.dtype)

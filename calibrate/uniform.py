"""Uniform round-to-nearest plan: every quantizable layer at the target widths (the baseline and the
default until mixed precision is chosen)."""
from __future__ import annotations

import fnmatch

from torch import nn

from qsched.models.adapters import ModelAdapter
from qsched.core.bits import BitSpec

from qsched.core.bitplan import BitPlan, LayerPlan

#: why an fp8 plan (uniform or MixDQ's) keeps a convolution FP
FP8_CONV_REASON = "FP8 covers linear layers; convolutions stay FP"


def uniform_plan(denoiser, adapter: ModelAdapter, spec: BitSpec, group_size: int | None = None,
                 keep_fp: list[str] | None = None, groups: dict[str, str] | None = None,
                 weight_scale: str = "max") -> BitPlan:
    """One width for all layers; layers matching a ``keep_fp`` glob stay FP, and the plan says so.
    ``weight_scale``: ``"max"`` (plain RTN) or ``"mse"`` (clipped scales, qsched.runtime.quantizers).
    An ``fp8`` spec puts every linear layer at FP8 e4m3 (per-channel weight scales: no group size, no
    ``weight_scale`` choice); convolutions stay FP, since FP8 here is a linear-layer format."""
    act_bits = spec.act_bits if spec.quantize_activations else None
    plan = BitPlan(method="uniform-rtn", target=str(spec))
    for name, module in adapter.quantizable_layers(denoiser).items():
        group = adapter.layer_group(name, groups)
        kept = next((p for p in keep_fp or [] if fnmatch.fnmatch(name, p)), None)
        width = group_size_for(module, group_size)
        if kept:
            plan.layers[name] = LayerPlan(None, None, group, None, f"kept FP by recipe pattern {kept!r}", module.weight.numel())
        elif spec.format == "fp8" and isinstance(module, nn.Linear):
            plan.layers[name] = LayerPlan(8, 8, group, None, "uniform fp8", module.weight.numel(), format="fp8")
        elif spec.format == "fp8":
            plan.layers[name] = LayerPlan(None, None, group, None, FP8_CONV_REASON, module.weight.numel())
        else:
            plan.layers[name] = LayerPlan(spec.uniform_weight_bits, act_bits, group, width, f"uniform {spec}",
                                          module.weight.numel(),
                                          weight_scale=weight_scale if spec.uniform_weight_bits else "max")
    return plan


def group_size_for(module, group_size: int | None) -> int | None:
    """Use the recipe's group size where it divides the layer's input width, else per-channel."""
    if not group_size:
        return None
    fan_in = module.weight[0].numel()
    return group_size if fan_in % group_size == 0 and fan_in > group_size else None

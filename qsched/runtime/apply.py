"""Apply a BitPlan to a denoiser in place (the torchao-style one verb: ``quantize_(model, plan, ranges)``)."""
from __future__ import annotations

from torch import nn

from qsched.core.bitplan import BitPlan
from qsched.runtime.qlayers import QuantLayer


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def quantize_(denoiser: nn.Module, plan: BitPlan, act_ranges: dict[str, tuple[float, float]],
              fp_tokens: dict | None = None, weights: dict | None = None) -> nn.Module:
    """Replace every planned layer by a :class:`QuantLayer`; layers planned fully FP are left untouched.
    ``fp_tokens`` (layer -> :class:`calibrate.fp_tokens.FPTokens`) supplies the FP rows of the layers
    whose plan lists ``fp_tokens``. ``weights`` (layer -> ``(codes, scales)``) supplies weights rounded
    elsewhere (the layers planned with ``rounding: gptq`` must have them)."""
    weights = weights or {}
    fp_tokens = fp_tokens or {}
    for name, layer_plan in plan.layers.items():
        if layer_plan.weight_bits is None and layer_plan.act_bits is None:
            continue
        module = denoiser.get_submodule(name)
        if isinstance(module, QuantLayer):
            raise ValueError(f"layer {name} is already quantized")
        rows = fp_tokens.get(name) if layer_plan.fp_tokens else None
        if layer_plan.fp_tokens and (rows is None or list(rows.positions) != list(layer_plan.fp_tokens)):
            raise ValueError(f"layer {name} is planned with FP token rows {layer_plan.fp_tokens} but none were given")
        rounded = weights.get(name)
        if layer_plan.rounding != "rtn" and layer_plan.weight_bits is not None and rounded is None:
            raise ValueError(f"layer {name} is planned with {layer_plan.rounding} rounding but no rounded weights "
                             "were given")
        quant = QuantLayer.from_module(module, layer_plan.weight_bits, layer_plan.act_bits,
                                       act_ranges.get(name), layer_plan.group_size, rows,
                                       layer_plan.weight_scale, rounded if layer_plan.weight_bits is not None else None,
                                       layer_plan.format)
        set_submodule(denoiser, name, quant)
    return denoiser

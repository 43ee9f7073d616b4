"""BitPlan: the per-layer quantization decision, keyed by module path.

This is the shared vocabulary between calibration, the artifact manifest and the loader: one entry per
quantizable layer, saying its weight and activation widths (``None`` = floating point), its metric
group, and why it got that width.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerPlan:
    """What to do with one layer. ``weight_bits``/``act_bits`` of ``None`` keep that side in floating point."""

    weight_bits: int | None
    act_bits: int | None
    group: str = "quality"
    group_size: int | None = None
    reason: str = ""
    params: int = 0
    #: token positions whose output rows are precomputed in FP (MixDQ's BOS-aware text layers)
    fp_tokens: list[int] = field(default_factory=list)
    #: how the weight scales were chosen: "max" (plain RTN) or "mse" (clipped, qsched.runtime.quantizers)
    weight_scale: str = "max"
    #: how the weights were rounded: "rtn" (round-to-nearest) or "gptq" (calibrate.gptq)
    rounding: str = "rtn"
    #: the number format of the quantized sides: "int" (integer codes) or "fp8" (e4m3 weights and activations,
    #: weight_bits = act_bits = 8; qsched.runtime.quantizers)
    format: str = "int"

    def to_dict(self) -> dict:
        data = asdict(self)
        # omitted when unused: plans (and keys hashed from them) stay as before
        if not data["fp_tokens"]:
            del data["fp_tokens"]
        if data["weight_scale"] == "max":
            del data["weight_scale"]
        if data["rounding"] == "rtn":
            del data["rounding"]
        if data["format"] == "int":
            del data["format"]
        return data


@dataclass
class BitPlan:
    """Per-layer widths for a whole denoiser, plus how they were chosen."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    method: str = "uniform-rtn"
    target: str = ""

    def average_weight_bits(self, fp_bits: int = 16) -> float:
        """Size-weighted average weight width (FP layers count as ``fp_bits``)."""
        total = sum(p.params for p in self.layers.values())
        if not total:
            return float(fp_bits)
        return sum(p.params * (p.weight_bits or fp_bits) for p in self.layers.values()) / total

    def to_dict(self) -> dict:
        return {"method": self.method, "target": self.target,
                "layers": {name: plan.to_dict() for name, plan in sorted(self.layers.items())}}

    @classmethod
    def from_dict(cls, data: dict) -> "BitPlan":
        return cls(layers={name: LayerPlan(**plan) for name, plan in data["layers"].items()},
                   method=data.get("method", ""), target=data.get("target", ""))

"""The ``--bits`` grammar: ``w{2,3,4,5,6,8}a{4,8,16}``, a fractional weight budget such as ``w3.5a8``, or ``fp8``.

An integer weight width is a uniform target; a fractional one is a size-weighted average budget that
only mixed precision can meet. ``a16`` means activations stay in floating point. ``fp8`` is W8A8 in the
e4m3 floating-point format instead of integers (per-channel weight scales, static per-tensor activation
scales; :mod:`qsched.runtime.quantizers`): what Hopper and Ada GPUs multiply at the int8 rate with
``torch._scaled_mm``. ``fp8`` names a format, not a budget: with ``--uniform`` every linear layer is FP8;
otherwise MixDQ keeps the most sensitive layers floating point and puts the rest at FP8, under the recipe's
``quantization.fp8_budget_bits`` (:func:`calibrate.mixdq.mixdq_plan`).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from qsched.core.errors import BitSpecError

WEIGHT_WIDTHS = (2, 3, 4, 5, 6, 8)
ACT_WIDTHS = (4, 8, 16)
_PATTERN = re.compile(r"^w(\d+(?:\.\d+)?)a(\d+)$")
#: the number formats a spec (and a planned layer) can use: integer codes, or FP8 e4m3 weights and activations
FORMATS = ("int", "fp8")
#: MixDQ's FP8 probe is the layer at FP8 with the rest in FP: around an all-FP8 model it would change nothing
FP8_NEEDS_FP_CONTEXT = ("--bits fp8 probes each layer with the rest in FP; quantization.sensitivity_context: uniform "
                        "has no FP8 form (every layer would score the same): use fp, or --uniform")
VALID_FORMS = ("w{2,3,4,5,6,8}a{4,8,16} (e.g. w4a8, w8a8, w4a16), a fractional weight budget between 2 and 8 "
               "such as w3.5a8, or fp8 (FP8 e4m3 weights and activations)")


@dataclass(frozen=True)
class BitSpec:
    """A parsed ``--bits`` value: average weight bits and activation bits (16 = floating point), and the
    number format (``"int"``, or ``"fp8"``: 8-bit e4m3 weights and activations)."""

    weight_bits: float
    act_bits: int
    format: str = "int"

    @property
    def is_fractional(self) -> bool:
        """True when the weight width is a budget that no single width meets (needs mixed precision)."""
        return float(self.weight_bits) not in {float(w) for w in WEIGHT_WIDTHS}

    @property
    def uniform_weight_bits(self) -> int:
        """The single weight width, for a non-fractional spec."""
        if self.is_fractional:
            raise BitSpecError(f"{self} is a fractional budget; uniform quantization needs an integer width, one of {WEIGHT_WIDTHS}")
        return int(self.weight_bits)

    @property
    def quantize_activations(self) -> bool:
        return self.act_bits < 16

    def __str__(self) -> str:
        if self.format == "fp8":
            return "fp8"
        w = int(self.weight_bits) if float(self.weight_bits).is_integer() else self.weight_bits
        return f"w{w}a{self.act_bits}"

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["format"] == "int":  # omitted when unused, as in LayerPlan.to_dict
            del data["format"]
        return data


def parse_bits(text: str) -> BitSpec:
    """Parse a ``--bits`` string; raise :class:`BitSpecError` listing the valid forms otherwise."""
    if str(text).strip().lower() == "fp8":
        return BitSpec(weight_bits=8.0, act_bits=8, format="fp8")
    match = _PATTERN.match(str(text).strip().lower())
    if not match:
        raise BitSpecError(f"invalid --bits {text!r}: expected {VALID_FORMS}")
    weight, act = float(match.group(1)), int(match.group(2))
    if act not in ACT_WIDTHS:
        raise BitSpecError(f"invalid --bits {text!r}: activation width must be one of {ACT_WIDTHS}; expected {VALID_FORMS}")
    if weight.is_integer():
        if int(weight) not in WEIGHT_WIDTHS:
            raise BitSpecError(f"invalid --bits {text!r}: weight width must be one of {WEIGHT_WIDTHS}; expected {VALID_FORMS}")
    elif not (min(WEIGHT_WIDTHS) < weight < max(WEIGHT_WIDTHS)):
        raise BitSpecError(f"invalid --bits {text!r}: a fractional weight budget must lie between 2 and 8; expected {VALID_FORMS}")
    return BitSpec(weight_bits=weight, act_bits=act)

"""Our BitPlan expressed as an nvidia-modelopt quantization, and a per-layer check of modelopt against our
reference quantizers (:mod:`qsched.runtime.quantizers`).

Why: modelopt's fake-quantized model is the door to its TensorRT export, but a different quantizer would
silently change what was searched and measured. So the config is built layer by layer from the plan (no
wildcard presets), the amax values are *set from our scales* (no recalibration), and every layer is
compared against ours.

What modelopt can express (nvidia-modelopt 0.47, read from ``tensor_quant._tensor_quant`` and the CUDA
kernel ``fake_tensor_quant_device``):

* **Weights: exactly.** modelopt's integer fake quant is ``q = clamp(round(x * qmax/amax)) ; x̂ = q /
  (qmax/amax)`` with ``qmax = 2^(b-1) - 1`` and round half to even (``torch.round`` on the CPU, ``rint``
  in CUDA), the same rounding as ours (``round(x / s) * s``, ``s = absmax/qmax``). With ``amax = s * qmax``,
  ``narrow_range=True`` (codes in ±qmax, like ours) and ``axis=0`` (per output channel) or
  ``block_sizes={-1: g}`` (our input groups; for a conv ``{1: g/(kh*kw), 2: kh, 3: kw}``), modelopt
  produces our integer codes from an artifact's dequantized weights (``w/s`` is an integer, never a
  tie); the values differ by float rounding only (it divides by ``qmax/amax`` where we multiply by
  ``amax/qmax``). Quantizing FP weights itself, it differs where ``w/s`` is within fp32 rounding of
  ``k + 1/2`` (``w * qmax/amax`` and ``w / s`` round differently): 125 of 2.29M codes on flux-tiny,
  whose fp16-shipped weights hit exact ties often. A conv group that splits a kernel window
  (``g % (kh*kw) != 0``) has no modelopt block shape and is refused with an error.
* **Activations: not natively.** Ours are static *asymmetric* per tensor (scale ``s``, zero point ``zp``,
  levels ``0 … 2^b-1``). modelopt's integer quantizers are symmetric around 0 (``unsigned=True`` only
  accepts non-negative inputs and raises otherwise, so it cannot hold a zero point either). Two choices:

  - ``activations="affine"``: modelopt's static affine ``bias`` (made for KV caches) subtracts ``β`` before
    a signed quantizer and adds it back. With ``amax = (2^(b-1)-1) * s`` and ``β = (2^(b-1) - zp) * s``
    the grid and the clamp range are exactly ours. In fp32 the levels agree except at rounding ties
    (modelopt rounds ``(x - β) * qmax/amax``, we round ``x / s``; within fp32 rounding of ``k + 1/2`` either
    neighbour can win). In bf16 modelopt subtracts ``β`` in bf16, before its fp32 quantization, so
    ``x - β`` carries bf16 rounding (up to a step): on an 8-bit range [-0.7, 3.1], 39% of values land one
    level off (a layer's output moves 0.7%). A 1-element fp32 bias would subtract in fp32 but makes the
    quantizer return fp32, which the bf16 linear then rejects. And modelopt's ONNX export drops ``bias``
    (``FakeTensorQuantFunction.symbolic`` never passes it on), so this is a simulation-only equivalent,
    not a TensorRT one.
  - ``activations="symmetric"``: what TensorRT's INT8 Q/DQ runs: signed, ``amax = max(|lo|, |hi|)`` of our
    calibrated range (``narrow_range=False``, levels ``-2^(b-1) … 2^(b-1)-1``). This is a *different*
    quantizer (up to twice the step for one-sided ranges); :func:`check_against_reference` reports it per
    layer as a mismatch, with the size of the difference.

* **FP8 (e4m3) layers: exactly, to float rounding.** Ours (:mod:`qsched.runtime.quantizers`) and modelopt's
  (``num_bits=(4, 3)``; on the CPU ``tensor_quant._fp8_eager``) are the same formula: scale to ±448, clamp,
  ``.to(torch.float8_e4m3fn)`` (torch's cast: round to nearest, ties to even), scale back. Weights per output
  channel (``axis=0``, ``amax = s_w * 448``), activations per tensor and symmetric (``amax = s_x * 448``, no
  bias: FP8 has no zero point, so ``activations=`` only concerns the integer layers). The one difference is
  fp32 arithmetic: modelopt multiplies by ``448/amax`` and back by ``1/(448/amax)``, we divide by ``s`` and
  multiply by ``s``. So weights (an artifact's dequantized codes, never near a midpoint between two e4m3
  values) land on the same e4m3 codes, and an activation lands on another code only where ``x/s`` is
  within fp32 rounding of such a midpoint; :func:`check_layer` compares codes and says whether any
  difference sits on such a tie. On CUDA modelopt uses its own ``fake_e4m3fy`` kernel instead (not checked
  here: no GPU in the tests).

* **FP token rows** (a :class:`QuantLayer` serving fixed token positions in FP, MixDQ's BOS handling) are a
  row substitution, not a quantizer; modelopt has nothing for them, so such layers are reported as not
  matching (the modelopt model computes those rows quantized).

Every planned layer is named explicitly in the config, after a deny-all entry; modelopt's default
exclusions (``_default_disabled_quantizer_cfg``, which disables ``*proj_out.*`` -- the output projection
of every FLUX single block and the final projection) are deliberately not used, and
:func:`assert_plan_quantized` raises if any planned layer ends up without its enabled, calibrated
quantizers, whatever the config said.
"""
from __future__ import annotations

import contextlib
import fnmatch
import io
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from qsched.core.errors import QschedError

from qsched.runtime.apply import set_submodule
from qsched.core.bitplan import BitPlan, LayerPlan
from qsched.runtime.qlayers import QuantLayer
from qsched.runtime.quantizers import (FP8_DTYPE, FP8_MAX, activation_qparams, fake_quantize_activation,
                                       fake_quantize_activation_fp8, fp8_act_scale, quantize_weight,
                                       quantize_weight_fp8, weight_qmax)

ACTIVATION_MODES = ("affine", "symmetric")
#: layer formats the bridge expresses; anything else is refused with one line (:func:`layer_format`)
FORMATS = ("int", "fp8")
#: modelopt's ``num_bits`` for FP8 e4m3 (exponent, mantissa bits)
E4M3 = (4, 3)
INSTALL_HINT = "pip install qsched[modelopt]"


class ModeloptMissingError(QschedError):
    """nvidia-modelopt is not installed."""


class ModeloptCoverageError(QschedError):
    """A planned layer has no active modelopt quantizer (or an unplanned one has one)."""


def require_modelopt():
    """Import ``modelopt.torch.quantization`` (its import warnings silenced), or say how to install it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
    except ImportError as err:
        raise ModeloptMissingError(f"nvidia-modelopt is not installed ({err}); {INSTALL_HINT}") from None
    return mtq


@dataclass
class LayerQuant:
    """What one planned layer quantizes, in our terms: the numbers modelopt has to reproduce."""

    kind: str                      # "linear" | "conv2d"
    weight_shape: tuple[int, ...]
    weight_bits: int | None
    act_bits: int | None
    group_size: int | None
    weight_scale: torch.Tensor | None = None   # fp32 [out, groups]
    codes: torch.Tensor | None = None          # int8 (fp8: float8_e4m3fn), the weight's shape
    act_scale: float | None = None
    act_zero_point: int | None = None
    fp_token_positions: tuple[int, ...] = ()  # our layer serves these token rows in FP (MixDQ's BOS rows)
    format: str = "int"                        # "int" | "fp8" (e4m3 codes, per-channel weight scales)

    @property
    def fp8(self) -> bool:
        return self.format == "fp8"

    def num_bits(self, bits: int):
        """modelopt's ``num_bits`` for one side: the integer width, or ``(4, 3)`` for e4m3."""
        return E4M3 if self.fp8 else bits

    @property
    def act_range(self) -> tuple[float, float]:
        """The real interval our activation grid spans: ``[-zp*s, (2^b-1-zp)*s]`` (FP8: ``±448*s``)."""
        if self.fp8:
            return -FP8_MAX * self.act_scale, FP8_MAX * self.act_scale
        levels = 2 ** self.act_bits - 1
        return -self.act_zero_point * self.act_scale, (levels - self.act_zero_point) * self.act_scale


def layer_format(name: str, planned: str | None, held: str | None = None) -> str:
    """The layer's format (``planned``, checked against the ``held`` QuantLayer's): one of :data:`FORMATS`,
    else the one line saying modelopt cannot express it."""
    fmt = planned or "int"
    if held is not None and held != fmt:
        raise ValueError(f"{name}: the denoiser's layer has format {held!r}, the plan {fmt!r}")
    if fmt not in FORMATS:
        raise QschedError(f"{name}: the modelopt bridge cannot express layer format {fmt!r} (it expresses "
                          f"{', '.join(FORMATS)}); compile at --bits w8a8 or fp8 for --export modelopt")
    return fmt


def _literal(name: str) -> str:
    """A module path as an fnmatch pattern that matches only itself."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _kind(module: nn.Module) -> str:
    if isinstance(module, QuantLayer):
        return module.kind
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    raise ValueError(f"modelopt bridge: unsupported layer type {type(module).__name__}")


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, QuantLayer) and module.weight_bits is not None:
        return tuple(module.qweight.shape)
    return tuple(module.weight.shape)


def weight_block_sizes(kind: str, weight_shape: tuple[int, ...], group_size: int | None, name: str = "") -> dict:
    """modelopt's attributes for our weight granularity: ``axis=0`` per channel, ``block_sizes`` per group."""
    if not group_size:
        return {"axis": 0}
    if kind == "linear":
        return {"block_sizes": {-1: group_size}}
    kh, kw = weight_shape[2], weight_shape[3]
    if group_size % (kh * kw):
        raise ValueError(f"{name}: a weight group of {group_size} splits {kh}x{kw} kernel windows, which modelopt's "
                         f"block_sizes cannot express; plan this conv per channel or with a multiple of {kh * kw}")
    return {"block_sizes": {1: group_size // (kh * kw), 2: kh, 3: kw}}


def activation_cfg(bits: int, activations: str, fmt: str = "int") -> dict:
    """The input quantizer's attributes (per tensor; see the module docstring for the two modes; FP8 is
    symmetric in both, so ``activations`` does not change it)."""
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"unknown activations mode {activations!r}; use one of {ACTIVATION_MODES}")
    if fmt == "fp8":
        return {"num_bits": E4M3, "axis": None}
    cfg = {"num_bits": bits, "axis": None, "narrow_range": False}
    if activations == "affine":  # modelopt's schema needs an int axis key; the value we load is one scalar
        cfg["bias"] = {-1: None, "type": "static", "method": "max_min"}
    return cfg


def modelopt_config(layers: dict[str, LayerQuant], activations: str = "affine") -> dict:
    """The ``mtq.quantize`` config for ``layers``: deny all, then one explicit entry per quantizer of every
    planned layer (enabled with its attributes, or disabled for an FP side). No wildcard defaults."""
    entries: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for name, lq in layers.items():
        path = _literal(name)
        if lq.weight_bits is not None and lq.fp8:  # e4m3 per output channel (our QuantLayer has no fp8 groups)
            entries.append({"quantizer_name": f"{path}.weight_quantizer", "cfg": {"num_bits": E4M3, "axis": 0}})
        elif lq.weight_bits is not None:
            cfg = {"num_bits": lq.weight_bits, "narrow_range": True,
                   **weight_block_sizes(lq.kind, lq.weight_shape, lq.group_size, name)}
            entries.append({"quantizer_name": f"{path}.weight_quantizer", "cfg": cfg})
        else:
            entries.append({"quantizer_name": f"{path}.weight_quantizer", "enable": False})
        if lq.act_bits is not None:
            entries.append({"quantizer_name": f"{path}.input_quantizer", "cfg": activation_cfg(lq.act_bits, activations, lq.format)})
        else:
            entries.append({"quantizer_name": f"{path}.input_quantizer", "enable": False})
    # no calibration algorithm: every amax (and affine bias) is loaded from our numbers by load_quant_params
    return {"quant_cfg": entries, "algorithm": None}


def planned_layers(denoiser: nn.Module, plan: BitPlan | None = None,
                   act_ranges: dict[str, tuple[float, float]] | None = None) -> dict[str, LayerQuant]:
    """Our quantization of every planned layer. A denoiser with :class:`QuantLayer` s is read as is (its
    codes and scales); FP layers are quantized here with our reference quantizers from ``plan`` and
    ``act_ranges``. Layers the plan keeps fully FP are included, with no bits."""
    if plan is None:
        plan = BitPlan(layers={n: LayerPlan(m.weight_bits, m.act_bits, group_size=m.group_size, format=m.format)
                               for n, m in denoiser.named_modules() if isinstance(m, QuantLayer)})
    out = {}
    for name, lp in plan.layers.items():
        module = denoiser.get_submodule(name)
        fmt = layer_format(name, lp.format, module.format if isinstance(module, QuantLayer) else None)
        lq = LayerQuant(_kind(module), _weight_shape(module), lp.weight_bits, lp.act_bits, lp.group_size, format=fmt)
        if isinstance(module, QuantLayer):
            if (module.weight_bits, module.act_bits, module.group_size) != (lp.weight_bits, lp.act_bits, lp.group_size):
                raise ValueError(f"{name}: the denoiser's layer (w={module.weight_bits}, a={module.act_bits}, "
                                 f"group={module.group_size}) disagrees with the plan ({lp.weight_bits}, {lp.act_bits}, "
                                 f"{lp.group_size})")
            if lp.weight_bits is not None:
                lq.weight_scale, lq.codes = module.weight_scale.detach().float(), module.qweight.detach()
            if lp.act_bits is not None:
                lq.act_scale, lq.act_zero_point = module.activation_qparams()
            lq.fp_token_positions = tuple(getattr(module, "fp_token_positions", ()))
        else:
            if lp.weight_bits is not None:
                if lp.rounding != "rtn":
                    raise ValueError(f"{name}: the plan rounds its weights with {lp.rounding}, which needs the "
                                     "calibration inputs; pass the quantized denoiser (its codes are read as is)")
                lq.codes, lq.weight_scale = (quantize_weight_fp8(module.weight) if lq.fp8 else
                                             quantize_weight(module.weight, lp.weight_bits, lp.group_size,
                                                             lp.weight_scale))
            if lp.act_bits is not None:
                if not act_ranges or name not in act_ranges:
                    raise ValueError(f"{name}: activation quantization needs a calibrated range (act_ranges)")
                lq.act_scale, lq.act_zero_point = ((fp8_act_scale(*act_ranges[name]), 0) if lq.fp8 else
                                                   activation_qparams(*act_ranges[name], lp.act_bits))
        out[name] = lq
    return out


def _plain_module(layer: QuantLayer) -> nn.Module:
    """An ``nn.Linear`` / ``nn.Conv2d`` holding a QuantLayer's dequantized weight (what modelopt wraps)."""
    shape = _weight_shape(layer)
    with torch.device("meta"):
        if layer.kind == "linear":
            module = nn.Linear(shape[1], shape[0], bias=layer.bias is not None)
        else:
            args = layer.conv_args
            module = nn.Conv2d(shape[1] * args["groups"], shape[0], tuple(shape[2:]), stride=args["stride"],
                               padding=args["padding"], dilation=args["dilation"], groups=args["groups"],
                               bias=layer.bias is not None)
    # the QuantLayer is dropped from the model, so its tensors are taken over rather than copied
    module.weight = nn.Parameter(layer.dequantized_weight().detach(), requires_grad=False)
    layer._dequantized = None
    if layer.bias is not None:
        module.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
    return module


def _tensor_quantizers(model: nn.Module):
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


@torch.no_grad()
def _amax_buffer_from_weight(quantizer, weight: torch.Tensor) -> None:
    """Let modelopt's max calibrator see the weight once: this creates the amax buffer in the shape and
    layout modelopt's block reshaping expects (its values are overwritten with ours right after)."""
    quantizer.disable_quant()
    quantizer.enable_calib()
    quantizer(weight)
    quantizer.load_calib_amax()
    quantizer.disable_calib()
    quantizer.enable_quant()


def load_quant_params(model: nn.Module, layers: dict[str, LayerQuant], activations: str = "affine") -> None:
    """Set every planned quantizer's amax (and affine bias) from our scales: weights ``amax = s * qmax``
    in the layout modelopt gave the buffer (row-major over output channel, then group); inputs per tensor.
    FP8 layers: ``amax = s * 448`` on both sides (modelopt's e4m3 quantizer scales by ``448/amax``)."""
    for name, lq in layers.items():
        module = model.get_submodule(name)
        weight_q, input_q = getattr(module, "weight_quantizer", None), getattr(module, "input_quantizer", None)
        if lq.weight_bits is not None and weight_q is not None and weight_q.is_enabled:  # else: the assert says so
            quantizer = weight_q
            if quantizer.amax is None:
                _amax_buffer_from_weight(quantizer, module.weight)
            amax = lq.weight_scale.float() * (FP8_MAX if lq.fp8 else weight_qmax(lq.weight_bits))
            if quantizer.amax is None or quantizer.amax.numel() != amax.numel():
                raise ModeloptCoverageError(f"{name}: modelopt's weight amax has shape "
                                            f"{None if quantizer.amax is None else tuple(quantizer.amax.shape)}, ours has "
                                            f"{tuple(amax.shape)}; the granularity does not line up")
            quantizer.amax = amax.reshape(quantizer.amax.shape).to(quantizer.amax.device)
        if lq.act_bits is not None and input_q is not None and input_q.is_enabled:
            quantizer = input_q
            half = 2 ** (lq.act_bits - 1)
            device = module.weight.device
            if lq.fp8:
                quantizer.amax = torch.tensor(FP8_MAX * lq.act_scale, dtype=torch.float32, device=device)
            elif activations == "affine":
                quantizer.amax = torch.tensor((half - 1) * lq.act_scale, dtype=torch.float32, device=device)
                # a 0-dim bias: x - bias keeps x's dtype, so modelopt's output dtype matches the weight's
                quantizer.bias_value = torch.tensor((half - lq.act_zero_point) * lq.act_scale, dtype=torch.float32,
                                                    device=device)
            else:
                lo, hi = lq.act_range
                quantizer.amax = torch.tensor(max(abs(lo), abs(hi)), dtype=torch.float32, device=device)


def assert_plan_quantized(model: nn.Module, layers: dict[str, LayerQuant], activations: str = "affine") -> None:
    """Raise :class:`ModeloptCoverageError` unless exactly the planned quantizers are enabled and static.

    This is what catches a planned layer switched off by some later config entry (e.g. modelopt's default
    ``*proj_out.*`` exclusion) or by a module type modelopt does not wrap: nothing is skipped silently.
    """
    problems = []
    for name, lq in layers.items():
        module = model.get_submodule(name)
        for side, bits in (("weight", lq.weight_bits), ("input", lq.act_bits)):
            quantizer = getattr(module, f"{side}_quantizer", None)
            if quantizer is None:
                if bits is not None:
                    problems.append(f"{name}: no {side} quantizer (modelopt did not wrap {type(module).__name__})")
                continue
            if bits is None:
                if quantizer.is_enabled:
                    problems.append(f"{name}.{side}_quantizer is enabled but the plan keeps it FP")
                continue
            if not quantizer.is_enabled:
                problems.append(f"{name}.{side}_quantizer is disabled but the plan quantizes it to {bits} bits")
            elif quantizer.num_bits != lq.num_bits(bits):
                problems.append(f"{name}.{side}_quantizer has {quantizer.num_bits} bits, the plan {lq.num_bits(bits)}")
            elif quantizer.amax is None:
                problems.append(f"{name}.{side}_quantizer has no static amax (it would quantize dynamically)")
            elif side == "input" and activations == "affine" and not lq.fp8 and not hasattr(quantizer, "_bias_value"):
                problems.append(f"{name}.input_quantizer has no affine bias (zero point)")
    planned = {f"{n}.{s}_quantizer" for n, lq in layers.items()
               for s, b in (("weight", lq.weight_bits), ("input", lq.act_bits)) if b is not None}
    for qname, quantizer in _tensor_quantizers(model).items():
        if quantizer.is_enabled and qname not in planned:
            problems.append(f"{qname} is enabled but not in the plan")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; … {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ModeloptCoverageError(f"modelopt quantization does not cover the plan ({len(problems)} problem(s)): "
                                    f"{shown}. Build the config with modelopt_config() and do not append modelopt's "
                                    f"default exclusions (they disable '*proj_out.*')")


def to_modelopt(denoiser: nn.Module, plan: BitPlan | None = None, act_ranges: dict | None = None, *,
                activations: str = "affine", extra_cfg: list[dict] | None = None) -> nn.Module:
    """Quantize ``denoiser`` in place with modelopt so that it computes our quantization; returns it.

    ``denoiser`` either holds our :class:`QuantLayer` s (after :func:`qsched.runtime.apply.quantize_`, or from
    :func:`export.loader.build_denoiser`; each becomes an ``nn.Linear``/``nn.Conv2d`` with its dequantized
    weight, which modelopt re-quantizes to the same codes), or is the FP denoiser with ``plan`` and
    ``act_ranges``. ``extra_cfg`` entries are appended to the config (and then checked like the rest).
    """
    mtq = require_modelopt()
    activation_cfg(8, activations)  # validates the mode before any work
    layers = planned_layers(denoiser, plan, act_ranges)
    for name in layers:
        module = denoiser.get_submodule(name)
        if isinstance(module, QuantLayer):
            set_submodule(denoiser, name, _plain_module(module))
    config = modelopt_config(layers, activations)
    config["quant_cfg"] += list(extra_cfg or [])
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # it prints "Inserted N quantizers"
        warnings.simplefilter("ignore")
        mtq.quantize(denoiser, config)
    load_quant_params(denoiser, layers, activations)
    assert_plan_quantized(denoiser, layers, activations)
    return denoiser


# ------------------------------------------------------------------------------------------- the check

def _sample(lq: LayerQuant, n: int = 4099) -> torch.Tensor:
    """A dense sweep over our calibrated range and 25% beyond each end (exercises clamping and ties)."""
    lo, hi = lq.act_range
    pad = 0.25 * (hi - lo)
    return torch.linspace(lo - pad, hi + pad, n, dtype=torch.float32)


def _layer_input(lq: LayerQuant, module: nn.Module, sample: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """An input for the whole-layer comparison: real rows for a linear when given, else random values
    centred on the calibrated range."""
    if sample is not None and lq.kind == "linear" and sample.shape[-1] == lq.weight_shape[1]:
        return sample.reshape(-1, lq.weight_shape[1])[:64]
    center, spread = 0.0, 1.0
    if lq.act_bits is not None:
        lo, hi = lq.act_range
        center, spread = (lo + hi) / 2, (hi - lo) / 4
    if lq.kind == "linear":
        shape = (4, lq.weight_shape[1])
    else:
        shape = (1, module.in_channels, max(8, lq.weight_shape[2]), max(8, lq.weight_shape[3]))
    return torch.randn(shape, generator=gen) * spread + center


def _e4m3(v: torch.Tensor) -> torch.Tensor:
    """The e4m3 values of ``v`` (already divided by the scale): saturated, cast, as fp32 (so -0 == 0)."""
    return v.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()


#: how close to a midpoint between two e4m3 values counts as a tie: 2^-13 relative, about 1e-3 of the
#: e4m3 step (2^-3 relative), as the integer checks allow 1e-3 of a step; fp32 rounding is ~2^-23
E4M3_TIE = 2.0 ** -13


def _e4m3_tie(v: torch.Tensor) -> torch.Tensor:
    """Where ``v`` (divided by the scale, in float64) is within :data:`E4M3_TIE` of an e4m3 midpoint, so
    that fp32 rounding of the scaling can pick either neighbour."""
    v = v.double()
    return _e4m3(v * (1 - E4M3_TIE)) != _e4m3(v * (1 + E4M3_TIE))


def _f(x) -> float:
    x = float(x)
    return x if math.isfinite(x) else float("inf")


@torch.no_grad()
def check_layer(name: str, reference: nn.Module, quantized: nn.Module, lq: LayerQuant, activations: str,
                sample: torch.Tensor | None = None, seed: int = 0) -> dict:
    """One row of :func:`check_against_reference` (plain floats, ints, bools and strings)."""
    row = {"kind": lq.kind, "weight_bits": lq.weight_bits, "act_bits": lq.act_bits, "group_size": lq.group_size,
           "format": lq.format}
    reasons, match, worst = [], True, 0.0
    if lq.weight_bits is None and lq.act_bits is None:
        enabled = [s for s in ("weight", "input") if getattr(getattr(quantized, f"{s}_quantizer", None), "is_enabled", False)]
        row.update(weight_max_abs_diff=_f((reference.weight - quantized.weight).abs().max()), weight_match=not enabled,
                   act_max_abs_diff=None, act_match=None)
        match = not enabled
        reasons.append("kept FP in the plan; modelopt quantizers explicitly disabled" if match
                       else f"kept FP in the plan but modelopt quantizes {enabled}")
    else:
        ref_w = reference.dequantized_weight() if isinstance(reference, QuantLayer) else reference.weight
        mo_w = quantized.weight_quantizer(quantized.weight)
        diff = _f((mo_w.float() - ref_w.float()).abs().max())
        row["weight_max_abs_diff"] = diff
        if lq.weight_bits is not None:
            # the codes modelopt's weight lands on, and where the weight it quantized (the FP weight, or the
            # artifact's dequantized one) sits on a rounding tie
            if lq.fp8:  # e4m3 codes, one scale per output channel
                scale = lq.weight_scale.reshape(lq.weight_shape[0], 1)
                flat = mo_w.detach().float().reshape(lq.weight_shape[0], -1)
                differ_mask = _e4m3(flat / scale) != lq.codes.float().reshape(flat.shape)
                tie = _e4m3_tie(quantized.weight.detach().double().reshape(flat.shape) / scale.double())
                label, codes, at = "weights (fp8)", "e4m3", "e4m3 midpoints"
                how = "modelopt scales by 448/amax, we divide by s; fp32 rounding can cross a midpoint"
            else:
                scale = lq.weight_scale.unsqueeze(-1)
                flat = mo_w.detach().float().reshape(lq.weight_shape[0], scale.shape[1], -1)
                differ_mask = torch.round(flat / scale) != lq.codes.float().reshape(flat.shape)
                src = quantized.weight.detach().double().reshape(flat.shape) / scale.double()
                tie = ((src - src.floor()) - 0.5).abs() < 1e-3
                label, codes, at = "weights", "integer", "rounding ties w/s = k+1/2"
                how = ("modelopt rounds w*(qmax/amax), we round w/s; the two fp32 results can fall on either side "
                       "of a tie")
            differ = int(differ_mask.sum())
            ties_only = differ > 0 and not bool((differ_mask & ~tie).any())
            row.update(weight_codes_differ=differ, weight_differ_only_at_ties=ties_only, weight_match=differ == 0)
            worst = max(worst, diff)
            if differ:
                match = False
                where = f"only at {at}" if ties_only else "not only at ties"
                reasons.append(f"{label}: {differ} of {differ_mask.numel()} codes differ, {where} ({how})")
            else:
                reasons.append(f"{label}: same {codes} codes, values equal to float rounding")
        else:
            row.update(weight_match=diff == 0.0)
            match &= diff == 0.0
            reasons.append("weights: FP in both" if diff == 0.0 else "weights: FP but different")
        if lq.act_bits is not None and lq.fp8:  # symmetric e4m3 per tensor in both: compare the codes
            x = (sample.reshape(-1) if sample is not None else _sample(lq)).to(quantized.weight.dtype)
            ours = fake_quantize_activation_fp8(x, lq.act_scale)
            theirs = quantized.input_quantizer(x)
            adiff = _f((theirs.float() - ours.float()).abs().max())
            # both outputs sit on the grid (to float rounding, far from any midpoint): re-quantizing gives the codes
            differ = _e4m3(theirs.double() / lq.act_scale) != _e4m3(ours.double() / lq.act_scale)
            off = differ.float().mean().item()
            ties_only = bool(differ.any()) and not bool((differ & ~_e4m3_tie(x.double() / lq.act_scale)).any())
            row.update(act_max_abs_diff=adiff, act_levels_differ=off, act_differ_only_at_ties=ties_only,
                       act_match=off == 0.0, act_mode="fp8")
            worst = max(worst, adiff)
            if off == 0.0:
                reasons.append("activations (fp8): same e4m3 codes, equal to float rounding")
            else:
                match = False
                why = ("only at e4m3 midpoints: modelopt scales x by 448/amax, we divide by s; fp32 rounding can pick "
                       "the other neighbour" if ties_only else "away from e4m3 midpoints")
                reasons.append(f"activations (fp8): {off:.3%} of the sample on another e4m3 code, max |diff| "
                               f"{adiff:.3g}: {why}")
        elif lq.act_bits is not None:
            # in the layer's compute dtype: that is what reaches both quantizers in the model (bf16 matters)
            x = (sample.reshape(-1) if sample is not None else _sample(lq)).to(quantized.weight.dtype)
            ours = fake_quantize_activation(x, lq.act_scale, lq.act_zero_point, lq.act_bits)
            theirs = quantized.input_quantizer(x)
            adiff = _f((theirs.float() - ours.float()).abs().max())
            differ = (theirs.float() - ours.float()).abs() > lq.act_scale / 2
            off = differ.float().mean().item()
            scaled = x.double() / lq.act_scale
            tie = ((scaled - scaled.floor()) - 0.5).abs() < 1e-3  # within fp32 rounding of x/s = k + 1/2
            ties_only = bool(differ.any()) and not bool((differ & ~tie).any())
            row.update(act_max_abs_diff=adiff, act_levels_differ=off, act_differ_only_at_ties=ties_only,
                       act_match=off == 0.0, act_mode=activations)
            worst = max(worst, adiff)
            if off == 0.0:
                reasons.append(f"activations ({activations}): same levels, equal to float rounding")
            else:
                match = False
                if activations == "symmetric":
                    why = ("modelopt's integer quantizer is symmetric (amax=max(|lo|,|hi|)); ours is asymmetric "
                           "with a zero point")
                elif ties_only:
                    why = ("only at rounding ties x/s = k+1/2: modelopt rounds (x - bias)*(qmax/amax), we round x/s; "
                           "float rounding (and, for an odd bias/s, half-to-even itself) can pick the other neighbour")
                else:
                    why = "float rounding of x - bias away from ties"
                reasons.append(f"activations ({activations}): {off:.3%} of the sample on another level, "
                               f"max |diff| {adiff:.3g} (step {lq.act_scale:.3g}): {why}")
        else:
            row.update(act_max_abs_diff=None, act_match=None)
        # the whole layer on one input: shows how the differences above add up in its output
        inp = _layer_input(lq, quantized, sample, torch.Generator().manual_seed(seed))
        dtype = quantized.weight.dtype
        inp = inp.to(dtype=dtype, device=quantized.weight.device)
        ref_out, mo_out = reference(inp).float(), quantized(inp).float()
        out_diff = (mo_out - ref_out).abs().max()
        row["output_max_abs_diff"] = _f(out_diff)
        row["output_rel_diff"] = _f(out_diff / ref_out.abs().max().clamp(min=1e-12))
    if lq.fp_token_positions:  # a row substitution, not a quantizer: modelopt has nothing to express it with
        match = False
        row["fp_token_positions"] = list(lq.fp_token_positions)
        reasons.append(f"our layer serves token rows {list(lq.fp_token_positions)} in FP (MixDQ's BOS rows); "
                       "modelopt has no such substitution, so it computes those rows quantized")
    row["max_abs_diff"] = worst
    row["match"] = bool(match)
    row["reason"] = "; ".join(reasons)
    return row


def check_against_reference(reference: nn.Module, quantized: nn.Module | None = None, plan: BitPlan | None = None,
                            act_ranges: dict | None = None, *, activations: str = "affine",
                            samples: dict[str, torch.Tensor] | None = None, seed: int = 0) -> dict[str, dict]:
    """Compare modelopt's quantizers with ours, layer by layer; returns ``{module path: row}``.

    ``reference`` holds our :class:`QuantLayer` s (or is the FP denoiser, with ``plan`` and ``act_ranges``,
    quantized here with :func:`qsched.runtime.apply.quantize_` on a copy). ``quantized`` is the modelopt model;
    by default it is built from a copy of ``reference`` with :func:`to_modelopt`. ``samples`` maps a layer
    to real inputs for its activation check (see :func:`capture_inputs`); otherwise a dense sweep over
    the calibrated range (and beyond it) is used. Layers are checked one at a time and the reference's
    dequantized weight is dropped after each, so the reference never holds more than one layer in FP.

    Each row holds: ``weight_max_abs_diff`` and ``weight_codes_differ`` (modelopt's fake-quantized weight
    against our dequantized one, and how many integer or e4m3 codes differ), ``act_max_abs_diff`` and
    ``act_levels_differ`` (the fraction of sample values landing on another level), the layer's
    ``output_max_abs_diff``/``output_rel_diff``, ``max_abs_diff`` (weights and activations), ``match``
    (identical codes and levels) and ``reason``.
    """
    import copy

    from qsched.runtime.apply import quantize_

    if not any(isinstance(m, QuantLayer) for m in reference.modules()):
        if plan is None:
            raise ValueError("an FP reference needs the plan (and act_ranges) to quantize it")
        fp = reference
        reference = quantize_(copy.deepcopy(fp), plan, act_ranges or {})
        if quantized is None:
            quantized = to_modelopt(copy.deepcopy(fp), plan, act_ranges, activations=activations)
    layers = planned_layers(reference, plan)
    if quantized is None:
        quantized = to_modelopt(copy.deepcopy(reference), plan, activations=activations)
    assert_plan_quantized(quantized, layers, activations)
    table = {}
    for i, (name, lq) in enumerate(layers.items()):
        ref_layer = reference.get_submodule(name)
        table[name] = check_layer(name, ref_layer, quantized.get_submodule(name),
                                  lq, activations, (samples or {}).get(name), seed + i)
        if isinstance(ref_layer, QuantLayer):
            ref_layer._dequantized = None  # one layer's FP copy at a time, not the whole model's
    return table


def summarize(table: dict[str, dict]) -> dict:
    """Counts and worst differences of a check table (what the manifest records)."""
    rows = list(table.values())
    quant = [r for r in rows if r["weight_bits"] is not None]
    acts = [r for r in rows if r.get("act_match") is not None]
    return {"layers": len(rows), "match": sum(r["match"] for r in rows),
            "weight_layers": len(quant), "weight_match": sum(bool(r["weight_match"]) for r in quant),
            "weight_codes_differ": sum(r.get("weight_codes_differ", 0) for r in quant),
            "weight_max_abs_diff": max((r["weight_max_abs_diff"] for r in quant), default=0.0),
            "act_layers": len(acts), "act_match": sum(bool(r["act_match"]) for r in acts),
            "act_max_abs_diff": max((r["act_max_abs_diff"] for r in acts), default=0.0),
            "act_levels_differ_max": max((r["act_levels_differ"] for r in acts), default=0.0),
            "output_rel_diff_max": max((r.get("output_rel_diff", 0.0) for r in rows), default=0.0),
            "fp_token_layers": sum(bool(r.get("fp_token_positions")) for r in rows),
            "fp8_layers": sum(r.get("format") == "fp8" for r in rows)}


def capture_inputs(denoiser: nn.Module, names, run, max_rows: int = 512) -> dict[str, torch.Tensor]:
    """Real inputs of ``names`` while ``run()`` runs ``denoiser``, as rows ``[n, features]`` (conv inputs:
    one row per pixel), a strided subsample of up to ``max_rows`` rows per call, over every call."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook(name):
        def _hook(_m, args):
            x = args[0].detach().float()
            rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.dim() == 4 else x.reshape(-1, x.shape[-1])
            seen[name].append(rows[:: max(1, rows.shape[0] // max_rows)].clone())
        return _hook

    handles = [denoiser.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(rows) for n, rows in seen.items() if rows}


def uncovered_by_default_filters(layers) -> list[str]:
    """Planned layers that modelopt's default exclusion list would switch off (documentation aid)."""
    from modelopt.torch.quantization.config import _default_disabled_quantizer_cfg

    patterns = [e["quantizer_name"] for e in _default_disabled_quantizer_cfg
                if "parent_class" not in e and e.get("enable") is False]
    return sorted(n for n in layers if any(fnmatch.fnmatch(f"{n}.weight_quantizer", p) for p in patterns))

"""The simulated-quantization layer that replaces ``nn.Linear`` / ``nn.Conv2d`` in a denoiser.

It holds exactly what the artifact stores (integer codes, scales, activation scale and zero point, bias; or,
in the ``fp8`` format, e4m3 codes, per-channel scales and a per-tensor activation scale whose zero point is 0),
so the model in memory after calibration and the model rebuilt from disk compute the same numbers bit for
bit. The dequantized weight is cached (not saved): simulation trades memory for speed, within a budget a
compile sets (:func:`limit_dequantized_cache`: at FLUX.1 size every cached weight together is a second,
BF16 copy of the denoiser); the packed runtimes in ``export`` keep weights packed.

A layer may also hold FP token rows (MixDQ's BOS-aware text handling, :mod:`calibrate.fp_tokens`): the
output rows of fixed token positions, precomputed in floating point, which replace the quantized rows
whenever the input at those positions is the stored constant row.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qsched.runtime.quantizers import (FP8_DTYPE, dequantize_weight, fake_quantize_activation,
                                       fake_quantize_activation_fp8, quantize_weight, quantize_weight_fp8)

#: the layer formats: integer codes, or FP8 e4m3 codes (see :func:`check_format`)
LAYER_FORMATS = ("int", "fp8")


def check_format(format: str, kind: str, weight_bits: int | None, act_bits: int | None,
                 group_size: int | None) -> None:
    """Refuse a format this layer cannot have, with the reason: FP8 is W8A8 e4m3 on linear layers only, with
    per-channel weight scales (convolutions stay integer or FP: no FP8 conv kernel is in reach)."""
    if format not in LAYER_FORMATS:
        raise ValueError(f"unknown layer format {format!r}: expected one of {', '.join(LAYER_FORMATS)}")
    if format == "fp8" and (kind != "linear" or weight_bits != 8 or act_bits != 8 or group_size):
        raise ValueError(f"the fp8 format is for linear layers at 8-bit weights and activations with per-channel "
                         f"scales; got a {kind} at w={weight_bits}, a={act_bits}, group size {group_size}")


def refuse_fp8(formats, what: str) -> None:
    """One :class:`qsched.core.errors.QschedError` line when ``formats`` (layer formats, or a spec's) hold
    ``fp8`` and ``what`` (an export or a runtime) has no FP8 form yet: said before any work, so nothing is
    written. It names the alternatives: the native runtime, or an integer W8A8 compile."""
    from qsched.core.errors import QschedError

    if "fp8" in set(formats):
        raise QschedError(f"{what} cannot express FP8 (e4m3) layers; load the artifact with "
                          "export.load(path, runtime='native') (torch._scaled_mm on sm89+ GPUs), or compile at "
                          f"--bits w8a8 for {what}")


#: Buffers that stay fp32 whatever dtype the model is cast to: the scales calibration chose, which bf16 would
#: round by up to 2^-8 of themselves (and every dequantized weight with them).
FP32_BUFFERS = ("weight_scale", "act_scale", "out_scale")


class CastableQuantized(nn.Module):
    """A quantized layer that follows ``model.to(dtype)`` (``half()``, ``pipe.to(torch.bfloat16)``, ...) as an FP
    layer would: FP tensors and ``compute_dtype`` take the new dtype, integer and e4m3 codes keep theirs, and
    the :data:`FP32_BUFFERS` are moved but never rounded."""

    compute_dtype: torch.dtype

    def _apply(self, fn, recurse=True):
        kept = {key: self._buffers[key] for key in FP32_BUFFERS if self._buffers.get(key) is not None}
        codes = self._buffers.get("qweight")
        if codes is not None and codes.dtype == FP8_DTYPE:  # e4m3 codes count as floating point: torch would cast them
            kept["qweight"] = codes
        super()._apply(fn, recurse)
        for key, scale in kept.items():
            moved = self._buffers[key]
            if moved.dtype != scale.dtype:  # cast with the rest: take the original, on the new device
                self._buffers[key] = scale.to(moved.device)
        target = fn(torch.empty(0, dtype=self.compute_dtype))  # what fn does to an FP tensor of the compute dtype
        if isinstance(target, torch.Tensor) and target.is_floating_point():
            self.compute_dtype = target.dtype
        return self


class QuantLayer(CastableQuantized):
    """A linear or 2-D convolution with quantized weights and optionally fake-quantized input activations."""

    def __init__(self, kind: str, weight_shape: tuple[int, ...], weight_bits: int | None, act_bits: int | None,
                 group_size: int | None = None, conv_args: dict | None = None, has_bias: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 fp_token_positions: tuple[int, ...] = (), format: str = "int"):
        super().__init__()
        if kind not in ("linear", "conv2d"):
            raise ValueError(f"unsupported layer kind {kind!r}")
        check_format(format, kind, weight_bits, act_bits, group_size)
        self.kind, self.weight_bits, self.act_bits, self.group_size = kind, weight_bits, act_bits, group_size
        self.format = format
        self.conv_args = dict(conv_args or {})
        self.compute_dtype = dtype
        groups = 1 if not group_size else math.prod(weight_shape[1:]) // group_size  # no tensor: built on meta
        if weight_bits is None:
            self.weight = nn.Parameter(torch.empty(weight_shape, dtype=dtype, device=device), requires_grad=False)
        else:
            code_dtype = FP8_DTYPE if format == "fp8" else torch.int8
            self.register_buffer("qweight", torch.empty(weight_shape, dtype=code_dtype, device=device))
            self.register_buffer("weight_scale", torch.empty((weight_shape[0], groups), dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(weight_shape[0], dtype=dtype, device=device), requires_grad=False) if has_bias else None
        if act_bits is not None:  # fp8 keeps the zero point (always 0): one state-dict layout for every format
            self.register_buffer("act_scale", torch.ones((), dtype=torch.float32, device=device))
            self.register_buffer("act_zero_point", torch.zeros((), dtype=torch.int32, device=device))
        self.fp_token_positions = tuple(int(p) for p in fp_token_positions)
        if self.fp_token_positions:
            if kind != "linear":
                raise ValueError("FP token rows apply to linear layers over token sequences only")
            n = len(self.fp_token_positions)
            self.register_buffer("fp_token_inputs", torch.empty((n, weight_shape[1]), dtype=dtype, device=device))
            self.register_buffer("fp_token_outputs", torch.empty((n, weight_shape[0]), dtype=dtype, device=device))
        self._dequantized: torch.Tensor | None = None
        self._act_qparams: tuple[float, int] | None = None
        self.cache_dequantized = True  # keep the dequantized weight between calls (limit_dequantized_cache)

    @classmethod
    def from_module(cls, module: nn.Module, weight_bits: int | None, act_bits: int | None,
                    act_range: tuple[float, float] | None = None, group_size: int | None = None,
                    fp_tokens=None, weight_scale: str = "max", quantized=None, format: str = "int") -> "QuantLayer":
        """Quantize an existing ``nn.Linear`` / ``nn.Conv2d`` (its weights are read, not modified).
        ``fp_tokens``: a :class:`calibrate.fp_tokens.FPTokens` whose rows this layer serves in FP.
        ``weight_scale``: how the weight scales are chosen, ``"max"`` or ``"mse"`` (see
        :func:`qsched.runtime.quantizers.weight_scale`). ``quantized``: ``(codes, scales)`` already rounded
        (e.g. by :func:`calibrate.gptq.gptq_quantize`) to use instead of round-to-nearest. ``format``: ``"int"``
        or ``"fp8"`` (e4m3 codes, :func:`qsched.runtime.quantizers.quantize_weight_fp8`; its activation scale is
        :func:`qsched.runtime.quantizers.fp8_act_scale` with zero point 0)."""
        from qsched.runtime.quantizers import activation_qparams, fp8_act_scale

        kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
        conv_args = {} if kind == "linear" else {"stride": module.stride, "padding": module.padding,
                                                 "dilation": module.dilation, "groups": module.groups}
        if kind == "conv2d" and module.padding_mode != "zeros":
            raise ValueError(f"conv padding mode {module.padding_mode!r} is not supported")
        layer = cls(kind, tuple(module.weight.shape), weight_bits, act_bits, group_size, conv_args,
                    module.bias is not None, module.weight.dtype, module.weight.device,
                    fp_tokens.positions if fp_tokens is not None else (), format)
        with torch.no_grad():
            if weight_bits is None:
                layer.weight.copy_(module.weight)
            else:
                if quantized is None:
                    quantized = quantize_weight_fp8(module.weight) if format == "fp8" else \
                        quantize_weight(module.weight, weight_bits, group_size, weight_scale)
                codes, scale = quantized
                layer.qweight.copy_(codes)
                layer.weight_scale.copy_(scale)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
            if act_bits is not None:
                if act_range is None:
                    raise ValueError("activation quantization needs a calibrated activation range")
                scale, zero_point = (fp8_act_scale(*act_range), 0) if format == "fp8" else \
                    activation_qparams(*act_range, act_bits)
                layer.act_scale.fill_(scale)
                layer.act_zero_point.fill_(zero_point)
            if fp_tokens is not None:
                layer.fp_token_inputs.copy_(fp_tokens.inputs)
                layer.fp_token_outputs.copy_(fp_tokens.outputs)
        return layer

    @property
    def in_features(self) -> int:
        """``nn.Linear``'s attribute, which pipelines read (SDXL sizes its time ids from ``add_embedding.linear_1``)."""
        return (self.qweight if self.weight_bits is not None else self.weight).shape[1]

    @property
    def out_features(self) -> int:
        return (self.qweight if self.weight_bits is not None else self.weight).shape[0]

    def dequantized_weight(self) -> torch.Tensor:
        if self.weight_bits is None:
            return self.weight
        if self._dequantized is not None and self._dequantized.device == self.qweight.device:
            return self._dequantized
        weight = dequantize_weight(self.qweight, self.weight_scale, self.compute_dtype, self.group_size)
        if getattr(self, "cache_dequantized", True):
            self._dequantized = weight
        return weight

    def _apply(self, fn, recurse=True):
        self._dequantized = self._act_qparams = None  # device or dtype moves invalidate the caches
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dequantized = self._act_qparams = None
        return super()._load_from_state_dict(*args, **kwargs)

    def activation_qparams(self) -> tuple[float, int]:
        """Scale and zero point as Python numbers, read from the buffers once (not per call: on a GPU each
        read would be a device sync in every layer at every step)."""
        if self._act_qparams is None:
            self._act_qparams = (float(self.act_scale), int(self.act_zero_point)) if self.act_bits is not None else (0.0, 0)
        return self._act_qparams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = quantized_forward(self, x, *self.activation_qparams())
        return substitute_fp_tokens(self, x, out) if self.fp_token_positions else out

    def extra_repr(self) -> str:
        w, a = format_labels(self)
        rows = f", fp_tokens={list(self.fp_token_positions)}" if self.fp_token_positions else ""
        return f"{self.kind}, shape={tuple(self.qweight.shape if self.weight_bits else self.weight.shape)}, w={w}, a={a}{rows}"


def limit_dequantized_cache(module: nn.Module, max_bytes: float | None) -> dict:
    """Let the simulated layers of ``module`` keep their dequantized weights between calls up to ``max_bytes``
    in all (None: no limit), in module order; the others dequantize on every call, the same numbers without a
    second copy. Returns what is cached: bytes and layers against the whole."""
    kept = total = cached = layers = 0
    for layer in module.modules():
        if not isinstance(layer, QuantLayer) or layer.weight_bits is None:
            continue
        size = layer.qweight.numel() * torch.empty((), dtype=layer.compute_dtype).element_size()
        total, layers = total + size, layers + 1
        layer.cache_dequantized = max_bytes is None or kept + size <= max_bytes
        if layer.cache_dequantized:
            kept, cached = kept + size, cached + 1
        else:
            layer._dequantized = None
    return {"cached_bytes": kept, "dequantized_bytes": total, "cached_layers": cached, "layers": layers}


def float_activations_(module: nn.Module) -> int:
    """Switch off the activation quantizer of every simulated ``QuantLayer`` in ``module`` (the same weights,
    activations in floating point: W*A16). What diagnoses separate from the weights, and what GGUF computes.
    Returns how many layers changed."""
    layers = [m for m in module.modules() if isinstance(m, QuantLayer)]
    for layer in layers:
        layer.act_bits = None
    return len(layers)


def format_labels(layer) -> tuple[str, str]:
    """How a layer's weights and activations are written in reprs: ``fp``, ``int<bits>`` or ``fp8``."""
    kind = "fp8" if getattr(layer, "format", "int") == "fp8" else None
    return tuple("fp" if bits is None else kind or f"int{bits}" for bits in (layer.weight_bits, layer.act_bits))


def quantized_forward(layer, x: torch.Tensor, act_scale: float, act_zero_point: int) -> torch.Tensor:
    """Fake-quantize the input (when the layer has activation bits), then the linear/conv with the
    layer's dequantized weight: the one definition shared by simulation and dequantizing runtimes. An fp8
    layer's input goes through e4m3 and back (its zero point is 0); its e4m3 weight codes dequantize as
    integer codes do (code × per-channel scale in fp32)."""
    if layer.act_bits is not None and getattr(layer, "format", "int") == "fp8":
        x = fake_quantize_activation_fp8(x, act_scale)
    elif layer.act_bits is not None:
        x = fake_quantize_activation(x, act_scale, act_zero_point, layer.act_bits)
    weight = layer.dequantized_weight()
    if layer.kind == "linear":
        return F.linear(x, weight, layer.bias)
    return F.conv2d(x, weight, layer.bias, **layer.conv_args)


#: A token row counts as the stored constant row when it is within this fraction of the row's largest
#: magnitude: loose enough for batch-dependent kernel rounding (bf16 included), far tighter than any
#: other token or the zeroed unconditional embedding differs by.
FP_TOKEN_RTOL = 0.02


def substitute_fp_tokens(layer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Put ``layer``'s precomputed FP output rows at its token positions, for every sequence whose input
    row there matches the stored one; other rows (e.g. SDXL's all-zero unconditional embedding) keep the
    quantized result. Elementwise selection, no host sync."""
    positions = layer.fp_token_positions
    if x.dim() < 3 or x.shape[-2] <= max(positions):
        return out
    ref = layer.fp_token_inputs.to(x.dtype)                                     # [P, in]
    rows = x[..., list(positions), :]                                           # [..., P, in]
    tol = FP_TOKEN_RTOL * ref.abs().amax(-1, keepdim=True)
    match = (rows - ref).abs().amax(-1, keepdim=True) <= tol                    # [..., P, 1]
    out = out.clone()
    out[..., list(positions), :] = torch.where(match, layer.fp_token_outputs.to(out.dtype), out[..., list(positions), :])
    return out


class FPTokenRows(nn.Module):
    """Wraps a deployment layer (native, bitsandbytes, ...) with a :class:`QuantLayer`'s FP token rows, so
    every runtime serves the BOS rows the way the simulation does."""

    def __init__(self, inner: nn.Module, layer: QuantLayer):
        super().__init__()
        self.inner, self.fp_token_positions = inner, layer.fp_token_positions
        self.register_buffer("fp_token_inputs", layer.fp_token_inputs.detach().clone())
        self.register_buffer("fp_token_outputs", layer.fp_token_outputs.detach().clone())
        self.path = getattr(inner, "path", type(inner).__name__)

    @property
    def in_features(self) -> int:
        """The wrapped layer's sizes, which pipelines and peft's LoRA layers read."""
        return self.inner.in_features

    @property
    def out_features(self) -> int:
        return self.inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return substitute_fp_tokens(self, x, self.inner(x))


def with_fp_tokens(inner: nn.Module, layer: QuantLayer) -> nn.Module:
    """``inner`` itself, or wrapped in :class:`FPTokenRows` when ``layer`` holds FP token rows."""
    return FPTokenRows(inner, layer) if getattr(layer, "fp_token_positions", ()) else inner

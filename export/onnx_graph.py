"""The quantized denoiser as an ONNX graph that carries the artifact's own integers.

How: every :class:`~qsched.runtime.qlayers.QuantLayer` is swapped (in place, restored afterwards) for an
:class:`OnnxLayer` that holds the layer's codes and scales in the layout an ONNX operator reads, and calls
one of four small torch custom ops (``qsched_onnx::*``). ``torch.onnx.export(..., dynamo=True)`` traces the
denoiser with them kept whole, and ``custom_translation_table`` turns each into standard ONNX (or
``com.microsoft``) nodes. So no graph pattern has to be matched after the fact, the initializers are the
artifact's codes (re-laid out, never re-quantized), and the same code serves FLUX, PixArt and UNets.

Per layer form (:func:`layer_form`, recorded per layer in the manifest; nothing is skipped):

* activations (``act_bits`` set): ``QuantizeLinear``/``DequantizeLinear`` (uint8) with the layer's static
  scale and zero point; widths below 8 get a ``Clip`` to the quantizer's range first, so uint8 saturation
  equals the simulation's ``[0, 2^b - 1]`` clamp.
* 5-8-bit weights, per channel (``dq-int8``): int8 codes ``[K, N]`` → ``DequantizeLinear(axis=1)`` →
  ``MatMul``. With 8-bit activations this is the QDQ pattern onnxruntime fuses into its integer kernel
  (``MatMulIntegerToFloat`` on CPU). Every int8 weight ``DequantizeLinear`` has its own explicit zero point 0,
  which onnxruntime's ``session.x64quantprecision`` rewrite needs (it keeps the integer kernel exact on x86
  CPUs without VNNI; see :func:`export.runtime_onnx.session_settings`).
* ≤4-bit weights (``matmulnbits``, bits=4): ``com.microsoft::MatMulNBits``. The codes are symmetric, so the
  uint4 code is ``code + 8`` with the op's default zero point 8 (2- and 3-bit codes fit the same nibbles).
  The block size is the largest of 128/64/32/16 (the CPU kernel takes 16 to 256) that divides the scale
  group (the whole row when per channel); a group's scale is repeated for each of its blocks, and a
  per-channel row that no block divides is padded with codes that decode to 0.
* grouped 5-8-bit weights (``matmulnbits``, bits=8, code + 128): onnxruntime 1.31 fuses a blocked int8
  ``DequantizeLinear`` next to activation QDQ into ``MatMulIntegerToFloat`` and computes it wrongly (43%
  off, silently), so those layers never take that pattern.
* fallbacks when no block fits the group: ``dq-int4`` (int4 initializer, blocked ``DequantizeLinear``,
  ``MatMul``) for ≤4 bits, ``int8-cast-mul`` (int8 codes, ``Cast``, ``Mul`` by the group scales) for 5-8.
* convolutions: ``DequantizeLinear`` (int8 codes, or int4 for ≤4 bits; per output channel, or blocked over
  the flattened kernel and reshaped) → ``Conv``. Layers with FP weights keep their float weight.
* FP8 layers (``--bits fp8``: e4m3 weights per output channel, a static per-tensor e4m3 activation scale):
  ``QuantizeLinear``/``DequantizeLinear`` to ``float8e4m3fn`` with zero point 0 (saturating, so an input past
  the range lands on ±448 as in the simulation), and the artifact's e4m3 codes ``[K, N]`` →
  ``DequantizeLinear(axis=1)`` → ``MatMul`` (``qdq-e4m3``, ``dq-e4m3``). onnxruntime's CPU kernels compute this
  exactly as the simulation does (tested); on GPUs the FP8 Q/DQ pair is what TensorRT fuses into an FP8 GEMM.
* FP token rows (MixDQ's BOS rows) are the simulation's own elementwise selection, traced as is.

The graph computes in float32 whatever the artifact's compute dtype: onnxruntime's CPU kernels are fp32, and
an fp32 evaluation of the same integers is what the simulation approximates.

Cache schedules: :func:`export_graph` can also return chosen block components' outputs as extra graph
outputs; :func:`reuse_variant` then cuts a graph in which those components are graph *inputs* instead (the
stored outputs of an earlier step) and everything that only fed them is removed, and :func:`switched_graph`
folds every step's cut into one graph whose skipped parts sit in ``If`` nodes. One export serves every
step of a schedule.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qsched.runtime.apply import set_submodule
from qsched.runtime.qlayers import QuantLayer, substitute_fp_tokens
from qsched.runtime.quantizers import FP8_DTYPE, fake_quantize_activation_fp8

OPSET = 21  # blocked DequantizeLinear and int4 tensors
NBITS_BLOCKS = (128, 64, 32, 16)  # MatMulNBits block sizes tried, largest first (the CPU kernel takes 16..256)
MSFT_DOMAIN = "com.microsoft"
OUTPUT = "output.sample"  # the denoiser's output (not "sample": UNets take an input of that name)

__all__ = ["OPSET", "OUTPUT", "OnnxLayer", "layer_form", "swap_layers", "export_graph", "reuse_variant",
           "switched_graph", "int4_initializers"]


# ------------------------------------------------------------------------------------------- custom ops
# Eager bodies are plain torch references of what the ONNX nodes compute (used to check the layouts
# without onnxruntime); the fake bodies give shapes to the tracer; the translations emit the nodes.

@torch.library.custom_op("qsched_onnx::quantize_activation", mutates_args=())
def quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, lo: Optional[torch.Tensor],
                        hi: Optional[torch.Tensor]) -> torch.Tensor:
    if lo is not None:
        x = torch.clamp(x, lo, hi)
    zp = zero_point.float()
    q = torch.clamp(torch.round(x.float() / scale) + zp, 0, 255)
    return ((q - zp) * scale).to(x.dtype)


@quantize_activation.register_fake
def _(x, scale, zero_point, lo, hi):
    return torch.empty_like(x)


@torch.library.custom_op("qsched_onnx::quantize_activation_fp8", mutates_args=())
def quantize_activation_fp8(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return fake_quantize_activation_fp8(x.float(), scale).to(x.dtype)


@quantize_activation_fp8.register_fake
def _(x, scale, zero_point):
    return torch.empty_like(x)


@torch.library.custom_op("qsched_onnx::dq_matmul", mutates_args=())
def dq_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], block_size: int, cast: int) -> torch.Tensor:
    w = codes.float() * (scale if block_size == 0 else scale.repeat_interleave(block_size, 0))
    y = x @ w.to(x.dtype)
    return y if bias is None else y + bias


@dq_matmul.register_fake
def _(x, codes, scale, zero_point, bias, block_size, cast):
    return x.new_empty((*x.shape[:-1], codes.shape[1]))


@torch.library.custom_op("qsched_onnx::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                 k: int, n: int, bits: int, block_size: int, accuracy_level: int) -> torch.Tensor:
    if bits == 4:
        codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(n, -1)[:, :k].float() - 8
    else:
        codes = packed.reshape(n, -1)[:, :k].float() - 128
    w = codes * scales.reshape(n, -1).repeat_interleave(block_size, 1)[:, :k]
    y = x @ w.t().to(x.dtype)
    return y if bias is None else y + bias


@matmul_nbits.register_fake
def _(x, packed, scales, bias, k, n, bits, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("qsched_onnx::dq_conv2d", mutates_args=())
def dq_conv2d(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], weight_shape: list[int], stride: list[int], padding: list[int], dilation: list[int], groups: int,
              block_size: int) -> torch.Tensor:
    if block_size == 0:
        w = codes.float() * scale.view(-1, *([1] * (codes.dim() - 1)))
    else:
        w = codes.float() * scale.repeat_interleave(block_size, 1)
    return F.conv2d(x, w.reshape(weight_shape).to(x.dtype), bias, stride, padding, dilation, groups)


@dq_conv2d.register_fake
def _(x, codes, scale, zero_point, bias, weight_shape, stride, padding, dilation, groups, block_size):
    h = (x.shape[2] + 2 * padding[0] - dilation[0] * (weight_shape[2] - 1) - 1) // stride[0] + 1
    w = (x.shape[3] + 2 * padding[1] - dilation[1] * (weight_shape[3] - 1) - 1) // stride[1] + 1
    return x.new_empty((x.shape[0], weight_shape[0], h, w))


def _matmul_nbits_schema():
    """onnxruntime's ``com.microsoft::MatMulNBits`` (the inputs used here), which onnx's own schema registry
    lacks; the exporter needs a schema to build the node."""
    from onnx.defs import OpSchema

    param, attr, INT = OpSchema.FormalParameter, OpSchema.Attribute, OpSchema.AttrType.INT
    return OpSchema(
        "MatMulNBits", MSFT_DOMAIN, 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1")], outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)"], "activations and scales"), ("T2", ["tensor(uint8)"], "packed codes")],
        attributes=[attr("K", INT, "input width"), attr("N", INT, "output width"), attr("bits", INT, "code width"),
                    attr("block_size", INT, "codes per scale"), attr("accuracy_level", INT, "compute type")])


def _translations() -> dict:
    """The ONNX translation of each custom op (onnxscript builds the nodes while the exporter traces)."""
    from onnxscript import opset21 as op
    from onnxscript.values import Op, Opset

    matmul_nbits_op = Op(Opset(MSFT_DOMAIN, 1), "MatMulNBits", _matmul_nbits_schema())

    def t_quantize_activation(x, scale, zero_point, lo, hi):
        if lo is not None:
            x = op.Clip(x, lo, hi)
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    def t_quantize_activation_fp8(x, scale, zero_point):  # saturate=1: past ±448 clamps, as the simulation's
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point, saturate=1), scale, zero_point)

    def _dq(codes, scale, zero_point, axis_per_channel, block_axis, block_size):
        args = (codes, scale) if zero_point is None else (codes, scale, zero_point)
        if block_size == 0:
            return op.DequantizeLinear(*args, axis=axis_per_channel)
        return op.DequantizeLinear(*args, axis=block_axis, block_size=block_size)

    def t_dq_matmul(x, codes, scale, zero_point, bias, block_size, cast):
        if cast:  # codes [K, N] * scales [G, 1, N] as plain arithmetic (int8-cast-mul)
            k, n = codes.shape
            grouped = op.Reshape(op.Cast(codes, to=1), op.Constant(value_ints=[k // block_size, block_size, n]))
            w = op.Reshape(op.Mul(grouped, op.Unsqueeze(scale, op.Constant(value_ints=[1]))),
                           op.Constant(value_ints=[k, n]))
        else:
            w = _dq(codes, scale, zero_point, 1, 0, block_size)
        y = op.MatMul(x, w)
        return y if bias is None else op.Add(y, bias)

    def t_matmul_nbits(x, packed, scales, bias, k, n, bits, block_size, accuracy_level):
        y = matmul_nbits_op(x, packed, scales, K=k, N=n, bits=bits, block_size=block_size,
                             accuracy_level=accuracy_level)
        return y if bias is None else op.Add(y, bias)

    def t_dq_conv2d(x, codes, scale, zero_point, bias, weight_shape, stride, padding, dilation, groups, block_size):
        w = _dq(codes, scale, zero_point, 0, 1, block_size)
        if block_size:
            w = op.Reshape(w, op.Constant(value_ints=list(weight_shape)))
        args = (x, w) if bias is None else (x, w, bias)
        return op.Conv(*args, strides=list(stride), pads=[*padding, *padding], dilations=list(dilation),
                       group=groups)

    ops = torch.ops.qsched_onnx
    return {ops.quantize_activation.default: t_quantize_activation,
            ops.quantize_activation_fp8.default: t_quantize_activation_fp8, ops.dq_matmul.default: t_dq_matmul,
            ops.matmul_nbits.default: t_matmul_nbits, ops.dq_conv2d.default: t_dq_conv2d}


# ------------------------------------------------------------------------------------------ layer forms


def nbits_block_size(k: int, group_size: int | None) -> int | None:
    """MatMulNBits block size for a row of ``k`` inputs with scale groups of ``group_size`` (None: per
    channel), or None when no accepted block fits inside a group."""
    width = group_size or k
    for block in NBITS_BLOCKS:
        if width % block == 0:
            return block
    return None if group_size else NBITS_BLOCKS[-1]  # per channel: pad the row, padding codes are 0


def layer_form(spec: dict) -> dict:
    """How one layer (a manifest layer spec) is carried in the graph: ``weight`` form, ``act`` form, the
    ONNX ``op`` that does the arithmetic, and for MatMulNBits its ``bits`` and ``block_size``."""
    kind, wbits, abits, group = spec["kind"], spec["weight_bits"], spec["act_bits"], spec["group_size"]
    if spec.get("format") == "fp8":  # W8A8 e4m3 linear, per channel (qsched.runtime.qlayers.check_format)
        form = {"act": "qdq-e4m3", "op": "MatMul", "weight": "dq-e4m3"}
        if spec.get("fp_tokens"):
            form["fp_tokens"] = list(spec["fp_tokens"])
        return form
    act = None if abits is None else ("qdq-u8" if abits == 8 else "clip-qdq-u8")
    form = {"act": act, "op": "Conv" if kind == "conv2d" else "MatMul"}
    k = int(np.prod(spec["weight_shape"][1:]))
    block = nbits_block_size(k, group)
    if wbits is None:
        form["weight"] = "fp"
    elif kind == "conv2d":
        form["weight"] = "dq-int8" if wbits > 4 else "dq-int4"
    elif wbits <= 4 and block:
        form.update(weight="matmulnbits", op="MatMulNBits", bits=4, block_size=block)
    elif wbits <= 4:
        form["weight"] = "dq-int4"
    elif not group:
        form["weight"] = "dq-int8"
    elif block:  # grouped 8-bit: MatMulNBits (onnxruntime mis-fuses blocked int8 DQ next to activation QDQ)
        form.update(weight="matmulnbits", op="MatMulNBits", bits=8, block_size=block)
    else:
        form["weight"] = "int8-cast-mul"
    if spec.get("fp_tokens"):
        form["fp_tokens"] = list(spec["fp_tokens"])
    return form


def _spec_of(layer: QuantLayer) -> dict:
    shape = tuple((layer.qweight if layer.weight_bits is not None else layer.weight).shape)
    return {"kind": layer.kind, "weight_bits": layer.weight_bits, "act_bits": layer.act_bits,
            "group_size": layer.group_size, "weight_shape": list(shape), "format": getattr(layer, "format", "int"),
            "fp_tokens": list(getattr(layer, "fp_token_positions", ()))}


class OnnxLayer(nn.Module):
    """A :class:`QuantLayer` holding its integers in the layout its ONNX form reads (see the module
    docstring); ``forward`` calls the ``qsched_onnx`` ops, so tracing it yields exactly those nodes."""

    def __init__(self, layer: QuantLayer, accuracy_level: int = 0):
        super().__init__()
        spec = _spec_of(layer)
        self.form = layer_form(spec)
        self.kind, self.act_bits = layer.kind, layer.act_bits
        self.weight_shape = spec["weight_shape"]
        self.conv_args = dict(layer.conv_args)
        if isinstance(self.conv_args.get("padding"), str):
            raise ValueError(f"conv padding {self.conv_args['padding']!r} is not supported by the ONNX export; "
                             "use explicit padding sizes")
        self.accuracy_level = int(accuracy_level)
        self.block_size = 0
        with torch.no_grad():
            if self.form["act"] == "qdq-e4m3":  # zero point 0, typed e4m3 so QuantizeLinear emits e4m3
                self.register_buffer("act_scale", torch.tensor(float(layer.act_scale), dtype=torch.float32))
                self.register_buffer("act_zero_point", torch.zeros((), dtype=FP8_DTYPE))
            elif layer.act_bits is not None:
                scale, zp = float(layer.act_scale), int(layer.act_zero_point)
                levels = 2 ** layer.act_bits - 1
                self.register_buffer("act_scale", torch.tensor(scale, dtype=torch.float32))
                self.register_buffer("act_zero_point", torch.tensor(zp, dtype=torch.uint8))
                if layer.act_bits < 8:  # quantizer range as a clip, so uint8 rounding matches the clamp
                    self.register_buffer("act_lo", torch.tensor(-zp * scale, dtype=torch.float32))
                    self.register_buffer("act_hi", torch.tensor((levels - zp) * scale, dtype=torch.float32))
            bias = None if layer.bias is None else layer.bias.detach().float().clone()
            self.register_buffer("bias", bias)
            weight = self.form["weight"]
            if weight == "fp":
                self.register_buffer("weight", layer.weight.detach().float().clone())
            elif weight == "matmulnbits":
                self._init_nbits(layer)
            else:
                self._init_dq(layer)
        self.fp_token_positions = tuple(getattr(layer, "fp_token_positions", ()))
        if self.fp_token_positions:
            self.register_buffer("fp_token_inputs", layer.fp_token_inputs.detach().float().clone())
            self.register_buffer("fp_token_outputs", layer.fp_token_outputs.detach().float().clone())

    def _init_nbits(self, layer: QuantLayer) -> None:
        """MatMulNBits layout: B [N, blocks, block * bits / 8] uint8 of ``code + 2^(bits-1)`` (the op's default
        zero point), nibbles low first (the artifact's own packing), one scale per block."""
        n, k = self.weight_shape
        bits, block = self.form["bits"], self.form["block_size"]
        blocks = math.ceil(k / block)
        offset = 2 ** (bits - 1)
        codes = layer.qweight.detach().to(torch.int16) + offset
        if blocks * block > k:  # per-channel row padded to whole blocks with codes that decode to 0
            codes = torch.cat([codes, codes.new_full((n, blocks * block - k), offset)], dim=1)
        codes = codes.to(torch.uint8).reshape(n, blocks, block)
        packed = codes[..., 0::2] | (codes[..., 1::2] << 4) if bits == 4 else codes
        self.register_buffer("packed", packed.contiguous())
        group = layer.group_size or k
        owner = (torch.arange(blocks) * block) // group  # the scale group each block lies in
        self.register_buffer("scales", layer.weight_scale.detach().float()[:, owner].reshape(-1).contiguous())
        self.block_size = block

    def _init_dq(self, layer: QuantLayer) -> None:
        codes, scale = layer.qweight.detach(), layer.weight_scale.detach().float()
        grouped = scale.shape[1] > 1
        if self.kind == "linear":
            # [K, N] so that MatMul(x, DQ(codes)) needs no transpose; per-channel scale along axis 1
            self.register_buffer("codes", codes.t().contiguous())
            self.register_buffer("scale", scale.t().contiguous() if grouped else scale[:, 0].contiguous())
        else:
            self.register_buffer("codes", codes.reshape(codes.shape[0], -1).contiguous() if grouped else codes.clone())
            self.register_buffer("scale", scale.contiguous() if grouped else scale[:, 0].contiguous())
        self.block_size = layer.group_size if grouped else 0
        # int8 codes get an explicit zero point of 0 (the same value as none), shaped like the scale: with
        # session.x64quantprecision (export.runtime_onnx.session_settings) onnxruntime rewrites int8 weights
        # as uint8 + 128 and gives a DequantizeLinear without a zero point a scalar one, which per-axis and
        # blocked DequantizeLinear reject (onnxruntime 1.31 and 1.32).
        zero = {"dq-int8": torch.int8, "dq-e4m3": FP8_DTYPE}.get(self.form["weight"])
        self.register_buffer("zero_point", None if zero is None else torch.zeros(self.scale.shape, dtype=zero))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = x
        x = x.float()
        if self.form["act"] == "qdq-e4m3":
            x = torch.ops.qsched_onnx.quantize_activation_fp8(x, self.act_scale, self.act_zero_point)
        elif self.act_bits is not None:
            x = torch.ops.qsched_onnx.quantize_activation(x, self.act_scale, self.act_zero_point,
                                                          getattr(self, "act_lo", None), getattr(self, "act_hi", None))
        weight = self.form["weight"]
        if self.kind == "linear":
            if weight == "fp":
                out = F.linear(x, self.weight, self.bias)
            elif weight == "matmulnbits":
                out = torch.ops.qsched_onnx.matmul_nbits(x, self.packed, self.scales, self.bias, self.weight_shape[1],
                                                         self.weight_shape[0], self.form["bits"], self.block_size,
                                                         self.accuracy_level)
            else:
                out = torch.ops.qsched_onnx.dq_matmul(x, self.codes, self.scale, self.zero_point, self.bias,
                                                      self.block_size,
                                                      int(weight == "int8-cast-mul"))
        else:
            args = self.conv_args
            pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [int(v), int(v)]  # noqa: E731
            if weight == "fp":
                out = F.conv2d(x, self.weight, self.bias, **args)
            else:
                out = torch.ops.qsched_onnx.dq_conv2d(x, self.codes, self.scale, self.zero_point, self.bias,
                                                      list(self.weight_shape),
                                                      pair(args.get("stride", 1)), pair(args.get("padding", 0)),
                                                      pair(args.get("dilation", 1)), int(args.get("groups", 1)),
                                                      self.block_size)
        if self.fp_token_positions:
            out = substitute_fp_tokens(self, inp.float(), out)
        return out

    def int4_buffer(self) -> str | None:
        """The buffer holding ≤4-bit codes as int8 (stored as an ONNX int4 initializer after export)."""
        return "codes" if self.form["weight"] == "dq-int4" else None


@contextlib.contextmanager
def swap_layers(denoiser: nn.Module, accuracy_level: int = 0):
    """Swap every QuantLayer of ``denoiser`` for its :class:`OnnxLayer` for the duration of the block
    (restored after, even on error); yields ``{layer name: OnnxLayer}``."""
    targets = [(name, m) for name, m in denoiser.named_modules() if isinstance(m, QuantLayer)]
    swapped = {}
    try:
        for name, module in targets:
            swapped[name] = OnnxLayer(module, accuracy_level)
            set_submodule(denoiser, name, swapped[name])
        yield swapped
    finally:
        for name, module in targets:
            set_submodule(denoiser, name, module)


# ------------------------------------------------------------------------------------------ the trace


def canonical_kwargs(kwargs: dict) -> dict:
    """A denoiser call's keyword arguments without ``return_dict`` and without None / empty containers
    (``joint_attention_kwargs={}`` and ``None`` mean the same), so export-time and run-time calls flatten
    to the same inputs."""
    def clean(value):
        if isinstance(value, dict):
            value = {k: clean(v) for k, v in value.items()}
            return {k: v for k, v in value.items() if v is not None and not (isinstance(v, dict) and not v)}
        return value
    return clean({k: v for k, v in kwargs.items() if k != "return_dict"})


def flatten_call(kwargs: dict) -> tuple[list[str], list[torch.Tensor], dict, object]:
    """(input names, tensors, constants {name: value}, pytree spec) of a canonical denoiser call. Names are
    the keyword paths joined by dots (``added_cond_kwargs.text_embeds``)."""
    from torch.utils._pytree import keystr, tree_flatten_with_path

    leaves, spec = tree_flatten_with_path(kwargs)
    names, tensors, constants = [], [], {}
    for path, leaf in leaves:
        name = keystr(path).replace("']['", ".").strip("[]'")
        if isinstance(leaf, torch.Tensor):
            names.append(name)
            tensors.append(leaf)
        else:
            constants[name] = leaf
    return names, tensors, constants, spec


class _Recorder:
    """Wraps block components so one traced forward also returns the outputs of those in ``emit`` (for
    cache schedules), and counts every slot's calls per forward."""

    def __init__(self, denoiser: nn.Module, slots: Iterable[tuple[int, str, str]], emit: set[int]):
        self.outputs: list[torch.Tensor] = []
        self.keys: list[str] = []
        self.calls: dict[int, int] = {}
        self._patched = []
        modules = dict(denoiser.named_modules())
        for slot, block, comp in slots:
            module = getattr(modules[block], comp)
            original = module.forward

            def forward(*args, _slot=slot, _original=original, _name=f"{block}.{comp}", **kwargs):
                out = _original(*args, **kwargs)
                call = self.calls.get(_slot, 0)
                self.calls[_slot] = call + 1
                if _slot not in emit:
                    return out
                parts = out if isinstance(out, (tuple, list)) else (out,)
                for part, value in enumerate(parts):
                    if not isinstance(value, torch.Tensor):
                        raise TypeError(f"component {_name} returned a {type(value).__name__}; only tensor "
                                        "outputs can be cached in the ONNX graph")
                    self.keys.append(f"{_slot}.{call}.{part}")
                    self.outputs.append(value)
                return out

            self._patched.append((module, "forward" in vars(module), vars(module).get("forward")))
            module.forward = forward

    def start(self) -> None:
        self.outputs, self.keys, self.calls = [], [], {}

    def remove(self) -> None:
        for module, had, old in reversed(self._patched):
            if had:
                module.forward = old
            else:
                del module.forward


class _Traced(nn.Module):
    """The denoiser as a function of its flattened tensor inputs, returning (sample, *component outputs)."""

    def __init__(self, denoiser: nn.Module, spec, template: list, tensor_slots: list[int], recorder):
        super().__init__()
        self.denoiser, self.spec, self.template, self.tensor_slots = denoiser, spec, template, tensor_slots
        self.recorder = recorder

    def forward(self, *tensors):
        from torch.utils._pytree import tree_unflatten

        leaves = list(self.template)
        for i, t in zip(self.tensor_slots, tensors):
            leaves[i] = t
        kwargs = tree_unflatten(leaves, self.spec)
        if self.recorder is not None:
            self.recorder.start()
        out = self.denoiser(**kwargs, return_dict=False)[0].float()
        extra = self.recorder.outputs if self.recorder is not None else []
        return (out, *[o.float() for o in extra])


def dynamic_axes_for(names: list[str], tensors: list[torch.Tensor]) -> list[dict]:
    """Which axes are exported as dynamic (``Dim.AUTO``: kept static where the model specialises them):
    the batch axis of every batched input, and the token axes of sequence inputs."""
    from torch.export import Dim

    batch = tensors[0].shape[0] if tensors and tensors[0].dim() else None
    sequence = tensors[0].dim() == 3  # a token sequence denoiser (FLUX): image tokens are dynamic too
    token_axes = {"encoder_hidden_states": 1, "encoder_attention_mask": 1}
    if sequence:
        token_axes.update({"hidden_states": 1, "img_ids": 0, "txt_ids": 0})
    out = []
    for name, t in zip(names, tensors):
        axes = {}
        if t.dim() >= 1 and t.shape[0] == batch and name not in ("img_ids", "txt_ids"):
            axes[0] = Dim.AUTO
        leaf = name.rsplit(".", 1)[-1]
        if leaf in token_axes and t.dim() > token_axes[leaf]:
            axes[token_axes[leaf]] = Dim.AUTO
        out.append(axes or None)
    return out


def _no_duck_shapes():
    """Without this, torch.export gives two dynamic axes of equal example size one symbol (FLUX traced at 16
    image and 16 text tokens would then only run with equal counts)."""
    from torch.fx.experimental import _config

    return _config.patch(use_duck_shape=False) if hasattr(_config, "use_duck_shape") else contextlib.nullcontext()


def export_graph(denoiser: nn.Module, call_kwargs: dict, cache_slots: Iterable[tuple[int, str, str]] = (),
                 emit: Iterable[int] = (), dynamic: bool = True, accuracy_level: int = 0, optimize: bool = True):
    """Trace ``denoiser`` (with QuantLayers) on one captured call and return ``(onnx_ir model, info)``.

    ``cache_slots``: the schedule's (slot index, block path, component); the outputs of the slots in ``emit``
    become extra graph outputs named ``cache.<slot>.<call>.<part>``. ``info`` holds the input names and
    dtypes, the non-tensor constants of the call, the output names, each slot's calls per forward and the
    per-layer forms. The denoiser is left as it was.
    """
    from torch.utils._pytree import tree_flatten

    kwargs = canonical_kwargs(call_kwargs)
    names, tensors, constants, spec = flatten_call(kwargs)
    template = tree_flatten(kwargs)[0]
    tensor_slots = [i for i, leaf in enumerate(template) if isinstance(leaf, torch.Tensor)]
    template = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in template]
    tensors = [t.float() if t.is_floating_point() else t for t in tensors]
    dtypes = _dtypes(denoiser)
    if any(d != torch.float32 and d.is_floating_point for d in dtypes.values()):
        denoiser.float()  # the graph computes in fp32; every tensor's own dtype is put back afterwards
    recorder = None
    try:
        with swap_layers(denoiser, accuracy_level) as layers, torch.no_grad():
            cache_slots = list(cache_slots)
            recorder = _Recorder(denoiser, cache_slots, set(emit)) if cache_slots else None
            traced = _Traced(denoiser, spec, template, tensor_slots, recorder).eval()
            shapes = (tuple(dynamic_axes_for(names, tensors)),) if dynamic else None  # one entry: *tensors
            with _no_duck_shapes():
                program = torch.export.export(traced, tuple(tensors), dynamic_shapes=shapes, strict=False)
            _drop_noop_squeezes(program)
            outputs = [OUTPUT] + [f"cache.{k}" for k in (recorder.keys if recorder else [])]
            onnx_program = torch.onnx.export(program, tuple(tensors), dynamo=True, input_names=names,
                                             output_names=outputs, opset_version=OPSET, optimize=optimize,
                                             custom_translation_table=_translations(), verbose=False)
            forms = {name: layer.form for name, layer in layers.items()}
            int4 = {f"denoiser.{name}.{layer.int4_buffer()}": name for name, layer in layers.items()
                    if layer.int4_buffer()}
            calls = {str(k): v for k, v in sorted(recorder.calls.items())} if recorder else {}
    finally:
        if recorder is not None:
            recorder.remove()
        _restore_dtypes(denoiser, dtypes)
    model = onnx_program.model
    _finish(model, int4)
    info = {"inputs": names, "input_dtypes": {n: str(t.dtype).removeprefix("torch.") for n, t in zip(names, tensors)},
            "constants": constants, "outputs": outputs, "layers": forms, "slot_calls": calls}
    return model, info


def _dtypes(module: nn.Module) -> dict[str, torch.dtype]:
    return {name: t.dtype for name, t in [*module.named_parameters(), *module.named_buffers()]}


def _restore_dtypes(module: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Put every parameter and buffer back to its recorded dtype (a blanket ``.to(bf16)`` would also turn
    the quantized layers' fp32 scales into bf16)."""
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if name in dtypes and tensor.dtype != dtypes[name]:
                owner_name, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                if leaf in owner._parameters:
                    owner._parameters[leaf].data = tensor.data.to(dtypes[name])
                else:
                    owner._buffers[leaf] = tensor.to(dtypes[name])
    for m in module.modules():
        if isinstance(m, QuantLayer):
            m._dequantized = m._act_qparams = None  # caches of the old dtype


def _drop_noop_squeezes(program) -> None:
    """Remove ``aten.squeeze.dim`` nodes on axes that are not 1 (a no-op in torch: PixArt squeezes its
    ``[B, tokens, C]`` output at dim 1). torchlib translates every one to ONNX ``Squeeze``, which onnxruntime
    rejects on a non-1 axis."""
    graph = program.graph_module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.squeeze.dim:
            continue
        source, dim = node.args[0], node.args[1]
        shape = getattr(source.meta.get("val"), "shape", None)
        if shape is not None and isinstance(shape[dim], int) and shape[dim] != 1:
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            changed = True
    if changed:
        program.graph_module.recompile()


def _finish(model, int4: dict[str, str]) -> None:
    """Post-export touches on the IR: initializers named by module path (the ``denoiser.`` prefix of the
    tracing wrapper dropped) and ≤4-bit DQ codes stored as int4 initializers."""
    import ml_dtypes
    import onnx_ir as ir

    graph = model.graph
    for old in list(graph.initializers):
        value = graph.initializers[old]
        new = old.removeprefix("denoiser.")
        if old in int4:
            codes = value.const_value.numpy()
            value.const_value = ir.Tensor(codes.astype(ml_dtypes.int4), name=new)
            value.dtype = ir.DataType.INT4
        if new != old:
            del graph.initializers[old]
            value.name = new
            if value.const_value is not None:
                value.const_value.name = new
            graph.initializers[new] = value
    _unshare_weight_dq_inputs(graph)


def _unshare_weight_dq_inputs(graph) -> None:
    """Give every int8 weight DequantizeLinear its own codes and zero point initializers. The exporter merges
    equal initializers (the all-zero zero points of layers of one width become one), and onnxruntime's
    x64quantprecision rewrite converts each DequantizeLinear's inputs to uint8 under a name derived from the
    input's: a shared input is converted twice and the session fails ("Attempt to replace the existing
    tensor")."""
    import onnx_ir as ir

    for node in list(graph):
        if node.op_type != "DequantizeLinear" or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        codes = node.inputs[0]
        if codes is None or not codes.is_initializer() or codes.dtype != ir.DataType.INT8:
            continue
        layer = codes.name.removesuffix(".codes")
        for index, leaf in ((0, "codes"), (2, "zero_point")):
            value, name = node.inputs[index], f"{layer}.{leaf}"
            if len(value.uses()) < 2 or value.name == name:  # not shared, or this layer's own (others copy)
                continue
            while name in graph.initializers:
                name += "_"
            copy = ir.Value(name=name, type=value.type, shape=value.shape,
                            const_value=ir.Tensor(value.const_value.numpy().copy(), name=name))
            graph.register_initializer(copy)
            node.replace_input_with(index, copy)


def int4_initializers(model_proto) -> list[str]:
    """Names of the int4 initializers of an ONNX model (for checks)."""
    import onnx
    return [t.name for t in model_proto.graph.initializer if t.data_type == onnx.TensorProto.INT4]


def reuse_variant(full, reuse: set[int]):
    """A copy of the full graph (an onnx ModelProto with ``cache.*`` outputs) in which the components of the
    slots in ``reuse`` are not computed: each of their ``cache.<slot>.<call>.<part>`` outputs becomes a graph
    input of the same name, its producer's output is detached, and every node that no longer feeds an output
    is removed (with the initializers only they used). Weights referenced as external data stay references."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(full)
    graph = model.graph
    taken = {o.name: o for o in graph.output if o.name.startswith("cache.") and int(o.name.split(".")[1]) in reuse}
    if not taken:
        raise ValueError(f"the graph has no cached outputs for slots {sorted(reuse)}")
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name in taken:
                node.output[i] = name + ".detached"
    kept_outputs = [o for o in graph.output if o.name not in taken]
    del graph.output[:]
    graph.output.extend(kept_outputs)
    graph.input.extend(taken[name] for name in taken)
    _remove_dead_nodes(graph)
    return model


def _subgraph_inputs(node) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing graph, conservatively."""
    names = set()
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in sub.node:
                names.update(inner.input)
                names |= _subgraph_inputs(inner)
    return names


def _remove_dead_nodes(graph) -> None:
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):  # exported graphs are topologically sorted
        if any(name in needed for name in node.output):
            keep.append(node)
            needed.update(node.input)
            needed |= _subgraph_inputs(node)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def switched_graph(full, patterns: list[set[int]]):
    """One graph for every step of a cache schedule: the full graph (an onnx ModelProto with ``cache.*``
    outputs) in which whatever some step does not compute sits inside an ``If`` node, so one onnxruntime
    session (one pre-packed copy of the weights, where a session per cut graph packs its own) serves every
    step.

    ``patterns``: the schedule's distinct reuse sets (slot indices). A node's *signature* is the set of
    patterns whose :func:`reuse_variant` drops it; nodes with an empty signature stay in the main graph and
    every other signature is a *group* with a boolean input ``run.<group>``. A group's nodes are moved, in
    runs that keep the graph topologically ordered, into ``If`` nodes: the then-branch computes them, the
    else-branch returns each reused component's stored output (graph input ``stored.<slot>.<call>.<part>``,
    fed an empty array when the step computes it) and an empty tensor for values only skipped nodes read.
    So each step computes exactly what its cut variant would. Returns ``(model, conditions)``:
    ``conditions[i][g]`` is ``run.<g>``'s value for ``patterns[i]``. Weights referenced as external data
    stay references.
    """
    import onnx
    from onnx import helper

    graph = full.graph
    nodes = [onnx.NodeProto() for _ in graph.node]  # copies: unsharing rewires inputs, the caller's graph stays
    for node, original in zip(nodes, graph.node):
        node.CopyFrom(original)
    outputs = {o.name for o in graph.output}
    dead_in = [[] for _ in nodes]  # per node: the patterns whose variant drops it
    for index, pattern in enumerate(patterns):
        if not pattern:
            continue
        live = {n.output[0] for n in reuse_variant(full, set(pattern)).graph.node}
        for i, node in enumerate(nodes):
            if node.output[0] not in live:
                dead_in[i].append(index)
    signatures = [frozenset(d) for d in dead_in]
    types = {v.name: v.type for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    nodes, signatures = _unshare_quantizers(nodes, signatures, outputs, types)
    groups = list(dict.fromkeys(s for s in signatures if s))
    conditions = [[index not in g for g in groups] for index in range(len(patterns))]

    def rank(name: str) -> int:
        return len(types[name].tensor_type.shape.dim)

    def any_shape(name: str, like: str):
        """A value of ``like``'s type and rank with every axis free (skipped values are empty)."""
        return helper.make_tensor_value_info(name, types[like].tensor_type.elem_type,
                                             [f"{name}.{axis}" for axis in range(rank(like))])

    consumers: dict[str, set[int]] = {}
    for i, node in enumerate(nodes):
        if any(attr.HasField("g") or attr.graphs for attr in node.attribute):
            raise ValueError(f"node {node.name} ({node.op_type}) has subgraphs; cannot switch this graph")
        for name in node.input:
            consumers.setdefault(name, set()).add(i)

    new_nodes, stored_inputs, chunk_count = [], {}, 0
    initializers = {t.name: t for t in graph.initializer}
    open_chunks: dict[frozenset, list[int]] = {}
    produced_by: dict[str, frozenset] = {}  # name -> group of the open chunk producing it

    def close(group: frozenset) -> None:
        nonlocal chunk_count
        members = open_chunks.pop(group)
        inside = set(members)
        produced = {o for i in members for o in nodes[i].output if o}
        for name in produced:
            produced_by.pop(name, None)
        exported = [o for i in members for o in nodes[i].output
                    if o and (o in outputs or any(c not in inside for c in consumers.get(o, ())))]
        suffix = f"__switch{chunk_count}"
        compute = []
        for i in members:
            node = onnx.NodeProto()
            node.CopyFrom(nodes[i])
            node.input[:] = [n + suffix if n in produced else n for n in node.input]
            node.output[:] = [n + suffix if n else n for n in node.output]
            compute.append(node)
        skip, missing = [], [o for o in exported if o not in types]
        if missing:
            raise ValueError(f"the graph has no type for {missing[:3]}; cannot switch it")
        for name in exported:
            if name.startswith("cache."):
                slot = int(name.split(".")[1])
                if any(slot not in patterns[p] for p in group):
                    raise ValueError(f"{name} would be skipped at a step that does not reuse slot {slot}")
                stored = "stored." + name.removeprefix("cache.")
                stored_inputs[stored] = name
                skip.append(helper.make_node("Identity", [stored], [name + suffix + ".skip"]))
            else:
                empty = helper.make_tensor("empty", types[name].tensor_type.elem_type, [0] * rank(name), [])
                skip.append(helper.make_node("Constant", [], [name + suffix + ".skip"], value=empty))

        # weights only this run reads move into its branch: onnxruntime's QDQ rewrites look initializers up
        # in the subgraph that uses them, not in the enclosing graph
        read = dict.fromkeys(n for i in members for n in nodes[i].input if n in initializers)
        own = [initializers.pop(n) for n in read if consumers[n] <= inside]

        def branch(label: str, body: list, tail: str, weights=()):
            return helper.make_graph(body, f"switch{chunk_count}.{label}", [], [
                any_shape(n + tail, n) for n in exported],
                initializer=list(weights))

        group_index = groups.index(group)
        new_nodes.append(helper.make_node(
            "If", [f"run.{group_index}"], exported, name=f"switch{chunk_count}",
            then_branch=branch("compute", compute, suffix, own), else_branch=branch("skip", skip, suffix + ".skip")))
        chunk_count += 1

    for i, node in enumerate(nodes):
        group = signatures[i]
        for name in node.input:
            owner = produced_by.get(name)
            if owner is not None and (owner != group):
                close(owner)
        if not group:
            new_nodes.append(node)
            continue
        open_chunks.setdefault(group, []).append(i)
        for name in node.output:
            produced_by[name] = group
    for group in list(open_chunks):
        close(group)

    model = onnx.ModelProto()
    model.CopyFrom(full)
    out = model.graph
    del out.node[:]
    out.node.extend(new_nodes)
    del out.initializer[:]
    out.initializer.extend(initializers.values())
    # a skipped run's values are empty: their static shapes must go, or onnxruntime's planner reuses their
    # buffers for later values of that shape
    empty = {o for n in new_nodes if n.op_type == "If" for o in n.output if not o.startswith("cache.")}
    outer = {o for n in new_nodes for o in n.output} - empty
    infos = [v for v in out.value_info if v.name in outer]
    del out.value_info[:]
    out.value_info.extend(infos)
    out.input.extend(helper.make_tensor_value_info(f"run.{g}", onnx.TensorProto.BOOL, []) for g in range(len(groups)))
    out.input.extend(any_shape(name, like) for name, like in sorted(stored_inputs.items()))
    return model, conditions


def _unshare_quantizers(nodes: list, signatures: list, outputs: set[str], types: dict) -> tuple[list, list]:
    """Give each group its own copy of an activation QuantizeLinear/DequantizeLinear that layers of several
    groups share. The exporter merges equal quantizers (layers reading one tensor with one calibrated range,
    such as a single block's attention and MLP inputs); left shared, the quantizer stays outside the ``If``
    nodes while its layers move inside, and onnxruntime, which fuses a Q/DQ pair with its MatMul only
    within one graph, runs those layers unfused (measured: about twice the time at w8a8, and other
    rounding). A copy per group computes the same values. Returns the new node list and signatures, each
    copy where its original stood; ``types`` (value name -> type) gains the copies' outputs."""
    import onnx

    entries = [[node, sig] for node, sig in zip(nodes, signatures)]
    consumers: dict[str, list] = {}
    for entry in entries:
        for name in entry[0].input:
            consumers.setdefault(name, []).append(entry)
    placed: list[list] = [[entry] for entry in entries]  # what stands at each original position
    for i in reversed(range(len(entries))):  # consumers first: a DQ's copies then count as its Q's consumers
        node, _ = entries[i]
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or any(o in outputs for o in node.output):
            continue
        by_group: dict[frozenset, list] = {}
        for user in consumers.get(node.output[0], []):
            by_group.setdefault(user[1], []).append(user)
        if len(by_group) < 2:
            continue
        placed[i] = []
        for name in node.input:
            consumers[name] = [e for e in consumers[name] if e is not entries[i]]
        for k, (sig, users) in enumerate(by_group.items()):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name, copy.output[0] = f"{node.name}.group{k}", f"{node.output[0]}.group{k}"
            if node.output[0] in types:
                types[copy.output[0]] = types[node.output[0]]
            for user in users:
                user[0].input[:] = [copy.output[0] if n == node.output[0] else n for n in user[0].input]
                consumers.setdefault(copy.output[0], []).append(user)
            entry = [copy, sig]
            placed[i].append(entry)
            for name in copy.input:
                consumers.setdefault(name, []).append(entry)
        consumers.pop(node.output[0], None)
    flat = [entry for position in placed for entry in position]
    return [e[0] for e in flat], [e[1] for e in flat]

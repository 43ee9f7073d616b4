"""Torch-native runtime: deployment layers that compute with the artifact's integers instead of simulating them.

The simulated :class:`~qsched.runtime.qlayers.QuantLayer` dequantizes its weights once and keeps an FP copy
(fast to evaluate, but no smaller than the FP model). :func:`to_native_` swaps each one for a layer that
keeps only what the artifact stores and does the arithmetic a deployment would do:

* **W(5-8)A(≤8) linear** — :class:`NativeInt8Linear`: the input is quantized with the layer's static
  asymmetric (scale, zero point), an exact int8 x int8 -> int32 matmul (:func:`int_mm`: ``torch._int_mm``,
  or on a CPU where it is slow, fp32 matmuls over slices of K that fp32 sums exactly) does the matmul, and
  one multiply rescales. The activation codes ``q`` live in ``[0, 2^b - 1]`` (unsigned), which int8 cannot
  hold, so the kernel is fed ``q - 128`` and the offset is folded into a per-output integer correction::

      y = s_x * s_w * (Σ_k (q_k - zp) w_k) + b
        = s_x * s_w * (Σ_k (q_k - 128) w_k  +  (128 - zp) * Σ_k w_k) + b

  The correction is exact int32 arithmetic, so the only difference from the simulation is fp32 rounding.
  Grouped weight scales run one ``_int_mm`` per input group (each group has its own scale).
* **≤4-bit weights** (W4A8, W4A16, ...) — :class:`NativeDequantLayer` holding the **packed** nibbles of
  :func:`export.packing.pack_int` (``ceil(n/2)`` uint8 bytes); every forward unpacks, dequantizes to the
  compute dtype and runs a float matmul, with activations fake-quantized exactly as in simulation.
* **W(5-8)A16 and conv layers** — :class:`NativeDequantLayer` with int8 codes (or packed nibbles),
  dequantized on the fly.
* **FP8 (e4m3) linear** — :class:`NativeFP8Linear`: the input is quantized to e4m3 with the layer's static
  per-tensor scale, the e4m3 x e4m3 product accumulates in fp32 and is rescaled by ``s_x`` and the
  per-channel ``s_w``: ``torch._scaled_mm`` on CUDA devices of compute capability 8.9 or newer (Ada, Hopper),
  and elsewhere an exact emulation (:func:`fp8_matmul`): a product of two e4m3 values has at most 8
  significant bits, so every product is exact in fp32 and only the fp32 sum's order differs from the kernel.

Loading: :func:`export.loader.build_native_denoiser` (what ``export.load(..., runtime="native")`` uses)
builds each native layer straight from the artifact's stored tensors (:class:`StoredLayer`,
:func:`native_from_stored`), layer by layer: the packed bytes on disk are already :func:`pack_int`'s
layout, so they become ``packed`` as they are; the result equals ``to_native_`` on the simulated model
rebuilt from the same artifact, buffer for buffer.

Numerics: the dequantize-on-the-fly path reproduces the simulation bit for bit (same formulas, same
order); the integer path agrees to fp32 rounding (tested: max |diff| / max |y| < 1e-4 in fp32).

``torch._int_mm`` shape rules: on CUDA it needs M > 16 and K, N multiples of 8; the CPU kernel (torch
2.13) takes any shape. :func:`to_native_` therefore only builds the integer layer when K (or the group
size) and N are multiples of 8, which keeps an artifact portable between devices (every FLUX width is);
other layers take the dequantize path. At run time small M is zero-padded to 17 rows on CUDA, and a device
without an int8 matmul falls back to the same integer product computed in float64, exact because
``|acc| < 2^53``.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from qsched.runtime.apply import set_submodule
from qsched.runtime.qlayers import CastableQuantized, QuantLayer, format_labels, quantized_forward, with_fp_tokens
from qsched.runtime.quantizers import quantize_activation_fp8
from qsched.core.errors import ArtifactError, QschedError

from export.packing import NIBBLE_BITS, check_fp8_codes, check_packed, pack_int

__all__ = ["NativeInt8Linear", "NativeFP8Linear", "NativeDequantLayer", "StoredLayer", "native_layer",
           "native_from_stored", "to_native_", "int_mm", "int_mm_fp32", "cpu_int8_backend", "fp8_matmul",
           "fp8_kernel_available", "unpack_nibbles", "int_matmul_eligible"]

_ACT_OFFSET = 128  # unsigned activation code q in [0, 255] -> int8 code q - 128


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Packed ≤4-bit codes (``pack_int`` layout) -> int8 codes, flat. No range checks: validated at build."""
    nib = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(-1)[:numel]
    return nib.view(torch.int8) - 8


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Same arithmetic as :func:`qsched.runtime.quantizers.dequantize_weight` (fp32 multiply, then cast)."""
    groups = scale.shape[1]
    grouped = codes.reshape(shape[0], groups, -1).float() * scale.unsqueeze(-1)
    return grouped.reshape(shape).to(dtype)


#: Terms per fp32 matmul in :func:`int_mm_fp32`: a product of two int8 codes is at most 128 * 128 = 2^14 in
#: magnitude, so any sum of at most 2^10 of them is an integer of magnitude <= 2^24, which fp32 holds exactly
#: in whatever order the matmul adds them.
EXACT_FP32_TERMS = 1 << 10
CPU_INT8_BACKENDS = ("int_mm", "fp32")
_cpu_int8_backend: str | None = None


def int_mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] -> int32 [M, N], exactly, as fp32 matmuls over slices of K of at most
    :data:`EXACT_FP32_TERMS` (each slice's sum is exact in fp32, see there), added in int32. The same integers
    as ``torch._int_mm``, at an fp32 matmul's speed: on x86 CPUs without VNNI (AVX2) oneDNN's int8 matmul is
    about 25x slower than that (measured, docs/results.md)."""
    out = None
    for start in range(0, a.shape[1], EXACT_FP32_TERMS):
        stop = start + EXACT_FP32_TERMS
        part = torch.mm(a[:, start:stop].float(), b[start:stop].float()).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out


def cpu_int8_backend() -> str:
    """Which exact int8 matmul this CPU runs faster, ``"int_mm"`` (``torch._int_mm``) or ``"fp32"``
    (:func:`int_mm_fp32`): measured once per process on a small product (about 0.1 s), or forced with the
    environment variable ``QSCHED_CPU_INT8``. Both give identical integers, so the choice never changes a
    result, only the speed."""
    global _cpu_int8_backend
    if _cpu_int8_backend is None:
        forced = os.environ.get("QSCHED_CPU_INT8")
        if forced is not None and forced not in CPU_INT8_BACKENDS:
            raise QschedError(f"QSCHED_CPU_INT8={forced!r} is not a CPU int8 backend; use one of {CPU_INT8_BACKENDS}")
        _cpu_int8_backend = forced or _measure_cpu_int8()
    return _cpu_int8_backend


def _measure_cpu_int8() -> str:
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (64, 512), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (512, 512), dtype=torch.int8, generator=gen)
    seconds = {}
    for name, fn in (("int_mm", torch._int_mm), ("fp32", int_mm_fp32)):
        try:
            fn(a, b)  # warm-up (first-call set-up)
            best = float("inf")
            for _ in range(2):
                start = time.perf_counter()
                fn(a, b)
                best = min(best, time.perf_counter() - start)
            seconds[name] = best
        except (RuntimeError, NotImplementedError):
            continue
    return min(seconds, key=seconds.get)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] -> int32 [M, N]: ``torch._int_mm`` on GPUs, working around its shape rules;
    on a CPU, whichever of it and :func:`int_mm_fp32` :func:`cpu_int8_backend` measured faster.

    CUDA's kernel rejects M <= 16: pad with zero rows and slice (cheap; only tiny batches hit it). If the
    device has no int8 matmul at all, compute the identical integer result in float64 (exact for any
    realistic K: |acc| <= K * 128 * 127 < 2^53).
    """
    m = a.shape[0]
    if m == 0:
        return torch.zeros((0, b.shape[1]), dtype=torch.int32, device=a.device)
    if a.device.type == "cpu" and (_cpu_int8_backend or cpu_int8_backend()) == "fp32":
        return int_mm_fp32(a, b)
    if a.device.type == "cuda" and m <= 16:
        a = torch.cat([a, a.new_zeros((17 - m, a.shape[1]))])
    try:
        out = torch._int_mm(a, b)
    except (RuntimeError, NotImplementedError):
        out = (a.double() @ b.double()).to(torch.int32)
    return out[:m]


def int_matmul_eligible(layer: QuantLayer) -> bool:
    """Whether a simulated layer can run as :class:`NativeInt8Linear` (see the module docstring)."""
    if layer.kind != "linear" or layer.weight_bits is None or layer.act_bits is None or layer.format != "int":
        return False
    if not (5 <= layer.weight_bits <= 8 and layer.act_bits <= 8):
        return False
    n, k = layer.qweight.shape
    inner = layer.group_size or k
    return n % 8 == 0 and inner % 8 == 0


def _act_qparams(layer: QuantLayer) -> tuple[float, int]:
    return float(layer.act_scale), int(layer.act_zero_point)


def _register_act_qparams(module: nn.Module, scale: float, zero_point: int, device: torch.device) -> None:
    """The activation scale (fp32) and zero point (int32) as 0-dim buffers, not Python numbers: dynamo guards
    on a module's Python constants, so blocks whose layers differ only in their calibrated ranges would each
    compile their own graph (and past ``recompile_limit``, 8, fall back to eager); tensors are graph inputs,
    so a regional compile gives same-shaped blocks one graph. Reading them needs no device sync either."""
    module.register_buffer("act_scale", torch.tensor(scale, dtype=torch.float32, device=device))
    module.register_buffer("act_zero_point", torch.tensor(zero_point, dtype=torch.int32, device=device))


class NativeInt8Linear(CastableQuantized):
    """Static W8A8 (weights 5-8 bits, activations ≤8 bits) linear on ``torch._int_mm``.

    Buffers: ``qweight`` int8 [N, K] (the artifact's codes), ``out_scale`` fp32 [N, G] = s_x * s_w,
    ``correction`` int32 [N, G] = (128 - zp) * Σ_k∈g w, ``bias`` in the compute dtype.
    """

    path = "int8_mm"

    def __init__(self, layer: QuantLayer):
        super().__init__()
        if not int_matmul_eligible(layer):
            raise ArtifactError(f"layer ({layer.extra_repr()}) cannot run on the int8 matmul; use NativeDequantLayer")
        self.kind, self.weight_bits, self.act_bits, self.group_size = "linear", layer.weight_bits, layer.act_bits, layer.group_size
        self.compute_dtype = layer.compute_dtype
        scale, zero_point = _act_qparams(layer)
        codes = layer.qweight.detach().contiguous()
        n, k = codes.shape
        self.in_features, self.out_features = k, n
        groups = layer.weight_scale.shape[1]
        self.groups, self.group_width = groups, k // groups
        wsum = codes.reshape(n, groups, -1).sum(dim=-1, dtype=torch.int32)
        self.register_buffer("qweight", codes)
        if codes.device.type == "cpu":
            cpu_int8_backend()  # measured now, not while torch.compile traces a forward
        _register_act_qparams(self, scale, zero_point, codes.device)
        # what quantize_input adds to the rounded input: the zero point, less the int8 offset
        self.register_buffer("code_offset", torch.tensor(zero_point - _ACT_OFFSET, dtype=torch.int32, device=codes.device))
        self.register_buffer("correction", (wsum * (_ACT_OFFSET - zero_point)).to(torch.int32))
        self.register_buffer("out_scale", layer.weight_scale.detach().float() * scale)
        bias = None if layer.bias is None else layer.bias.detach().clone()
        self.register_buffer("bias", bias)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """int8 codes ``q - 128`` of ``x``; the rounding is the simulation's, so the codes are identical.

        The offset is added before the clamp (``clamp(r + zp, 0, L) - 128 == clamp(r + zp - 128, -128, L - 128)``
        for the integer-valued ``r``), and the steps after the division run in place: eager makes two tensors
        instead of six, and the compiler sees one pointwise chain it fuses with the producer of ``x``.
        """
        codes = torch.div(x.float(), self.act_scale).round_()
        codes.add_(self.code_offset).clamp_(-_ACT_OFFSET, 2**self.act_bits - 1 - _ACT_OFFSET)
        return codes.to(torch.int8)

    def _rescale(self, acc: torch.Tensor, group: int) -> torch.Tensor:
        """int32 accumulator -> fp32 output of one group: the exact integer correction first (in place), then
        one int32 x fp32 multiply (type promotion converts, so no separate ``.float()`` pass)."""
        return acc.add_(self.correction[:, group]) * self.out_scale[:, group]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Static shapes, scales as buffers (no .item(), no data-dependent branch): torch.compile traces
        # it as one graph and fuses the quantization and the rescale + bias with the neighbouring ops.
        lead = x.shape[:-1]
        q = self.quantize_input(x.reshape(-1, self.in_features))
        if self.groups == 1:
            y = self._rescale(int_mm(q, self.qweight.t()), 0)
        else:
            y = None
            for g in range(self.groups):  # each input group has its own weight scale: one integer matmul each
                cols = slice(g * self.group_width, (g + 1) * self.group_width)
                part = self._rescale(int_mm(q[:, cols].contiguous(), self.qweight[:, cols].t()), g)
                y = part if y is None else y.add_(part)
        if self.bias is not None:
            y = y.add_(self.bias.float())
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w=int{self.weight_bits}, a=int{self.act_bits}, "
                f"groups={self.groups}, path=int8_mm")


def fp8_kernel_available(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` has FP8 tensor-core kernels on ``device``: CUDA, compute capability ≥ 8.9."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_matmul(x_codes: torch.Tensor, w_codes: torch.Tensor, act_scale: torch.Tensor, weight_scale: torch.Tensor,
               kernel: bool) -> torch.Tensor:
    """fp32 ``[M, N]`` = ``(Σ_k x_k · w_nk) · s_x · s_w[n]`` for e4m3 ``x_codes [M, K]`` and ``w_codes [N, K]``.

    ``kernel``: ``torch._scaled_mm`` with the per-tensor scales ``s_x`` and 1 and an fp32 output, then the
    per-channel ``s_w`` (the tensor-wise kernel takes an fp32 output on every FP8 GPU; the row-wise one wants
    bf16 below sm90 and an [M, 1] activation scale). Its CUDA shape rules: K and N multiples of 16, any M.
    Otherwise the same formula emulated in fp32: the codes decode exactly, their products are exact in fp32, and
    the sum is fp32, so the two differ only by summation order. ``act_scale`` is a 0-dim fp32 tensor,
    ``weight_scale`` fp32 ``[N, 1]``.
    """
    if kernel:
        acc = torch._scaled_mm(x_codes, w_codes.t(), scale_a=act_scale, scale_b=act_scale.new_ones(()),
                               out_dtype=torch.float32)
    else:
        acc = torch.mm(x_codes.float(), w_codes.float().t()).mul_(act_scale)
    return acc.mul_(weight_scale.t())


class NativeFP8Linear(CastableQuantized):
    """Static FP8 W8A8 linear: e4m3 weights with per-channel scales, e4m3 inputs with the calibrated per-tensor
    scale, fp32 accumulation (:func:`fp8_matmul`: the GPU kernel where there is one, the exact emulation
    elsewhere). Buffers: ``qweight`` e4m3 [N, K] (the artifact's codes), ``weight_scale`` fp32 [N, 1],
    ``act_scale`` fp32 0-dim, ``bias`` in the compute dtype.
    """

    path = "fp8_mm"

    def __init__(self, layer: QuantLayer):
        super().__init__()
        if layer.format != "fp8":
            raise ArtifactError(f"layer ({layer.extra_repr()}) is not an fp8 layer; use native_layer")
        self.kind, self.weight_bits, self.act_bits, self.group_size = "linear", 8, 8, None
        self.format, self.compute_dtype = "fp8", layer.compute_dtype
        codes = layer.qweight.detach().contiguous()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("qweight", codes)
        self.register_buffer("weight_scale", layer.weight_scale.detach().float().reshape(-1, 1).clone())
        self.register_buffer("act_scale", torch.tensor(float(layer.act_scale), dtype=torch.float32, device=codes.device))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        # the kernel's shape rules (fp8_matmul); a layer that misses them runs the emulation on any device
        self.kernel_shapes = self.in_features % 16 == 0 and self.out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        q = quantize_activation_fp8(x.reshape(-1, self.in_features), self.act_scale)
        kernel = self.kernel_shapes and x.is_cuda and fp8_kernel_available(x.device)
        y = fp8_matmul(q, self.qweight, self.act_scale, self.weight_scale, kernel)
        if self.bias is not None:
            y = y.add_(self.bias.float())
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w=fp8, a=fp8, path=fp8_mm"


class NativeDequantLayer(CastableQuantized):
    """Linear or conv whose weight is dequantized on the fly from the stored codes (never cached).

    Weights of ≤4 bits are held packed (``packed`` uint8, two codes per byte); 5-8 bits as int8 ``qweight``;
    FP weights (layers that only quantize activations) as ``weight``. Activations are fake-quantized with
    the simulation's own function, so this path matches :class:`QuantLayer` bit for bit.
    """

    def __init__(self, layer: QuantLayer):
        super().__init__()
        self.kind, self.weight_bits, self.act_bits, self.group_size = layer.kind, layer.weight_bits, layer.act_bits, layer.group_size
        self.conv_args = dict(layer.conv_args)
        self.compute_dtype, self.format = layer.compute_dtype, layer.format
        if layer.act_bits is not None:
            held = next(t for t in (getattr(layer, k, None) for k in ("qweight", "packed", "weight")) if t is not None)
            _register_act_qparams(self, *_act_qparams(layer), held.device)
        packed = getattr(layer, "packed", None)  # a StoredLayer's bytes, already in pack_int's layout
        if layer.weight_bits is None:
            self.weight_shape = tuple(layer.weight.shape)
            self.register_buffer("weight", layer.weight.detach().clone())
            self.path = "fp"
        else:
            if packed is not None:
                self.weight_shape = tuple(layer.weight_shape)
                self.register_buffer("packed", packed.detach())  # kept as stored: the loader's own copy
                self.path = f"dequant-packed{layer.weight_bits}"
            elif layer.weight_bits in NIBBLE_BITS:
                self.weight_shape = tuple(layer.qweight.shape)
                codes = layer.qweight.detach()
                self.register_buffer("packed", pack_int(codes.cpu(), layer.weight_bits).to(codes.device))
                self.path = f"dequant-packed{layer.weight_bits}"
            else:
                self.weight_shape = tuple(layer.qweight.shape)
                codes = layer.qweight.detach()
                self.register_buffer("qweight", codes.contiguous().clone())
                self.path = "dequant-fp8" if self.format == "fp8" else "dequant-int8"
            self.register_buffer("weight_scale", layer.weight_scale.detach().float().clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.out_features, self.in_features = self.weight_shape[:2]  # pipelines read these (SDXL's add_embedding)

    def codes(self) -> torch.Tensor:
        """The integer weight codes (unpacked now if stored packed)."""
        if hasattr(self, "packed"):
            numel = 1
            for d in self.weight_shape:
                numel *= d
            return unpack_nibbles(self.packed, numel).reshape(self.weight_shape)
        return self.qweight

    def dequantized_weight(self) -> torch.Tensor:
        if self.weight_bits is None:
            return self.weight
        return _dequantize(self.codes(), self.weight_scale, self.weight_shape, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_forward(self, x, getattr(self, "act_scale", None), getattr(self, "act_zero_point", None))

    def extra_repr(self) -> str:
        w, a = format_labels(self)
        return f"{self.kind}, shape={self.weight_shape}, w={w}, a={a}, path={self.path}"


class StoredLayer:
    """One quantized layer as the artifact stores it, with 2-4 bit codes still packed: what a loader builds
    the native layer from, so the whole model's unpacked int8 codes and a simulated copy never exist.

    ``template`` is the (meta-device) :class:`QuantLayer` the manifest spec describes: it gives the layer's
    kind, bits, group size, conv arguments, compute dtype, FP token positions and the tensor names and
    shapes to expect. ``tensors`` maps those names (``qweight``, ``weight_scale``, ``bias``, ...) to the
    stored tensors, which this object takes over: they should be memory the caller owns (e.g. read with
    :func:`export.format.open_shard`), since :class:`NativeDequantLayer` keeps the stored ``packed`` bytes
    as they are. It exposes the attributes the native layers read from a :class:`QuantLayer`: ``qweight``
    (int8 codes, 5-8 bits, a view of the stored bytes), ``packed`` (2-4 bits, the stored bytes, which are
    :func:`export.packing.pack_int`'s layout, the one the native layer keeps), ``weight`` (FP weights),
    ``weight_scale``, ``bias``, ``act_scale``, ``act_zero_point``, ``fp_token_inputs`` / ``_outputs``.
    """

    def __init__(self, template: QuantLayer, tensors: dict[str, torch.Tensor], name: str = "layer"):
        self.kind, self.weight_bits, self.act_bits = template.kind, template.weight_bits, template.act_bits
        self.group_size, self.conv_args = template.group_size, dict(template.conv_args)
        self.compute_dtype, self.fp_token_positions = template.compute_dtype, template.fp_token_positions
        self.format = template.format
        expected = template.state_dict(keep_vars=True)
        missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
        if missing or unexpected:
            raise ArtifactError(f"artifact layer {name} does not match its manifest spec (missing {sorted(missing)}, "
                                f"unexpected {sorted(unexpected)}); the artifact is corrupt or from an incompatible qsched")
        for key, want in expected.items():
            if key != "qweight" and tuple(tensors[key].shape) != tuple(want.shape):
                raise ArtifactError(f"artifact tensor {name}.{key} has shape {list(tensors[key].shape)}, its manifest "
                                    f"spec needs {list(want.shape)}; the artifact is corrupt or from an incompatible qsched")
        self.bias = tensors.get("bias")
        if self.weight_bits is None:
            self.weight = tensors["weight"]
            self.weight_shape = tuple(self.weight.shape)
        else:
            self.weight_shape = tuple(template.qweight.shape)
        if self.format == "fp8":  # e4m3 codes are stored as they are: checked, not unpacked
            self.qweight = check_fp8_codes(tensors["qweight"], self.weight_shape)
            self.weight_scale = tensors["weight_scale"]
        elif self.weight_bits is not None:
            flat = check_packed(tensors["qweight"], self.weight_bits, self.weight_shape)  # validated, not copied
            if self.weight_bits in NIBBLE_BITS:
                self.packed = flat
            else:
                self.qweight = flat.view(self.weight_shape)
            self.weight_scale = tensors["weight_scale"]
        if self.act_bits is not None:
            self.act_scale, self.act_zero_point = tensors["act_scale"], tensors["act_zero_point"]
        if self.fp_token_positions:
            self.fp_token_inputs, self.fp_token_outputs = tensors["fp_token_inputs"], tensors["fp_token_outputs"]


def native_layer(layer: QuantLayer, int_matmul: bool = True) -> nn.Module:
    """The deployment layer for one simulated (or :class:`StoredLayer`) layer (integer matmul when eligible and
    ``int_matmul``; an fp8 layer's FP8 matmul unless ``int_matmul`` is off)."""
    if int_matmul and layer.format == "fp8":
        return NativeFP8Linear(layer)
    if int_matmul and int_matmul_eligible(layer):
        return NativeInt8Linear(layer)
    return NativeDequantLayer(layer)


def to_native_(denoiser: nn.Module, int_matmul: bool = True) -> dict[str, int]:
    """Replace every :class:`QuantLayer` in ``denoiser`` (in place) by its native layer.

    Returns how many layers took each path (``int8_mm``, ``dequant-packed4``, ``dequant-int8``, ...), so a
    caller can see whether the integer kernel is actually used. ``int_matmul=False`` forces the dequantize
    path everywhere (a reference for debugging the integer path).
    """
    counts: dict[str, int] = {}
    targets = [(name, m) for name, m in denoiser.named_modules() if isinstance(m, QuantLayer)]
    for name, module in targets:
        if any(t.is_meta for t in module.buffers()):
            raise ArtifactError(f"layer {name} has no weights yet (meta device); load the artifact before going native")
        native = with_fp_tokens(native_layer(module, int_matmul), module).train(module.training)
        set_submodule(denoiser, name, native)
        counts[native.path] = counts.get(native.path, 0) + 1
    return counts


def native_from_stored(template: QuantLayer, tensors: dict[str, torch.Tensor], int_matmul: bool = True,
                       name: str = "layer") -> nn.Module:
    """The deployment layer for one stored layer (see :class:`StoredLayer`): the same module, buffers and
    numbers as ``to_native_`` gives for the simulated layer rebuilt from the same tensors, built without it."""
    stored = StoredLayer(template, tensors, name)
    return with_fp_tokens(native_layer(stored, int_matmul), stored)

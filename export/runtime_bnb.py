"""bitsandbytes runtime: an artifact's linear layers as ``bnb`` 8-bit / 4-bit layers.

diffusers' own bitsandbytes loader quantizes FP checkpoints and refuses CPU, so the layers are built here
from what the artifact stores:

* weights of 5-8 bits -> ``bnb.nn.Linear8bitLt``. bnb's int8 format is per-row absmax (``w = CB * SCB/127``),
  which is exactly the artifact's symmetric per-channel format, so ungrouped layers reuse the artifact's
  codes (``CB``) and scales (``SCB = 127 * s``) without requantizing. Grouped layers are requantized from
  the dequantized weight (bnb has no per-group int8). Note that bnb's forward is LLM.int8(): activations
  are quantized dynamically per row at run time (``threshold > 0`` keeps outlier columns in fp16).
* weights of ≤4 bits -> ``bnb.nn.Linear4bit`` (``nf4`` or ``fp4``, blockwise absmax). Neither grid holds
  the artifact's uniform int4 levels, so this is a second quantization of the dequantized weight and adds
  error on top of the artifact's; the native runtime (:mod:`export.runtime_torch`) is the exact one.

bnb layers are weight-only as far as the artifact is concerned: its static activation scales are not used.
Convolutions (bnb has none) and FP-weight layers go to :class:`export.runtime_torch.NativeDequantLayer`.

CPU caveats (bitsandbytes 0.50.2): the CPU 4-bit dequantize kernel indexes blocks per row, so it returns
wrong weights when ``in_features`` is not a multiple of ``blocksize`` (quantize is flat, dequantize is
not); such layers fall back to the native dequantize layer on CPU. On AVX512-BF16 CPUs, eval-mode
``Linear4bit`` repacks its weights for a fused bf16 kernel that needs ``out_features % 32 == 0``; other
layers are told to skip that repacking (bnb's dequantize + matmul path instead). ``Linear8bitLt`` in
training mode on CPU dequantizes and runs an FP matmul instead of LLM.int8(), so each new layer copies the
train/eval mode of the layer it replaces. bnb's int8 path casts activations to fp16 to quantize them, so
activations beyond ±65504 overflow there (the native runtime has no such limit).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from qsched.runtime.apply import set_submodule
from qsched.runtime.qlayers import QuantLayer, refuse_fp8, with_fp_tokens
from qsched.runtime.quantizers import dequantize_weight
from qsched.core.errors import QschedError

from export.runtime_torch import NativeDequantLayer

__all__ = ["require_bitsandbytes", "bnb_layer", "to_bnb_", "FOUR_BIT_TYPES"]

FOUR_BIT_TYPES = ("nf4", "fp4")
_PROBED: dict[str, str | None] = {}
_CPU_PACK_BLOCK_N = 32  # bitsandbytes.functional._convert_weight_packed_for_cpu's block_n


class _DropFp16CastNotice(logging.Filter):
    """bnb logs "inputs will be cast ... to float16" on every int8 forward with fp32/bf16 inputs (documented above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _quiet_bnb_logs() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropFp16CastNotice) for f in logger.filters):
        logger.addFilter(_DropFp16CastNotice())


def require_bitsandbytes(device: str | torch.device = "cpu"):
    """Import bitsandbytes and check that its int8 and 4-bit layers run on ``device``; raise QschedError if not.

    The check runs two tiny layers once per device: bnb imports happily on machines where its kernels then
    fail (no matching native library, unsupported CPU), and a clear error up front beats one mid-generation.
    """
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken native library raising at import
        raise QschedError(f"the bitsandbytes runtime needs the bitsandbytes package ({exc}); "
                          "install it with `pip install 'qsched[bnb]'`") from None
    _quiet_bnb_logs()
    key = str(torch.device(device))
    if key not in _PROBED:
        _PROBED[key] = _probe(bnb, torch.device(device))
    if _PROBED[key] is not None:
        raise QschedError(f"bitsandbytes {bnb.__version__} cannot run on {key}: {_PROBED[key]}; "
                          "use runtime='native' instead")
    return bnb


def _probe(bnb, device: torch.device) -> str | None:
    try:
        with torch.no_grad():
            x = torch.randn(2, 64, device=device)
            w = torch.randn(32, 64)
            int8 = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
            int8.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            int8 = int8.to(device)
            four = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            four.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
            four = four.to(device)
            for layer in (int8.eval(), four.eval()):  # eval: the int8 kernel path, not dequantize + matmul
                if not torch.isfinite(layer(x)).all():
                    return "a test layer produced non-finite output"
    except Exception as exc:  # any kernel failure means the runtime is unusable here
        return f"{type(exc).__name__}: {exc}"
    return None


def _int8_layer(bnb, layer: QuantLayer, threshold: float, device: torch.device) -> nn.Module:
    n, k = layer.qweight.shape
    out = bnb.nn.Linear8bitLt(k, n, bias=layer.bias is not None, has_fp16_weights=False, threshold=threshold)
    if layer.weight_scale.shape[1] == 1:  # same format as bnb: reuse codes and scales as they are
        codes = layer.qweight.detach().contiguous().clone()
        scb = layer.weight_scale.detach().float()[:, 0] * 127.0
        out.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scb)
    else:
        weight = dequantize_weight(layer.qweight, layer.weight_scale, torch.float32, layer.group_size)
        out.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return out.to(device)


def _four_bit_layer(bnb, layer: QuantLayer, quant_type: str, blocksize: int, device: torch.device) -> nn.Module:
    n, k = layer.qweight.shape
    out = bnb.nn.Linear4bit(k, n, bias=layer.bias is not None, compute_dtype=layer.compute_dtype,
                            quant_type=quant_type, compress_statistics=False)
    weight = dequantize_weight(layer.qweight, layer.weight_scale, torch.float32, layer.group_size)
    out.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type, blocksize=blocksize,
                                   compress_statistics=False)
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    if n % _CPU_PACK_BLOCK_N and getattr(out, "support_avx512bf16_for_cpu", False):
        out.support_avx512bf16_for_cpu = False  # the fused CPU kernel asserts N % 32 == 0
    return out.to(device)


def bnb_layer(layer: QuantLayer, four_bit: str = "nf4", blocksize: int = 64, threshold: float = 0.0,
              device: str | torch.device | None = None) -> nn.Module:
    """The bitsandbytes (or, for convs and FP weights, native dequantize) layer for one simulated layer.

    ``device`` is where bnb quantizes and keeps the weights (default: where the layer is); build on the
    device you will run on, bnb's quantized parameters are not meant to be moved around afterwards.
    """
    if four_bit not in FOUR_BIT_TYPES:
        raise QschedError(f"unknown 4-bit type {four_bit!r}; use one of {', '.join(FOUR_BIT_TYPES)}")
    refuse_fp8([layer.format], "the bitsandbytes runtime")
    device = torch.device(device) if device is not None else next(layer.buffers()).device
    in_features = layer.qweight.shape[1] if layer.weight_bits is not None else None
    cpu_block_bug = device.type == "cpu" and layer.weight_bits is not None and layer.weight_bits <= 4 \
        and in_features % blocksize != 0
    if layer.kind != "linear" or layer.weight_bits is None or cpu_block_bug:
        return NativeDequantLayer(layer).to(device)
    bnb = require_bitsandbytes(device)
    if layer.weight_bits <= 4:
        new = _four_bit_layer(bnb, layer, four_bit, blocksize, device)
    else:
        new = _int8_layer(bnb, layer, threshold, device)
    return new.train(layer.training)


def to_bnb_(denoiser: nn.Module, four_bit: str = "nf4", blocksize: int = 64, threshold: float = 0.0,
            device: str | torch.device | None = None) -> dict[str, int]:
    """Replace every :class:`QuantLayer` in ``denoiser`` (in place); returns how many became each layer type."""
    counts: dict[str, int] = {}
    targets = [(name, m) for name, m in denoiser.named_modules() if isinstance(m, QuantLayer)]
    refuse_fp8((m.format for _, m in targets), "the bitsandbytes runtime")
    if targets and any(m.kind == "linear" and m.weight_bits is not None for _, m in targets):
        require_bitsandbytes(device or next(targets[0][1].buffers()).device)  # fail before changing anything
    for name, module in targets:
        new = bnb_layer(module, four_bit, blocksize, threshold, device)
        kind = type(new).__name__
        set_submodule(denoiser, name, with_fp_tokens(new, module))
        counts[kind] = counts.get(kind, 0) + 1
    return counts

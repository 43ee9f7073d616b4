"""Packed integer weights: the on-disk layout of quantised codes.

Why this exists: an artifact that claims "4-bit" must actually be about a quarter of the bf16 size on
disk, not int8 codes with a 4-bit label. So codes of 4 bits or fewer are stored two per byte; codes of
5 to 8 bits are stored as plain int8 (packing 5-7 bit codes across byte boundaries saves little and
costs every loader a bit-stream decoder).

Layout (the contract every loader must follow):

* ``bits`` in {2, 3, 4}: the codes are flattened in C order and each code ``c`` in
  ``[-2**(bits-1), 2**(bits-1) - 1]`` is stored as the unsigned nibble ``c + 8`` (offset binary, so
  a nibble always decodes as ``nibble - 8``, whatever ``bits`` is). Element ``2*i`` goes in the low
  nibble of byte ``i`` and element ``2*i + 1`` in its high nibble. An odd element count is padded with
  a zero nibble. The result is a 1-D ``uint8`` tensor of ``ceil(numel / 2)`` bytes. 2- and 3-bit codes
  use the same nibble layout (no four-per-byte mode), so there is exactly one packed format.
* ``bits`` in {5, 6, 7, 8}: the codes as a 1-D ``int8`` tensor of ``numel`` bytes.

The shape is not stored in the packed tensor; the caller records it (in the manifest) and passes it to
:func:`unpack_int`. All work is vectorised torch ops, so a 12288x3072 matrix packs in well under a
second on a CPU.
"""

from __future__ import annotations

import math

import torch

from qsched.core.errors import ArtifactError

__all__ = ["NIBBLE_BITS", "BYTE_BITS", "SUPPORTED_BITS", "pack_int", "unpack_int", "check_packed", "packed_nbytes",
           "check_fp8_codes"]

#: Bit widths stored two codes per byte.
NIBBLE_BITS = (2, 3, 4)
#: Bit widths stored one code per byte (int8).
BYTE_BITS = (5, 6, 7, 8)
#: Every bit width :func:`pack_int` accepts.
SUPPORTED_BITS = NIBBLE_BITS + BYTE_BITS

_NIBBLE_OFFSET = 8


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ArtifactError(
            f"unsupported bit width {bits!r} for packed weights; use an integer from 2 to 8"
        )
    return bits


def _code_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that :func:`pack_int` produces for ``numel`` codes of ``bits`` bits."""
    bits = _check_bits(bits)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ArtifactError(f"element count must be a non-negative integer, got {numel!r}")
    if bits in NIBBLE_BITS:
        return (numel + 1) // 2
    return numel


def _check_codes_in_range(q: torch.Tensor, bits: int, what: str) -> None:
    if q.numel() == 0:
        return
    lo, hi = _code_range(bits)
    qmin, qmax = torch.aminmax(q)
    qmin, qmax = int(qmin), int(qmax)
    if qmin < lo or qmax > hi:
        raise ArtifactError(
            f"{what} holds codes in [{qmin}, {qmax}], outside the int{bits} range [{lo}, {hi}]; "
            f"clamp the codes or use more bits"
        )


def pack_int(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed integer codes ``q`` (int8, any shape) of ``bits`` bits; see the module docstring.

    Returns a new contiguous 1-D tensor (``uint8`` for 2-4 bits, ``int8`` for 5-8 bits) that shares no
    memory with ``q``. Raises :class:`ArtifactError` for a non-int8 input or a code out of range.
    """
    bits = _check_bits(bits)
    if not isinstance(q, torch.Tensor):
        raise ArtifactError(f"pack_int expects a torch.Tensor of int8 codes, got {type(q).__name__}")
    if q.dtype != torch.int8:
        raise ArtifactError(
            f"pack_int expects int8 codes, got {q.dtype}; round and convert with .to(torch.int8) first"
        )
    _check_codes_in_range(q, bits, "weight tensor")
    flat = q.detach().reshape(-1)
    if flat.device.type != "cpu":
        # Packing is cheap; doing it on the device would only keep a second copy there.
        flat = flat.cpu()
    if bits in BYTE_BITS:
        return flat.clone(memory_format=torch.contiguous_format)

    # Codes are in [-8, 7] here, so ``+ 8`` stays inside int8 and the result is in [0, 15].
    nib = (flat + _NIBBLE_OFFSET).view(torch.uint8)
    if nib.numel() % 2:
        nib = torch.cat([nib, nib.new_zeros(1)])
    pairs = nib.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def _checked_flat(packed: torch.Tensor, bits: int, shape) -> tuple[torch.Tensor, tuple[int, ...], int]:
    """Dtype and size checks shared by :func:`unpack_int` and :func:`check_packed`: (flat, shape, numel)."""
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise ArtifactError(f"shape must be a sequence of integers, got {shape!r}") from None
    if any(d < 0 for d in shape):
        raise ArtifactError(f"shape must not have negative sizes, got {shape}")
    if not isinstance(packed, torch.Tensor):
        raise ArtifactError(f"packed weights must be a torch.Tensor, got {type(packed).__name__}")
    numel = math.prod(shape)
    expect_dtype = torch.uint8 if bits in NIBBLE_BITS else torch.int8
    if packed.dtype != expect_dtype:
        raise ArtifactError(
            f"packed int{bits} weights must be {expect_dtype}, got {packed.dtype}; "
            f"the recorded bit width does not match the stored tensor, re-export the artifact"
        )
    nbytes = packed_nbytes(numel, bits)
    if packed.numel() != nbytes:
        raise ArtifactError(
            f"packed int{bits} weights for shape {list(shape)} need {nbytes} bytes, got "
            f"{packed.numel()}; the shard is corrupt or the manifest is wrong, re-export the artifact"
        )
    return packed.detach().reshape(-1), shape, numel


def unpack_int(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_int`: int8 codes of shape ``shape`` from a packed tensor.

    Raises :class:`ArtifactError` when the packed tensor has the wrong dtype or size for ``shape`` and
    ``bits``, or decodes to codes outside the ``bits`` range (a sign that the recorded bit width is
    wrong or the data is corrupt).
    """
    bits = _check_bits(bits)
    flat, shape, numel = _checked_flat(packed, bits, shape)
    if bits in BYTE_BITS:
        out = flat.clone(memory_format=torch.contiguous_format)
    else:
        low = flat & 0x0F
        high = flat >> 4
        nib = torch.stack([low, high], dim=1).reshape(-1)[:numel]
        out = nib.view(torch.int8) - _NIBBLE_OFFSET
    if bits != 8:
        _check_codes_in_range(out, bits, f"packed int{bits} tensor")
    return out.reshape(shape)


def check_packed(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The checks of :func:`unpack_int` without unpacking: returns ``packed`` as a flat tensor (a view,
    no copy) once its dtype and size fit ``shape`` and ``bits`` and every code is in the ``bits`` range.

    For loaders that keep the codes in the :func:`pack_int` layout (the native runtime keeps 2-4 bit
    codes packed in memory). A nibble always decodes into the int4 range, so only 2- and 3-bit codes
    (and 5-7 bit bytes) are range-checked, on the stored bytes themselves; the padding nibble of an odd
    element count is ignored, as :func:`unpack_int` ignores it.
    """
    bits = _check_bits(bits)
    flat, shape, numel = _checked_flat(packed, bits, shape)
    if bits in BYTE_BITS:
        if bits != 8:
            _check_codes_in_range(flat, bits, f"packed int{bits} tensor")
        return flat
    if bits < 4 and numel:
        lo, hi = _code_range(bits)
        found = []
        for nibbles in (flat & 0x0F, flat[: numel // 2] >> 4):  # low nibbles: elements 0, 2, ...; high: 1, 3, ...
            if nibbles.numel():
                nmin, nmax = torch.aminmax(nibbles)
                found += [int(nmin) - _NIBBLE_OFFSET, int(nmax) - _NIBBLE_OFFSET]
        if min(found) < lo or max(found) > hi:
            raise ArtifactError(
                f"packed int{bits} tensor holds codes in [{min(found)}, {max(found)}], outside the int{bits} range "
                f"[{lo}, {hi}]; clamp the codes or use more bits"
            )
    return flat


def check_fp8_codes(stored: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An FP8 layer's stored codes, checked: e4m3 codes are not packed (one byte each, stored in the shard
    as safetensors' F8_E4M3), so the check is their dtype and shape. Returns ``stored`` reshaped (a view)."""
    shape = tuple(int(d) for d in shape)
    if not isinstance(stored, torch.Tensor) or stored.dtype != torch.float8_e4m3fn:
        got = stored.dtype if isinstance(stored, torch.Tensor) else type(stored).__name__
        raise ArtifactError(f"fp8 weights must be stored as torch.float8_e4m3fn, got {got}; the recorded format "
                            "does not match the stored tensor, re-export the artifact")
    if stored.numel() != math.prod(shape):
        raise ArtifactError(f"fp8 weights for shape {list(shape)} need {math.prod(shape)} codes, got {stored.numel()}; "
                            "the shard is corrupt or the manifest is wrong, re-export the artifact")
    return stored.detach().reshape(shape)

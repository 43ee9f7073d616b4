"""Packed integer weights: exact round trips, real byte savings, clear errors."""

import math

import pytest
import torch

from export.packing import (
    BYTE_BITS,
    NIBBLE_BITS,
    SUPPORTED_BITS,
    check_packed,
    pack_int,
    packed_nbytes,
    unpack_int,
)
from qsched.core.errors import ArtifactError


def _codes(shape, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int64).to(torch.int8)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (3, 5), (4, 6), (2, 3, 5), (2, 1, 4, 3), ()])
def test_round_trip(bits, shape):
    q = _codes(shape, bits, seed=bits * 100 + len(shape))
    packed = pack_int(q, bits)
    assert packed.dim() == 1
    assert packed.is_contiguous()
    assert packed.numel() == packed_nbytes(q.numel(), bits)
    assert packed.dtype == (torch.uint8 if bits <= 4 else torch.int8)
    out = unpack_int(packed, bits, tuple(q.shape))
    assert out.dtype == torch.int8
    assert tuple(out.shape) == tuple(q.shape)
    assert torch.equal(out, q)


@pytest.mark.parametrize("bits", range(2, 9))
def test_extreme_values(bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.tensor([lo, hi, lo, hi, 0, -1, lo], dtype=torch.int8).reshape(7)
    assert torch.equal(unpack_int(pack_int(q, bits), bits, (7,)), q)
    q2 = torch.full((3, 3), lo, dtype=torch.int8)
    assert torch.equal(unpack_int(pack_int(q2, bits), bits, (3, 3)), q2)
    q3 = torch.full((2, 5), hi, dtype=torch.int8)
    assert torch.equal(unpack_int(pack_int(q3, bits), bits, (2, 5)), q3)


def test_nibble_layout_is_documented_one():
    # element 2i -> low nibble, 2i+1 -> high nibble, stored as code + 8; odd tail padded with 0.
    q = torch.tensor([-8, 7, 0, -1, 3], dtype=torch.int8)
    packed = pack_int(q, 4)
    assert packed.tolist() == [(0) | (15 << 4), (8) | (7 << 4), 11]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 1001, 1002])
def test_four_bit_size_is_half(n):
    q = _codes((n,), 4, seed=n)
    packed = pack_int(q, 4)
    assert packed.numel() * packed.element_size() == math.ceil(n / 2)
    assert packed_nbytes(n, 4) == math.ceil(n / 2)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_packed_nbytes(bits):
    for n in (0, 1, 5, 6, 12288 * 3072):
        assert packed_nbytes(n, bits) == ((n + 1) // 2 if bits in NIBBLE_BITS else n)
    assert set(NIBBLE_BITS) | set(BYTE_BITS) == set(range(2, 9))


def test_pack_returns_independent_copy():
    q = _codes((4, 4), 8)
    packed = pack_int(q, 8)
    packed[0] = 0 if q.reshape(-1)[0] != 0 else 1
    assert packed[0] != q.reshape(-1)[0]


@pytest.mark.parametrize("bits", range(2, 8))
def test_out_of_range_raises(bits):
    hi = (1 << (bits - 1)) - 1
    lo = -(1 << (bits - 1))
    with pytest.raises(ArtifactError, match=f"outside the int{bits} range"):
        pack_int(torch.tensor([0, hi + 1], dtype=torch.int8), bits)
    with pytest.raises(ArtifactError, match=f"outside the int{bits} range"):
        pack_int(torch.tensor([lo - 1, 0], dtype=torch.int8), bits)


def test_bad_dtype_and_bits_raise():
    with pytest.raises(ArtifactError, match="int8"):
        pack_int(torch.zeros(4, dtype=torch.int32), 4)
    with pytest.raises(ArtifactError, match="int8"):
        pack_int(torch.zeros(4), 4)
    with pytest.raises(ArtifactError, match="int8"):
        pack_int([1, 2, 3], 4)  # type: ignore[arg-type]
    for bad in (1, 9, 0, 4.0, True, "4"):
        with pytest.raises(ArtifactError, match="bit width"):
            pack_int(torch.zeros(4, dtype=torch.int8), bad)  # type: ignore[arg-type]
        with pytest.raises(ArtifactError, match="bit width"):
            packed_nbytes(4, bad)  # type: ignore[arg-type]
    with pytest.raises(ArtifactError):
        packed_nbytes(-1, 4)


def test_unpack_validates_size_dtype_and_range():
    q = _codes((5, 3), 4)
    packed = pack_int(q, 4)
    with pytest.raises(ArtifactError, match="need 8 bytes"):
        unpack_int(packed[:-1], 4, (5, 3))
    with pytest.raises(ArtifactError, match="must be torch.uint8"):
        unpack_int(packed.view(torch.int8), 4, (5, 3))
    with pytest.raises(ArtifactError, match="must be torch.int8"):
        unpack_int(packed, 8, (8,))
    with pytest.raises(ArtifactError, match="negative"):
        unpack_int(packed, 4, (-1, 3))
    # 4-bit data read back as 2-bit is out of range -> caught, not silently wrong.
    wide = pack_int(torch.tensor([7, -8, 5, 1], dtype=torch.int8), 4)
    with pytest.raises(ArtifactError, match="outside the int2 range"):
        unpack_int(wide, 2, (4,))


def test_flux_size_matrix_round_trips():
    """A FLUX-size weight (its packing speed is measured by benchmarks/artifact_size.py, not asserted here)."""
    q = _codes((12288, 3072), 4, seed=1)
    packed = pack_int(q, 4)
    assert packed.numel() == 12288 * 3072 // 2
    assert torch.equal(unpack_int(packed, 4, (12288, 3072)), q)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(5, 3), (4, 4), (1,), (0, 3)])
def test_check_packed_accepts_what_unpack_accepts_and_returns_the_bytes(bits, shape):
    """check_packed validates like unpack_int but returns the stored bytes themselves (a view, no copy)."""
    packed = pack_int(_codes(shape, bits, seed=bits), bits)
    flat = check_packed(packed, bits, shape)
    assert flat.data_ptr() == packed.data_ptr() and torch.equal(flat, packed)
    assert torch.equal(unpack_int(flat, bits, shape), _codes(shape, bits, seed=bits))


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7])
def test_check_packed_refuses_codes_out_of_range_like_unpack(bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for bad in ([0, 0, hi + 1], [lo - 1, 0, 0], [0, hi + 1, 0]):  # low nibble, low nibble, high nibble
        codes = torch.tensor(bad, dtype=torch.int8)
        packed = pack_int(codes, 4) if bits <= 4 else codes.clone()
        with pytest.raises(ArtifactError, match=f"outside the int{bits} range"):
            unpack_int(packed, bits, (3,))
        with pytest.raises(ArtifactError, match=f"outside the int{bits} range"):
            check_packed(packed, bits, (3,))


def test_check_packed_ignores_the_padding_nibble_and_checks_size_and_dtype():
    packed = pack_int(torch.tensor([1, -2, 0], dtype=torch.int8), 2)  # odd count: high nibble of byte 1 is padding
    assert int(packed[1]) >> 4 == 0  # padding nibble 0 decodes to -8, out of the int2 range, yet must pass
    check_packed(packed, 2, (3,))
    with pytest.raises(ArtifactError, match="need 2 bytes"):
        check_packed(packed[:1], 2, (3,))
    with pytest.raises(ArtifactError, match="must be torch.uint8"):
        check_packed(packed.view(torch.int8), 2, (3,))
    with pytest.raises(ArtifactError, match="torch.Tensor"):
        check_packed([1, 2], 2, (3,))  # type: ignore[arg-type]

"""GGML block encoders for the GGUF export, in numpy: the K-quants gguf-py cannot write, and grid-aware Q8_0/Q5_0/Q4_0.

gguf-py (0.19) dequantizes every GGML type but quantizes only BF16, Q4_0/Q4_1, Q5_0/Q5_1, Q8_0 and a few
others; ``Q2_K`` ... ``Q6_K`` raise ``NotImplementedError``. :func:`encode_rows` writes all of them. Each
packer here is the exact inverse of gguf-py's ``dequantize_blocks`` for its type (the tests decode with
gguf-py and with diffusers' torch dequantizers).

**Grid-aware.** The artifact's weights are already on a grid: ``value = code × step``, symmetric codes
``|code| ≤ 2^(b-1) − 1`` and one ``step`` per output channel (or per group). Re-quantizing those values
from their range, as llama.cpp does for FP weights, would put a second rounding on top of ours (a Q4_K
sub-block whose largest code is 6 gets 15 levels across ±6 steps, none of them on our grid). So
:func:`encode_rows` takes the per-element ``step`` as well: wherever one step covers a whole sub-block
(per-channel scales, or groups that are a multiple of the sub-block), that sub-block's scale *is* the step
(affine types: ``min = 2^(B-1) × step``, ``q = code + 2^(B-1)``), and the GGML codes equal ours. What
remains is the format's own rounding of the sub-block scales: an fp16 super-block scale times a 4-8-bit
integer (see :func:`_fit_scales`), a relative error of about 1e-3 at most where all sub-blocks share one
step. Sub-blocks spanning several steps (groups smaller than the sub-block) fall back to range-based
scales, like llama.cpp's plain round-to-nearest (not its iterative search).

Rows are encoded independently (a block never crosses a row), so fused tensors (FLUX's q|k|v) can be
encoded member by member and concatenated along rows.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as _gq

QK_K = 256
_FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)  # 6.1e-5: below it an fp16 scale loses precision
_FP16_MAX = float(np.finfo(np.float16).max)

#: type → bits of its codes (what a weight of that many bits fits into)
CODE_BITS = {T.Q2_K: 2, T.Q3_K: 3, T.Q4_K: 4, T.Q5_K: 5, T.Q6_K: 6, T.Q4_0: 4, T.Q5_0: 5, T.Q8_0: 8}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)

__all__ = ["encode_rows", "decode_rows", "row_bytes", "CODE_BITS", "FLOAT_TYPES", "QK_K"]


def row_bytes(qtype: T, cols: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {block} values; got {cols}")
    return cols // block * size


def encode_rows(values: np.ndarray, qtype: T, step: np.ndarray | None = None) -> np.ndarray:
    """``values`` [rows, cols] (float) as ``qtype``: a uint8 array [rows, bytes per row] (float32/16 arrays for
    F32/F16, which gguf-py writes as such). ``step``: the grid step of every value (same shape), or None."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"encode_rows takes a 2-D array, got shape {values.shape}")
    if qtype in FLOAT_TYPES:
        return _gq.quantize(values, qtype)
    encoder = _ENCODERS.get(qtype)
    if encoder is None:
        raise NotImplementedError(f"no encoder for {qtype.name}")
    rows, cols = values.shape
    block = GGML_QUANT_SIZES[qtype][0]
    row_bytes(qtype, cols)  # checks divisibility
    x = values.reshape(-1, block).astype(np.float64)
    s = None if step is None else np.ascontiguousarray(step, dtype=np.float64).reshape(-1, block)
    out = encoder(x, s)
    return out.reshape(rows, -1)


def decode_rows(data: np.ndarray, qtype: T, cols: int) -> np.ndarray:
    """gguf-py's dequantization of :func:`encode_rows`' output, as float32 [rows, cols]."""
    return _gq.dequantize(np.asarray(data), qtype).reshape(-1, cols).astype(np.float32)


# ------------------------------------------------------------------------------------------- scales


def _sub_scales(x, step, sub: int, qpos: float, offset: float | None):
    """Per sub-block ``(scale, min)`` [n, subs]: the grid step where one step covers the sub-block, else
    from the range (symmetric: ``max|x| / qpos``; affine: ``(hi − lo) / levels``, ``min = −lo``)."""
    n = x.shape[0]
    xs = x.reshape(n, -1, sub)
    if offset is None:
        scale, mn = np.abs(xs).max(-1) / qpos, None
    else:
        lo, hi = np.minimum(xs.min(-1), 0.0), np.maximum(xs.max(-1), 0.0)
        scale, mn = (hi - lo) / qpos, -lo
    if step is not None:
        st = step.reshape(n, -1, sub)
        uniform = (st.max(-1) == st.min(-1)) & (st[..., 0] > 0)
        scale = np.where(uniform, st[..., 0], scale)
        if offset is not None:
            mn = np.where(uniform, offset * st[..., 0], mn)
    return scale, mn


def _fit_scales(scale: np.ndarray, int_max: int) -> tuple[np.ndarray, np.ndarray]:
    """``scale`` [n, subs] ≥ 0 as ``d × sc``: an fp16 ``d`` per super-block and integers ``sc`` in
    [0, int_max]; returns ``(d as float16 [n], sc as int [n, subs])``.

    ``d = max / c`` for a few candidate ``c`` (``int_max`` itself, smaller ones, and the largest that keeps
    ``d`` a normal fp16 number, which matters for 6-bit weights whose steps are ~1e-3), keeping per
    super-block the one whose ``d × sc`` is closest to the scales."""
    smax = scale.max(-1)
    safe = np.clip(np.floor(smax / _FP16_MIN_NORMAL), 1, int_max)
    candidates = [np.full_like(smax, c) for c in sorted({int_max, max(1, int_max - 1), max(1, 3 * int_max // 4),
                                                        max(1, int_max // 2)})] + [safe]
    best_d = best_sc = best_err = None
    for c in candidates:
        d = np.minimum(smax / c, _FP16_MAX).astype(np.float16)
        df = d.astype(np.float64)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.where(df > 0, np.rint(scale / df), 0)
        sc = np.clip(sc, 0, int_max)
        sc = np.where((scale > 0) & (sc == 0) & (df > 0), 1, sc)
        err = np.abs(df * sc - scale).sum(-1)
        if best_err is None:
            best_d, best_sc, best_err = d, sc, err
        else:
            better = err < best_err
            best_d = np.where(better, d, best_d)
            best_sc = np.where(better[:, None], sc, best_sc)
            best_err = np.where(better, err, best_err)
    return best_d, best_sc.astype(np.int64)


def _codes(x, eff, lo: int, hi: int, sub: int, minimum=None):
    """Integer codes of ``x`` with per-sub-block step ``eff`` (and subtracted ``minimum``), clipped."""
    n = x.shape[0]
    xs = x.reshape(n, -1, sub)
    if minimum is not None:
        xs = xs + minimum[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(eff[..., None] > 0, np.rint(xs / eff[..., None]), 0)
    return np.clip(q, lo, hi).astype(np.int64).reshape(n, -1)


def _f16_bytes(d: np.ndarray) -> np.ndarray:
    return d.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _pack_fields(q: np.ndarray, shape: tuple, shifts: tuple, width: int) -> np.ndarray:
    """Pack small integers ``q`` [n, 256] laid out as ``(n, *shape)`` whose axis ``-2`` indexes ``shifts``
    (bit positions within one byte) into bytes [n, ...]: the inverse of gguf-py's ``>> shift & mask``."""
    n = q.shape[0]
    v = q.reshape((n,) + shape).astype(np.uint8) & np.uint8((1 << width) - 1)
    out = np.zeros(v.shape[:-2] + v.shape[-1:], dtype=np.uint8)
    for i, s in enumerate(shifts):
        out |= (v[..., i, :] << np.uint8(s)).astype(np.uint8)
    return out.reshape(n, -1)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 scale bytes from 8 six-bit scales and 8 six-bit mins (gguf-py's ``get_scale_min``)."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return out


# ------------------------------------------------------------------------------------------- K-quants


def _affine_k(x, step, bits: int, sub: int, int_max: int):
    """The shared part of Q2_K/Q4_K/Q5_K: ``value = d·sc·q − dmin·m``, ``q`` in [0, 2^bits − 1]."""
    levels = (1 << bits) - 1
    scale, mn = _sub_scales(x, step, sub, levels, float(1 << (bits - 1)))
    d, sc = _fit_scales(scale, int_max)
    dmin, m = _fit_scales(mn, int_max)
    eff = d.astype(np.float64)[:, None] * sc
    minimum = dmin.astype(np.float64)[:, None] * m
    return d, sc, dmin, m, _codes(x, eff, 0, levels, sub, minimum)


def _q2_k(x, step):
    d, sc, dmin, m, q = _affine_k(x, step, 2, 16, 15)
    scales = (sc | (m << 4)).astype(np.uint8)
    qs = _pack_fields(q, (2, 4, 32), (0, 2, 4, 6), 2)
    return np.concatenate([scales, qs, _f16_bytes(d), _f16_bytes(dmin)], axis=1)


def _q4_k(x, step):
    d, sc, dmin, m, q = _affine_k(x, step, 4, 32, 63)
    qs = _pack_fields(q, (4, 2, 32), (0, 4), 4)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, m), qs], axis=1)


def _q5_k(x, step):
    d, sc, dmin, m, q = _affine_k(x, step, 5, 32, 63)
    qh = _pack_fields(q >> 4, (1, 8, 32), tuple(range(8)), 1)
    qs = _pack_fields(q & 0x0F, (4, 2, 32), (0, 4), 4)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, m), qh, qs], axis=1)


def _q3_k(x, step):
    # value = d · (sc − 32) · (q − 4); scales kept positive (sc − 32 in 1..31), codes in −4..3
    scale, _ = _sub_scales(x, step, 16, 3.0, None)
    d, sc = _fit_scales(scale, 31)
    q = _codes(x, d.astype(np.float64)[:, None] * sc, -4, 3, 16) + 4  # 0..7
    hmask = _pack_fields(q >> 2, (1, 8, 32), tuple(range(8)), 1)
    qs = _pack_fields(q & 3, (2, 4, 32), (0, 2, 4, 6), 2)
    u = (sc + 32).astype(np.uint8)  # 6-bit
    low, high = u & 0x0F, u >> 4
    scales = np.zeros((x.shape[0], 12), dtype=np.uint8)
    scales[:, 0:8] = low[:, 0:8] | (low[:, 8:16] << 4)
    for t in range(4):
        scales[:, 8:12] |= (high[:, 4 * t:4 * t + 4] << (2 * t)).astype(np.uint8)
    return np.concatenate([hmask, qs, scales, _f16_bytes(d)], axis=1)


def _q6_k(x, step):
    # value = d · sc · (q − 32), sc int8 (kept positive), codes −32..31
    scale, _ = _sub_scales(x, step, 16, 31.0, None)
    d, sc = _fit_scales(scale, 127)
    q = _codes(x, d.astype(np.float64)[:, None] * sc, -32, 31, 16) + 32  # 0..63
    ql = _pack_fields(q & 0x0F, (2, 2, 64), (0, 4), 4)
    qh = _pack_fields(q >> 4, (2, 4, 32), (0, 2, 4, 6), 2)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)


# --------------------------------------------------------------------------------- 32-value blocks


def _one_scale(x, step, qpos: float):
    """One fp16 scale per 32-value block: the grid step where one step covers the block, else max|x|/qpos."""
    scale, _ = _sub_scales(x, step, x.shape[1], qpos, None)
    d = np.minimum(scale[:, 0], _FP16_MAX).astype(np.float16)
    return d, d.astype(np.float64)[:, None]


def _q8_0(x, step):
    d, eff = _one_scale(x, step, 127.0)
    q = _codes(x, eff, -127, 127, 32)
    return np.concatenate([_f16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)


def _q4_0(x, step):
    d, eff = _one_scale(x, step, 7.0)
    q = (_codes(x, eff, -8, 7, 32) + 8).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), q[:, :16] | (q[:, 16:] << 4)], axis=1)


def _q5_0(x, step):
    d, eff = _one_scale(x, step, 15.0)
    q = (_codes(x, eff, -16, 15, 32) + 16).astype(np.uint8)
    qh = np.packbits((q >> 4).reshape(-1, 1, 32), axis=-1, bitorder="little").reshape(-1, 4)
    qs = (q[:, :16] & 0x0F) | (q[:, 16:] << 4)
    return np.concatenate([_f16_bytes(d), qh, qs.astype(np.uint8)], axis=1)


_ENCODERS = {T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
             T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q5_0: _q5_0}

"""The plan's time from one timed denoiser call on the compiling machine, instead of a datasheet figure.

A datasheet's dense throughput times an achieved fraction is a guess twice over: small or narrow models are
bound by per-call overhead, not arithmetic (the CPU rehearsal at width 1/24 ran about 7x slower than its MACs
at the table's rate), and a real GPU reaches a fraction that depends on the shapes. ``--plan-measure`` builds
the denoiser for real from the planned architecture (random weights, the compile's dtype, on ``--device``),
calls it at the compile's batch of sample rows and resolution, and prices every evaluation at the measured
seconds per row. Nothing else of the compile runs.
"""
from __future__ import annotations

import time

import torch
from torch import nn


def measure_row_seconds(denoiser: nn.Module, inputs: dict, device: str, rows: int, repeats: int = 2) -> dict:
    """Seconds per sample row of ``denoiser`` (a meta-device module) rebuilt with random weights on ``device``
    and called on ``inputs`` (meta tensors for one row) widened to ``rows`` rows: one warm-up call, then the
    median of ``repeats`` timed calls."""
    dtype = next(denoiser.parameters()).dtype
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype on its device: no fp32 copy first
    try:
        with torch.device(device):
            real = type(denoiser).from_config(denoiser.config)
    finally:
        torch.set_default_dtype(default)
    real = real.eval().requires_grad_(False)
    batch = _widen(inputs, rows, torch.device(device))
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            real(**batch)
            _sync(device)
            if i:  # the first call warms up kernels and allocators
                times.append(time.perf_counter() - start)
    del real, batch
    if torch.device(device).type == "cuda":  # the compile that follows needs the memory back
        torch.cuda.empty_cache()
    seconds = sorted(times)[len(times) // 2]
    return {"device": str(device), "rows": rows, "seconds_per_call": seconds, "seconds_per_row": seconds / rows,
            "repeats": repeats}


def _widen(value, rows: int, device: torch.device):
    """Real zeros for the meta inputs, with every per-row tensor (first dimension 1) repeated to ``rows`` rows;
    position ids and other shared tensors keep their shape."""
    if isinstance(value, dict):
        return {k: _widen(v, rows, device) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        shape = list(value.shape)
        if shape and shape[0] == 1:
            shape[0] = rows
        return torch.zeros(shape, dtype=value.dtype, device=device)
    return value


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)

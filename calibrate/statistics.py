"""Activation statistics from full-precision calibration runs.

Forward pre-hooks on every quantizable layer record the input's min and max at each denoiser call; a
running average with momentum 0.95 (MixDQ's static activation quantizer) turns the per-call ranges into
one static range per layer.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class RangeObserver:
    """Exponential moving average of per-call (min, max); the first call initialises it. ``momentum=None``
    keeps the envelope instead (the least min and greatest max seen)."""

    def __init__(self, momentum: float | None = 0.95):
        self.momentum, self.lo, self.hi, self.calls = momentum, None, None, 0

    def update(self, x: torch.Tensor) -> None:
        lo, hi = float(x.detach().amin()), float(x.detach().amax())
        if self.calls == 0:
            self.lo, self.hi = lo, hi
        elif self.momentum is None:
            self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        else:
            m = self.momentum
            self.lo, self.hi = m * self.lo + (1 - m) * lo, m * self.hi + (1 - m) * hi
        self.calls += 1

    @property
    def range(self) -> tuple[float, float]:
        if not self.calls:
            raise RuntimeError("observer saw no data")
        return self.lo, self.hi


@contextmanager
def observe_inputs(layers: dict[str, nn.Module], momentum: float | None = 0.95,
                   exclude_rows: dict[str, tuple[int, ...]] | None = None):
    """Attach range observers to the inputs of ``layers`` for the duration of the block.

    ``exclude_rows`` (layer -> token positions) leaves those rows out of a layer's range: rows served
    in FP (a BOS outlier) must not set the scale of the quantized rest."""
    from calibrate.fp_tokens import drop_rows

    exclude_rows = exclude_rows or {}
    observers = {name: RangeObserver(momentum) for name in layers}
    handles = [m.register_forward_pre_hook(
        lambda _m, args, o=observers[n], p=exclude_rows.get(n, ()): o.update(drop_rows(args[0], p)))
        for n, m in layers.items()]
    try:
        yield observers
    finally:
        for h in handles:
            h.remove()

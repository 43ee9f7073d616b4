"""The run context of one MixDQ allocation: what a compile knows beyond the recipe's ``quantization``
section (where to cache, which weights, where to fan out). Plain and serialisable except the hooks."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class MixDQRun:
    """``seed``/``batch_size``: the sensitivity passes' sampling (``batch_size=None``: all prompts at once).
    ``work_dir``/``model_digest``: the sensitivity table is cached there under a key of its inputs (the
    digest saves hashing the weights again). ``ray``/``pipeline_source``: probe layers on Ray workers (see
    :func:`calibrate.sensitivity.analyze_sensitivity`). ``fp_tokens``: BOS rows the final model serves in
    FP, so sensitivity is measured with them. ``hessians``/``hessian_key``: GPTQ-rounded weights in the
    probes. ``max_bops``: an optional compute cap on the program; ``time_limit``: HiGHS's seconds (the
    result says when it stopped at a gap). ``image_metric``: the content metric (default SSIM)."""

    seed: int = 0
    batch_size: int | None = None
    work_dir: str | Path | None = None
    model_digest: str | None = None
    progress: bool | str = True
    ray: object | None = None
    pipeline_source: object | None = None
    fp_tokens: dict | None = None
    hessians: dict | None = None
    hessian_key: str | None = None
    max_bops: float | None = None
    time_limit: float = 60.0
    image_metric: Callable | None = None

"""Q-Sched's JAQ objective (maximised): ``JAQ = mean(TC) + k·mean(IQ)``, k = 2 by default.

TC is text-image compatibility, IQ a no-reference image quality: both reference-free, so calibrating
the scheduler coefficients never runs the full-precision model. The two terms are pluggable callables
so the same search runs on the tiny shape world (the world's judge) and on real models (CLIP):

* ``tc_fn(images, prompts)`` → one score per image (a scalar is accepted too: only means are used);
* ``iq_fn(images)`` → one score per image (or a scalar).

Images are float ``[n, 3, H, W]`` in ``[0, 1]``, as :func:`qsched.generation.generate` returns them.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from .errors import QschedError

TcFn = Callable[[torch.Tensor, Sequence[str]], "np.ndarray | torch.Tensor | float"]
IqFn = Callable[[torch.Tensor], "np.ndarray | torch.Tensor | float"]

__all__ = ["jaq", "world_jaq_terms", "clip_jaq_terms"]


def _mean(values, n: int, name: str) -> float:
    if isinstance(values, torch.Tensor):
        values = values.detach().double().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim > 0 and arr.size != n:
        raise QschedError(f"JAQ {name} term returned {arr.size} scores for {n} images")
    mean = float(arr.mean())
    if not np.isfinite(mean):
        raise QschedError(f"JAQ {name} term is not finite ({mean})")
    return mean


def jaq(images: torch.Tensor, prompts: Sequence[str], tc_fn: TcFn, iq_fn: IqFn, k: float = 2.0) -> float:
    """``mean(tc_fn(images, prompts)) + k · mean(iq_fn(images))``; higher is better."""
    n = int(images.shape[0])
    prompts = list(prompts)
    if n == 0:
        raise QschedError("JAQ needs at least one image")
    if len(prompts) != n:
        raise QschedError(f"JAQ needs one prompt per image; got {len(prompts)} prompts for {n} images")
    return _mean(tc_fn(images, prompts), n, "TC") + float(k) * _mean(iq_fn(images), n, "IQ")


def world_jaq_terms() -> tuple[TcFn, IqFn]:
    """TC and IQ for the tiny shape world: the world judge's per-image ``score`` and its
    ``quality_score``. Imported lazily: the judge is only needed when the world is in use."""
    from .tinyworld import judge as judge_mod

    def tc(images, prompts):
        return judge_mod.judge(images, list(prompts)).score

    def iq(images):
        return judge_mod.quality_score(images)

    return tc, iq


def clip_jaq_terms(bundle) -> tuple[TcFn, IqFn]:
    """TC = CLIPScore / 100 (torchmetrics scale brought to [0, 1], commensurate with IQ) and
    IQ = CLIP-IQA in [0, 1], both from one loaded :class:`qsched.scoring.clip.ClipBundle`."""
    from .scoring.clip import clip_iqa, clip_score

    def tc(images, prompts):
        return clip_score(bundle, images, list(prompts)) / 100.0

    def iq(images):
        return clip_iqa(bundle, images)

    return tc, iq

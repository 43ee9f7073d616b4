"""Q-Sched's JAQ objective (maximised): ``JAQ = mean(TC) + k·mean(IQ)``, k = 2 by default.

TC is text-image compatibility, IQ a no-reference image quality: both reference-free, so calibrating
the scheduler coefficients never runs the full-precision model. The two terms are pluggable callables
(:func:`scorer_terms` takes them from the model profile's scorer), so the same search runs on the tiny
shape world (the world's judge) and on real models (CLIP):

* ``tc_fn(images, prompts)`` → one score per image (a scalar is accepted too: only means are used);
* ``iq_fn(images)`` → one score per image (or a scalar).

Images are float ``[n, 3, H, W]`` in ``[0, 1]``, as :func:`qsched.runtime.generation.generate` returns them.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from qsched.core.errors import QschedError

TcFn = Callable[[torch.Tensor, Sequence[str]], "np.ndarray | torch.Tensor | float"]
IqFn = Callable[[torch.Tensor], "np.ndarray | torch.Tensor | float"]

__all__ = ["jaq", "scorer_terms"]


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


def scorer_terms(scorer) -> tuple[TcFn, IqFn]:
    """TC and IQ from a :class:`qsched.scoring.scorer.Scorer`: its text match and its image quality (the
    world's judge score and quality for flux-tiny; CLIPScore / 100 and CLIP-IQA for a real model)."""
    return scorer.text_match, scorer.image_quality

"""Cache-search quality for real models: CLIP text-image match and CLIP-IQA, plus fidelity to no-cache.

The embedded model has its world's judge (:class:`cache_search.search.WorldQuality`); a real model has no
judge, so its content term comes from a ``transformers`` CLIP (a local directory or a hub id, the same one
Q-Sched's JAQ uses): ``score = (CLIPScore / 100 + k · CLIP-IQA) / (1 + k)``, in [0, 1] like the judge's
score. Everything else (batching, prefix sharing, noise per row, the fidelity term against the uncached
images, the counters) is :class:`WorldQuality`'s, so both objectives rank schedules the same way.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .search import WorldQuality, quality_terms


class ClipQuality(WorldQuality):
    """``quality = (1 - w) · score + w · fidelity`` with the CLIP ``score`` above (w = ``fidelity_weight``)."""

    def __init__(self, pipe, prompts: Sequence[str], settings, clip, seed: int = 0, k: float = 2.0, **kwargs):
        self.clip, self.k = clip, float(k)  # set before the base class scores the uncached reference
        super().__init__(pipe, prompts, settings, seed, **kwargs)

    def metrics(self, images) -> dict:
        from qsched.scoring.clip import clip_iqa, clip_score
        from qsched.tinyworld.judge import psnr

        tc = float(np.mean(clip_score(self.clip, images, self.prompts))) / 100.0  # per image -> mean
        iq = float(np.mean(clip_iqa(self.clip, images)))
        score = float((tc + self.k * iq) / (1.0 + self.k))
        return {"score": score, "clip_score": float(tc), "clip_iqa": float(iq),
                **quality_terms(score, psnr(images, self.reference), self.psnr_cap, self.fidelity_weight)}


def clip_quality(pipe, prompts: Sequence[str], settings, clip, seed: int = 0, **kwargs) -> ClipQuality:
    """The real-model evaluator for :func:`cache_search.search.nsga2_search` (see :class:`ClipQuality`)."""
    return ClipQuality(pipe, prompts, settings, clip, seed, **kwargs)

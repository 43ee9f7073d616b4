"""The one seam between the methods and whatever judges an image: a :class:`Scorer`.

Why: Q-Sched's JAQ loss, the cache search's quality objective, the guards and the report all ask the same
three questions of a batch of images: does it match its prompts (text-image match), does it look clean
(no-reference quality), and how close is it to a reference (fidelity). The answers come from the tiny
world's programmatic judge for flux-tiny and from a CLIP for real models; the methods only see this
interface, so none of them knows which model it runs.

Conventions: images are float ``[n, 3, H, W]`` in ``[0, 1]`` (what :func:`qsched.runtime.generation.generate`
returns); per-image scores are numpy arrays in ``[0, 1]``. A scorer is described by a plain
:meth:`Scorer.spec` dict, from which :func:`scorer_from_spec` rebuilds it (on a Ray worker, say).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from qsched.core.errors import QschedError


class Scorer:
    """Text-image match, no-reference image quality, and fidelity against a reference."""

    kind = "abstract"

    def text_match(self, images, prompts: Sequence[str]) -> np.ndarray:
        """Per image, in [0, 1]: how well each image shows its prompt (JAQ's TC term)."""
        raise NotImplementedError

    def image_quality(self, images) -> np.ndarray:
        """Per image, in [0, 1]: how clean each image looks, with no reference (JAQ's IQ term)."""
        raise NotImplementedError

    def content(self, images, prompts: Sequence[str]) -> dict:
        """``{"score": mean content score in [0, 1], ...}``: the content term of the cache search's and the
        report's quality (which add fidelity to it). Extra keys are recorded beside it."""
        raise NotImplementedError

    def judged(self, images, prompts: Sequence[str]) -> dict | None:
        """Exact correctness where the scorer can decide it (``accuracy``, ``score``), else None."""
        return None

    def fidelity(self, images, reference) -> dict:
        """Mean PSNR and SSIM of ``images`` against ``reference`` (the same prompts and noise)."""
        from qsched.metrics import psnr, ssim

        return {"psnr": float(np.mean(psnr(images, reference))), "ssim": float(np.mean(ssim(images, reference)))}

    def spec(self) -> dict:
        """A plain description that :func:`scorer_from_spec` turns back into this scorer."""
        raise NotImplementedError


class WorldJudgeScorer(Scorer):
    """The tiny shape world's programmatic judge (:mod:`qsched.tinyworld.judge`): its continuous per-image
    ``score`` is the text match and the content score, its ``quality_score`` the image quality, and its
    pass/fail verdict the judged accuracy."""

    kind = "world-judge"

    def text_match(self, images, prompts):
        from qsched.tinyworld.judge import judge
        return np.asarray(judge(images, list(prompts)).scores, dtype=np.float64)

    def image_quality(self, images):
        from qsched.tinyworld.judge import quality_score
        return np.asarray(quality_score(images), dtype=np.float64)

    def content(self, images, prompts):
        return self.judged(images, prompts)

    def judged(self, images, prompts):
        from qsched.tinyworld.judge import judge
        verdict = judge(images, list(prompts))
        return {"accuracy": float(verdict.accuracy), "score": float(verdict.score)}

    def spec(self) -> dict:
        return {"kind": self.kind}


class ClipScorer(Scorer):
    """A ``transformers`` CLIP (:mod:`qsched.scoring.clip`): CLIPScore / 100 is the text match, CLIP-IQA the
    image quality, and ``(match + k · quality) / (1 + k)`` the content score (JAQ's weighting brought to
    [0, 1]). Loaded once from a local directory or a hub id."""

    kind = "clip"

    def __init__(self, bundle, k: float = 2.0):
        self.bundle, self.k = bundle, float(k)

    @classmethod
    def load(cls, source: str, device: str = "cpu", k: float = 2.0) -> "ClipScorer":
        from qsched.scoring.clip import load_clip
        return cls(load_clip(source, device=device), k=k)

    @property
    def source(self) -> str:
        return self.bundle.source

    def text_match(self, images, prompts):
        from qsched.scoring.clip import clip_score
        return np.asarray(clip_score(self.bundle, images, list(prompts)), dtype=np.float64) / 100.0

    def image_quality(self, images):
        from qsched.scoring.clip import clip_iqa
        return np.asarray(clip_iqa(self.bundle, images), dtype=np.float64)

    def content(self, images, prompts):
        tc = float(np.mean(self.text_match(images, prompts)))
        iq = float(np.mean(self.image_quality(images)))
        return {"score": (tc + self.k * iq) / (1.0 + self.k), "clip_score": tc, "clip_iqa": iq}

    def spec(self) -> dict:
        return {"kind": self.kind, "source": self.source, "k": self.k}


def scorer_for(source: str, device: str = "cpu") -> Scorer:
    """The scorer a recipe's or ``--scorer``'s value names: ``world-judge``, or a CLIP (local directory or
    hub id)."""
    if source == WorldJudgeScorer.kind:
        return WorldJudgeScorer()
    return ClipScorer.load(source, device=device)


def scorer_from_spec(spec: dict, device: str = "cpu") -> Scorer:
    """The scorer a :meth:`Scorer.spec` describes (loading a CLIP where it names one)."""
    kind = spec.get("kind")
    if kind == WorldJudgeScorer.kind:
        return WorldJudgeScorer()
    if kind == ClipScorer.kind:
        return ClipScorer.load(spec["source"], device=device, k=spec.get("k", 2.0))
    raise QschedError(f"unknown scorer kind {kind!r}; expected {WorldJudgeScorer.kind!r} or {ClipScorer.kind!r}")

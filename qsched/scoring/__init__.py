"""Image-quality scores for real models (the TC and IQ terms of Q-Sched's JAQ loss, and the
cache-search quality objective). ``transformers`` is imported only when a CLIP is loaded."""

from qsched.scoring.clip import (
    DEFAULT_IQA_PAIRS,
    ClipBundle,
    clip_iqa,
    clip_score,
    image_embeddings,
    load_clip,
    preprocess,
    text_embeddings,
)

__all__ = [
    "DEFAULT_IQA_PAIRS",
    "ClipBundle",
    "clip_iqa",
    "clip_score",
    "image_embeddings",
    "load_clip",
    "preprocess",
    "text_embeddings",
]

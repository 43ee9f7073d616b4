"""qsched: a post-training compression compiler for few-step text-to-image diffusion models.

``qsched.compile(model, bits, out)`` runs calibration (mixed precision), Q-Sched and cache search and
writes one artifact; ``export.load(path)`` turns the artifact back into a diffusers pipeline.
"""
__version__ = "0.1.0"

from .artifact import Artifact  # noqa: E402
from .compiler import compile  # noqa: E402,A001

__all__ = ["Artifact", "compile", "__version__"]

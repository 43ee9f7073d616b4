"""qsched: a post-training compression compiler for few-step text-to-image diffusion models.

``qsched.compile(model, bits, out)`` runs calibration (mixed precision), Q-Sched and cache search and
writes one artifact; ``export.load(path)`` turns the artifact back into a diffusers pipeline;
``qsched.plan(model, bits, ...)`` says what that compile would cost, without running it.

The package's layers (imports point downward only; ``.importlinter`` holds the contract):
``cli`` → ``planning`` → ``compiler``/``artifact`` → ``report`` → ``export/`` → the methods (``calibrate/``,
``cache_search/``, ``coefficients``) → ``distributed`` → ``models``/``scoring`` → ``tinyworld`` → ``metrics``
→ ``recipe`` → ``runtime`` → ``core``. ``compile`` and ``Artifact`` are imported on first use, so importing
any lower layer (as ``export.load`` does) never pulls in the compiler and its solvers.

Importing qsched registers its quantizer with diffusers (``export/__init__.py``), so diffusers' own
``from_pretrained`` loads artifacts too; diffusers itself is not imported for that.
"""
from qsched.core.version import __version__  # noqa: E402

import export as _export  # noqa: E402,F401  registers the diffusers quantizer (cheap: see export/__init__.py)

__all__ = ["Artifact", "compile", "plan", "__version__"]


def __getattr__(name: str):
    if name == "compile":
        from qsched.compiler import compile
        return compile
    if name == "plan":
        from qsched.planning import plan_compile
        return plan_compile
    if name == "Artifact":
        from qsched.artifact import Artifact
        return Artifact
    raise AttributeError(f"module 'qsched' has no attribute {name!r}")

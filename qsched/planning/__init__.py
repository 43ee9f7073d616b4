"""``qcompile --plan``: what a compile will cost (denoiser evaluations per stage, peak memory, wall time on a
named device), worked out from the recipe and the architecture on the meta device; nothing runs the model.

``plan_compile(model, bits, ...)`` takes :func:`qsched.compile`'s arguments (plus ``plan_device``) and returns a
frozen :class:`CompilePlan`; ``render_text(plan)`` is the table ``qcompile --plan`` prints. The device table is
:mod:`qsched.planning.devices`.
"""
from qsched.planning.plan import CompilePlan, Evaluations, plan_compile
from qsched.planning.render import render_text

__all__ = ["CompilePlan", "Evaluations", "plan_compile", "render_text"]

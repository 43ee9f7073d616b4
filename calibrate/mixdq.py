"""MixDQ-style mixed precision: decoupled per-layer sensitivity, then one integer program, then a BitPlan.

``mixdq_plan`` only decides; applying the plan stays ``quantize_(denoiser, plan, act_ranges)``, so the
mixed-precision model is built by the same code path as the uniform one.
"""
from __future__ import annotations

import fnmatch
import math
from pathlib import Path
from typing import Callable, Iterable

from torch import nn

from qsched.models.adapters import adapter_for
from qsched.core.bits import FP8_NEEDS_FP_CONTEXT, WEIGHT_WIDTHS, BitSpec
from qsched.core.errors import QschedError
from qsched.runtime.generation import GenerationSettings

from calibrate.allocation import AllocationResult, allocate, allocation_plan, follow_weights, reference_widths
from qsched.core.bitplan import BitPlan, LayerPlan
from calibrate.sensitivity import SensitivityTable, analyze_sensitivity
from calibrate.mixdq_run import MixDQRun
from calibrate.uniform import FP8_CONV_REASON, group_size_for
from qsched.recipe import QuantizationConfig


SENSITIVITY_CONTEXTS = ("fp", "uniform")


def width_floor(min_weight_bits: int | None, rounding: str) -> int | None:
    """The recipe's ``min_weight_bits`` resolved (``None`` = automatic): 3 with round-to-nearest, whose
    2-bit layers single-layer sensitivity under-prices (together they cost flux-tiny 4.6 points at W3.5A8),
    no floor with GPTQ, whose 2-bit layers are worth their bits (flux-tiny W3.5A8: +1.4 dB, +0.6 points)."""
    if min_weight_bits is not None:
        return min_weight_bits
    return 3 if rounding == "rtn" else None


def allowed_weight_widths(weight_widths, min_weight_bits: int | None, budget: float) -> list[int]:
    """The weight widths the program may choose (and the sensitivity pass probes): the candidates at or above
    the floor, where the floor drops to the widest candidate within ``budget`` when it is above it."""
    within = [w for w in weight_widths if w <= budget + 1e-9]  # the floor must leave one of these
    floor = None if min_weight_bits is None else min(min_weight_bits, max(within, default=min_weight_bits))
    allowed = sorted(w for w in set(weight_widths) if floor is None or w >= floor)
    if not allowed:
        raise QschedError(f"min_weight_bits {min_weight_bits} excludes every weight width {sorted(set(weight_widths))}")
    return allowed


def mixdq_plan(pipe, spec: BitSpec, prompts: list[str], settings: GenerationSettings,
               act_ranges: dict[str, tuple[float, float]] | None,
               config: QuantizationConfig = QuantizationConfig(), run: MixDQRun = MixDQRun()
               ) -> tuple[BitPlan, SensitivityTable, AllocationResult]:
    """Choose per-layer widths for ``pipe``'s denoiser that meet ``spec`` on average.

    ``spec.weight_bits`` is the size-weighted weight budget (fractional budgets such as 3.5 are what this
    is for); ``spec.act_bits`` the MAC-weighted activation budget (16: activations stay FP). The most
    sensitive ``config.fp_act_fraction`` of layers (rounded up; 0 disables) may keep FP activations outside
    the activation budget, as MixDQ keeps its top ~1%: the program picks which. ``config`` is the recipe's
    ``quantization`` section (:class:`qsched.recipe.QuantizationConfig`: candidate widths, ``keep_fp`` globs
    that stay FP and count at 16 bits, ``layers`` globs that limit the plan to part of the model,
    ``min_weight_bits`` resolved by :func:`width_floor`, ``normalise``, ``weight_scale``,
    ``sensitivity_context``: ``"fp"`` probes each layer with the rest in FP as MixDQ does, ``"uniform"`` with
    the rest at the uniform widths the budget stands for). ``act_ranges`` must be the ranges the plan will
    be applied with (``None``: collected here first); sensitivity is measured with them. ``run`` is the run
    context (:class:`calibrate.mixdq_run.MixDQRun`); its ``fp_tokens`` mark BOS rows for sensitivity only,
    the plan itself is marked by the caller.

    An ``fp8`` spec chooses per linear layer between FP8 e4m3 W8A8 and floating point (both sides: an FP
    layer is FP on its activations too) under ``config.fp8_budget_bits``, the size-weighted average of 8
    (FP8) and 16 (FP) bits: ``--bits fp8`` names a format, not a budget, and a budget of 8 would leave no
    choice. Each layer is probed once at FP8 W8A8, the program is :func:`allocate`'s with candidates
    {8, FP} and no activation side, and the plan is labelled ``mixdq-fp8``. Convolutions stay FP (FP8 is a
    linear-layer format) outside the budget; the integer-width knobs (widths, floor, group size,
    ``weight_scale``, ``fp_act_fraction``) and GPTQ do not apply, and ``sensitivity_context`` must be ``fp``.
    """
    from calibrate.calibration import collect_statistics

    fp8 = spec.format == "fp8"
    if fp8 and run.max_bops is not None:
        raise QschedError("max_bops caps integer widths' BOPs; an fp8 plan (FP8 or FP per layer) takes no BOPs cap")
    if fp8 and config.sensitivity_context != "fp":
        raise QschedError(FP8_NEEDS_FP_CONTEXT)
    layers, keep_fp, groups, group_size = config.layers, list(config.keep_fp), config.layer_groups, config.group_size
    weight_widths, act_widths, weight_scale = list(config.weight_widths), list(config.act_widths), config.weight_scale
    min_weight_bits = width_floor(config.min_weight_bits, config.rounding)
    sensitivity_context, seed, progress, fp_tokens = config.sensitivity_context, run.seed, run.progress, run.fp_tokens

    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    all_layers = adapter.quantizable_layers(denoiser)
    scope = {n: m for n, m in all_layers.items()
             if layers is None or any(fnmatch.fnmatchcase(n, p) for p in layers)}
    if not scope:
        raise QschedError(f"no quantizable layer matches {list(layers or [])}")
    kept = {n: next(p for p in keep_fp or [] if fnmatch.fnmatchcase(n, p)) for n in scope
            if any(fnmatch.fnmatchcase(n, p) for p in keep_fp or [])}
    decided = [n for n in scope if n not in kept]
    convs = [n for n in decided if fp8 and not isinstance(scope[n], nn.Linear)]  # FP8 covers linear layers
    decided = [n for n in decided if n not in convs]
    if not decided:
        raise QschedError("every layer in scope is kept FP by the recipe: nothing for mixed precision to decide")

    quantize_acts = spec.quantize_activations
    if quantize_acts and act_ranges is None:
        act_ranges = collect_statistics(pipe, prompts, settings, seed=seed, progress=progress and "ranges",
                                        fp_token_candidates={n: t.positions for n, t in (fp_tokens or {}).items()})[0]
    if sensitivity_context not in SENSITIVITY_CONTEXTS:
        raise QschedError(f"unknown sensitivity context {sensitivity_context!r}: expected one of "
                          f"{', '.join(SENSITIVITY_CONTEXTS)}")
    context = None
    if sensitivity_context == "uniform":
        w_ref, a_ref = reference_widths(spec.weight_bits, spec.act_bits if quantize_acts else None,
                                        list(weight_widths), list(act_widths) if quantize_acts else [None])
        context = {n: (w_ref, a_ref) for n in decided}
    probing = dict(act_ranges=act_ranges if quantize_acts else None, layers=decided, groups=groups, seed=seed,
                   batch_size=run.batch_size, work_dir=run.work_dir, model_digest=run.model_digest,
                   image_metric=run.image_metric, progress=progress, ray=run.ray,
                   pipeline_source=run.pipeline_source, fp_tokens=fp_tokens, context=context,
                   record_bytes=int(config.sensitivity_record_gb * 1e9))
    fixed_fp_params = sum(scope[n].weight.numel() for n in kept)  # kept layers count 16 bits in the budget
    if fp8:
        table = analyze_sensitivity(pipe, prompts, settings, weight_widths=(8,), act_widths=(), format="fp8",
                                    **probing)
        result = follow_weights(allocate(table, config.fp8_budget_bits, None, weight_widths=[8, None],
                                         content_weight=config.content_weight,
                                         fixed_fp_params=fixed_fp_params,
                                         time_limit=run.time_limit, normalise=config.normalise), table)
        plan = allocation_plan(result, table, target=str(spec), method="mixdq-fp8")
        return _with_fp_layers(plan, adapter, scope, groups, kept, convs), table, result
    allowed = allowed_weight_widths(weight_widths, min_weight_bits, spec.weight_bits)
    # only the widths the program may choose are probed (the floor's exclusions would cost probes for nothing)
    table = analyze_sensitivity(pipe, prompts, settings, weight_widths=allowed,
                                act_widths=act_widths if quantize_acts else (), group_size=group_size,
                                weight_scale=weight_scale, hessians=run.hessians, hessian_key=run.hessian_key,
                                **probing)
    max_fp = math.ceil(config.fp_act_fraction * len(decided)) if quantize_acts and config.fp_act_fraction > 0 else 0
    candidates = sorted(set(act_widths)) + ([None] if max_fp else [])
    result = allocate(table, spec.weight_bits, spec.act_bits if quantize_acts else None,
                      weight_widths=allowed, act_widths=candidates if quantize_acts else None,
                      content_weight=config.content_weight, max_fp_act=max_fp if quantize_acts else None,
                      max_bops=run.max_bops, fixed_fp_params=fixed_fp_params,
                      time_limit=run.time_limit, normalise=config.normalise)
    plan = allocation_plan(result, table, target=str(spec), method="mixdq",
                           group_sizes={n: group_size_for(scope[n], group_size) for n in decided},
                           weight_scale=weight_scale)
    return _with_fp_layers(plan, adapter, scope, groups, kept, ()), table, result


def _with_fp_layers(plan: BitPlan, adapter, scope: dict, groups, kept: dict, convs) -> BitPlan:
    """``plan`` with the layers the program did not decide, at FP and with the reason."""
    reasons = {**{n: FP8_CONV_REASON for n in convs},
               **{n: f"kept FP by recipe pattern {p!r}" for n, p in kept.items()}}
    for name, reason in reasons.items():
        plan.layers[name] = LayerPlan(None, None, adapter.layer_group(name, groups), None, reason,
                                      scope[name].weight.numel())
    plan.layers = dict(sorted(plan.layers.items()))
    return plan

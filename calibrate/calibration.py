"""The calibrate stage: run the FP pipeline on calibration prompts, collect activation ranges, pick a
BitPlan, and quantize the denoiser (simulated quantization)."""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
from dataclasses import dataclass, field

from qsched.models.adapters import adapter_for
from qsched.core.bits import BitSpec
from qsched.runtime.generation import GenerationSettings, generate

from qsched.runtime.apply import quantize_
from qsched.core.bitplan import BitPlan
from calibrate.fp_tokens import FPTokenReport, FPTokens, fp_tokens_from_rows, record_rows
from calibrate.gptq import HESSIAN_CHUNK_BYTES, SharedInputs, collect_hessians, gptq_quantize, hessian_chunks, uses_gptq
from calibrate.statistics import observe_inputs
from calibrate.mixdq_run import MixDQRun
from calibrate.uniform import uniform_plan
from qsched.recipe import CalibrationConfig, QuantizationConfig


@dataclass
class CalibrationResult:
    """The plan and the static activation ranges it was applied with (plain, serialisable)."""

    plan: BitPlan
    act_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    sensitivity: dict | None = None  # SensitivityTable.to_dict() for mixed precision
    allocation: dict | None = None  # AllocationResult.to_dict() for mixed precision
    fp_tokens: FPTokenReport = field(default_factory=FPTokenReport)  # BOS rows: where applied, where refused
    #: FP sampler passes over the calibration prompts: ``statistics`` (0 or 1; it also observes GPTQ's first
    #: Hessian group) and ``gptq_hessians`` (the further ones, one per Hessian group; see :func:`calibrate`)
    passes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"plan": self.plan.to_dict(), "act_ranges": {k: list(v) for k, v in sorted(self.act_ranges.items())},
                "prompts": list(self.prompts), "sensitivity": self.sensitivity, "allocation": self.allocation,
                "fp_tokens": self.fp_tokens.to_dict()}


def collect_activation_ranges(pipe, prompts: list[str], settings: GenerationSettings, seed: int = 0,
                              batch_size: int = 8, momentum: float = 0.95, progress: bool = True) -> dict:
    """Static (min, max) of every quantizable layer's input over full-precision calibration runs."""
    return collect_statistics(pipe, prompts, settings, seed, batch_size, momentum, progress)[0]


def collect_statistics(pipe, prompts: list[str], settings: GenerationSettings, seed: int = 0, batch_size: int = 8,
                       momentum: float = 0.95, progress: bool = True,
                       fp_token_candidates: dict[str, tuple[int, ...]] | None = None, also=None
                       ) -> tuple[dict, dict[str, FPTokens], FPTokenReport]:
    """One FP calibration run: activation ranges, plus FP token rows for the candidate layers. ``also``: one
    more context manager around the sampler run (GPTQ's Hessian observers ride on it).

    A candidate whose rows turn out constant gets :class:`FPTokens` and a range without those rows; one
    whose rows vary keeps its full range and is listed in the report with the reason.
    """
    adapter = adapter_for(pipe)
    layers = adapter.quantizable_layers(adapter.denoiser(pipe))
    candidates = {n: p for n, p in (fp_token_candidates or {}).items() if n in layers}
    with observe_inputs(layers, momentum) as full, \
            observe_inputs({n: layers[n] for n in candidates}, momentum, candidates) as without, \
            record_rows(layers, candidates) as rows, also or contextlib.nullcontext():
        generate(pipe, prompts, settings, seed=seed, batch_size=batch_size, progress=progress)
    ranges = {name: obs.range for name, obs in full.items() if obs.calls}
    fp_tokens, report = {}, FPTokenReport()
    for name, positions in sorted(candidates.items()):
        found = fp_tokens_from_rows(layers[name], positions, rows[name], len(set(prompts)))
        if isinstance(found, str):
            report.rejected[name] = found
        else:
            fp_tokens[name], report.applied[name] = found, list(positions)
            ranges[name] = without[name].range
    return ranges, fp_tokens, report


def mark_fp_tokens(plan: BitPlan, fp_tokens: dict[str, FPTokens]) -> dict[str, FPTokens]:
    """Record the FP rows in the plan for the layers it quantizes; returns the rows ``quantize_`` needs."""
    used = {}
    for name, tokens in fp_tokens.items():
        lp = plan.layers.get(name)
        if lp is None or (lp.weight_bits is None and lp.act_bits is None):
            continue
        lp.fp_tokens = list(tokens.positions)
        lp.reason = f"{lp.reason}; token(s) {list(tokens.positions)} (BOS) served in FP" if lp.reason else \
            f"token(s) {list(tokens.positions)} (BOS) served in FP"
        used[name] = tokens
    return used


def calibrate(pipe, spec: BitSpec, prompts: list[str], settings: GenerationSettings,
              config: QuantizationConfig = QuantizationConfig(), *,
              calibration: CalibrationConfig = CalibrationConfig(), run: MixDQRun | None = None,
              progress: bool = True) -> CalibrationResult:
    """Quantize ``pipe``'s denoiser in place at ``spec`` and return what was done.

    ``config`` (the recipe's ``quantization`` section, with the recipe's defaults) says how:
    ``method="uniform"``: round-to-nearest widths at the target; ``"mixdq"``: per-layer widths from
    decoupled sensitivity (on the first ``sensitivity_prompts`` prompts) and one integer program.
    ``bos_aware``: when activations are quantized, the adapter's text layers serve a constant BOS row in
    FP and their ranges leave it out (:mod:`calibrate.fp_tokens`); sensitivity is measured that way too.
    ``weight_scale``: ``"max"`` or ``"mse"`` (:func:`qsched.runtime.quantizers.weight_scale`). ``rounding``:
    ``"gptq"`` rounds linear layers' weights against their calibration inputs (:mod:`calibrate.gptq`; the
    Hessians are observed during the statistics pass, or one more FP pass when activations stay FP or the
    Hessians need more than one pass; MixDQ's sensitivity probes use GPTQ weights too); ``"rtn"``
    round-to-nearest. Convolutions and 8-bit weights keep round-to-nearest. ``calibration`` holds the
    statistics pass's seed, batch size and momentum; ``run`` MixDQ's run context (cache folder, model
    digest, Ray).
    """
    method, rounding = config.method, config.rounding
    seed, batch_size = calibration.seed, calibration.batch_size
    keep_fp, groups = list(config.keep_fp), config.layer_groups
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown weight rounding {rounding!r}: expected one of {', '.join(ROUNDINGS)}")
    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    rounded = gptq_layers(adapter.quantizable_layers(denoiser), config, spec)
    # GPTQ's first group of Hessians rides on the statistics pass (same prompts, seed and batches)
    first = hessian_chunks(rounded, HESSIAN_CHUNK_BYTES)[:1] if rounded and spec.quantize_activations else []
    ranges, fp_tokens, report = {}, {}, FPTokenReport()
    observed = SharedInputs(first[0] if first else {})  # observes the sampler runs only, not the BOS-row checks
    if spec.quantize_activations:
        candidates = adapter.bos_layers(pipe) if config.bos_aware else {}
        ranges, fp_tokens, report = collect_statistics(pipe, prompts, settings, seed, batch_size,
                                                       calibration.momentum, progress, candidates, observed)
        if not candidates:
            report.note = "switched off (quantization.bos_aware: false)" if not config.bos_aware else \
                "no text layer reads a BOS-led sequence (the text tokenizers add no BOS)"
    # Hessians wait in host memory (GPTQ brings each back as it rounds). Rare: if the statistics pass's input
    # sharing did not hold, its group is collected again with the others.
    covered = set(first[0]) if first and observed.consistent else set()
    hessians = observed.hessians("cpu") if covered else {}
    del observed  # the observers' accumulators (on the device) go now, not when calibrate returns
    rest = {n: m for n, m in rounded.items() if n not in covered}
    if rest:
        hessians.update(collect_hessians(pipe, rest, prompts, settings, seed=seed, batch_size=batch_size,
                                         max_bytes=HESSIAN_CHUNK_BYTES, progress=progress and "GPTQ inputs"))
    passes = {"statistics": int(spec.quantize_activations),
              "gptq_hessians": len(hessian_chunks(rest, HESSIAN_CHUNK_BYTES)) if rest else 0}
    sensitivity = allocation = None
    if method == "mixdq":
        from calibrate.mixdq import mixdq_plan
        context = dataclasses.replace(run or MixDQRun(), seed=seed, progress=progress, fp_tokens=fp_tokens or None,
                                      hessians=hessians or None,
                                      hessian_key=_prompts_key(prompts, seed, batch_size) if hessians else None)
        plan, table, result = mixdq_plan(pipe, spec, prompts[:config.sensitivity_prompts], settings, ranges or None,
                                         config, context)
        sensitivity, allocation = table.to_dict(), result.to_dict()
    elif method == "uniform":
        plan = uniform_plan(denoiser, adapter, spec, config.group_size, keep_fp, groups, config.weight_scale)
    else:
        raise ValueError(f"unknown calibration method {method!r}: expected 'uniform' or 'mixdq'")
    missing = [n for n, p in plan.layers.items() if p.act_bits is not None and n not in ranges]
    if missing:
        raise RuntimeError(f"calibration never reached {len(missing)} layer(s), e.g. {missing[:3]}")
    weights = gptq_weights(denoiser, plan, hessians) if hessians else {}
    if plan.method == "uniform-rtn" and any(lp.rounding == "gptq" for lp in plan.layers.values()):
        plan.method = "uniform-gptq"  # the label says how the weights were rounded
    quantize_(denoiser, plan, ranges, mark_fp_tokens(plan, fp_tokens), weights)
    return CalibrationResult(plan, ranges, list(prompts), sensitivity, allocation, report, passes)


ROUNDINGS = ("rtn", "gptq")


def gptq_weights(denoiser, plan: BitPlan, hessians: dict) -> dict:
    """GPTQ ``(codes, scales)`` for every planned layer with quantized weights and a Hessian; marks those
    layers ``rounding: gptq`` in the plan (the others stay round-to-nearest)."""
    weights = {}
    for name, lp in plan.layers.items():
        if not uses_gptq(lp.weight_bits) or name not in hessians:
            continue
        weights[name] = gptq_quantize(denoiser.get_submodule(name).weight, hessians[name], lp.weight_bits,
                                      lp.group_size, scale_method=lp.weight_scale)
        lp.rounding = "gptq"
        lp.reason = f"{lp.reason}; GPTQ rounding" if lp.reason else "GPTQ rounding"
    return weights


def gptq_layers(layers: dict, config: QuantizationConfig, spec: BitSpec) -> dict:
    """The layers GPTQ needs a Hessian for: none with ``rounding: rtn``, for an fp8 spec (e4m3 weights are
    cast, never GPTQ-rounded: no Hessian pass for them) or when the uniform width is past GPTQ's; else the
    layers :func:`_rounded_layers` leaves."""
    if config.rounding != "gptq" or spec.format == "fp8" or not (
            config.method == "mixdq" or uses_gptq(spec.uniform_weight_bits)):
        return {}
    scope = list(config.layers) if config.method == "mixdq" and config.layers else None
    return _rounded_layers(layers, list(config.keep_fp), scope)


def _rounded_layers(layers: dict, keep_fp: list[str] | None, scope: list[str] | None) -> dict:
    """The layers whose weights may be quantized: neither kept FP by the recipe nor outside MixDQ's scope
    (only these need a Hessian)."""
    return {n: m for n, m in layers.items()
            if not any(fnmatch.fnmatchcase(n, p) for p in keep_fp or [])
            and (scope is None or any(fnmatch.fnmatchcase(n, p) for p in scope))}


def _prompts_key(prompts: list[str], seed: int, batch_size: int) -> str:
    return hashlib.sha256(json.dumps([list(prompts), seed, batch_size]).encode()).hexdigest()[:16]

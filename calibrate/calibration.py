"""The calibrate stage: run the FP pipeline on calibration prompts, collect activation ranges, pick a
BitPlan, and quantize the denoiser (simulated quantization)."""
from __future__ import annotations

from dataclasses import dataclass, field

from qsched.adapters import adapter_for
from qsched.bits import BitSpec
from qsched.generation import GenerationSettings, generate

from .apply import quantize_
from .bitplan import BitPlan
from .statistics import observe_inputs
from .uniform import uniform_plan


@dataclass
class CalibrationResult:
    """The plan and the static activation ranges it was applied with (plain, serialisable)."""

    plan: BitPlan
    act_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    sensitivity: dict | None = None  # SensitivityTable.to_dict() for mixed precision
    allocation: dict | None = None  # AllocationResult.to_dict() for mixed precision

    def to_dict(self) -> dict:
        return {"plan": self.plan.to_dict(), "act_ranges": {k: list(v) for k, v in sorted(self.act_ranges.items())},
                "prompts": list(self.prompts), "sensitivity": self.sensitivity, "allocation": self.allocation}


def collect_activation_ranges(pipe, prompts: list[str], settings: GenerationSettings, seed: int = 0,
                              batch_size: int = 8, momentum: float = 0.95, progress: bool = True) -> dict:
    """Static (min, max) of every quantizable layer's input over full-precision calibration runs."""
    adapter = adapter_for(pipe)
    layers = adapter.quantizable_layers(adapter.denoiser(pipe))
    with observe_inputs(layers, momentum) as observers:
        generate(pipe, prompts, settings, seed=seed, batch_size=batch_size, progress=progress)
    return {name: obs.range for name, obs in observers.items() if obs.calls}


def calibrate(pipe, spec: BitSpec, prompts: list[str], settings: GenerationSettings, seed: int = 0,
              batch_size: int = 8, momentum: float = 0.95, group_size: int | None = None,
              keep_fp: list[str] | None = None, groups: dict[str, str] | None = None,
              progress: bool = True, method: str = "uniform", mixdq: dict | None = None) -> CalibrationResult:
    """Quantize ``pipe``'s denoiser in place at ``spec`` and return what was done.

    ``method="uniform"``: round-to-nearest at the target widths. ``method="mixdq"``: per-layer widths from
    decoupled sensitivity and one integer program (``mixdq`` holds :func:`calibrate.mixdq.mixdq_plan`'s
    options, e.g. ``sensitivity_prompts``, ``content_weight``, ``work_dir``, ``model_digest``).
    """
    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    ranges = collect_activation_ranges(pipe, prompts, settings, seed, batch_size, momentum, progress) \
        if spec.quantize_activations else {}
    sensitivity = allocation = None
    if method == "mixdq":
        from .mixdq import mixdq_plan
        options = dict(mixdq or {})
        n = options.pop("sensitivity_prompts", 8)
        plan, table, result = mixdq_plan(pipe, spec, prompts[:n], settings, ranges or None, seed=seed,
                                         group_size=group_size, keep_fp=keep_fp, groups=groups,
                                         progress=progress, **options)
        sensitivity, allocation = table.to_dict(), result.to_dict()
    elif method == "uniform":
        plan = uniform_plan(denoiser, adapter, spec, group_size, keep_fp, groups)
    else:
        raise ValueError(f"unknown calibration method {method!r}: expected 'uniform' or 'mixdq'")
    missing = [n for n, p in plan.layers.items() if p.act_bits is not None and n not in ranges]
    if missing:
        raise RuntimeError(f"calibration never reached {len(missing)} layer(s), e.g. {missing[:3]}")
    quantize_(denoiser, plan, ranges)
    return CalibrationResult(plan, ranges, list(prompts), sensitivity, allocation)

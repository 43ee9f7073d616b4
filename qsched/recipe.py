"""Recipes: YAML files that fix every knob of a compile for one model and bit target.

A recipe is validated against the dataclasses below: an unknown key or a value of the wrong type is a
:class:`RecipeError` naming the key and the valid ones, never a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qsched.core.errors import RecipeError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class CalibrationConfig:
    """How calibration statistics are gathered."""

    prompts: int = 32
    batch_size: int = 8
    seed: int = 0
    momentum: float = 0.95


@dataclass
class QuantizationConfig:
    """How the BitPlan is chosen. ``method``: ``mixdq`` (mixed widths under the target as a size-weighted
    average budget, the default) or ``uniform`` (every layer at the target widths; ``--uniform``)."""

    method: str = "mixdq"
    group_size: int | None = None
    keep_fp: list[str] = field(default_factory=list)
    groups: dict[str, str] = field(default_factory=dict)
    #: mixdq: candidate widths, the weight of the content group against the quality group in the
    #: objective, and the fraction of layers allowed to keep FP activations (MixDQ keeps ~1%).
    weight_widths: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 8])
    act_widths: list[int] = field(default_factory=lambda: [4, 8])
    #: 0.15: chosen on flux-tiny validation prompts (seed 7, docs/results.md); at 0.5 the SSIM-scored content
    #: layers took the bits and W4A8 lost 1.2 dB of PSNR to uniform RTN
    content_weight: float = 0.15
    fp_act_fraction: float = 0.01
    sensitivity_prompts: int = 8
    #: mixdq: no layer narrower than this many weight bits (lowered to the widest candidate within the
    #: budget when above it, so w2.5 may still use 2; 2 = no floor). null (default) = automatic, see
    #: calibrate.mixdq.width_floor: 3 with ``rounding: rtn`` (round-to-nearest 2-bit layers cost flux-tiny
    #: 4.6 points at W3.5A8 together), none with ``gptq`` (its 2-bit layers help: +1.4 dB at W3.5A8)
    min_weight_bits: int | None = None
    #: mixdq: the groups' exchange rate, ``spread`` (total loss at the narrowest widths) or ``budget``
    #: (total loss of round-to-nearest at the target); see calibrate.allocation.allocate
    normalise: str = "spread"
    #: MixDQ's BOS-aware text layers: where the text sequence starts with a constant BOS (CLIP), the text
    #: layers serve that row in FP and their activation ranges leave its outlier out (both methods).
    bos_aware: bool = True
    #: weight scales, both methods: ``max`` is plain round-to-nearest; ``mse`` clips each row to the least
    #: rounding error. On flux-tiny ``mse`` raises weight SQNR 2.5 dB and image PSNR 1 dB at W3A8 but costs
    #: 8 points of judged accuracy (clipped outlier weights carry what the judge checks): not the default.
    weight_scale: str = "max"
    #: weight rounding, both methods: ``gptq`` rounds each linear layer against its calibration inputs
    #: (calibrate.gptq; flux-tiny W3A8: +3.4 dB PSNR and +6 points judged accuracy over ``rtn``),
    #: ``rtn`` is plain round-to-nearest. Convolutions and 8-bit weights always use round-to-nearest.
    rounding: str = "gptq"
    #: mixdq: probe each layer with the rest of the model in FP (``fp``, MixDQ) or at the uniform widths the
    #: budget stands for (``uniform``: around the operating point, see calibrate.sensitivity)
    sensitivity_context: str = "fp"


@dataclass
class GenerationConfig:
    """Sampler overrides; unset fields take the model's defaults."""

    steps: int | None = None
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None


@dataclass
class QSchedConfig:
    """Q-Sched: learn per-step scheduler coefficients with the reference-free JAQ objective.

    JAQ's terms come from the recipe's ``scorer``. ``method``: ``cma`` (ours, per-step) or ``grid``
    (Q-Sched's first-step grid).
    ``select``: ``guard`` keeps the candidate with the best held-out JAQ (a per-step search overfits a
    few train prompts), ``train`` the best train one. ``patience``: stop after this many train runs
    without a held-out improvement (null: spend the whole budget).
    """

    enabled: bool = True
    k: float = 2.0
    method: str = "cma"
    budget: int = 120
    prompts: int = 16
    heldout_prompts: int = 16
    sigma0: float = 0.05
    select: str = "guard"
    patience: int | None = None


@dataclass
class CacheSearchConfig:
    """ECAD-style search over caching schedules. The operating point: the best quality within ``budget``
    (a fraction of no-cache MACs) when set, else the cheapest point keeping ``quality_floor`` × the
    no-cache quality; quality on the guard prompts when ``guard_prompts`` > 0.

    ``guard_prompts``: the final front is re-scored on this many other prompts (their own noise) and cut to
    the points they do not dominate, since the search overfits its ``prompts`` (0: no guard).
    ``proxy_generations``: the first this many generations (0 = the initial population) are scored on the
    first quarter of the prompts, then the population is re-scored on all of them; at most ``generations``.
    Off by default: a 2-prompt proxy (of the default 8) is noisy for the judge term, and its effect on the
    held-out front is not measured yet (``benchmarks/cache_search_tiny.py --proxy-generations``).
    """

    enabled: bool = True
    budget: float | None = None
    quality_floor: float = 0.98
    population: int = 16
    generations: int = 6
    prompts: int = 8
    guard_prompts: int = 16
    proxy_generations: int = 0


@dataclass
class ReportConfig:
    """What the compile measures for the artifact's ``report.html`` (see :mod:`qsched.report`).

    ``samples``: how many of the first calibration prompts get sample images for every report point
    (0 records no images and no latency; the report still shows the front, bit plan and schedules).
    ``repeats``: timed runs of that sample generation per point (the median is reported).
    """

    samples: int = 4
    repeats: int = 3
    #: a second, side-by-side FP copy of the denoiser (for the RTN baseline and quality with FP as the
    #: reference) is kept only when the FP denoiser is at most this many GB; 0 never keeps one
    fp_copy_max_gb: float = 2.0


@dataclass
class Recipe:
    """Everything a compile needs beyond the model and ``--bits``."""

    model: str | None = None
    bits: str | None = None
    description: str = ""
    #: what judges images for Q-Sched, the cache search and the report: ``world-judge`` (the tiny world's
    #: judge) or a CLIP (a local directory or a hub id); null: the registry's default for the model, if any
    scorer: str | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    qsched: QSchedConfig = field(default_factory=QSchedConfig)
    cache_search: CacheSearchConfig = field(default_factory=CacheSearchConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_METHODS = ("uniform", "mixdq")


def _check_type(path: str, value, annotation):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return value
        return _check_type(path, value, next(a for a in args if a is not type(None)))
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"recipe key {path!r} must be a list, got {value!r}")
        return [_check_type(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key {path!r} must be a mapping, got {value!r}")
        return {str(k): _check_type(f"{path}.{k}", v, args[1]) for k, v in value.items()}
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and (not isinstance(value, annotation) or
                                                  (annotation is int and isinstance(value, bool))):
        raise RecipeError(f"recipe key {path!r} must be {annotation.__name__}, got {value!r}")
    return value


def _build(cls, data, path: str):
    if not isinstance(data, dict):
        raise RecipeError(f"recipe section {path or 'top level'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"in section {path!r}" if path else "at top level"
        raise RecipeError(f"unknown recipe key(s) {', '.join(map(repr, unknown))} {where}; valid keys: {', '.join(names)}")
    values = {}
    for name, value in data.items():
        key = f"{path}.{name}" if path else name
        hint = hints[name]
        values[name] = _build(hint, value, key) if dataclasses.is_dataclass(hint) else _check_type(key, value, hint)
    return cls(**values)


def parse_recipe(data: dict, source: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping and return a :class:`Recipe`."""
    try:
        recipe = _build(Recipe, data or {}, "")
    except RecipeError as err:
        raise RecipeError(f"{source}: {err}") from None
    if recipe.quantization.method not in _METHODS:
        raise RecipeError(f"{source}: quantization.method must be one of {_METHODS}, got {recipe.quantization.method!r}")
    if recipe.calibration.prompts < 1 or recipe.calibration.batch_size < 1:
        raise RecipeError(f"{source}: calibration.prompts and calibration.batch_size must be positive")
    if recipe.qsched.method not in ("cma", "grid", "nelder-mead"):
        raise RecipeError(f"{source}: qsched.method must be one of cma, grid, nelder-mead; got {recipe.qsched.method!r}")
    if recipe.qsched.budget < 1 or recipe.qsched.prompts < 1 or recipe.qsched.heldout_prompts < 1:
        raise RecipeError(f"{source}: qsched.budget, qsched.models.prompts and qsched.heldout_prompts must be positive")
    if recipe.qsched.select not in ("guard", "train"):
        raise RecipeError(f"{source}: qsched.select must be guard or train; got {recipe.qsched.select!r}")
    if recipe.qsched.patience is not None and recipe.qsched.patience < 1:
        raise RecipeError(f"{source}: qsched.patience must be a positive number of runs or null; "
                          f"got {recipe.qsched.patience!r}")
    c = recipe.cache_search
    if c.budget is not None and not 0.0 < c.budget <= 1.0 or not 0.0 < c.quality_floor <= 1.0:
        raise RecipeError(f"{source}: cache_search.budget must lie in (0, 1] and quality_floor in (0, 1]")
    if c.population < 4 or c.population % 4 or c.generations < 0 or c.prompts < 1:
        raise RecipeError(f"{source}: cache_search.population must be a positive multiple of 4, "
                          "generations >= 0 and prompts >= 1")
    if c.guard_prompts < 0:
        raise RecipeError(f"{source}: cache_search.guard_prompts must be >= 0 (0: no guard); got {c.guard_prompts!r}")
    if not 0 <= c.proxy_generations <= c.generations:
        raise RecipeError(f"{source}: cache_search.proxy_generations must lie in [0, generations = {c.generations}]; "
                          f"got {c.proxy_generations!r}")
    q = recipe.quantization
    if not set(q.weight_widths) <= {2, 3, 4, 5, 6, 8} or not q.weight_widths:
        raise RecipeError(f"{source}: quantization.weight_widths must be a non-empty subset of [2, 3, 4, 5, 6, 8]")
    if not set(q.act_widths) <= {4, 8} or not q.act_widths:
        raise RecipeError(f"{source}: quantization.act_widths must be a non-empty subset of [4, 8]")
    if q.min_weight_bits is not None and not 2 <= q.min_weight_bits <= 8:
        raise RecipeError(f"{source}: quantization.min_weight_bits must lie in [2, 8] or be null; "
                          f"got {q.min_weight_bits!r}")
    if q.normalise not in ("spread", "budget"):
        raise RecipeError(f"{source}: quantization.normalise must be spread or budget; got {q.normalise!r}")
    if q.sensitivity_context not in ("fp", "uniform"):
        raise RecipeError(f"{source}: quantization.sensitivity_context must be fp or uniform; "
                          f"got {q.sensitivity_context!r}")
    if q.rounding not in ("rtn", "gptq"):
        raise RecipeError(f"{source}: quantization.rounding must be rtn or gptq; got {q.rounding!r}")
    if q.weight_scale not in ("max", "mse"):
        raise RecipeError(f"{source}: quantization.weight_scale must be max or mse; got {q.weight_scale!r}")
    if not 0.0 <= q.content_weight <= 1.0 or not 0.0 <= q.fp_act_fraction < 1.0 or q.sensitivity_prompts < 1:
        raise RecipeError(f"{source}: quantization.content_weight must lie in [0, 1], fp_act_fraction in [0, 1), "
                          "sensitivity_prompts >= 1")
    if not 0 <= recipe.report.samples <= 64 or not 1 <= recipe.report.repeats <= 20:
        raise RecipeError(f"{source}: report.samples must lie in [0, 64] and report.repeats in [1, 20]")
    if not 0.0 <= recipe.report.fp_copy_max_gb < float("inf"):
        raise RecipeError(f"{source}: report.fp_copy_max_gb must be 0 or more; got {recipe.report.fp_copy_max_gb!r}")
    if recipe.scorer is not None and not recipe.scorer.strip():
        raise RecipeError(f"{source}: scorer must be world-judge, a local CLIP directory or a hub id, or null")
    if not 0.0 <= recipe.calibration.momentum < 1.0:
        raise RecipeError(f"{source}: calibration.momentum must lie in [0, 1)")
    if not 0 <= recipe.calibration.seed < 2**32:  # numpy's RandomState takes 32-bit seeds
        raise RecipeError(f"{source}: calibration.seed must lie in [0, {2**32 - 1}]; got {recipe.calibration.seed!r}")
    if q.group_size is not None and q.group_size < 1:
        raise RecipeError(f"{source}: quantization.group_size must be a positive number of channels or null; "
                          f"got {q.group_size!r}")
    if not 0.0 < recipe.qsched.sigma0 < float("inf"):
        raise RecipeError(f"{source}: qsched.sigma0 must be a positive step size; got {recipe.qsched.sigma0!r}")
    g = recipe.generation
    if any(v is not None and v < 1 for v in (g.steps, g.height, g.width)):
        raise RecipeError(f"{source}: generation.steps, height and width must be positive or null")
    if recipe.bits is not None:
        from qsched.core.bits import parse_bits
        from qsched.core.errors import BitSpecError
        try:
            parse_bits(recipe.bits)
        except BitSpecError as err:
            raise RecipeError(f"{source}: {err}") from None
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML file."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a directory; give a recipe YAML file")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte {err.start}); save the recipe YAML as UTF-8") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror or err}") from None
    return parse_recipe(data, str(path))


def find_recipe(model: str, bits: str) -> Path | None:
    """The shipped recipe for ``model`` at ``bits`` (``recipes/<model>-<bits>.yaml``), else ``<model>.yaml``."""
    for name in (f"{model}-{bits}.yaml", f"{model}.yaml"):
        candidate = RECIPES_DIR / name
        if candidate.is_file():
            return candidate
    return None

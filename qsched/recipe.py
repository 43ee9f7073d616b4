"""Recipes: YAML files that fix every knob of a compile for one model and bit target.

A recipe is validated against the dataclasses below: an unknown key or a value of the wrong type is a
:class:`RecipeError` naming the key and the valid ones, never a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from qsched.core.errors import RecipeError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class _Config:
    """A frozen config that validates itself on construction: built from YAML or in Python, a bad value is
    a :class:`RecipeError` naming its recipe key. Lists become tuples, so nothing can change it afterwards;
    :meth:`Recipe.override` makes changed copies."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self.SECTION}.{f.name}" if self.SECTION else f.name
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                if not isinstance(value, hints[f.name]):
                    raise RecipeError(f"recipe section {key!r} must be a {hints[f.name].__name__}, got {value!r}")
                continue
            object.__setattr__(self, f.name, _check_type(key, value, hints[f.name]))
        self.validate()

    def validate(self) -> None:
        """Checks across fields; each section adds its own."""

    def _require(self, ok: bool, message: str) -> None:
        if not ok:
            raise RecipeError(f"{self.SECTION}.{message}" if self.SECTION else message)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(value):
    """asdict's tuples as lists, so records and cache keys read as they did from YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class CalibrationConfig(_Config):
    """How calibration statistics are gathered."""

    SECTION: ClassVar[str] = "calibration"
    prompts: int = 32
    batch_size: int = 8
    seed: int = 0
    momentum: float = 0.95

    def validate(self) -> None:
        self._require(self.prompts >= 1 and self.batch_size >= 1, "prompts and calibration.batch_size must be positive")
        self._require(0.0 <= self.momentum < 1.0, "momentum must lie in [0, 1)")
        self._require(0 <= self.seed < 2**32,  # numpy's RandomState takes 32-bit seeds
                      f"seed must lie in [0, {2**32 - 1}]; got {self.seed!r}")


METHODS = ("uniform", "mixdq")


@dataclass(frozen=True)
class QuantizationConfig(_Config):
    """How the BitPlan is chosen and the weights are rounded; ``calibrate.calibration.calibrate`` takes it.
    ``method``: ``mixdq`` (mixed widths under the target as a size-weighted average budget, the default) or
    ``uniform`` (every layer at the target widths; ``--uniform``)."""

    SECTION: ClassVar[str] = "quantization"
    method: str = "mixdq"
    group_size: int | None = None
    keep_fp: tuple[str, ...] = ()
    groups: dict[str, str] = field(default_factory=dict)
    #: mixdq: candidate widths, the weight of the content group against the quality group in the
    #: objective, and the fraction of layers allowed to keep FP activations (MixDQ keeps ~1%).
    weight_widths: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    act_widths: tuple[int, ...] = (4, 8)
    #: 0.15: chosen on flux-tiny validation prompts (seed 7, docs/results.md); at 0.5 the SSIM-scored content
    #: layers took the bits and W4A8 lost 1.2 dB of PSNR to uniform RTN
    content_weight: float = 0.15
    fp_act_fraction: float = 0.01
    sensitivity_prompts: int = 8
    #: mixdq: host memory (GB) for the block outputs the sensitivity probes replay instead of recomputing
    #: (calibrate.sensitivity._BlockPrefix): blocks are recorded from the first until it is full; 0 = none.
    #: FLUX.1-schnell at 1024² with 8 prompts needs 48.8 GB for every block; the plan shows what a value buys
    sensitivity_record_gb: float = 32.0
    #: memory (GB, on the compile's device) the quantized denoiser may keep its dequantized weights in between
    #: calls, for the stages after calibration; the layers beyond it dequantize on every call (same numbers,
    #: slower). Every weight at FLUX.1 size is 23.8 GB in BF16: a second copy of the denoiser
    dequantized_cache_gb: float = 8.0
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
    #: mixdq: how layers are scored. ``decoupled`` (MixDQ): content layers (text paths) by SSIM of the images,
    #: quality layers by SQNR of the output, weighed by ``content_weight``; ``sqnr``: every layer by SQNR (the
    #: groups and ``content_weight`` then play no part). Chosen per model on a validation draw (docs/results.md)
    objective: str = "decoupled"
    #: mixdq: only these layer globs are decided by the program (null: every quantizable layer); the budget
    #: applies to that part, the rest stays FP
    layers: tuple[str, ...] | None = None
    #: mixdq at ``--bits fp8``: the size-weighted average weight bits the program may spend, a linear layer
    #: costing 8 at FP8 (W8A8 e4m3) and 16 kept in floating point (``keep_fp`` layers count 16 too). 8 puts
    #: every layer at FP8; 9.0 lets the most sensitive eighth of the weights stay FP. ``--bits fp8`` itself
    #: says only the format, so the budget is this key
    fp8_budget_bits: float = 9.0

    def validate(self) -> None:
        self._require(self.method in METHODS, f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        self._require(bool(self.weight_widths) and set(self.weight_widths) <= {2, 3, 4, 5, 6, 8},
                      "weight_widths must be a non-empty subset of [2, 3, 4, 5, 6, 8]")
        self._require(bool(self.act_widths) and set(self.act_widths) <= {4, 8},
                      "act_widths must be a non-empty subset of [4, 8]")
        self._require(self.min_weight_bits is None or 2 <= self.min_weight_bits <= 8,
                      f"min_weight_bits must lie in [2, 8] or be null; got {self.min_weight_bits!r}")
        for key, allowed in (("normalise", ("spread", "budget")), ("sensitivity_context", ("fp", "uniform")),
                             ("rounding", ("rtn", "gptq")), ("weight_scale", ("max", "mse"))):
            self._require(getattr(self, key) in allowed,
                          f"{key} must be {' or '.join(allowed)}; got {getattr(self, key)!r}")
        self._require(0.0 <= self.content_weight <= 1.0, "content_weight must lie in [0, 1]")
        self._require(0.0 <= self.fp_act_fraction < 1.0, "fp_act_fraction must lie in [0, 1)")
        self._require(self.sensitivity_prompts >= 1, "sensitivity_prompts must be >= 1")
        self._require(self.sensitivity_record_gb >= 0, "sensitivity_record_gb must be >= 0 (0: no block record)")
        self._require(self.dequantized_cache_gb >= 0, "dequantized_cache_gb must be >= 0 (0: dequantize every call)")
        self._require(self.group_size is None or self.group_size >= 1,
                      f"group_size must be a positive number of channels or null; got {self.group_size!r}")
        self._require(self.layers is None or len(self.layers) > 0, "layers must name at least one glob, or be null")
        self._require(8.0 <= self.fp8_budget_bits <= 16.0,
                      f"fp8_budget_bits must lie in [8, 16] (8: every layer FP8, 16: all FP); got {self.fp8_budget_bits!r}")
        self._require(self.objective in ("decoupled", "sqnr"), f"objective must be decoupled or sqnr; got {self.objective!r}")
        self._require(self.objective == "decoupled" or not self.groups,
                      "groups has no effect with objective: sqnr (every layer is scored by SQNR); remove one")

    @property
    def layer_groups(self) -> dict[str, str]:
        """The metric-group overrides the sensitivity analysis uses (glob → group)."""
        return {"*": "quality"} if self.objective == "sqnr" else dict(self.groups)


@dataclass(frozen=True)
class GenerationConfig(_Config):
    """Sampler overrides; unset fields take the model's defaults."""

    SECTION: ClassVar[str] = "generation"
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    #: the text encoder's padded length where the pipeline takes one (FLUX: 256 for schnell, 512 for dev)
    max_sequence_length: int | None = None

    def validate(self) -> None:
        self._require(all(v is None or v >= 1 for v in (self.steps, self.height, self.width,
                                                        self.max_sequence_length)),
                      "steps, height, width and max_sequence_length must be positive or null")


@dataclass(frozen=True)
class CoefficientsConfig(_Config):
    """Q-Sched, the method: learn per-step scheduler coefficients with the reference-free JAQ objective.

    JAQ's terms come from the recipe's ``scorer``. ``method``: ``cma`` (ours, per-step) or ``grid``
    (Q-Sched's first-step grid).
    ``select``: ``guard`` keeps the candidate with the best held-out JAQ (a per-step search overfits a
    few train prompts), ``train`` the best train one. ``patience``: stop after this many train runs
    without a held-out improvement (null: spend the whole budget).
    """

    SECTION: ClassVar[str] = "coefficients"
    enabled: bool = True
    k: float = 2.0
    method: str = "cma"
    budget: int = 120
    prompts: int = 16
    heldout_prompts: int = 16
    sigma0: float = 0.05
    select: str = "guard"
    patience: int | None = None

    def validate(self) -> None:
        self._require(self.method in ("cma", "grid", "nelder-mead"),
                      f"method must be one of cma, grid, nelder-mead; got {self.method!r}")
        self._require(self.budget >= 1 and self.prompts >= 1 and self.heldout_prompts >= 1,
                      "budget, coefficients.prompts and coefficients.heldout_prompts must be positive")
        self._require(self.select in ("guard", "train"), f"select must be guard or train; got {self.select!r}")
        self._require(self.patience is None or self.patience >= 1,
                      f"patience must be a positive number of runs or null; got {self.patience!r}")
        self._require(0.0 < self.sigma0 < float("inf"), f"sigma0 must be a positive step size; got {self.sigma0!r}")


@dataclass(frozen=True)
class CacheSearchConfig(_Config):
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

    SECTION: ClassVar[str] = "cache_search"
    enabled: bool = True
    budget: float | None = None
    quality_floor: float = 0.98
    population: int = 16
    generations: int = 6
    prompts: int = 8
    guard_prompts: int = 16
    proxy_generations: int = 0
    #: sample rows per pipeline call (candidates × prompts): candidates in one call share their common steps,
    #: and every row keeps each cacheable component's output, so memory grows with it (FLUX.1 at 1024²: about
    #: 7 GB a row; ``qcompile --plan`` says what fits the device)
    batch_rows: int = 64

    def validate(self) -> None:
        self._require((self.budget is None or 0.0 < self.budget <= 1.0) and 0.0 < self.quality_floor <= 1.0,
                      "budget must lie in (0, 1] and quality_floor in (0, 1]")
        self._require(self.population >= 4 and self.population % 4 == 0 and self.generations >= 0
                      and self.prompts >= 1, "population must be a positive multiple of 4, "
                      "generations >= 0 and prompts >= 1")
        self._require(self.batch_rows >= 1, f"batch_rows must be >= 1; got {self.batch_rows!r}")
        self._require(self.guard_prompts >= 0,
                      f"guard_prompts must be >= 0 (0: no guard); got {self.guard_prompts!r}")
        self._require(0 <= self.proxy_generations <= self.generations,
                      f"proxy_generations must lie in [0, generations = {self.generations}]; "
                      f"got {self.proxy_generations!r}")


@dataclass(frozen=True)
class ReportConfig(_Config):
    """What the compile measures for the artifact's ``report.html`` (see :mod:`qsched.report`).

    ``samples``: how many of the first calibration prompts get sample images for every report point
    (0 records no images and no latency; the report still shows the front, bit plan and schedules).
    ``repeats``: timed runs of that sample generation per point (the median is reported).
    """

    SECTION: ClassVar[str] = "report"
    samples: int = 4
    repeats: int = 3
    #: a second, side-by-side FP copy of the denoiser (for the RTN baseline and quality with FP as the
    #: reference) is kept only when the FP denoiser is at most this many GB; 0 never keeps one
    fp_copy_max_gb: float = 2.0
    #: the runtime the latency column and sample images come from: ``native`` (the integer and packed layers
    #: ``export.load(path, runtime="native")`` deploys) or ``simulated`` (the compile's own layers)
    runtime: str = "native"
    #: ``torch.compile`` for the timed runs, FP and quantized alike, as ``export.load(compile=...)`` applies
    #: it: ``off``, ``full`` or ``regional`` (a warm-up run per point pays the compile before timing)
    compile: str = "off"

    def validate(self) -> None:
        self._require(0 <= self.samples <= 64 and 1 <= self.repeats <= 20,
                      "samples must lie in [0, 64] and report.repeats in [1, 20]")
        self._require(self.runtime in ("native", "simulated"), f"runtime must be native or simulated; got {self.runtime!r}")
        self._require(self.compile in ("off", "full", "regional"),
                      f"compile must be off, full or regional; got {self.compile!r}")
        self._require(0.0 <= self.fp_copy_max_gb < float("inf"),
                      f"fp_copy_max_gb must be 0 or more; got {self.fp_copy_max_gb!r}")


@dataclass(frozen=True)
class Recipe(_Config):
    """Everything a compile needs beyond the model and ``--bits``: one validated config per method."""

    model: str | None = None
    bits: str | None = None
    description: str = ""
    #: what judges images for Q-Sched, the cache search and the report: ``world-judge`` (the tiny world's
    #: judge) or a CLIP (a local directory or a hub id); null: the registry's default for the model, if any
    scorer: str | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    coefficients: CoefficientsConfig = field(default_factory=CoefficientsConfig)
    cache_search: CacheSearchConfig = field(default_factory=CacheSearchConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def validate(self) -> None:
        self._require(self.scorer is None or bool(self.scorer.strip()),
                      "scorer must be world-judge, a local CLIP directory or a hub id, or null")
        if self.bits is not None:
            from qsched.core.bits import parse_bits
            from qsched.core.errors import BitSpecError
            try:
                parse_bits(self.bits)
            except BitSpecError as err:
                raise RecipeError(str(err)) from None

    def override(self, changes: dict) -> "Recipe":
        """A copy with ``changes`` applied (dotted keys: ``{"cache_search.budget": 0.5}``), validated like
        the original; the recipe itself never changes."""
        sections: dict[str, dict] = {}
        top = {}
        for key, value in changes.items():
            section, _, name = key.partition(".")
            if name:
                sections.setdefault(section, {})[name] = value
            else:
                top[key] = value
        for section, values in sections.items():
            if not isinstance(getattr(self, section, None), _Config):
                raise RecipeError(f"unknown recipe section {section!r} in override {values!r}")
            unknown = set(values) - {f.name for f in dataclasses.fields(getattr(self, section))}
            if unknown:
                raise RecipeError(f"unknown recipe key(s) {sorted(unknown)} in section {section!r}")
            top[section] = dataclasses.replace(getattr(self, section), **values)
        return dataclasses.replace(self, **top)


def _check_type(path: str, value, annotation):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return value
        return _check_type(path, value, next(a for a in args if a is not type(None)))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"recipe key {path!r} must be a list, got {value!r}")
        items = [_check_type(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
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
        values[name] = _build(hint, value, key) if dataclasses.is_dataclass(hint) else value
    return cls(**values)


def parse_recipe(data: dict, source: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping and return a :class:`Recipe` (the configs check themselves)."""
    try:
        return _build(Recipe, data or {}, "")
    except RecipeError as err:
        raise RecipeError(f"{source}: {err}") from None


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

"""The five compile stages. Each reads a :class:`Compilation` (the job and what earlier stages left) and
returns its :class:`StageRecord`; :func:`qsched.compiler.compile` runs them in order."""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qsched.artifact import Artifact
from qsched.core.bits import BitSpec
from qsched.core.errors import ModelNotFoundError, QschedError
from qsched.models.adapters import adapter_for
from qsched.models.profiles import ModelProfile
from qsched.models.registry import default_settings, load_pipeline, state_digest, torch_dtype
from qsched.recipe import Recipe
from qsched.runtime.generation import GenerationSettings, generate
from qsched.runtime.qlayers import limit_dequantized_cache
from qsched.scoring.fidelity import fidelity_metrics


@dataclass(frozen=True)
class CompileJob:
    """Everything a compile was asked for, checked before any work; the recipe already has the caller's
    overrides applied. ``method``: the calibrate stage's (``uniform`` or ``mixdq``)."""

    model: str
    spec: BitSpec
    out: Path
    recipe: Recipe
    recipe_path: str | None
    seed: int = 0
    device: str = "cpu"
    init: str = "pretrained"
    width_scale: float | None = None
    dtype: str = "auto"
    bundle: bool = False
    eval_prompts: int = 8
    overwrite: bool = False
    progress: bool = True
    ray: object | None = None
    scorer_source: str | None = None

    @property
    def needs_scorer(self) -> bool:
        return self.recipe.coefficients.enabled or self.recipe.cache_search.enabled


@dataclass
class StageRecord:
    """What a stage did: ``status`` (done, skipped, kept identity), why when it did not run, its seconds and
    its own details; ``to_dict`` is the manifest's ``stages`` entry."""

    status: str = "done"
    reason: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"status": self.status, **({"reason": self.reason} if self.reason else {}), **self.details}


@dataclass
class Compilation:
    """The work in flight: the job, the pipeline being compressed and what each stage hands on."""

    job: CompileJob
    pipe: object = None
    profile: ModelProfile | None = None
    denoiser_attr: str = ""
    fp_params: int = 0
    source: dict = field(default_factory=dict)
    eval_set: list[str] = field(default_factory=list)
    reference: torch.Tensor | None = None
    calibration_prompts: list[str] = field(default_factory=list)
    report_probe: object = None
    calibration: object = None
    cache_record: dict = field(default_factory=lambda: {"schedule": None, "pareto_front": None})
    cache_handle: object = None
    search_prompts: list[str] = field(default_factory=list)
    text_cache: object = None
    records: dict[str, StageRecord] = field(default_factory=dict)
    artifact: Artifact | None = None

    @property
    def settings(self) -> GenerationSettings:
        return self.profile.settings

    @property
    def scorer(self):
        return self.profile.scorer() if self.profile else None


def open_scorer(source: str | None, device: str, required: bool):
    """The :class:`qsched.scoring.scorer.Scorer` ``source`` names, loaded. One that cannot be had (a CLIP off
    the hub while offline, a bad directory) is an error naming every way out when a search needs it, and
    only costs the report its quality column when none does."""
    from qsched.scoring.scorer import scorer_for

    if source is None:
        return None
    try:
        return scorer_for(source, device)
    except ModelNotFoundError as err:
        if required:
            raise QschedError(f"{err}; or pass --no-qsched --no-cache-search, or use --model flux-tiny") from None
        return None


def generation_settings(model: str, pipe, recipe: Recipe) -> GenerationSettings:
    """The model's defaults with the recipe's ``generation`` overrides."""
    overrides = {k: v for k, v in dataclasses.asdict(recipe.generation).items() if v is not None}
    return dataclasses.replace(default_settings(model, pipe), **overrides)


def load(c: Compilation) -> StageRecord:
    """Scorer first (a CLIP that cannot be had stops the compile before any work), then the model, the FP
    reference images, and the report's FP measurements while FP is still in memory."""
    from qsched.report.measure import ReportProbe

    job = c.job
    scorer = open_scorer(job.scorer_source, job.device, required=job.needs_scorer)
    c.pipe, source = load_pipeline(job.model, init=job.init, device=job.device, seed=job.seed,
                                   width_scale=job.width_scale, dtype=torch_dtype(job.dtype))
    adapter = adapter_for(c.pipe)
    denoiser = adapter.denoiser(c.pipe)
    c.denoiser_attr = adapter.denoiser_attr
    c.profile = ModelProfile(job.model, generation_settings(job.model, c.pipe, job.recipe), job.scorer_source, scorer)
    c.fp_params = sum(p.numel() for p in denoiser.parameters())
    c.source = {**source.to_dict(), "denoiser_sha256": state_digest(denoiser)}
    c.eval_set = c.profile.prompts("evaluation", job.eval_prompts, job.seed)
    cal = job.recipe.calibration
    c.calibration_prompts = c.profile.prompts("calibration", cal.prompts, cal.seed)
    text = embed_prompts_once(c)
    if job.eval_prompts:
        c.reference = generate(c.pipe, c.eval_set, c.settings, seed=job.seed,
                               progress=job.progress and "FP reference")
    report = job.recipe.report
    fp_bytes = sum(p.numel() * p.element_size() for p in denoiser.parameters())
    c.report_probe = ReportProbe.begin(c.pipe, c.denoiser_attr, c.settings, c.calibration_prompts[:report.samples],
                                       report, fp_bytes <= report.fp_copy_max_gb * 1e9, job.seed)
    return StageRecord(details={"source": source.model, "scorer": scorer.spec() if scorer is not None else None,
                                "text_embeddings": text})


def compile_prompts(c: Compilation) -> list[str]:
    """Every prompt the compile's own pipeline samples, by the recipe: evaluation and calibration (the
    sensitivity probes and the report draw from these), and Q-Sched's and the cache search's when they run.
    One the stages draw beyond this list is still served, only encoded later."""
    job, recipe = c.job, c.job.recipe
    prompts = [*c.eval_set, *c.calibration_prompts]
    if recipe.coefficients.enabled:
        prompts += c.profile.prompts("qsched_train", recipe.coefficients.prompts, job.seed)
        prompts += c.profile.prompts("qsched_guard", recipe.coefficients.heldout_prompts, job.seed)
    if recipe.cache_search.enabled:
        prompts += c.profile.prompts("cache_train", recipe.cache_search.prompts, job.seed)
        prompts += c.profile.prompts("cache_guard", recipe.cache_search.guard_prompts, job.seed)
    return list(dict.fromkeys(prompts))


def embed_prompts_once(c: Compilation) -> dict:
    """Encode every prompt of the compile once, keep the embeddings in host memory and, on an accelerator,
    move the text encoders off it for the rest of the compile (:mod:`qsched.runtime.text_embeddings`).
    :func:`qsched.compiler.compile` removes the cache and puts the encoders back when it ends."""
    from qsched.runtime.generation import call_arguments
    from qsched.runtime.text_embeddings import cache_text_embeddings, release_text_encoders

    if not callable(getattr(type(c.pipe), "encode_prompt", None)):
        return {"status": f"not cached: {type(c.pipe).__name__} has no encode_prompt; the pipeline encodes "
                          "every call itself and its text encoders stay on the device"}
    c.text_cache = cache_text_embeddings(c.pipe)
    prompts = compile_prompts(c)
    c.text_cache.precompute(prompts, call_arguments(c.pipe, c.settings))
    on_host = torch.device(c.job.device).type == "cpu"
    moved = 0 if on_host else release_text_encoders(c.pipe, c.text_cache, "cpu")
    return {"prompts": len(prompts),
            "text_encoders": "in host memory with the rest (the compile runs on the CPU)" if on_host else
                             f"moved to host memory ({moved / 1e9:.2f} GB) once the prompts were encoded"}


def calibrate(c: Compilation) -> StageRecord:
    """Statistics, then the BitPlan (uniform or MixDQ under the budget), then the quantized denoiser."""
    from calibrate.calibration import calibrate as run_calibration
    from calibrate.mixdq_run import MixDQRun

    job = c.job
    run = MixDQRun(work_dir=work_dir(job.out), model_digest=c.source["denoiser_sha256"], ray=job.ray)
    if job.ray is not None:
        from qsched.distributed import PipelineSource
        run = dataclasses.replace(run, pipeline_source=PipelineSource.from_loader(
            job.model, init=job.init, seed=job.seed, device=job.device, digest=c.source["denoiser_sha256"],
            width_scale=job.width_scale, dtype=torch_dtype(job.dtype)))
    result = run_calibration(c.pipe, job.spec, c.calibration_prompts, c.settings, job.recipe.quantization,
                             calibration=job.recipe.calibration, run=run, progress=job.progress and "calibration")
    c.calibration = result
    cache = limit_dequantized_cache(adapter_for(c.pipe).denoiser(c.pipe),
                                    job.recipe.quantization.dequantized_cache_gb * 1e9)
    details = {"method": result.plan.method, "prompts": len(c.calibration_prompts), "dequantized_cache": cache,
               "average_weight_bits": round(result.plan.average_weight_bits(), 4),
               "fp_tokens": result.fp_tokens.to_dict()}
    if result.allocation:
        details["allocation"] = {k: result.allocation[k] for k in ("status", "objective", "solve_seconds")
                                 if k in result.allocation}
    # the denoiser work, in the units `qcompile --plan` predicts (qsched.planning)
    details["passes"] = dict(result.passes)
    if result.sensitivity:
        stats = result.sensitivity.get("stats", {})
        details["sensitivity"] = {k: stats.get(k) for k in ("layers", "layers_computed", "evaluations",
                                                            "content_evaluations", "quality_evaluations")}
    return StageRecord(details=details)


def coefficients(c: Compilation) -> StageRecord:
    """Q-Sched's scheduler coefficients, learned on the quantized pipeline."""
    if not c.job.recipe.coefficients.enabled:
        return StageRecord("skipped", "switched off (--no-qsched or recipe coefficients.enabled: false)")
    from qsched.coefficients.stage import learn_schedule

    record = learn_schedule(c.pipe, c.profile, c.settings, c.job.recipe.coefficients, c.job.seed, c.job.progress)
    status, reason = record.pop("status"), record.pop("reason", "")
    return StageRecord(status, reason, details=record)


def cache_search(c: Compilation) -> StageRecord:
    """The Pareto front of cache schedules on the quantized, rescheduled pipeline; the chosen one is enabled."""
    job, config = c.job, c.job.recipe.cache_search
    c.search_prompts = c.profile.prompts("cache_train", config.prompts, job.seed)
    if not config.enabled:
        return StageRecord("skipped", "switched off (--no-cache-search or recipe cache_search.enabled: false)")
    if c.settings.steps < 2:
        return StageRecord("skipped", f"a {c.settings.steps}-step sampler has no earlier step to reuse a component "
                                      "from (the cache search needs 2 or more steps)")
    from cache_search.stage import search_cache
    from qsched.runtime.cache_schedule import block_layout
    from qsched.runtime.caching import enable_cache

    try:
        block_layout(c.pipe)
    except ValueError as err:
        return StageRecord("skipped", str(err))

    guard_prompts = c.profile.prompts("cache_guard", config.guard_prompts, job.seed)
    key = cache_search_key(c.source["denoiser_sha256"], c.calibration, c.records["coefficients"].to_dict(),
                           c.search_prompts, c.settings, config, job.seed, guard_prompts, c.scorer.spec())
    result, schedule = search_cache(c.pipe, c.search_prompts, c.settings, config, job.seed,
                                    work_dir(job.out) / f"cache-{key[:16]}", c.scorer, job.progress, ray=job.ray,
                                    guard_prompts=guard_prompts)
    c.cache_record = {"schedule": schedule.to_dict() if schedule else None, "pareto_front": result["front"]}
    if schedule is not None:
        c.cache_handle = enable_cache(c.pipe, schedule)  # the export stage's evaluation measures the chosen point
    record = dict(result["record"])
    return StageRecord(record.pop("status"), record.pop("reason", ""), details=record)


def export(c: Compilation) -> StageRecord:
    """Fidelity on held-out prompts, the report's measurements, then the artifact, written atomically."""
    from export.save import save_quantized
    from qsched.report import write_report

    job, result = c.job, c.calibration
    metrics = {}
    if c.reference is not None:
        images = generate(c.pipe, c.eval_set, c.settings, seed=job.seed, progress=job.progress and "quantized eval")
        metrics["fidelity"] = fidelity_metrics(c.reference, images, c.eval_set, c.scorer)
    report_files = c.report_probe.finish(c.pipe, job.spec, result.act_ranges, c.cache_record,
                                         c.records["cache_search"].details.get("chosen"), c.cache_handle, c.scorer,
                                         c.search_prompts)
    if c.text_cache is not None:  # what the cache did over the whole compile, beside what load embedded
        c.records["load"].details["text_embeddings"].update(c.text_cache.stats.to_dict())
    manifest = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": c.source, "bits": str(job.spec), "recipe": {"path": job.recipe_path, **job.recipe.to_dict()},
        "generation": c.settings.to_dict(), "activation_ranges": {k: list(v) for k, v in result.act_ranges.items()},
        "calibration_prompts": c.calibration_prompts, "eval_prompts": c.eval_set, "seed": job.seed,
        "profile": c.profile.to_dict(), "cache": c.cache_record,
        "stages": {name: r.to_dict() for name, r in c.records.items()}, "tools": tool_versions(),
        "metrics": metrics,
        "timings_s": {**{name: round(r.seconds, 3) for name, r in c.records.items()},
                      "report": round(c.report_probe.seconds, 3)},
    }
    if job.ray is not None:
        from qsched.distributed import cluster_summary
        manifest["ray"] = {**job.ray.to_dict(), **cluster_summary()}
    extra = {"sensitivity.json": json.dumps(result.sensitivity, indent=1).encode()} if result.sensitivity else {}
    path = save_quantized(job.out, c.pipe, c.denoiser_attr, result.plan, manifest, bundle=job.bundle,
                          overwrite=job.overwrite, fp_params=c.fp_params, extra_files={**extra, **report_files},
                          finalize=write_report)
    c.artifact = Artifact.open(path)
    c.artifact.compiled_pipeline = c.pipe
    return StageRecord()


#: The compile, in order: (name, stage). The names are the manifest's ``stages`` keys.
STAGES = (("load", load), ("calibrate", calibrate), ("coefficients", coefficients), ("cache_search", cache_search),
          ("export", export))


def tool_versions() -> dict:
    import diffusers
    import transformers

    from qsched.core.version import __version__
    return {"qsched": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def cache_search_key(fp_digest: str, calibration, coefficients_record: dict, prompts: list[str], settings, config,
                     seed: int, guard_prompts: list[str] | None = None, scorer: dict | None = None) -> str:
    """A hash of everything the cache search's evaluations depend on (the quantized model, the Q-Sched
    coefficients, prompts and guard prompts, settings, search knobs, the scorer), so a checkpoint is only ever resumed
    by the same search. Left out: ``generations`` (a rerun with more generations continues the same search)
    and the knobs that only pick a point from the front (``budget``, ``quality_floor``)."""
    from cache_search.search import EVALUATOR_VERSION

    knobs = {k: v for k, v in config.to_dict().items() if k not in ("generations", "budget", "quality_floor", "enabled")}
    inputs = {"fp": fp_digest, "plan": calibration.plan.to_dict(),
              "act_ranges": {k: [float(x) for x in v] for k, v in sorted(calibration.act_ranges.items())},
              "qsched": coefficients_record.get("coefficients") if coefficients_record.get("status") == "done" else None,
              "prompts": list(prompts), "guard_prompts": list(guard_prompts or []), "settings": settings.to_dict(),
              "config": knobs, "seed": seed, "evaluator": EVALUATOR_VERSION, "scorer": scorer}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def work_dir(out: Path) -> Path:
    """Where long stages cache their results (keyed by their inputs), beside the artifact: reruns resume."""
    return Path(out).resolve().parent / ".qsched-work"

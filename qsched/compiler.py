"""``qsched.compile``: load → calibrate → schedule → cache → export, each stage a plain function.

The CLI only parses arguments and calls this. Stages that are not available yet, or that the caller
switched off, are recorded in the manifest as skipped with the reason, never silently. Alongside the stages,
:class:`qsched.report.measure.ReportProbe` measures the report's points and baselines (it starts at load, while
FP is in memory, and measures at export), and the artifact gets ``report/data.json``, PNGs and ``report.html``.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .artifact import Artifact
from .bits import WEIGHT_WIDTHS, BitSpec, parse_bits
from .errors import QschedError
from .generation import GenerationSettings, generate
from .models import REGISTRY, default_settings, load_pipeline
from .prompts import calibration_prompts
from .recipe import Recipe, find_recipe, load_recipe

STAGES = ("load", "calibrate", "qsched", "cache_search", "export")


def tool_versions() -> dict:
    import diffusers
    import transformers

    from . import __version__
    return {"qsched": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def state_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's tensors (names, shapes, bytes): identifies the source weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resolve_recipe(model: str, bits: str, recipe: str | Path | Recipe | None) -> tuple[Recipe, str | None]:
    """The explicit recipe, else the shipped one for model and bits, else defaults."""
    if isinstance(recipe, Recipe):
        return recipe, None
    path = Path(recipe) if recipe else find_recipe(model, bits)
    return (load_recipe(path), str(path)) if path else (Recipe(), None)


def generation_settings(model: str, pipe, recipe: Recipe) -> GenerationSettings:
    settings = dataclasses.replace(default_settings(model, pipe))
    for key, value in dataclasses.asdict(recipe.generation).items():
        if value is not None:
            setattr(settings, key, value)
    return settings


def compile(model: str = "flux-tiny", bits: str | BitSpec = "w4a8", out: str | Path | None = None,
            recipe: str | Path | Recipe | None = None, seed: int = 0, device: str = "cpu", init: str = "pretrained",
            uniform: bool = False, qsched: bool = True, cache_search: bool = True, bundle: bool = False,
            eval_prompts: int = 8, overwrite: bool = False, progress: bool = True,
            cache_budget: float | None = None, ray=None) -> Artifact:
    """Compile ``model`` at ``bits`` into an artifact directory ``out`` and return it.

    ``uniform`` forces round-to-nearest at the target widths; ``qsched``/``cache_search`` switch those
    stages off; ``bundle`` stores every pipeline component so the artifact loads without the source.
    ``eval_prompts`` FP-vs-quantized images are generated to record fidelity (0 skips it). ``ray`` (a
    :class:`qsched.distributed.RayConfig`, or an address string: ``"auto"``, ``"local"``, ``host:port``)
    runs the per-layer sensitivity analysis and the cache-search evaluations on Ray workers, each loading
    the model once; the artifact is the same as without it.
    """
    spec = parse_bits(bits) if isinstance(bits, str) else bits
    out = Path(out or f"out/{Path(model).name}-{spec}")
    _check_out(out, overwrite)
    recipe_obj, recipe_path = resolve_recipe(model, str(spec), recipe)
    if cache_budget is not None:
        if not 0.0 < cache_budget <= 1.0:
            raise QschedError(f"--cache-budget {cache_budget} must be a fraction of no-cache MACs in (0, 1]")
        recipe_obj.cache_search.budget = cache_budget
    if spec.is_fractional and uniform:
        raise QschedError(f"--bits {spec} is a fractional budget, which needs mixed precision; "
                          f"use an integer weight width ({', '.join(map(str, WEIGHT_WIDTHS))}) with --uniform")
    if isinstance(ray, str):
        from .distributed import RayConfig
        ray = RayConfig(address=ray)
    torch.manual_seed(seed)
    bar = tqdm(total=len(STAGES), desc="qcompile", unit="stage", disable=not progress)
    try:
        method = "uniform" if uniform else ("mixdq" if spec.is_fractional else recipe_obj.quantization.method)
        return _run_stages(bar, model, spec, out, recipe_obj, recipe_path, seed, device, init, qsched,
                           cache_search, bundle, eval_prompts, overwrite, progress, method, ray)
    except BaseException:
        bar.leave = False  # clear the bar so the error message starts its own line
        raise
    finally:
        bar.close()


def _run_stages(bar, model, spec, out, recipe_obj, recipe_path, seed, device, init, qsched, cache_search, bundle,
                eval_prompts, overwrite, progress, method, ray=None) -> Artifact:
    timings, stages = {}, {}

    def stage(name: str):
        bar.set_postfix_str(name)
        timings[name] = time.perf_counter()

    def done(name: str, **info):
        timings[name] = round(time.perf_counter() - timings[name], 3)
        stages[name] = {"status": "done", **info}
        bar.update(1)

    stage("load")
    pipe, source = load_pipeline(model, init=init, device=device, seed=seed)
    from .adapters import adapter_for
    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    settings = generation_settings(model, pipe, recipe_obj)
    embedded = model in REGISTRY and REGISTRY[model].embedded
    fp_params = sum(p.numel() for p in denoiser.parameters())
    source_info = {**source.to_dict(), "denoiser_sha256": state_digest(denoiser)}
    eval_set = calibration_prompts(model, eval_prompts, seed=seed + 1, embedded=embedded) if eval_prompts else []
    reference = generate(pipe, eval_set, settings, seed=seed, progress=progress and "FP reference") if eval_set else None
    from .report.measure import ReportProbe
    samples = calibration_prompts(model, min(recipe_obj.report.samples, recipe_obj.calibration.prompts),
                                  seed=recipe_obj.calibration.seed, embedded=embedded)
    report_probe = ReportProbe.begin(pipe, adapter.denoiser_attr, settings, samples, recipe_obj.report, embedded, seed)
    done("load", source=source.model)

    stage("calibrate")
    from calibrate.calibration import calibrate
    from calibrate.mixdq import width_floor
    cal = recipe_obj.calibration
    prompts = calibration_prompts(model, cal.prompts, seed=cal.seed, embedded=embedded)
    quant = recipe_obj.quantization
    mixdq = {"sensitivity_prompts": quant.sensitivity_prompts, "content_weight": quant.content_weight,
             "fp_act_fraction": quant.fp_act_fraction, "weight_widths": quant.weight_widths,
             "act_widths": quant.act_widths, "model_digest": source_info["denoiser_sha256"],
             "min_weight_bits": width_floor(quant.min_weight_bits, quant.rounding), "normalise": quant.normalise,
             "sensitivity_context": quant.sensitivity_context,
             "work_dir": work_dir(out)}
    if ray is not None:
        from .distributed import PipelineSource
        mixdq.update(ray=ray, pipeline_source=PipelineSource.from_loader(
            model, init=init, seed=seed, device=device, digest=source_info["denoiser_sha256"]))
    result = calibrate(pipe, spec, prompts, settings, seed=cal.seed, batch_size=cal.batch_size, momentum=cal.momentum,
                       group_size=quant.group_size, keep_fp=quant.keep_fp, groups=quant.groups,
                       progress=progress and "calibration", method=method, mixdq=mixdq, bos_aware=quant.bos_aware,
                       weight_scale=quant.weight_scale, rounding=quant.rounding)
    plan_info = {"average_weight_bits": round(result.plan.average_weight_bits(), 4),
                 "fp_tokens": result.fp_tokens.to_dict()}
    if result.allocation:
        plan_info["allocation"] = {k: result.allocation[k] for k in ("status", "objective", "solve_seconds")
                                   if k in result.allocation}
    done("calibrate", method=result.plan.method, prompts=len(prompts), **plan_info)

    stage("qsched")
    if qsched and recipe_obj.qsched.enabled:
        info = learn_schedule(pipe, model, embedded, settings, recipe_obj.qsched, seed, progress)
        timings["qsched"] = round(time.perf_counter() - timings["qsched"], 3)
        stages["qsched"] = info
        bar.update(1)
    else:
        done("qsched")
        stages["qsched"] = {"status": "skipped", "reason": "switched off"}

    stage("cache_search")
    cache_record = {"schedule": None, "pareto_front": None}
    cache_handle = None
    if not (cache_search and recipe_obj.cache_search.enabled):
        stages["cache_search"] = {"status": "skipped", "reason": "switched off"}
    elif not embedded and not (recipe_obj.cache_search.clip or recipe_obj.qsched.clip):
        stages["cache_search"] = {"status": "skipped", "reason": "no quality scorer for cache search on this model: "
                                                                 "set cache_search.clip (or qsched.clip) in the recipe "
                                                                 "to a local CLIP directory or hub id"}
    else:
        from cache_search.caching import enable_cache
        from cache_search.stage import search_cache
        clip = None
        if embedded:
            search_prompts = cache_search_prompts(recipe_obj.cache_search, seed)
        else:  # a real model: CLIP scores the schedules (cache_search/clip_quality.py)
            from .scoring.clip import load_clip
            clip_source = recipe_obj.cache_search.clip or recipe_obj.qsched.clip
            clip = load_clip(clip_source, device=device)
            search_prompts = calibration_prompts(model, recipe_obj.cache_search.prompts, seed=seed + 3)
        guard_prompts = cache_guard_prompts(model, embedded, recipe_obj.cache_search, seed, search_prompts)
        scored_by = dataclasses.replace(recipe_obj.cache_search, clip=clip.source if clip is not None else None)
        key = cache_search_key(source_info["denoiser_sha256"], result, stages["qsched"], search_prompts, settings,
                               scored_by, seed, guard_prompts)
        cache_result, schedule = search_cache(pipe, search_prompts, settings, recipe_obj.cache_search, seed,
                                              work_dir(out) / f"cache-{key[:16]}", progress, ray=ray, clip=clip,
                                              guard_prompts=guard_prompts)
        stages["cache_search"] = cache_result["record"]
        cache_record = {"schedule": schedule.to_dict() if schedule else None, "pareto_front": cache_result["front"]}
        if schedule is not None:
            cache_handle = enable_cache(pipe, schedule)  # the export stage's evaluation measures the chosen point
    timings["cache_search"] = round(time.perf_counter() - timings["cache_search"], 3)
    bar.update(1)

    stage("export")
    metrics = {}
    if reference is not None:
        images = generate(pipe, eval_set, settings, seed=seed, progress=progress and "quantized eval")
        metrics["fidelity"] = fidelity_metrics_for(reference, images, eval_set, embedded)
    report_files = report_probe.finish(pipe, spec, result.act_ranges, cache_record,
                                       stages["cache_search"].get("chosen"), cache_handle,
                                       cache_search_prompts(recipe_obj.cache_search, seed) if embedded else None)
    timings["report"] = report_probe.seconds
    manifest = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source_info, "bits": str(spec), "recipe": {"path": recipe_path, **recipe_obj.to_dict()},
        "generation": settings.to_dict(), "activation_ranges": {k: list(v) for k, v in result.act_ranges.items()},
        "calibration_prompts": prompts, "eval_prompts": eval_set, "seed": seed,
        "cache": cache_record,
        "stages": stages, "tools": tool_versions(),
    }
    if ray is not None:
        from .distributed import cluster_summary
        manifest["ray"] = {**ray.to_dict(), **cluster_summary()}
    from export.save import save_quantized
    manifest["metrics"] = metrics
    manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items() if k != "export"}
    extra = {"sensitivity.json": json.dumps(result.sensitivity, indent=1).encode()} if result.sensitivity else {}
    from .report import write_report
    path = save_quantized(out, pipe, adapter.denoiser_attr, result.plan, manifest, bundle=bundle,
                          overwrite=overwrite, fp_params=fp_params, extra_files={**extra, **report_files},
                          finalize=write_report)
    bar.update(1)
    artifact = Artifact.open(path)
    artifact.compiled_pipeline = pipe
    return artifact


def cache_search_key(fp_digest: str, calibration, qsched_record: dict, prompts: list[str], settings, config,
                     seed: int, guard_prompts: list[str] | None = None) -> str:
    """A hash of everything the cache search's evaluations depend on (the quantized model, the Q-Sched
    coefficients, prompts and guard prompts, settings, search knobs), so a checkpoint is only ever resumed
    by the same search. Left out: ``generations`` (a rerun with more generations continues the same search)
    and the knobs that only pick a point from the front (``budget``, ``quality_floor``)."""
    from cache_search.search import EVALUATOR_VERSION

    knobs = {k: v for k, v in dataclasses.asdict(config).items()
             if k not in ("generations", "budget", "quality_floor", "enabled")}
    inputs = {"fp": fp_digest, "plan": calibration.plan.to_dict(),
              "act_ranges": {k: [float(x) for x in v] for k, v in sorted(calibration.act_ranges.items())},
              "qsched": qsched_record.get("coefficients") if qsched_record.get("status") == "done" else None,
              "prompts": list(prompts), "guard_prompts": list(guard_prompts or []), "settings": settings.to_dict(),
              "config": knobs, "seed": seed, "evaluator": EVALUATOR_VERSION}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def cache_search_prompts(config, seed: int) -> list[str]:
    """The embedded world's prompts the cache search scores schedules on (the report re-scores on them)."""
    from .tinyworld.world import sample_batch
    return list(sample_batch(seed=40_000 + seed, n=config.prompts, split="train")[1])


def cache_guard_prompts(model: str, embedded: bool, config, seed: int, search_prompts: list[str]) -> list[str]:
    """The prompts that re-score the cache search's front (``config.guard_prompts`` of them, none when 0):
    the embedded world's held-out split from their own seed; for a real model the calibration prompts that
    follow the search's own, without any of the search prompts (fewer when the shipped list runs out)."""
    n = config.guard_prompts
    if not n:
        return []
    if embedded:
        from .tinyworld.world import sample_batch
        return list(sample_batch(seed=50_000 + seed, n=n, split="test")[1])
    taken = set(search_prompts)
    tail = calibration_prompts(model, len(search_prompts) + n, seed=seed + 3)[len(search_prompts):]
    return [p for p in dict.fromkeys(tail) if p not in taken]


def fidelity_metrics_for(reference, images, prompts, embedded: bool) -> dict:
    from .evaluate import fidelity_metrics
    return fidelity_metrics(reference, images, prompts, judge_prompts=embedded)


def learn_schedule(pipe, model: str, embedded: bool, settings: GenerationSettings, config, seed: int,
                   progress: bool) -> dict:
    """The Q-Sched stage: learn coefficients on the quantized pipeline (never the FP one) and apply them
    when they beat the unmodified scheduler on held-out prompts. Returns the stage record."""
    from .jaq import clip_jaq_terms, jaq, world_jaq_terms
    from .optimize import learn_coefficients
    from .schedulers import SUPPORTED_SCHEDULERS, QSchedScheduler

    if type(pipe.scheduler).__name__ not in SUPPORTED_SCHEDULERS:
        return {"status": "skipped", "reason": f"scheduler {type(pipe.scheduler).__name__} is not supported by Q-Sched"}
    if embedded:
        terms = world_jaq_terms()
        from .tinyworld.world import sample_batch
        train = list(sample_batch(seed=20_000 + seed, n=config.prompts, split="train")[1])
        heldout = list(sample_batch(seed=30_000 + seed, n=config.heldout_prompts, split="test")[1])
    elif config.clip:
        from .scoring.clip import load_clip
        terms = clip_jaq_terms(load_clip(config.clip))
        prompts = calibration_prompts(model, config.prompts + config.heldout_prompts, seed=seed + 2)
        train, heldout = prompts[:config.prompts], prompts[config.prompts:]
    else:
        return {"status": "skipped", "reason": "no JAQ scorer for this model: set qsched.clip in the recipe "
                                               "to a local CLIP directory or hub id"}
    result = learn_coefficients(pipe, train, heldout, settings, lambda im, p: jaq(im, p, *terms, k=config.k),
                                method=config.method, budget=config.budget, seed=seed, sigma0=config.sigma0,
                                select=config.select, patience=config.patience, progress=progress)
    applied = result.heldout_jaq > result.identity_heldout_jaq
    if applied:
        pipe.scheduler = QSchedScheduler.wrap(pipe.scheduler, result.coefficients)
    record = result.to_dict()
    record.pop("history", None)
    return {"status": "done" if applied else "kept identity",
            "reason": "" if applied else "learned coefficients did not beat the unmodified scheduler on held-out prompts",
            **record}


def work_dir(out: Path) -> Path:
    """Where long stages cache their results (keyed by their inputs), beside the artifact: reruns resume."""
    return Path(out).resolve().parent / ".qsched-work"


def _check_out(out: Path, overwrite: bool) -> None:
    """Fail before any work if ``out`` cannot be written (the writer checks again, atomically)."""
    if out.exists() and not overwrite:
        raise QschedError(f"output {out} already exists; choose another --out or pass --overwrite")
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    import os
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise QschedError(f"cannot write the artifact to {out}: {probe} is not a writable directory")

"""``qsched.compile``: load → calibrate → schedule → cache → export, each stage a plain function.

The CLI only parses arguments and calls this. Stages that are not available yet, or that the caller
switched off, are recorded in the manifest as skipped with the reason, never silently. Alongside the stages,
:class:`qsched.report.measure.ReportProbe` measures the report's points and baselines (it starts at load, while
FP is in memory, and measures at export), and the artifact gets ``report/data.json``, PNGs and ``report.html``.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qsched.artifact import Artifact
from qsched.core.bits import WEIGHT_WIDTHS, BitSpec, parse_bits
from qsched.core.errors import QschedError
from qsched.scoring.fidelity import fidelity_metrics
from qsched.runtime.generation import GenerationSettings, generate
from qsched.models.registry import default_settings, load_pipeline, state_digest
from qsched.models.profiles import ModelProfile, default_scorer, no_scorer_message
from qsched.recipe import Recipe, find_recipe, load_recipe

STAGES = ("load", "calibrate", "qsched", "cache_search", "export")


def tool_versions() -> dict:
    import diffusers
    import transformers

    from qsched import __version__
    return {"qsched": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


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
            cache_budget: float | None = None, ray=None, scorer: str | None = None) -> Artifact:
    """Compile ``model`` at ``bits`` into an artifact directory ``out`` and return it.

    Every method runs by default: MixDQ's mixed precision under the bit budget, Q-Sched and the cache
    search. ``uniform`` forces round-to-nearest at the target widths instead of MixDQ; ``qsched``/
    ``cache_search`` switch those stages off. ``scorer`` (``world-judge``, a local CLIP directory or a hub
    id; default: the recipe's, else the registry's for the model) judges images for Q-Sched, the cache
    search and the report; with none, a compile that needs one stops before any work.
    ``bundle`` stores every pipeline component so the artifact loads without the source.
    ``eval_prompts`` FP-vs-quantized images are generated to record fidelity (0 skips it). ``ray`` (a
    :class:`qsched.distributed.RayConfig`, or an address string: ``"auto"``, ``"local"``, ``host:port``)
    runs the per-layer sensitivity analysis and the cache-search evaluations on Ray workers, each loading
    the model once; the artifact is the same as without it.
    """
    spec = parse_bits(bits) if isinstance(bits, str) else bits
    out = Path(out or f"out/{Path(model).name}-{spec}")
    check_out(out, overwrite)
    recipe_obj, recipe_path = resolve_recipe(model, str(spec), recipe)
    recipe_obj = copy.deepcopy(recipe_obj)  # overrides below never change the caller's recipe
    if cache_budget is not None:
        if not 0.0 < cache_budget <= 1.0:
            raise QschedError(f"--cache-budget {cache_budget} must be a fraction of no-cache MACs in (0, 1]")
        recipe_obj.cache_search.budget = cache_budget
    if spec.is_fractional and uniform:
        raise QschedError(f"--bits {spec} is a fractional budget, which needs mixed precision; "
                          f"use an integer weight width ({', '.join(map(str, WEIGHT_WIDTHS))}) with --uniform")
    run_qsched, run_cache = qsched and recipe_obj.qsched.enabled, cache_search and recipe_obj.cache_search.enabled
    scorer_source = scorer or recipe_obj.scorer or default_scorer(model)
    if scorer_source is None and (run_qsched or run_cache):
        raise QschedError(no_scorer_message(model))
    if isinstance(ray, str):
        from qsched.distributed import RayConfig
        ray = RayConfig(address=ray)
    torch.manual_seed(seed)
    bar = tqdm(total=len(STAGES), desc="qcompile", unit="stage", disable=not progress)
    try:
        method = "uniform" if uniform else ("mixdq" if spec.is_fractional else recipe_obj.quantization.method)
        return _run_stages(bar, model, spec, out, recipe_obj, recipe_path, seed, device, init, run_qsched,
                           run_cache, bundle, eval_prompts, overwrite, progress, method, ray, scorer_source)
    except BaseException:
        bar.leave = False  # clear the bar so the error message starts its own line
        raise
    finally:
        bar.close()


def _run_stages(bar, model, spec, out, recipe_obj, recipe_path, seed, device, init, qsched, cache_search, bundle,
                eval_prompts, overwrite, progress, method, ray=None, scorer_source=None) -> Artifact:
    timings, stages = {}, {}

    def stage(name: str):
        bar.set_postfix_str(name)
        timings[name] = time.perf_counter()

    def done(name: str, **info):
        timings[name] = round(time.perf_counter() - timings[name], 3)
        stages[name] = {"status": "done", **info}
        bar.update(1)

    stage("load")
    # the scorer loads before the model: a CLIP that cannot be had stops a compile that needs it before any work
    scorer = open_scorer(scorer_source, device, required=qsched or cache_search)
    pipe, source = load_pipeline(model, init=init, device=device, seed=seed)
    from qsched.models.adapters import adapter_for
    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    settings = generation_settings(model, pipe, recipe_obj)
    profile = ModelProfile(model, settings, scorer_source, scorer)
    fp_params = sum(p.numel() for p in denoiser.parameters())
    source_info = {**source.to_dict(), "denoiser_sha256": state_digest(denoiser)}
    eval_set = profile.prompts("evaluation", eval_prompts, seed) if eval_prompts else []
    reference = generate(pipe, eval_set, settings, seed=seed, progress=progress and "FP reference") if eval_set else None
    from qsched.report.measure import ReportProbe
    cal = recipe_obj.calibration
    prompts = profile.prompts("calibration", cal.prompts, cal.seed)
    fp_bytes = sum(p.numel() * p.element_size() for p in denoiser.parameters())
    report_probe = ReportProbe.begin(pipe, adapter.denoiser_attr, settings, prompts[:recipe_obj.report.samples],
                                     recipe_obj.report, fp_bytes <= recipe_obj.report.fp_copy_max_gb * 1e9, seed)
    done("load", source=source.model, scorer=scorer.spec() if scorer is not None else None)

    stage("calibrate")
    from calibrate.calibration import calibrate
    from calibrate.mixdq import width_floor
    quant = recipe_obj.quantization
    mixdq = {"sensitivity_prompts": quant.sensitivity_prompts, "content_weight": quant.content_weight,
             "fp_act_fraction": quant.fp_act_fraction, "weight_widths": quant.weight_widths,
             "act_widths": quant.act_widths, "model_digest": source_info["denoiser_sha256"],
             "min_weight_bits": width_floor(quant.min_weight_bits, quant.rounding), "normalise": quant.normalise,
             "sensitivity_context": quant.sensitivity_context,
             "work_dir": work_dir(out)}
    if ray is not None:
        from qsched.distributed import PipelineSource
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
    if qsched:
        info = learn_schedule(pipe, profile, settings, recipe_obj.qsched, seed, progress)
        timings["qsched"] = round(time.perf_counter() - timings["qsched"], 3)
        stages["qsched"] = info
        bar.update(1)
    else:
        done("qsched")
        stages["qsched"] = {"status": "skipped", "reason": "switched off (--no-qsched or recipe qsched.enabled: false)"}

    stage("cache_search")
    cache_record = {"schedule": None, "pareto_front": None}
    cache_handle = None
    search_prompts = profile.prompts("cache_train", recipe_obj.cache_search.prompts, seed)
    if not cache_search:
        stages["cache_search"] = {"status": "skipped",
                                  "reason": "switched off (--no-cache-search or recipe cache_search.enabled: false)"}
    else:
        from qsched.runtime.caching import enable_cache
        from cache_search.stage import search_cache
        guard_prompts = profile.prompts("cache_guard", recipe_obj.cache_search.guard_prompts, seed)
        key = cache_search_key(source_info["denoiser_sha256"], result, stages["qsched"], search_prompts, settings,
                               recipe_obj.cache_search, seed, guard_prompts, scorer.spec())
        cache_result, schedule = search_cache(pipe, search_prompts, settings, recipe_obj.cache_search, seed,
                                              work_dir(out) / f"cache-{key[:16]}", scorer, progress, ray=ray,
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
        metrics["fidelity"] = fidelity_metrics(reference, images, eval_set, scorer)
    report_files = report_probe.finish(pipe, spec, result.act_ranges, cache_record,
                                       stages["cache_search"].get("chosen"), cache_handle, scorer, search_prompts)
    timings["report"] = report_probe.seconds
    manifest = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source_info, "bits": str(spec), "recipe": {"path": recipe_path, **recipe_obj.to_dict()},
        "generation": settings.to_dict(), "activation_ranges": {k: list(v) for k, v in result.act_ranges.items()},
        "calibration_prompts": prompts, "eval_prompts": eval_set, "seed": seed, "profile": profile.to_dict(),
        "cache": cache_record,
        "stages": stages, "tools": tool_versions(),
    }
    if ray is not None:
        from qsched.distributed import cluster_summary
        manifest["ray"] = {**ray.to_dict(), **cluster_summary()}
    from export.save import save_quantized
    manifest["metrics"] = metrics
    manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items() if k != "export"}
    extra = {"sensitivity.json": json.dumps(result.sensitivity, indent=1).encode()} if result.sensitivity else {}
    from qsched.report import write_report
    path = save_quantized(out, pipe, adapter.denoiser_attr, result.plan, manifest, bundle=bundle,
                          overwrite=overwrite, fp_params=fp_params, extra_files={**extra, **report_files},
                          finalize=write_report)
    bar.update(1)
    artifact = Artifact.open(path)
    artifact.compiled_pipeline = pipe
    return artifact


def cache_search_key(fp_digest: str, calibration, qsched_record: dict, prompts: list[str], settings, config,
                     seed: int, guard_prompts: list[str] | None = None, scorer: dict | None = None) -> str:
    """A hash of everything the cache search's evaluations depend on (the quantized model, the Q-Sched
    coefficients, prompts and guard prompts, settings, search knobs, the scorer), so a checkpoint is only ever resumed
    by the same search. Left out: ``generations`` (a rerun with more generations continues the same search)
    and the knobs that only pick a point from the front (``budget``, ``quality_floor``)."""
    from cache_search.search import EVALUATOR_VERSION

    knobs = {k: v for k, v in dataclasses.asdict(config).items()
             if k not in ("generations", "budget", "quality_floor", "enabled")}
    inputs = {"fp": fp_digest, "plan": calibration.plan.to_dict(),
              "act_ranges": {k: [float(x) for x in v] for k, v in sorted(calibration.act_ranges.items())},
              "qsched": qsched_record.get("coefficients") if qsched_record.get("status") == "done" else None,
              "prompts": list(prompts), "guard_prompts": list(guard_prompts or []), "settings": settings.to_dict(),
              "config": knobs, "seed": seed, "evaluator": EVALUATOR_VERSION, "scorer": scorer}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def open_scorer(source: str | None, device: str, required: bool):
    """The :class:`qsched.scoring.scorer.Scorer` ``source`` names, loaded. One that cannot be had (a CLIP off
    the hub while offline, a bad directory) is an error naming every way out when a search needs it, and
    only costs the report its quality column when none does."""
    from qsched.core.errors import ModelNotFoundError
    from qsched.scoring.scorer import scorer_for

    if source is None:
        return None
    try:
        return scorer_for(source, device)
    except ModelNotFoundError as err:
        if required:
            raise QschedError(f"{err}; or pass --no-qsched --no-cache-search, or use --model flux-tiny") from None
        return None


def learn_schedule(pipe, profile: ModelProfile, settings: GenerationSettings, config, seed: int,
                   progress: bool) -> dict:
    """The Q-Sched stage: learn coefficients on the quantized pipeline (never the FP one) with JAQ from the
    profile's scorer, and apply them when they beat the unmodified scheduler on held-out prompts. Returns
    the stage record."""
    from qsched.coefficients.jaq import jaq, scorer_terms
    from qsched.coefficients.optimize import learn_coefficients
    from qsched.runtime.schedulers import SUPPORTED_SCHEDULERS, QSchedScheduler

    if type(pipe.scheduler).__name__ not in SUPPORTED_SCHEDULERS:
        return {"status": "skipped", "reason": f"scheduler {type(pipe.scheduler).__name__} is not supported by Q-Sched"}
    terms = scorer_terms(profile.scorer())
    train = profile.prompts("qsched_train", config.prompts, seed)
    heldout = profile.prompts("qsched_guard", config.heldout_prompts, seed)
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


def check_out(out: Path, overwrite: bool) -> None:
    """Fail before any work if ``out`` cannot be written (the writer checks again, atomically). Tries a real
    mkdir in the nearest existing ancestor, since ``os.access`` says yes to root even on /proc or a
    read-only mount."""
    import os
    import tempfile

    out = Path(out)
    if os.path.lexists(out):
        if not overwrite:
            raise QschedError(f"output {out} already exists; choose another --out or pass --overwrite")
        if out.is_symlink() or not out.is_dir():
            raise QschedError(f"--overwrite will not replace {out}: it is not a directory; remove it or choose "
                              "another --out")
        if not (out / "manifest.json").is_file() and any(out.iterdir()):
            raise QschedError(f"--overwrite will not replace {out}: it is a non-empty directory that is not a qsched "
                              "artifact (no manifest.json); remove it or choose another --out")
    probe = out.absolute().parent
    while not os.path.lexists(probe):
        probe = probe.parent
    if not probe.is_dir():
        raise QschedError(f"cannot write the artifact to {out}: {probe} is not a directory; choose another --out")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".qcompile-probe-", dir=probe))
    except OSError as err:
        raise QschedError(f"cannot write the artifact to {out}: cannot create anything in {probe} "
                          f"({err.strerror or err}); choose another --out") from None

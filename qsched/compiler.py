"""``qsched.compile``: load → calibrate → coefficients → cache_search → export, a short loop over
:mod:`qsched.stages`.

The CLI only parses arguments and calls this. Every argument is checked and every override applied to a
copy of the recipe before any work; each stage returns a :class:`qsched.stages.StageRecord`, and stages the
caller switched off or that cannot run are recorded with the reason, never skipped silently. Alongside the
stages, :class:`qsched.report.measure.ReportProbe` measures the report's points and baselines.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qsched.artifact import Artifact
from qsched.core.bits import FP8_NEEDS_FP_CONTEXT, WEIGHT_WIDTHS, BitSpec, parse_bits
from qsched.core.errors import QschedError
from qsched.models.profiles import default_scorer, no_scorer_message
from qsched.recipe import Recipe, find_recipe, load_recipe
from qsched.stages import STAGES, Compilation, CompileJob


def resolve_recipe(model: str, bits: str, recipe: str | Path | Recipe | None) -> tuple[Recipe, str | None]:
    """The explicit recipe, else the shipped one for model and bits, else defaults."""
    if isinstance(recipe, Recipe):
        return recipe, None
    path = Path(recipe) if recipe else find_recipe(model, bits)
    return (load_recipe(path), str(path)) if path else (Recipe(), None)


def compile(model: str = "flux-tiny", bits: str | BitSpec = "w4a8", out: str | Path | None = None,
            recipe: str | Path | Recipe | None = None, seed: int = 0, device: str = "cpu", init: str = "pretrained",
            width_scale: float | None = None, dtype: str = "auto", uniform: bool = False, coefficients: bool = True, cache_search: bool = True, bundle: bool = False,
            eval_prompts: int = 8, overwrite: bool = False, progress: bool = True,
            cache_budget: float | None = None, ray=None, scorer: str | None = None) -> Artifact:
    """Compile ``model`` at ``bits`` into an artifact directory ``out`` and return it.

    Every method runs by default: MixDQ's mixed precision under the bit budget, Q-Sched's scheduler
    coefficients and the cache search. ``uniform`` forces round-to-nearest at the target widths instead of
    MixDQ; ``coefficients``/``cache_search`` switch those stages off. ``scorer`` (``world-judge``, a local
    CLIP directory or a hub id; default: the recipe's, else the registry's for the model) judges images for
    Q-Sched, the cache search and the report; with none, a compile that needs one stops before any work.
    ``bundle`` stores every pipeline component so the artifact loads without the source. ``width_scale`` (with
    ``init="random"``) shrinks a registry architecture's widths and keeps its depth: a rehearsal. ``dtype``
    (``auto``, ``bfloat16``, ``float16``, ``float32``) is the dtype the pipeline is loaded and run in.
    ``eval_prompts`` FP-vs-quantized images are generated to record fidelity (0 skips it). ``ray`` (a
    :class:`qsched.distributed.RayConfig`, or an address string: ``"auto"``, ``"local"``, ``host:port``)
    runs the per-layer sensitivity analysis and the cache-search evaluations on Ray workers, each loading
    the model once; the artifact is the same as without it. These arguments are overrides on the recipe
    (``recipe.override``); the caller's recipe never changes.
    """
    job = plan_job(model, bits, out, recipe, seed=seed, device=device, init=init, width_scale=width_scale, dtype=dtype,
                   uniform=uniform,
                   coefficients=coefficients, cache_search=cache_search, bundle=bundle, eval_prompts=eval_prompts,
                   overwrite=overwrite, progress=progress, cache_budget=cache_budget, ray=ray, scorer=scorer)
    torch.manual_seed(job.seed)
    c = Compilation(job)
    bar = tqdm(total=len(STAGES), desc="qcompile", unit="stage", disable=not progress)
    try:
        for name, stage in STAGES:
            bar.set_postfix_str(name)
            start = time.perf_counter()
            record = stage(c)
            record.seconds = time.perf_counter() - start
            c.records[name] = record
            bar.update(1)
    except BaseException:
        bar.leave = False  # clear the bar so the error message starts its own line
        raise
    finally:
        bar.close()
        if c.text_cache is not None:  # the pipeline handed back encodes its prompts itself again
            c.text_cache.remove()
    return c.artifact


def plan_job(model: str, bits: str | BitSpec, out, recipe, *, uniform: bool = False, coefficients: bool = True,
             cache_search: bool = True, cache_budget: float | None = None, ray=None, scorer: str | None = None,
             check_output: bool = True, **job) -> CompileJob:
    """Check everything and apply the caller's overrides to a copy of the recipe, before any work.
    ``check_output=False`` leaves ``out`` unchecked: :func:`qsched.planning.plan_compile` writes nothing."""
    spec = parse_bits(bits) if isinstance(bits, str) else bits
    from qsched.models.width_scale import check_width_scale
    check_width_scale(job.get("width_scale"), job.get("init", "pretrained"), model)
    from qsched.models.registry import torch_dtype
    torch_dtype(job.get("dtype"))
    out = Path(out or f"out/{Path(model).name}-{spec}")
    if check_output:
        check_out(out, job.get("overwrite", False))
    base, recipe_path = resolve_recipe(model, str(spec), recipe)
    if cache_budget is not None and not 0.0 < cache_budget <= 1.0:
        raise QschedError(f"--cache-budget {cache_budget} must be a fraction of no-cache MACs in (0, 1]")
    if spec.is_fractional and uniform:
        raise QschedError(f"--bits {spec} is a fractional budget, which needs mixed precision; "
                          f"use an integer weight width ({', '.join(map(str, WEIGHT_WIDTHS))}) with --uniform")
    overrides = {}
    if uniform:
        overrides["quantization.method"] = "uniform"
    elif spec.is_fractional:
        overrides["quantization.method"] = "mixdq"
    if not coefficients:
        overrides["coefficients.enabled"] = False
    if not cache_search:
        overrides["cache_search.enabled"] = False
    if cache_budget is not None:
        overrides["cache_search.budget"] = cache_budget
    if scorer is not None:
        overrides["scorer"] = scorer
    final = base.override(overrides)
    if spec.format == "fp8" and final.quantization.method == "mixdq" and final.quantization.sensitivity_context != "fp":
        raise QschedError(FP8_NEEDS_FP_CONTEXT)
    scorer_source = final.scorer or default_scorer(model)
    if scorer_source is None and (final.coefficients.enabled or final.cache_search.enabled):
        raise QschedError(no_scorer_message(model))
    if isinstance(ray, str):
        from qsched.distributed import RayConfig
        ray = RayConfig(address=ray)
    return CompileJob(model, spec, out, final, recipe_path, ray=ray, scorer_source=scorer_source, **job)


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

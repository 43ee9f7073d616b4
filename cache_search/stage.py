"""The cache-search stage of a compile: search the quantized (and Q-Sched) pipeline's caching schedules,
keep the Pareto front, and pick the operating point the recipe or ``--cache-budget`` asks for."""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path

from tqdm.auto import tqdm

from .cost import CostModel
from .schedule import CacheSchedule, block_layout
from .search import (ParetoFront, SearchConfig, distributed_world_quality, nsga2_search, sharing_summary,
                     world_quality)


def choose_point(front: ParetoFront, budget: float | None, quality_floor: float) -> int:
    """Index of the chosen front point: the best quality within ``budget`` (a MAC fraction) when given,
    else the cheapest point whose quality is at least ``quality_floor`` × the no-cache quality."""
    points = front.points
    if budget is not None:
        within = [i for i, p in enumerate(points) if p.mac_fraction <= budget + 1e-12]
        if within:
            return max(within, key=lambda i: (points[i].quality, -points[i].macs))
        return min(range(len(points)), key=lambda i: points[i].macs)
    full = max((p for p in points if p.mac_fraction >= 1.0 - 1e-12), key=lambda p: p.quality, default=None)
    reference = full.quality if full else max(p.quality for p in points)
    good = [i for i, p in enumerate(points) if p.quality >= quality_floor * reference]
    return min(good, key=lambda i: points[i].macs)


def search_cache(pipe, prompts: list[str], settings, config, seed: int, work: Path | None,
                 progress: bool = True, ray=None, clip=None) -> tuple[dict, CacheSchedule | None]:
    """Run NSGA-II over caching schedules with the world's quality (judge + fidelity to no-cache), or,
    given ``clip`` (a loaded :class:`qsched.scoring.clip.ClipBundle`), a real model's CLIP quality
    (:mod:`cache_search.clip_quality`). ``ray`` (a :class:`qsched.distributed.RayConfig`) evaluates each
    generation's world-quality candidates on Ray workers; the front is the same as in process."""
    cost = CostModel.from_pipeline(pipe, settings.height, settings.width, settings.max_sequence_length)
    search = SearchConfig(population=config.population, generations=config.generations, seed=seed)
    if clip is not None:
        from .clip_quality import clip_quality
        if ray is not None:
            warnings.warn("the CLIP cache-search quality runs in process; --ray is used by the other stages only",
                          stacklevel=2)
        evaluators = nullcontext(clip_quality(pipe, prompts, settings, clip, seed=seed))
    elif ray is not None:
        evaluators = distributed_world_quality(pipe, prompts, settings, seed=seed, ray=ray)
    else:
        evaluators = nullcontext(world_quality(pipe, prompts, settings, seed=seed))
    bar = tqdm(total=config.generations + 1, desc="cache search", unit="gen", disable=not progress, leave=False)
    with evaluators as evaluator, bar:
        def on_generation(g, state):
            bar.update(g + 1 - bar.n)
            saved = sharing_summary(state.counts).get("block_evaluations")
            if saved:  # summed over the whole search, resumed generations included
                bar.set_postfix_str(f"{len(state.archive)} evaluated, {saved['saved_vs_naive']:.0%} block evals saved")

        front = nsga2_search(settings.steps, block_layout(pipe), evaluator, cost.schedule_macs, search, work_dir=work,
                             on_generation=on_generation)
    chosen = choose_point(front, config.budget, config.quality_floor)
    point = front.points[chosen]
    record = {"status": "done", "chosen": chosen, "mac_fraction": point.mac_fraction, "quality": point.quality,
              "evaluations": front.evaluations, "generations": front.generations,
              "prefix_sharing": sharing_summary(front.counts)}
    schedule = point.schedule if point.mac_fraction < 1.0 - 1e-12 else None
    return {"record": record, "front": front.to_dict()}, schedule

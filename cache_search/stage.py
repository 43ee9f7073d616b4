"""The cache-search stage of a compile: search the quantized (and Q-Sched) pipeline's caching schedules
(``cache_search.proxy_generations`` of them on the cheap proxy), keep the Pareto front, cut it to the points
the guard prompts do not dominate (:mod:`cache_search.guard`), and pick the operating point the recipe or
``--cache-budget`` asks for, by guard quality."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from tqdm.auto import tqdm

from cache_search.cost import CostModel
from cache_search.guard import guard_front
from qsched.runtime.cache_schedule import CacheSchedule, block_layout
from cache_search.search import (ParetoFront, SearchConfig, distributed_schedule_quality, nsga2_search, proxy_summary,
                     schedule_quality, sharing_summary)

GUARD_SEED_OFFSET = 50_000  # the guard's noise: row i of the guard prompts draws from seed + 50,000 + i


def choose_point(front: ParetoFront, budget: float | None, quality_floor: float) -> int:
    """Index of the chosen front point: the best quality within ``budget`` (a MAC fraction) when given,
    else the cheapest point whose quality is at least ``quality_floor`` × the no-cache quality. Quality is
    the guard's where the front was guarded (:attr:`FrontPoint.selection_quality`)."""
    points = front.points
    quality = [p.selection_quality for p in points]
    if budget is not None:
        within = [i for i, p in enumerate(points) if p.mac_fraction <= budget + 1e-12]
        if within:
            return max(within, key=lambda i: (quality[i], -points[i].macs))
        return min(range(len(points)), key=lambda i: points[i].macs)
    full = [quality[i] for i, p in enumerate(points) if p.mac_fraction >= 1.0 - 1e-12]
    reference = max(full) if full else max(quality)
    good = [i for i in range(len(points)) if quality[i] >= quality_floor * reference]
    return min(good, key=lambda i: points[i].macs)


def search_cache(pipe, prompts: list[str], settings, config, seed: int, work: Path | None, scorer,
                 progress: bool = True, ray=None,
                 guard_prompts: list[str] | None = None) -> tuple[dict, CacheSchedule | None]:
    """Run NSGA-II over caching schedules scored by ``scorer`` (the model profile's
    :class:`qsched.scoring.scorer.Scorer`) plus fidelity to no-cache (:class:`cache_search.search.ScheduleQuality`).
    ``ray`` (a :class:`qsched.distributed.RayConfig`) evaluates each generation's candidates on Ray workers,
    each rebuilding the scorer from its spec; the front is the same as in process.
    ``guard_prompts`` (disjoint from ``prompts``; none or empty: no guard) re-score the front with the same
    quality, noise seed ``seed`` + :data:`GUARD_SEED_OFFSET`, and keep what they do not dominate."""
    cost = CostModel.for_pipeline(pipe, settings)
    search = SearchConfig(population=config.population, generations=config.generations, seed=seed,
                          proxy_generations=config.proxy_generations)
    if ray is not None:
        evaluators = distributed_schedule_quality(pipe, prompts, settings, scorer, seed=seed, ray=ray, cost=cost,
                                                  max_batch=config.batch_rows)
    else:
        evaluators = nullcontext(schedule_quality(pipe, prompts, settings, scorer, seed=seed, cost=cost,
                                                  max_batch=config.batch_rows))
    bar = tqdm(total=config.generations + 1, desc="cache search", unit="gen", disable=not progress, leave=False)
    with evaluators as evaluator, bar:
        def on_generation(g, state):
            bar.update(g + 1 - bar.n)
            saved = sharing_summary(state.counts).get("block_evaluations")
            if saved:  # summed over the whole search, resumed generations included
                bar.set_postfix_str(f"{len(state.archive)} evaluated, {saved['saved_vs_naive']:.0%} block evals saved")

        front = nsga2_search(settings.steps, block_layout(pipe), evaluator, cost.schedule_macs, search, work_dir=work,
                             on_generation=on_generation)
        if guard_prompts:
            front = guard_front(front, evaluator.on_prompts(guard_prompts, seed + GUARD_SEED_OFFSET))
    chosen = choose_point(front, config.budget, config.quality_floor)
    point = front.points[chosen]
    guard = {k: front.guard[k] for k in ("prompts", "points_before", "removed")} if front.guard else None
    record = {"status": "done", "chosen": chosen, "mac_fraction": point.mac_fraction, "quality": point.quality,
              "guard_quality": point.guard_quality, "guard": guard, "evaluations": front.evaluations,
              "generations": front.generations, "prefix_sharing": sharing_summary(front.counts),
              "proxy": proxy_summary(front) or None}
    schedule = point.schedule if point.mac_fraction < 1.0 - 1e-12 else None
    return {"record": record, "front": front.to_dict()}, schedule

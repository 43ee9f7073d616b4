"""The cache-search stage of a compile: search the quantized (and Q-Sched) pipeline's caching schedules,
keep the Pareto front, and pick the operating point the recipe or ``--cache-budget`` asks for."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from tqdm.auto import tqdm

from .cost import CostModel
from .schedule import CacheSchedule, block_layout
from .search import ParetoFront, SearchConfig, distributed_world_quality, nsga2_search, world_quality


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
                 progress: bool = True, ray=None) -> tuple[dict, CacheSchedule | None]:
    """Run NSGA-II over caching schedules with the world's quality (judge + fidelity to no-cache).
    ``ray`` (a :class:`qsched.distributed.RayConfig`) evaluates each generation's candidates on Ray
    workers; the front is the same as in process."""
    cost = CostModel.from_pipeline(pipe, settings.height, settings.width, settings.max_sequence_length)
    search = SearchConfig(population=config.population, generations=config.generations, seed=seed)
    evaluators = (distributed_world_quality(pipe, prompts, settings, seed=seed, ray=ray) if ray is not None
                  else nullcontext(world_quality(pipe, prompts, settings, seed=seed)))
    bar = tqdm(total=config.generations + 1, desc="cache search", unit="gen", disable=not progress, leave=False)
    with evaluators as evaluator, bar:
        front = nsga2_search(settings.steps, block_layout(pipe), evaluator, cost.schedule_macs, search, work_dir=work,
                             on_generation=lambda g, _s: bar.update(g + 1 - bar.n))
    chosen = choose_point(front, config.budget, config.quality_floor)
    point = front.points[chosen]
    record = {"status": "done", "chosen": chosen, "mac_fraction": point.mac_fraction, "quality": point.quality,
              "evaluations": front.evaluations, "generations": front.generations}
    schedule = point.schedule if point.mac_fraction < 1.0 - 1e-12 else None
    return {"record": record, "front": front.to_dict()}, schedule

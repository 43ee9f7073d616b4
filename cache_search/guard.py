"""Guard-set selection of a cache-search front (as Q-Sched's ``select="guard"`` does for its coefficients).

Why: the search ranks schedules on a few prompts and overfits them. On flux-tiny (docs/results.md, "Cache
search on flux-tiny"), a point that strictly dominated FORA-3 on its 16 search prompts was worse than
FORA-3 on 512 held-out prompts. So the final front is re-scored with the same quality function on a
separate guard set (its own prompts and noise seed), and only the points non-dominated on (guard quality,
MACs) are kept; each keeps both qualities, and :func:`cache_search.stage.choose_point` picks by the
guard's. The compile stage, its Ray path and ``benchmarks/cache_search_tiny.py`` all call
:func:`guard_front`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

from qsched.runtime.cache_schedule import CacheSchedule
from cache_search.search import ParetoFront, _add_counts, _evaluator_counts, non_dominated


def guard_front(front: ParetoFront, evaluate_guard: Callable[[Sequence[CacheSchedule]], list[float]]) -> ParetoFront:
    """``front`` re-scored by ``evaluate_guard`` (one batched call over its points) and cut to the points
    non-dominated on (guard quality, MACs), in MAC order. Every point of the result carries its
    ``guard_quality``; ``front.guard`` records the guard prompts (when the evaluator has ``prompts``), the
    points before and removed, the removed points themselves and the guard evaluator's counters."""
    points = front.points
    before = _evaluator_counts(evaluate_guard)
    qualities = [float(q) for q in evaluate_guard([p.schedule for p in points])]
    if len(qualities) != len(points):
        raise ValueError(f"the guard returned {len(qualities)} values for {len(points)} schedules")
    if not all(math.isfinite(q) for q in qualities):
        raise ValueError(f"non-finite guard quality in {qualities}")
    counts: dict[str, int] = {}
    _add_counts(counts, {k: v - before.get(k, 0) for k, v in _evaluator_counts(evaluate_guard).items()})
    scored = [dataclasses.replace(p, guard_quality=q) for p, q in zip(points, qualities)]
    keep = set(non_dominated([(p.guard_quality, p.macs) for p in scored]))
    kept = [p for i, p in enumerate(scored) if i in keep]
    removed = [p for i, p in enumerate(scored) if i not in keep]
    prompts = getattr(evaluate_guard, "prompts", None)
    guard = {"prompts": len(prompts) if prompts is not None else None, "points_before": len(scored),
             "removed": len(removed), "counts": counts, "removed_points": [p.to_dict() for p in removed]}
    return dataclasses.replace(front, points=kept, guard=guard)

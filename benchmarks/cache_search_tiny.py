"""ECAD-style cache-schedule search on the embedded flux-tiny model, with the heuristics as baselines.

Searches on ``--prompts`` training-split prompts (quality: :class:`cache_search.search.WorldQuality`),
then re-scores the front and the heuristics (no cache, FORA 2/3/4, attention-only, FF-only) on
``--val-prompts`` held-out prompts and seeds, so the reported numbers are not the ones searched on.
Resumable: rerun with the same ``--work`` to continue a killed search.

    python benchmarks/cache_search_tiny.py --prompts 64 --population 24 --generations 30 \
        --work bench-out/cache-search --out bench-out/cache-search.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cache_search.cost import CostModel
from cache_search.schedule import CacheSchedule, block_layout
from cache_search.search import SearchConfig, nsga2_search, world_quality
from qsched.tinyworld.model import TINY_SETTINGS, build_tiny_pipeline, load_embedded
from qsched.tinyworld.world import sample_batch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--val-prompts", type=int, default=256)
    p.add_argument("--population", type=int, default=24)
    p.add_argument("--generations", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--random-model", action="store_true", help="a random flux-tiny (smoke runs, no weights)")
    p.add_argument("--work", default="bench-out/cache-search")
    p.add_argument("--out", default="bench-out/cache-search.json")
    args = p.parse_args(argv)

    pipe = (build_tiny_pipeline(seed=args.seed) if args.random_model else load_embedded()).to(args.device)
    settings = TINY_SETTINGS
    blocks = block_layout(pipe)
    cost = CostModel.from_pipeline(pipe, settings.height, settings.width, settings.max_sequence_length)
    _, prompts = sample_batch(seed=args.seed + 101, n=args.prompts, split="train")
    evaluator = world_quality(pipe, prompts, settings, seed=args.seed, max_batch=args.max_batch)

    start = time.perf_counter()
    front = nsga2_search(settings.steps, blocks, evaluator, cost.schedule_macs,
                         SearchConfig(population=args.population, generations=args.generations, seed=args.seed),
                         work_dir=args.work,
                         on_generation=lambda g, s: print(f"generation {g}: {len(s.archive)} evaluated", flush=True))
    search_s = time.perf_counter() - start

    _, val_prompts = sample_batch(seed=args.seed + 202, n=args.val_prompts, split="test")
    val = world_quality(pipe, val_prompts, settings, seed=args.seed + 7, max_batch=args.max_batch)
    steps = settings.steps
    named = {"no_cache": CacheSchedule.no_cache(steps, blocks),
             **{f"fora_{n}": CacheSchedule.fora(steps, blocks, n) for n in (2, 3, 4)},
             "attention_only": CacheSchedule.attention_only(steps, blocks),
             "ff_only": CacheSchedule.ff_only(steps, blocks)}
    named.update({f"front_{i}": pt.schedule for i, pt in enumerate(front.points)})
    metrics = val.evaluate_metrics(list(named.values()))
    rows = {name: {"mac_fraction": round(cost.mac_fraction(s), 4), **{k: round(v, 4) for k, v in m.items()}}
            for (name, s), m in zip(named.items(), metrics)}
    report = {"settings": settings.to_dict(), "cost": cost.to_dict(), "search_seconds": round(search_s, 1),
              "validation": rows, "front": front.to_dict()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    for name, row in rows.items():
        print(f"{name:16s} MACs {row['mac_fraction']:.3f}  quality {row['quality']:.4f}  "
              f"score {row['score']:.4f}  PSNR {row['psnr']:.2f}")


if __name__ == "__main__":
    main()

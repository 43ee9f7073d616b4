"""Speed-up of the Ray scale-out: MixDQ sensitivity and cache-search evaluation on flux-tiny, side by side.

One run measures, on the same machine and the same work: in process (``--threads`` torch threads), then
Ray with 1 worker and with 2 workers (``--threads`` threads each would oversubscribe a small machine, so
each worker gets one thread and the in-process baseline is timed with one thread too). It checks that
every distributed result equals the in-process one. Sensitivity times are end to end (they include the
workers' start-up: loading the model and the FP reference run); for the cache search, start-up (paid once
per compile, not per generation) is reported apart from the evaluation.

    python benchmarks/ray_speedup.py --out bench-out/ray-speedup.json   # every layer, 96 schedules
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from qsched.runtime.cache_schedule import CacheSchedule, block_layout
from cache_search.search import distributed_schedule_quality, schedule_quality
from qsched.scoring.scorer import WorldJudgeScorer
from calibrate.sensitivity import analyze_sensitivity
from qsched.distributed import RayConfig
from qsched.tinyworld.model import TINY_SETTINGS, load_embedded
from qsched.tinyworld.world import sample_batch


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def sensitivity(pipe, prompts, layers, ray=None):
    table, seconds = _timed(lambda: analyze_sensitivity(pipe, prompts, TINY_SETTINGS, weight_widths=(3, 4, 8),
                                                        act_widths=(8,), layers=layers, progress=False, ray=ray))
    return {n: l.to_dict() for n, l in table.layers.items()}, seconds, table.stats


def cache_eval(pipe, prompts, schedules, ray=None):
    if ray is None:
        evaluator, startup = _timed(lambda: schedule_quality(pipe, prompts, TINY_SETTINGS, WorldJudgeScorer(), max_batch=64))
        values, seconds = _timed(lambda: evaluator(schedules))
        return values, seconds, startup
    t = time.perf_counter()
    with distributed_schedule_quality(pipe, prompts, TINY_SETTINGS, WorldJudgeScorer(), ray=ray, max_batch=64) as evaluator:
        startup = time.perf_counter() - t
        values, seconds = _timed(lambda: evaluator(schedules))
    return values, seconds, startup


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--layers", default="*", help="glob of layers to analyse")
    p.add_argument("--schedules", type=int, default=96, help="random cache schedules to evaluate")
    p.add_argument("--out", default="bench-out/ray-speedup.json")
    args = p.parse_args(argv)
    import ray

    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    pipe = load_embedded()
    prompts = list(sample_batch(seed=5, n=args.prompts, split="train")[1])
    layout = block_layout(pipe)
    gen = torch.Generator().manual_seed(0)
    length = CacheSchedule.genome_length(TINY_SETTINGS.steps, layout)
    schedules = [CacheSchedule.from_genome((torch.rand(length, generator=gen) < torch.rand(1, generator=gen))
                                           .int().tolist(), TINY_SETTINGS.steps, layout) for _ in range(args.schedules)]

    report = {"machine": f"{os.cpu_count()} CPUs", "prompts": args.prompts, "layers": args.layers,
              "schedules": args.schedules, "sensitivity": {}, "cache_search": {}}
    base_table, base_s, stats = sensitivity(pipe, prompts, [args.layers])
    base_q, base_cs, base_start = cache_eval(pipe, prompts, schedules)
    report["sensitivity"]["in_process"] = {"seconds": round(base_s, 2), "evaluations": stats["evaluations"]}
    report["cache_search"]["in_process"] = {"seconds": round(base_cs, 2), "startup_seconds": round(base_start, 2)}
    for workers in (1, 2):
        config = RayConfig(address="local", workers=workers)
        table, secs, _ = sensitivity(pipe, prompts, [args.layers], config)
        q, cs, start = cache_eval(pipe, prompts, schedules, config)
        report["sensitivity"][f"ray_{workers}"] = {"seconds": round(secs, 2), "same_table": table == base_table}
        report["cache_search"][f"ray_{workers}"] = {"seconds": round(cs, 2), "startup_seconds": round(start, 2),
                                                    "same_qualities": q == base_q}
        print(json.dumps(report, indent=1), flush=True)
    for stage in ("sensitivity", "cache_search"):
        r = report[stage]
        r["speedup_1_to_2_workers"] = round(r["ray_1"]["seconds"] / r["ray_2"]["seconds"], 2)
    ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""ECAD-style cache-schedule search on the embedded flux-tiny model, against FORA every 2/3/4 and no cache.

1. Search (NSGA-II, prefix-shared batched evaluation) on ``--prompts`` training-split prompts, with the
   quality :class:`cache_search.search.ScheduleQuality` uses (judge score + PSNR fidelity to no-cache); the
   first ``--proxy-generations`` generations on the proxy (the first quarter of the prompts). Reports
   candidates evaluated, wall time, evaluations per second, the block (component) evaluations and MACs
   that prefix sharing ran against evaluating each candidate on its own, and what the proxy saved.
2. Guards the front (``--guard-prompts N``, 0: off): re-scores it on N other training-split prompts (not
   the search's, and never the validation split) with their own noise, and keeps the points they do not
   dominate (:func:`cache_search.guard.guard_front`, as the compiler does).
3. Optionally (``--check-sharing N``) re-evaluates the first N schedules of the final population with and
   without prefix sharing: wall time of each, and the largest quality difference (rounding only).
4. Validates on ``--val-prompts`` held-out prompts (the test split, seed 2024, batches of 64: the prompts
   and seeds ``tiny_model_report.py`` uses) the baselines (no cache, FORA 2/3/4, attention-only,
   FF-only), for each MAC threshold (the FORA points' and ``--thresholds``) the train front's and the
   guarded front's point with the most MACs within it, and every guarded point with no more MACs than a
   validated FORA baseline: judged accuracy (Wilson 95 % interval), its paired difference to no cache
   (same prompts and noise; normal 95 % interval of the per-prompt differences), judge score, PSNR to no
   cache, the search's own quality on the validation prompts (against no cache on them), MAC fraction
   and measured latency (median of ``--repeats`` interleaved timings of a 16-prompt batch). The "front"
   column says whether a row is on the guarded front (``guard``), only on the train front (``train``:
   the guard removed it) or on neither. A last line says, for each FORA baseline, which guarded points
   dominate it on the validation prompts (MACs ≤ and quality ≥, strictly better in one), by the search's
   quality and by judged accuracy.

Resumable: rerun with the same ``--work`` to continue a killed search.

    OMP_NUM_THREADS=1 python benchmarks/cache_search_tiny.py --steps 20 --prompts 16 --population 24 \
        --generations 12 --val-prompts 512 --work bench-out/cache-20 --out bench-out/cache-20.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from qsched.runtime.caching import enable_cache
from cache_search.cost import CostModel
from qsched.runtime.cache_schedule import CacheSchedule, block_layout
from cache_search.guard import guard_front
from cache_search.search import SearchConfig, nsga2_search, proxy_summary, quality_terms, sharing_summary, schedule_quality
from qsched.scoring.scorer import WorldJudgeScorer
from cache_search.stage import GUARD_SEED_OFFSET
from qsched.runtime.generation import generate
from qsched.metrics import paired_difference
from qsched.tinyworld.judge import confidence_interval, judge, psnr
from qsched.tinyworld.model import TINY_SETTINGS, build_tiny_pipeline, load_embedded
from qsched.tinyworld.world import sample_batch

VAL_SEED = 2024  # tiny_model_report.py's held-out prompts and noise


def load(args):
    if args.random_model:
        return build_tiny_pipeline(seed=args.seed)
    pipe = load_embedded()
    if args.bits != "fp":  # uniform RTN, the recipe default for flux-tiny (no Q-Sched coefficients)
        from calibrate.calibration import calibrate
        from qsched.core.bits import parse_bits
        from qsched.models.profiles import world_profile

        from qsched.recipe import CalibrationConfig, QuantizationConfig

        calibrate(pipe, parse_bits(args.bits), world_profile().prompts("calibration", 64, 0), TINY_SETTINGS,
                  QuantizationConfig(method="uniform", rounding="rtn"), calibration=CalibrationConfig(batch_size=16),
                  progress=False)
    return pipe


def genome(schedule: CacheSchedule) -> str:
    return "".join(map(str, schedule.to_genome()))


def pick_front(front, thresholds: list[float], names: dict[str, str]) -> dict[str, CacheSchedule]:
    """For each MAC-fraction threshold, the front point with the most MACs within it (the search's best
    quality at that budget), named by ``names`` (genome → row name)."""
    out = {}
    for limit in sorted(set(thresholds), reverse=True):
        within = [p for p in front.points if p.mac_fraction <= limit + 1e-9]
        if within:
            p = max(within, key=lambda p: p.macs)
            out.setdefault(names[genome(p.schedule)], p.schedule)
    return out


def guard_prompts_for(args, search_prompts: list[str]) -> list[str]:
    """``--guard-prompts`` training-split prompts from their own seed, none of them a search prompt. Not
    the test split: the validation prompts come from there."""
    taken, out, n = set(search_prompts), [], args.guard_prompts
    while len(out) < args.guard_prompts:
        n *= 2
        drawn = sample_batch(seed=args.seed + GUARD_SEED_OFFSET, n=n, split="train")[1]
        out = [p for p in drawn if p not in taken][:args.guard_prompts]
    return out


def dominating(rows: dict, baseline: str, key: str, candidates: list[str]) -> list[str]:
    """The rows among ``candidates`` that dominate ``baseline`` on (MACs ↓, ``key`` ↑)."""
    b = rows[baseline]
    return [name for name in candidates
            if rows[name]["macs"] <= b["macs"] and rows[name][key] >= b[key]
            and (rows[name]["macs"] < b["macs"] or rows[name][key] > b[key])]


def generate_with(pipe, schedule, prompts, settings, seed, batch_size=64):
    if schedule is None or not schedule.num_reused:
        return generate(pipe, prompts, settings, seed=seed, batch_size=batch_size)
    with enable_cache(pipe, schedule):
        return generate(pipe, prompts, settings, seed=seed, batch_size=batch_size)


def denoise_with(pipe, schedule, prompts, settings):
    """The sampling loop alone (text encoding included, no VAE decode): ``output_type='latent'``."""
    kwargs = dict(num_inference_steps=settings.steps, height=settings.height, width=settings.width,
                  guidance_scale=settings.guidance_scale, max_sequence_length=settings.max_sequence_length,
                  output_type="latent", generator=torch.Generator().manual_seed(0))
    if schedule is None or not schedule.num_reused:
        return pipe(prompts, **kwargs)
    with enable_cache(pipe, schedule):
        return pipe(prompts, **kwargs)


def latency(pipe, named: dict, prompts, settings, repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds to generate one batch of ``prompts`` under each schedule, end to end and the
    sampling loop alone, in interleaved rounds."""
    runs = {name: ([], []) for name in named}
    for name, s in named.items():  # warm-up
        generate_with(pipe, s, prompts, settings, 0, len(prompts))
    for _ in range(repeats):
        for name, s in named.items():
            start = time.perf_counter()
            generate_with(pipe, s, prompts, settings, 0, len(prompts))
            mid = time.perf_counter()
            denoise_with(pipe, s, prompts, settings)
            runs[name][0].append(mid - start)
            runs[name][1].append(time.perf_counter() - mid)
    return {name: (float(np.median(full)), float(np.median(loop))) for name, (full, loop) in runs.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=TINY_SETTINGS.steps)
    p.add_argument("--bits", default="fp", help="fp, or a uniform RTN target such as w4a8")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--val-prompts", type=int, default=512)
    p.add_argument("--population", type=int, default=24)
    p.add_argument("--generations", type=int, default=12)
    p.add_argument("--guard-prompts", type=int, default=16, metavar="N",
                   help="re-score the front on N other prompts and keep what they do not dominate (0: off)")
    p.add_argument("--proxy-generations", type=int, default=0, metavar="N",
                   help="score the first N generations on the first quarter of the prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mutation-prob", type=float, default=SearchConfig.mutation_prob,
                   help="bit-flip probability per gene (ECAD's 0.05 flips ~17 genes per child at 20 steps)")
    p.add_argument("--max-batch", type=int, default=384, help="rows per search pipeline call")
    p.add_argument("--no-share", action="store_true", help="search without prefix sharing (ablation)")
    p.add_argument("--check-sharing", type=int, default=0, metavar="N",
                   help="time N final-population schedules with and without prefix sharing")
    p.add_argument("--baselines", nargs="*", default=None,
                   help="which baselines to validate (default all; no_cache is always validated)")
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--random-model", action="store_true", help="a random flux-tiny (smoke runs, no weights)")
    p.add_argument("--work", default="bench-out/cache-search")
    p.add_argument("--out", default="bench-out/cache-search.json")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)

    pipe = load(args)
    settings = dataclasses.replace(TINY_SETTINGS, steps=args.steps)
    blocks = block_layout(pipe)
    cost = CostModel.from_pipeline(pipe, settings.height, settings.width, settings.max_sequence_length)
    _, prompts = sample_batch(seed=args.seed + 101, n=args.prompts, split="train")
    evaluator = schedule_quality(pipe, prompts, settings, WorldJudgeScorer(), seed=args.seed, max_batch=args.max_batch,
                              share_prefixes=not args.no_share)
    state = {}
    start = time.perf_counter()

    def on_generation(g, search):
        state["population"] = [search.schedule(ind) for ind in search.population]
        state["proxy"] = search.proxy_evaluator
        s = sharing_summary(search.counts).get("block_evaluations") or {}
        print(f"generation {g}: {len(search.archive)} evaluated ({len(search.proxy_archive)} on the proxy), "
              f"{time.perf_counter() - start:.0f} s, block evaluations saved vs naive {s.get('saved_vs_naive')}",
              flush=True)

    config = SearchConfig(population=args.population, generations=args.generations, seed=args.seed,
                          mutation_prob=args.mutation_prob, proxy_generations=args.proxy_generations)
    train_front = nsga2_search(settings.steps, blocks, evaluator, cost.schedule_macs, config, work_dir=args.work,
                               on_generation=on_generation)
    search_s = time.perf_counter() - start
    # evaluated by this process (not resumed ones), in full and on the proxy
    proxy_eval = state.get("proxy")
    run_candidates = evaluator.counts.get("candidates", 0)
    run_proxy = proxy_eval.counts.get("candidates", 0) if proxy_eval is not None else 0
    evaluator_s = evaluator.seconds + (proxy_eval.seconds if proxy_eval is not None else 0.0)
    search = {"candidates": train_front.evaluations, "proxy_candidates": train_front.proxy.get("candidates", 0),
              "generations": train_front.generations, "proxy_generations": args.proxy_generations,
              "wall_seconds": round(search_s, 1), "evaluator_seconds": round(evaluator_s, 1),
              "candidates_this_run": run_candidates, "proxy_candidates_this_run": run_proxy,
              "evaluations_per_second": round((run_candidates + run_proxy) / search_s, 3)
              if run_candidates + run_proxy else None,
              "full_evaluations_per_evaluator_second": round(run_candidates / evaluator.seconds, 3)
              if evaluator.seconds else None,
              "prompts": args.prompts, "prefix_sharing": not args.no_share, "counts": train_front.counts,
              "sharing": sharing_summary(train_front.counts), "proxy": proxy_summary(train_front) or None}
    print(json.dumps(search, indent=1), flush=True)

    front, guard = train_front, None
    if args.guard_prompts:
        t = time.perf_counter()
        guard_eval = evaluator.on_prompts(guard_prompts_for(args, prompts), args.seed + GUARD_SEED_OFFSET)
        front = guard_front(train_front, guard_eval)
        guard = {"prompts": args.guard_prompts, "seconds": round(time.perf_counter() - t, 1),
                 **{k: front.guard[k] for k in ("points_before", "removed", "counts")}}
        print(f"guard: {guard}", flush=True)

    check = None
    if args.check_sharing and state.get("population"):
        scheds = state["population"][:args.check_sharing]
        check = {}
        for share in (True, False):
            ev = schedule_quality(pipe, prompts, settings, WorldJudgeScorer(), seed=args.seed, max_batch=args.max_batch, share_prefixes=share)
            t = time.perf_counter()
            check[share] = (ev(scheds), time.perf_counter() - t, ev.counts)
        check = {"schedules": len(scheds), "seconds_shared": round(check[True][1], 2),
                 "seconds_unshared": round(check[False][1], 2),
                 "max_quality_difference": float(np.max(np.abs(np.subtract(check[True][0], check[False][0])))),
                 "shared": sharing_summary(check[True][2]), "unshared": sharing_summary(check[False][2])}
        print(json.dumps(check, indent=1), flush=True)

    # --- held-out validation -------------------------------------------------------------------------
    steps = settings.steps
    baselines = {"no_cache": CacheSchedule.no_cache(steps, blocks),
                 **{f"fora_{n}": CacheSchedule.fora(steps, blocks, n) for n in (2, 3, 4)},
                 "attention_only": CacheSchedule.attention_only(steps, blocks),
                 "ff_only": CacheSchedule.ff_only(steps, blocks)}
    fora_fractions = [cost.mac_fraction(baselines[f"fora_{n}"]) for n in (2, 3, 4)]
    named = {k: v for k, v in baselines.items() if args.baselines is None or k == "no_cache" or k in args.baselines}
    names = {genome(p.schedule): f"front_{i}" for i, p in enumerate(train_front.points)}  # train front indices
    thresholds = fora_fractions + list(args.thresholds)
    foras = [k for k in named if k.startswith("fora_")]
    fora_macs = max((cost.schedule_macs(named[k]) for k in foras), default=0.0)
    candidates = {**pick_front(train_front, thresholds, names), **pick_front(front, thresholds, names),
                  # every guarded point that could dominate a validated FORA baseline
                  **{names[genome(p.schedule)]: p.schedule for p in front.points if p.macs <= fora_macs}}
    seen = {genome(s) for s in named.values()}
    for name, sched in sorted(candidates.items(), key=lambda kv: int(kv[0].split("_")[1])):
        if genome(sched) not in seen:  # a FORA seed on the front is validated once, as its baseline row
            seen.add(genome(sched))
            named[name] = sched
    from cache_search.search import CHECKPOINT

    archive = json.loads((Path(args.work) / CHECKPOINT).read_text())["archive"]  # genome → (quality, MACs)
    final = "guard" if args.guard_prompts else "train"  # the front the search hands on
    guarded = {genome(p.schedule): p.guard_quality for p in front.points} if args.guard_prompts else {}
    guard_q = dict(guarded)
    guard_q.update({genome(CacheSchedule.from_dict(d["schedule"])): d["guard_quality"]
                    for d in front.guard.get("removed_points", [])})
    _, val_prompts = sample_batch(seed=VAL_SEED, n=args.val_prompts, split="test")
    ref_images = reference = None
    rows = {}
    for name, sched in named.items():
        t = time.perf_counter()
        images = generate_with(pipe, sched, val_prompts, settings, VAL_SEED)
        verdict = judge(images, val_prompts)
        if ref_images is None:
            ref_images, reference = images, verdict
        delta, delta_ci = paired_difference(reference.correct, verdict.correct)
        n = len(val_prompts)
        acc = float(verdict.accuracy)
        g = genome(sched)
        terms = quality_terms(verdict.score, psnr(images, ref_images), evaluator.psnr_cap, evaluator.fidelity_weight)
        rows[name] = {"mac_fraction": round(cost.mac_fraction(sched), 4), "macs": cost.schedule_macs(sched),
                      "speedup_macs": round(1.0 / cost.mac_fraction(sched), 3),
                      "front": "guard" if g in guarded else ("train" if g in names else ""),
                      "accuracy": round(acc, 4), "ci95": round(confidence_interval(acc, n), 4),
                      "delta_vs_no_cache": round(delta, 4),
                      "delta_ci95": round(delta_ci, 4) if name != "no_cache" else 0.0,
                      "score": round(float(verdict.score), 4), "psnr_vs_no_cache": round(terms["psnr"], 2),
                      "validation_quality": round(terms["quality"], 4),
                      "search_quality": (archive.get(g) or [None])[0], "guard_quality": guard_q.get(g),
                      "reuse_fraction": round(sched.reuse_fraction, 4)}
        print(f"validated {name} in {time.perf_counter() - t:.0f} s: {rows[name]}", flush=True)
    for name, (full, loop) in latency(pipe, named, val_prompts[:16], settings, args.repeats).items():
        rows[name]["latency_ms_batch16"] = round(1000 * full, 1)
        rows[name]["latency_ms_batch16_sampling"] = round(1000 * loop, 1)

    # does some point of the final front (guarded, unless --guard-prompts 0) dominate each FORA baseline
    # on the validation prompts?
    final_rows = [name for name, r in rows.items() if r["front"] == final]
    dominance = {fora: {"validation_quality": dominating(rows, fora, "validation_quality", final_rows),
                        "accuracy": dominating(rows, fora, "accuracy", final_rows)} for fora in foras}

    report = {"settings": settings.to_dict(), "bits": args.bits, "cost": cost.to_dict(), "search": search,
              "guard": guard, "sharing_check": check,
              "validation": {"prompts": args.val_prompts, "seed": VAL_SEED, "split": "test", "rows": rows,
                             "fora_dominated_by": {"front": final, "baselines": dominance}},
              "front": front.to_dict(), "train_front": train_front.to_dict()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"{'schedule':16s} {'front':>5s} {'MACs':>6s} {'speed-up':>8s} {'accuracy':>15s} {'Δ vs no cache':>15s} "
          f"{'score':>6s} {'PSNR':>6s} {'val q':>6s} {'ms/16':>6s} {'loop':>6s}")
    for name, r in rows.items():
        print(f"{name:16s} {r['front']:>5s} {r['mac_fraction']:6.3f} {r['speedup_macs']:7.2f}× "
              f"{100 * r['accuracy']:6.1f} ± {100 * r['ci95']:4.1f} % {100 * r['delta_vs_no_cache']:+6.1f} ± "
              f"{100 * r['delta_ci95']:4.1f} {r['score']:6.3f} {r['psnr_vs_no_cache']:6.2f} "
              f"{r['validation_quality']:6.3f} {r['latency_ms_batch16']:6.1f} {r['latency_ms_batch16_sampling']:6.1f}")
    for fora, d in dominance.items():
        print(f"{fora} dominated on the validation prompts by {final}-front points: search quality "
              f"{', '.join(d['validation_quality']) or 'none'}; judged accuracy {', '.join(d['accuracy']) or 'none'}")


if __name__ == "__main__":
    main()

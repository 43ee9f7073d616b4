"""Q-Sched on flux-tiny W4A8: Q-Sched's own 50×50 grid vs our per-step CMA-ES, held-out JAQ vs sampler runs.

Both searches see only the quantized pipeline (uniform RTN W4A8, 4 steps) and the reference-free JAQ
(world judge score + k · world quality score) on the same train prompts with one fixed seed; a
held-out prompt set (world test split) is scored whenever a method's best changes, which gives the
curves. Finally FP / quantized / quantized+grid / quantized+CMA are judged on further held-out prompts
with a different seed.

    python benchmarks/qsched_curves.py --out bench-out/qsched-curves.json
    python benchmarks/qsched_curves.py --random-model --grid-size 2 --budget 6 --prompts 2 \\
        --eval-prompts 4 --cal-prompts 4 --out /tmp/qsched-smoke.json   # smoke test only
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from calibrate.calibration import calibrate
from qsched.bits import parse_bits
from qsched.errors import ModelNotFoundError
from qsched.generation import generate
from qsched.jaq import jaq, world_jaq_terms
from qsched.optimize import learn_coefficients
from qsched.prompts import calibration_prompts
from qsched.schedulers import QSchedScheduler
from qsched.tinyworld.judge import confidence_interval, judge, quality_score
from qsched.tinyworld.model import TINY_SETTINGS, build_tiny_pipeline, load_embedded
from qsched.tinyworld.world import sample_batch


def load_fp(random_model: bool):
    """The FP pipeline: the trained embedded model, or (smoke tests only) a random one."""
    if random_model:
        pipe = build_tiny_pipeline(seed=0)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return load_embedded()


def unique_prompts(seed: int, n: int, split: str, exclude: set[str]) -> list[str]:
    """``n`` distinct captions of ``split`` not in ``exclude`` (so the evaluation set is disjoint)."""
    out: list[str] = []
    draw = 0
    while len(out) < n:
        _, captions = sample_batch(seed=seed + draw, n=max(4 * n, 64), split=split)
        for c in captions:
            if c not in exclude and c not in out:
                out.append(c)
                if len(out) == n:
                    break
        draw += 1
        if draw > 50:
            raise RuntimeError(f"could not draw {n} distinct {split} prompts")
    return out


def judged(images, prompts, k: float) -> dict:
    v = judge(images, prompts)
    quality = float(quality_score(images).mean())
    return {"accuracy": round(float(v.accuracy), 4),
            "ci95": round(float(confidence_interval(v.accuracy, len(prompts))), 4),
            "score": round(float(v.score), 4), "quality": round(quality, 4),
            "jaq": round(float(v.score) + k * quality, 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", default="w4a8")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=24, help="train prompts and held-out guard prompts (each)")
    p.add_argument("--eval-prompts", type=int, default=256, help="further held-out prompts for the final numbers")
    p.add_argument("--cal-prompts", type=int, default=64, help="prompts for the W4A8 activation ranges")
    p.add_argument("--grid-size", type=int, default=50)
    p.add_argument("--grid-range", type=float, nargs=2, default=(0.8, 1.2))
    p.add_argument("--budget", type=int, default=250, help="CMA-ES configurations on the train prompts")
    p.add_argument("--sigma0", type=float, default=0.05)
    p.add_argument("--bounds", type=float, nargs=2, default=(0.7, 1.3))
    p.add_argument("--k", type=float, default=2.0, help="JAQ = TC + k·IQ")
    p.add_argument("--seed", type=int, default=0, help="search seed (sampling noise shared by every candidate)")
    p.add_argument("--eval-seed", type=int, default=2024)
    p.add_argument("--methods", nargs="+", default=["grid", "cma"], choices=["grid", "cma", "nelder-mead"])
    p.add_argument("--random-model", action="store_true", help="random tiny pipeline (smoke tests only)")
    p.add_argument("--out", default="bench-out/qsched-curves.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    settings = replace(TINY_SETTINGS, steps=args.steps)

    try:
        fp = load_fp(args.random_model)
        qpipe = load_fp(args.random_model)
    except ModelNotFoundError as err:
        print(f"error: {err}\n(the trained flux-tiny weights are needed; for a smoke test pass --random-model)",
              file=sys.stderr)
        return 2
    cal = calibration_prompts("flux-tiny", args.cal_prompts, seed=0, embedded=True)
    calibrate(qpipe, parse_bits(args.bits), cal, settings, seed=0, batch_size=16, progress=False)

    train = unique_prompts(20_000, args.prompts, "train", set())
    heldout = unique_prompts(30_000, args.prompts, "test", set())
    evaluation = unique_prompts(args.eval_seed, args.eval_prompts, "test", set(heldout))
    terms = world_jaq_terms()

    def objective(images, prompts):
        return jaq(images, prompts, *terms, k=args.k)

    report = {"model": "random flux-tiny (smoke test)" if args.random_model else "flux-tiny (embedded)",
              "bits": args.bits, "steps": args.steps, "k": args.k, "seed": args.seed, "eval_seed": args.eval_seed,
              "train_prompts": train, "heldout_prompts": heldout, "eval_prompts": len(evaluation),
              "grid": {"size": args.grid_size, "range": list(args.grid_range)},
              "cma": {"budget": args.budget, "sigma0": args.sigma0, "bounds": list(args.bounds)},
              "methods": {}, "eval": {}}
    results = {}
    for method in args.methods:
        kwargs = dict(grid_size=args.grid_size, grid_range=tuple(args.grid_range)) if method == "grid" \
            else dict(budget=args.budget, sigma0=args.sigma0, bounds=tuple(args.bounds))
        res = learn_coefficients(qpipe, train, heldout, settings, objective, method=method, seed=args.seed,
                                 batch_size=len(train), progress=True, **kwargs)
        results[method] = res
        report["methods"][method] = res.to_dict()  # history = the curve (held-out JAQ vs train runs)
        print(f"{method}: train JAQ {res.identity_train_jaq:.4f} -> {res.train_jaq:.4f}, held-out "
              f"{res.identity_heldout_jaq:.4f} -> {res.heldout_jaq:.4f}; {res.runs} runs "
              f"({res.sampler_calls} images) + {res.heldout_runs} held-out runs in {res.seconds:.1f} s", flush=True)
        print(f"  coefficients cx={[round(v, 4) for v in res.coefficients.cx]} "
              f"ce={[round(v, 4) for v in res.coefficients.ce]}", flush=True)

    def run(pipe, label):
        images = generate(pipe, evaluation, settings, seed=args.eval_seed, batch_size=64, progress=label)
        row = judged(images, evaluation, args.k)
        report["eval"][label] = row
        print(f"{label:>16}: accuracy {row['accuracy']:.4f} ± {row['ci95']:.4f}  quality {row['quality']:.4f}  "
              f"JAQ {row['jaq']:.4f}", flush=True)

    run(fp, "fp")
    run(qpipe, args.bits)
    base = qpipe.scheduler
    for method, res in results.items():
        qpipe.scheduler = QSchedScheduler.wrap(base, res.coefficients)
        try:
            run(qpipe, f"{args.bits}+{method}")
        finally:
            qpipe.scheduler = base
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    print(f"wall time {report['seconds']} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""flux-tiny's sampler time shift: judged accuracy at few steps for several FlowMatch ``shift`` values, paired.

Why: the shipped scheduler spaces its 4 Euler steps evenly in σ (``shift`` 1.0, as FLUX.1-schnell). A shift
above 1 spends more of the steps at high noise, where the layout (positions, relations, counts) is decided;
below 1, at low noise, where detail is. It changes no weight, so it is the cheapest few-step lever to check
before more training. Choose on a validation draw (seed 7), confirm on the acceptance draw (seed 2024).

    python benchmarks/tiny_sampler_shift.py --shifts 0.7 1 1.5 2 3 --steps 4 --prompts 512 --seed 7
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from qsched.metrics import confidence_interval, paired_difference
from qsched.runtime.generation import generate
from qsched.tinyworld.judge import judge
from qsched.tinyworld.model import TINY_SETTINGS, WEIGHTS_DIR, load_embedded
from qsched.tinyworld.world import sample_batch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shifts", type=float, nargs="+", default=[0.7, 1.0, 1.5, 2.0, 3.0])
    p.add_argument("--steps", type=int, nargs="+", default=[4])
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--seed", type=int, default=7, help="held-out draw: 7 validation, 2024 acceptance")
    p.add_argument("--weights", default=str(WEIGHTS_DIR))
    p.add_argument("--out", default="bench-out/tiny-sampler-shift.json")
    args = p.parse_args(argv)
    if any(s <= 0 for s in args.shifts) or any(n < 1 for n in args.steps) or args.prompts < 2:
        p.error("--shifts must be positive, --steps at least 1 and --prompts at least 2")
    if not (Path(args.weights) / "model_index.json").is_file():
        p.error(f"--weights {args.weights}: no model_index.json there; pass a flux-tiny pipeline folder")
    _, prompts = sample_batch(seed=args.seed, n=args.prompts, split="test")
    pipe = load_embedded(Path(args.weights))
    config = pipe.scheduler.config
    base = config.get("shift", 1.0)
    report = {"prompts": args.prompts, "seed": args.seed, "weights": args.weights, "shipped_shift": base, "rows": []}
    for steps in args.steps:
        settings = dataclasses.replace(TINY_SETTINGS, steps=steps)
        verdicts = {}
        for shift in [base, *sorted(set(args.shifts) - {base})]:  # the shipped shift first: the pairs' base
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config, shift=shift)
            images = generate(pipe, prompts, settings, seed=args.seed, batch_size=64, progress=f"shift {shift} {steps} steps")
            verdicts[shift] = v = judge(images, prompts)
            d, ci = paired_difference(verdicts[base].correct, v.correct) if shift != base else (0.0, 0.0)
            row = {"steps": steps, "shift": shift, "accuracy": round(v.accuracy, 4),
                   "ci95": round(confidence_interval(v.accuracy, len(prompts)), 4), "score": round(v.score, 4),
                   "paired_vs_shipped": [round(d, 4), round(ci, 4)],
                   "per_attribute": {a: round(x, 4) for a, x in v.per_attribute.items()}}
            report["rows"].append(row)
            print(f"{steps} steps, shift {shift}: {100 * v.accuracy:.1f} % ± {100 * row['ci95']:.1f}, "
                  f"paired {100 * d:+.1f} ± {100 * ci:.1f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

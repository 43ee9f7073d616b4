"""flux-tiny (FP) under Q-Sched scheduler coefficients, at their own step count and others, paired.

Why: Q-Sched's per-step coefficients (c^x scales the sample, c^ε the model output) are learned on a quantized
model to absorb its error, but on flux-tiny they lift the FP model too, which says the plain sampler is not the
best one for these weights. This measures that, and how coefficients learned at S steps carry to N steps in
two readings: ``interpolate`` (the values placed at i/(S−1), linearly interpolated: what
``QSchedScheduler.wrap(..., interpolate=True)`` does for coefficients that do not record their σ grid, or on a
coarser grid) and ``field`` (:meth:`SchedulerCoefficients.field_resampled`: the coefficients read as a velocity
field v* = c^ε·v + k·x with k = (c^x − 1)/Δσ on each interval of the S-step σ grid, integrated on the N-step grid;
what the wrapper does on finer grids when the coefficients record their grid, as the Q-Sched search's do; at N = S
both readings are the coefficients themselves). ``recorded`` runs the product's own choice end to end: the
coefficients with their grid, wrapped with ``interpolate=True``. ``train_v2``'s coef phase distils the field into the weights. Choose on a
validation draw (seed 7), confirm on the acceptance draw (seed 2024).

    python benchmarks/tiny_coefficients.py --cx 0.7,0.8531,0.7,0.952 --ce 0.9506,0.7927,0.9671,0.831 \\
        --steps 4 8 20 --prompts 512 --seed 7
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from qsched.core.errors import QschedError
from qsched.runtime.generation import generate
from qsched.runtime.schedulers import QSchedScheduler, SchedulerCoefficients
from qsched.tinyworld.judge import judge
from qsched.tinyworld.model import TINY_SETTINGS, WEIGHTS_DIR, load_embedded
from qsched.tinyworld.train_v2 import sampler_grid
from qsched.tinyworld.world import sample_batch


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cx", type=floats, required=True, metavar="C1,C2,...", help="c^x, one value a step")
    p.add_argument("--ce", type=floats, required=True, metavar="C1,C2,...", help="c^ε, as many as --cx")
    p.add_argument("--steps", type=int, nargs="+", default=[4])
    p.add_argument("--readings", nargs="+", choices=["field", "interpolate", "recorded"], default=["field"],
                   help="how the coefficients carry to another step count")
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--seed", type=int, default=7, help="held-out draw: 7 validation, 2024 acceptance")
    p.add_argument("--weights", default=str(WEIGHTS_DIR))
    p.add_argument("--out", default="bench-out/tiny-coefficients.json")
    args = p.parse_args(argv)
    try:
        coefs = SchedulerCoefficients(len(args.cx), args.cx, args.ce)
    except QschedError as e:
        p.error(f"--cx/--ce: {e}")
    if any(n < 1 for n in args.steps) or args.prompts < 2:
        p.error("--steps must be at least 1 and --prompts at least 2")
    if not (Path(args.weights) / "model_index.json").is_file():
        p.error(f"--weights {args.weights}: no model_index.json there; pass a flux-tiny pipeline folder")
    _, prompts = sample_batch(seed=args.seed, n=args.prompts, split="test")
    pipe = load_embedded(Path(args.weights))
    pipe.set_progress_bar_config(disable=True)
    plain = pipe.scheduler
    grid = sampler_grid(plain, coefs.steps)
    report = {"prompts": args.prompts, "seed": args.seed, "weights": args.weights, "coefficients": coefs.to_dict(),
              "rows": []}
    for steps in args.steps:
        settings = dataclasses.replace(TINY_SETTINGS, steps=steps)
        pipe.scheduler = plain
        base = judge(generate(pipe, prompts, settings, seed=args.seed, batch_size=64), prompts)
        rows = [("none", None, base)]
        readings = ["field"] if steps == coefs.steps else args.readings  # at S steps both readings agree
        for reading in readings:
            if reading == "field":  # forced at every step count (the product uses it on finer grids only)
                used = dataclasses.replace(coefs, sigmas=grid).field_resampled(sampler_grid(plain, steps))
                pipe.scheduler = QSchedScheduler.wrap(plain, used)
            elif reading == "recorded":  # the product's choice for coefficients that record their grid
                wrapped = QSchedScheduler.wrap(plain, dataclasses.replace(coefs, sigmas=grid), interpolate=True)
                wrapped.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))  # as FluxPipeline calls it
                used = wrapped.coefficients_for(steps)
                pipe.scheduler = wrapped
            else:  # coefficients without a recorded grid: the product's linear stretch
                used = coefs.resampled(steps)
                pipe.scheduler = QSchedScheduler.wrap(plain, coefs, interpolate=True)
            rows.append((reading, used, judge(generate(pipe, prompts, settings, seed=args.seed, batch_size=64),
                                              prompts)))
        for reading, used, v in rows:
            row = {"steps": steps, "coefficients": reading,
                   **v.paired_row(base if used is not None else None, "paired_vs_plain"),
                   "used": None if used is None else {k: np.round(x, 4).tolist() if isinstance(x, list) else x
                                                       for k, x in used.to_dict().items()}}
            report["rows"].append(row)
            d, ci = row["paired_vs_plain"]
            print(f"{steps} steps, {reading}: {100 * v.accuracy:.1f} % ± {100 * row['ci95']:.1f}, "
                  f"paired {100 * d:+.1f} ± {100 * ci:.1f}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

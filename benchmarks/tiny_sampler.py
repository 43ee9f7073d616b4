"""flux-tiny's sampler settings: judged accuracy at few steps for several FlowMatch scheduler configs, paired.

Why: the sampler changes no weight, so it is the cheapest few-step lever to check before more training. The
``shift`` spends more of the Euler steps at high noise (above 1), where the layout (positions, relations, counts)
is decided, or at low noise (below 1), where detail is; ``shift_terminal`` moves the last σ before 0 (with shift
3 and 4 steps the last step jumps from σ 0.5 to 0); ``use_karras_sigmas``/``use_exponential_sigmas``/
``use_beta_sigmas`` respace the grid between its ends. Every config is judged on the same prompts and noise as
the shipped one and reported as a paired difference. Choose on a validation draw (seed 7), confirm on the
acceptance draw (seed 2024).

    python benchmarks/tiny_sampler.py --shifts 0.7 1 1.5 2 3 --steps 4 --prompts 512 --seed 7
    python benchmarks/tiny_sampler.py --configs shift=3,shift_terminal=0.2 shift=3,use_karras_sigmas=true
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from qsched.metrics import confidence_interval, paired_difference
from qsched.runtime.generation import generate
from qsched.tinyworld.judge import judge
from qsched.tinyworld.model import TINY_SETTINGS, WEIGHTS_DIR, load_embedded
from qsched.tinyworld.world import sample_batch

_SETTABLE = ("shift", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
             "stochastic_sampling")


def parse_overrides(text: str) -> dict:
    """``"shift=3,shift_terminal=0.2"`` -> ``{"shift": 3.0, "shift_terminal": 0.2}``; raises ValueError on a bad one."""
    overrides = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in _SETTABLE:
            raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(_SETTABLE)}")
        if key.startswith(("use_", "stochastic")):
            if value.lower() not in ("true", "false"):
                raise ValueError(f"{item!r}: {key} takes true or false")
            overrides[key] = value.lower() == "true"
        else:
            try:
                overrides[key] = float(value)
            except ValueError:
                raise ValueError(f"{item!r}: {key} takes a number") from None
            if not (overrides[key] > 0 if key == "shift" else 0 < overrides[key] < 1):
                raise ValueError(f"{item!r}: shift must be positive and shift_terminal in (0, 1)")
    if sum(bool(overrides.get(k)) for k in _SETTABLE[2:5]) > 1:
        raise ValueError(f"{text!r}: at most one of the karras/exponential/beta spacings")
    return overrides


def label(overrides: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items()) or "shipped"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shifts", type=float, nargs="*", default=[], help="shorthand for --configs shift=S ...")
    p.add_argument("--configs", nargs="*", default=[], help="scheduler overrides, e.g. shift=3,shift_terminal=0.2")
    p.add_argument("--steps", type=int, nargs="+", default=[4])
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--seed", type=int, default=7, help="held-out draw: 7 validation, 2024 acceptance")
    p.add_argument("--weights", default=str(WEIGHTS_DIR))
    p.add_argument("--out", default="bench-out/tiny-sampler.json")
    args = p.parse_args(argv)
    if any(s <= 0 for s in args.shifts) or any(n < 1 for n in args.steps) or args.prompts < 2:
        p.error("--shifts must be positive, --steps at least 1 and --prompts at least 2")
    try:
        variants = [{"shift": s} for s in args.shifts] + [parse_overrides(c) for c in args.configs]
    except ValueError as e:
        p.error(f"--configs {e}")
    if not variants:
        p.error("give at least one of --shifts or --configs to compare with the shipped sampler")
    if not (Path(args.weights) / "model_index.json").is_file():
        p.error(f"--weights {args.weights}: no model_index.json there; pass a flux-tiny pipeline folder")
    _, prompts = sample_batch(seed=args.seed, n=args.prompts, split="test")
    pipe = load_embedded(Path(args.weights))
    config = pipe.scheduler.config
    shipped = {k: config.get(k) for k in _SETTABLE}
    report = {"prompts": args.prompts, "seed": args.seed, "weights": args.weights, "shipped": shipped,
              "shipped_shift": config.get("shift", 1.0), "rows": []}
    # The shipped sampler first (the pairs' base); variants equal to it are dropped, the rest kept in order.
    unique = [{}] + [v for i, v in enumerate(variants)
                     if {**shipped, **v} != shipped and v not in variants[:i]]
    for steps in args.steps:
        settings = dataclasses.replace(TINY_SETTINGS, steps=steps)
        base = None
        for overrides in unique:
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config, **overrides)
            name = label(overrides)
            images = generate(pipe, prompts, settings, seed=args.seed, batch_size=64, progress=f"{name} {steps} steps")
            v = judge(images, prompts)
            base = base or v
            d, ci = paired_difference(base.correct, v.correct) if overrides else (0.0, 0.0)
            row = {"steps": steps, "config": name, "overrides": overrides,
                   "shift": pipe.scheduler.config.shift, "accuracy": round(v.accuracy, 4),
                   "ci95": round(confidence_interval(v.accuracy, len(prompts)), 4), "score": round(v.score, 4),
                   "paired_vs_shipped": [round(d, 4), round(ci, 4)],
                   "sigmas": [round(float(s), 4) for s in _sigmas(pipe.scheduler, steps)],
                   "per_attribute": {a: round(x, 4) for a, x in v.per_attribute.items()}}
            report["rows"].append(row)
            print(f"{steps} steps, {name}: {100 * v.accuracy:.1f} % ± {100 * row['ci95']:.1f}, "
                  f"paired {100 * d:+.1f} ± {100 * ci:.1f}  σ {row['sigmas']}", flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2))


def _sigmas(scheduler, steps: int):
    """The σ grid the Flux pipeline asks this scheduler for (it passes ``linspace(1, 1/steps)``)."""
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    return scheduler.sigmas


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

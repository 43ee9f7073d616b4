"""Two or more flux-tiny weight folders judged side by side: same held-out prompts, same noise, paired differences.

Why: the unpaired 95 % intervals of two 1,024-prompt accuracies (about ±2.9 points each) hide differences
of 3-4 points that are real; the models share each prompt's difficulty and each seed's noise, so the
per-prompt difference has a much tighter interval. This is how a new flux-tiny candidate is judged against
the shipped weights before it replaces them.

    python benchmarks/compare_weights.py --weights shipped out/rel-RG/pipeline --prompts 1024 \
        --out bench-out/compare-rg.json

``--draws D`` (D >= 2) also draws each prompt from D - 1 further noises and reports how much its images vary
(:mod:`qsched.tinyworld.diversity`), against fresh world scenes of the same prompts: accuracy can rise by
drawing one easy layout every time, which the judge alone cannot see. Accuracy is judged on the first draw,
the same noise as without ``--draws``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from qsched.metrics import confidence_interval, paired_difference
from qsched.runtime.generation import generate
from qsched.tinyworld.diversity import diversity, reference_draws
from qsched.tinyworld.judge import ATTRIBUTES, judge
from qsched.tinyworld.model import TINY_SETTINGS, WEIGHTS_DIR, load_embedded
from qsched.tinyworld.world import sample_batch


_DRAW_SEED_STRIDE = 1_000_003  # draw d's batch i uses seed + d * stride + i: no batch shares a draw-0 noise


def weights_dir(name: str) -> Path | None:
    """``shipped`` is the package's weights; anything else a pipeline folder saved by ``train_v2`` (None if not one)."""
    path = WEIGHTS_DIR if name == "shipped" else Path(name)
    return path if (path / "model_index.json").is_file() else None


def row(verdict, base) -> dict:
    """Accuracy with its unpaired interval, and (against ``base``) the paired difference overall and per attribute."""
    n = len(verdict.correct)
    out = {"accuracy": round(verdict.accuracy, 4), "ci95": round(confidence_interval(verdict.accuracy, n), 4),
           "score": round(verdict.score, 4),
           "per_attribute": {a: round(v, 4) for a, v in verdict.per_attribute.items()}}
    if base is not None:
        d, ci = paired_difference(base.correct, verdict.correct)
        out["delta"] = {"accuracy": [round(d, 4), round(ci, 4)]}
        ds, cis = paired_difference(base.scores, verdict.scores)
        out["delta"]["score"] = [round(ds, 4), round(cis, 4)]
        for a in ATTRIBUTES:
            x, y = base.attributes[a], verdict.attributes[a]
            keep = ~(np.isnan(x) | np.isnan(y))
            if keep.sum() > 1:
                d, ci = paired_difference(x[keep], y[keep])
                out["delta"][a] = [round(d, 4), round(ci, 4)]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", nargs="+", required=True,
                   help="weight folders ('shipped' for the package's); differences are against the first")
    p.add_argument("--prompts", type=int, default=1024)
    p.add_argument("--seed", type=int, default=2024, help="the held-out draw (2024 is the acceptance draw)")
    p.add_argument("--steps", type=int, nargs="+", default=[4, 20])
    p.add_argument("--draws", type=int, default=1,
                   help="noises per prompt; 2 or more also reports diversity against the world's own scenes")
    p.add_argument("--out", default="bench-out/compare-weights.json")
    args = p.parse_args(argv)
    if len(args.weights) < 2:
        p.error("--weights needs at least two folders to compare")
    if args.prompts < 2 or any(s < 1 for s in args.steps) or args.draws < 1:
        p.error("--prompts must be at least 2, every --steps and --draws at least 1")
    folders = [weights_dir(w) for w in args.weights]  # all validated before any generation
    for name, folder in zip(args.weights, folders):
        if folder is None:
            p.error(f"--weights {name}: no model_index.json there; pass 'shipped' or a pipeline folder written by "
                    "`python -m qsched.tinyworld.train_v2 --phases export`")
    _, prompts = sample_batch(seed=args.seed, n=args.prompts, split="test")
    report = {"prompts": args.prompts, "seed": args.seed, "split": "test", "weights": args.weights, "by_steps": {}}
    verdicts: dict[int, list] = {s: [] for s in args.steps}
    spread: dict[int, list] = {s: [] for s in args.steps}
    reference = None
    if args.draws > 1:
        reference = diversity(reference_draws(prompts, args.draws, seed=args.seed))
        report["world_diversity"] = reference.summary()
        print(f"world's own scenes: layout {reference.layout.mean():.3f}, background {reference.background.mean():.1f}")
    for name, folder in zip(args.weights, folders):
        pipe = load_embedded(folder)
        for steps in args.steps:
            settings = dataclasses.replace(TINY_SETTINGS, steps=steps)
            draws = [generate(pipe, prompts, settings, seed=args.seed + d * _DRAW_SEED_STRIDE, batch_size=64,
                              progress=f"{name} {steps} steps, draw {d + 1}/{args.draws}") for d in range(args.draws)]
            verdicts[steps].append(judge(draws[0], prompts))
            if args.draws > 1:
                spread[steps].append(diversity(torch.stack(draws, dim=1)))
    for steps in args.steps:
        base = verdicts[steps][0]
        report["by_steps"][steps] = {name: row(v, None if i == 0 else base)
                                     for i, (name, v) in enumerate(zip(args.weights, verdicts[steps]))}
        for i, (name, div) in enumerate(zip(args.weights, spread[steps])):
            report["by_steps"][steps][name]["diversity"] = div.summary(reference, None if i == 0 else spread[steps][0])
        for name, r in report["by_steps"][steps].items():
            delta = r.get("delta", {}).get("accuracy")
            tail = f", paired {100 * delta[0]:+.1f} ± {100 * delta[1]:.1f} points" if delta else ""
            if "diversity" in r:
                lay, bgd = r["diversity"]["layout"], r["diversity"]["background"]
                tail += f"; diversity vs world: layout {lay['ratio']:.2f}, background {bgd['ratio']:.2f}"
            print(f"{steps:2d} steps {name}: {100 * r['accuracy']:.1f} % ± {100 * r['ci95']:.1f}{tail}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

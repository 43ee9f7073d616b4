"""flux-tiny sampled from τ·noise (initial-noise temperature), paired against plain noise.

Why: Q-Sched's coefficients lift the FP flux-tiny by shrinking its latents (``benchmarks/tiny_coefficients.py``),
but a per-step coefficient cannot be put into the weights without hurting 1 and 2 steps. Starting from τ·noise
(τ < 1) is the step-count-free form of the same idea, and ``train_v2``'s temp phase distils it exactly. This
measures what it buys at each step count: every τ on the same prompts and the same noise as τ = 1 (what
``runtime.generation.generate`` draws). Choose on a validation draw (seed 7), confirm on the acceptance draw
(seed 2024).

    python benchmarks/tiny_temperature.py --taus 0.7 0.8 0.9 --steps 2 4 20 --prompts 512 --seed 7
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from qsched.runtime.generation import call_arguments
from qsched.tinyworld.judge import judge
from qsched.tinyworld.model import TINY_SETTINGS, WEIGHTS_DIR, load_embedded
from qsched.tinyworld.world import sample_batch


def tempered_images(pipe, prompts: list[str], settings, tau: float, seed: int, batch_size: int = 64) -> torch.Tensor:
    """Images in [0, 1] from τ times the noise ``generate`` would draw (batch ``i``: seed ``seed + i``)."""
    out = []
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start:start + batch_size]
        kwargs = dict(call_arguments(pipe, settings), output_type="pt")
        noise, _ = pipe.prepare_latents(len(batch), pipe.transformer.config.in_channels // 4, kwargs["height"],
                                        kwargs["width"], torch.float32, "cpu",
                                        torch.Generator("cpu").manual_seed(seed + i))
        with torch.inference_mode():
            out.append(pipe(batch, latents=tau * noise, **kwargs).images.float().cpu())
    return torch.cat(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--taus", type=float, nargs="+", default=[0.7, 0.8, 0.9])
    p.add_argument("--steps", type=int, nargs="+", default=[4])
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--seed", type=int, default=7, help="held-out draw: 7 validation, 2024 acceptance")
    p.add_argument("--weights", default=str(WEIGHTS_DIR))
    p.add_argument("--out", default="bench-out/tiny-temperature.json")
    args = p.parse_args(argv)
    if any(not 0 < t <= 1 for t in args.taus) or any(n < 1 for n in args.steps) or args.prompts < 2:
        p.error("--taus must be above 0 and at most 1 (1 is plain noise), --steps at least 1, --prompts at least 2")
    if not (Path(args.weights) / "model_index.json").is_file():
        p.error(f"--weights {args.weights}: no model_index.json there; pass a flux-tiny pipeline folder")
    _, prompts = sample_batch(seed=args.seed, n=args.prompts, split="test")
    pipe = load_embedded(Path(args.weights))
    pipe.set_progress_bar_config(disable=True)
    report = {"prompts": args.prompts, "seed": args.seed, "weights": args.weights, "rows": []}
    for steps in args.steps:
        settings = dataclasses.replace(TINY_SETTINGS, steps=steps)
        base = None
        for tau in [1.0, *sorted(set(args.taus) - {1.0}, reverse=True)]:
            v = judge(tempered_images(pipe, prompts, settings, tau, args.seed), prompts)
            base = base or v
            row = {"steps": steps, "tau": tau, **v.paired_row(base if tau != 1.0 else None, "paired_vs_plain")}
            report["rows"].append(row)
            d, ci = row["paired_vs_plain"]
            print(f"{steps} steps, tau {tau}: {100 * v.accuracy:.1f} % ± {100 * row['ci95']:.1f}, "
                  f"paired {100 * d:+.1f} ± {100 * ci:.1f}", flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

"""flux-tiny under classifier-free guidance: judged accuracy at several ``true_cfg_scale`` values, paired.

Why: flux-tiny samples without guidance (as FLUX.1-schnell), one transformer call per step. FluxPipeline's true
CFG with the empty caption as negative prompt doubles the calls; this measures what it buys, so that
``train_v2``'s guide phase (guidance distillation) knows the teacher it distils and at which scale. Every scale
is judged on the same prompts and noise as no guidance (scale 1) and reported as a paired difference. Choose on a
validation draw (seed 7), confirm on the acceptance draw (seed 2024).

    python benchmarks/tiny_guidance.py --scales 1.25 1.5 2 --steps 4 20 --prompts 512 --seed 7
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


def guided_images(pipe, prompts: list[str], settings, scale: float, seed: int, batch_size: int = 64) -> torch.Tensor:
    """Images in [0, 1]; batch ``i`` uses seed ``seed + i`` as ``runtime.generation.generate`` does, so scale 1
    draws exactly what ``generate`` draws."""
    out = []
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start:start + batch_size]
        kwargs = dict(call_arguments(pipe, settings), output_type="pt",
                      generator=torch.Generator("cpu").manual_seed(seed + i))
        if scale != 1.0:
            kwargs.update(true_cfg_scale=scale, negative_prompt=[""] * len(batch))
        with torch.inference_mode():
            out.append(pipe(batch, **kwargs).images.float().cpu())
    return torch.cat(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", type=float, nargs="+", default=[1.25, 1.5, 2.0])
    p.add_argument("--steps", type=int, nargs="+", default=[4])
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--seed", type=int, default=7, help="held-out draw: 7 validation, 2024 acceptance")
    p.add_argument("--weights", default=str(WEIGHTS_DIR))
    p.add_argument("--out", default="bench-out/tiny-guidance.json")
    args = p.parse_args(argv)
    if any(s < 1 for s in args.scales) or any(n < 1 for n in args.steps) or args.prompts < 2:
        p.error("--scales must be at least 1 (1 is no guidance), --steps at least 1 and --prompts at least 2")
    if not (Path(args.weights) / "model_index.json").is_file():
        p.error(f"--weights {args.weights}: no model_index.json there; pass a flux-tiny pipeline folder")
    _, prompts = sample_batch(seed=args.seed, n=args.prompts, split="test")
    pipe = load_embedded(Path(args.weights))
    pipe.set_progress_bar_config(disable=True)
    report = {"prompts": args.prompts, "seed": args.seed, "weights": args.weights, "rows": []}
    for steps in args.steps:
        settings = dataclasses.replace(TINY_SETTINGS, steps=steps)
        base = None
        for scale in [1.0, *sorted(set(args.scales) - {1.0})]:
            v = judge(guided_images(pipe, prompts, settings, scale, args.seed), prompts)
            base = base or v
            row = {"steps": steps, "scale": scale, "transformer_calls": steps * (1 if scale == 1.0 else 2),
                   **v.paired_row(base if scale != 1.0 else None, "paired_vs_unguided")}
            report["rows"].append(row)
            d, ci = row["paired_vs_unguided"]
            print(f"{steps} steps, scale {scale}: {100 * v.accuracy:.1f} % ± {100 * row['ci95']:.1f}, "
                  f"paired {100 * d:+.1f} ± {100 * ci:.1f}", flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

"""flux-tiny under skip-layer guidance: judged accuracy for each skipped block and scale, paired against none.

Why: classifier-free guidance is distilled into the shipped weights already (CFG on top of them loses points);
skip-layer guidance (:mod:`qsched.tinyworld.skip_guidance`) contrasts the model with a copy that skips a block,
a different direction that may still help. Each row is judged on the same prompts and noise as the plain model.
Choose on a validation draw (seed 7), confirm on the acceptance draw (seed 2024).

    python benchmarks/tiny_skip_guidance.py --skip single_transformer_blocks.3 --scales 0.25 0.5 --steps 4 20
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from qsched.runtime.generation import generate
from qsched.tinyworld.judge import judge
from qsched.tinyworld.model import TINY_SETTINGS, WEIGHTS_DIR, load_embedded
from qsched.tinyworld.skip_guidance import block_paths, skip_layer_guidance
from qsched.tinyworld.world import sample_batch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip", nargs="+", default=None, metavar="BLOCK[,BLOCK]",
                   help="blocks skipped in the weak call, one row per item (comma-joined blocks skip together); "
                        "default: each block of the transformer in turn")
    p.add_argument("--scales", type=float, nargs="+", default=[0.5])
    p.add_argument("--steps", type=int, nargs="+", default=[4])
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--seed", type=int, default=7, help="held-out draw: 7 validation, 2024 acceptance")
    p.add_argument("--weights", default=str(WEIGHTS_DIR))
    p.add_argument("--out", default="bench-out/tiny-skip-guidance.json")
    args = p.parse_args(argv)
    if any(s <= 0 for s in args.scales) or any(n < 1 for n in args.steps) or args.prompts < 2:
        p.error("--scales must be above 0, --steps at least 1 and --prompts at least 2")
    if not (Path(args.weights) / "model_index.json").is_file():
        p.error(f"--weights {args.weights}: no model_index.json there; pass a flux-tiny pipeline folder")
    pipe = load_embedded(Path(args.weights))
    t = pipe.transformer
    blocks = block_paths(len(t.transformer_blocks), len(t.single_transformer_blocks))
    rows_skip = [item.split(",") for item in args.skip] if args.skip else [[b] for b in blocks]
    unknown = [b for row in rows_skip for b in row if b not in blocks]
    if unknown:
        p.error(f"--skip {unknown[0]}: not a block of this transformer; blocks: {', '.join(blocks)}")
    _, prompts = sample_batch(seed=args.seed, n=args.prompts, split="test")
    report = {"prompts": args.prompts, "seed": args.seed, "weights": args.weights, "rows": []}
    for steps in args.steps:
        settings = dataclasses.replace(TINY_SETTINGS, steps=steps)
        base = judge(generate(pipe, prompts, settings, seed=args.seed, batch_size=64), prompts)
        report["rows"].append({"steps": steps, "skip": [], "scale": 0.0, **base.paired_row(None, "paired_vs_plain")})
        print(f"{steps:2d} steps, no guidance: {100 * base.accuracy:.1f} %", flush=True)
        for skip in rows_skip:
            for scale in args.scales:
                with skip_layer_guidance(t, skip, scale):
                    v = judge(generate(pipe, prompts, settings, seed=args.seed, batch_size=64), prompts)
                row = {"steps": steps, "skip": skip, "scale": scale, **v.paired_row(base, "paired_vs_plain")}
                report["rows"].append(row)
                d, ci = row["paired_vs_plain"]
                print(f"{steps:2d} steps, skip {'+'.join(skip)} × {scale}: {100 * v.accuracy:.1f} % "
                      f"({100 * d:+.1f} ± {100 * ci:.1f})", flush=True)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

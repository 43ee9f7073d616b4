"""What transformer capacity fits flux-tiny's latency budget: a 4-step batch of 16 per width/depth, side by side.

Why: issue #19 asks for ≤ 0.5 s per 4-step batch of 16 on 2 cores, and the shipped model (4 heads of 32 dims,
2 double + 4 single blocks) is at about 0.35 s, 82 % of it in the transformer. A wider or deeper transformer is
the next accuracy lever; this says which ones stay inside the budget before hours of training go into them.
Random weights (latency does not depend on them), the shipped VAE/text configs, the shipped sampler. The
variants are timed in interleaved rounds so a noisy machine hits them alike; the median round is reported.

    python benchmarks/tiny_capacity_latency.py --variants 4:2,4 5:2,4 6:2,4 4:2,6 4:3,6 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from qsched.runtime.generation import generate
from qsched.tinyworld.model import SHIPPED_TRANSFORMER_CONFIG, TINY_SETTINGS
from qsched.tinyworld.train_v2 import build_pipeline_v2
from qsched.tinyworld.world import sample_batch


def parse_variant(text: str) -> tuple[int, int, int]:
    """``W:D,S`` -> (heads, double blocks, single blocks)."""
    try:
        width, depth = text.split(":")
        double, single = (int(v) for v in depth.split(","))
        heads = int(width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HEADS:DOUBLE,SINGLE, e.g. 4:2,4") from None
    if heads < 1 or double < 0 or single < 0 or double + single < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: heads must be at least 1 and there must be a block")
    return heads, double, single


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", type=parse_variant, nargs="+", default=[parse_variant(v) for v in
                   ("4:2,4", "5:2,4", "6:2,4", "4:2,6", "4:3,6")], metavar="HEADS:DOUBLE,SINGLE")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=0.5, help="seconds per 4-step batch of 16 (issue #19)")
    p.add_argument("--out", default="bench-out/tiny-capacity-latency.json")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    _, prompts = sample_batch(seed=0, n=16, split="test")
    pipes = {}
    for heads, double, single in args.variants:
        config = {"num_attention_heads": heads, "num_layers": double, "num_single_layers": single}
        pipe = build_pipeline_v2(seed=0, transformer_config={**SHIPPED_TRANSFORMER_CONFIG, **config})
        generate(pipe, prompts, TINY_SETTINGS, batch_size=16)  # warm-up
        pipes[f"{heads}:{double},{single}"] = pipe
    times = {name: [] for name in pipes}
    for _ in range(args.rounds):
        for name, pipe in pipes.items():
            t = time.perf_counter()
            generate(pipe, prompts, TINY_SETTINGS, batch_size=16)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(next(iter(times.values())))
    report = {"threads": torch.get_num_threads(), "rounds": args.rounds, "budget_s": args.budget, "variants": {}}
    for name, pipe in pipes.items():
        median = statistics.median(times[name])
        params = sum(q.numel() for q in pipe.transformer.parameters())
        report["variants"][name] = {"transformer_params": params, "fp16_transformer_mb": round(params * 2 / 2**20, 2),
                                    "seconds": round(median, 4), "vs_first": round(median / base, 3),
                                    "within_budget": median <= args.budget}
        print(f"{name}: {params / 1e6:.2f} M transformer params, {median:.3f} s ({median / base:.2f}× the first)"
              f"{'' if median <= args.budget else ' — over budget'}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

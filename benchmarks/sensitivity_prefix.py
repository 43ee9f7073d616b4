"""MixDQ sensitivity with and without the block prefix: probes per second, side by side in one run.

Quality probes replay the denoiser on the FP trajectory; with the block prefix
(:class:`calibrate.sensitivity._BlockPrefix`) each probe skips the blocks that finish before its layer first
runs. This script times the same quality layers both ways and checks the tables are identical, and, from
one recording, gives the fraction of block calls the prefix skips averaged over *every* quality layer of
the model: what a full sensitivity pass saves.

    python benchmarks/sensitivity_prefix.py --model flux-tiny
    python benchmarks/sensitivity_prefix.py --model flux-schnell --width-scale 0.0416667 --layers 16
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from calibrate.sensitivity import LayerAnalysis, analyze_sensitivity, metric_for_group
from qsched.models.adapters import adapter_for
from qsched.models.registry import load_pipeline
from qsched.runtime.generation import GenerationSettings


def _pipe(args):
    if args.model == "flux-tiny":
        from qsched.tinyworld.model import TINY_SETTINGS, load_embedded
        return load_embedded(), TINY_SETTINGS
    pipe, _ = load_pipeline(args.model, init="random", dtype=torch.float32, width_scale=args.width_scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe, GenerationSettings(steps=args.steps, height=args.size, width=args.size, guidance_scale=0.0,
                                    max_sequence_length=32)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-tiny")
    p.add_argument("--width-scale", type=float, default=None)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--layers", type=int, default=12, help="quality layers timed, spread evenly over depth")
    p.add_argument("--out", default="bench-out/sensitivity-prefix.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pipe, settings = _pipe(args)
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    adapter = adapter_for(pipe)
    names = list(adapter.quantizable_layers(adapter.denoiser(pipe)))
    quality = [n for n in names if metric_for_group(adapter.layer_group(n, None)) != "ssim"]
    prompts = [f"a red circle number {i}" for i in range(args.prompts)]

    t0 = time.perf_counter()
    run = LayerAnalysis(pipe, prompts, settings, quality, None, (4,), (), None, None, 0, len(prompts), 0.95, None)
    setup_s = time.perf_counter() - t0
    skipped = {n: run.probe.prefix.skipped(n) for n in quality}
    blocks = len(run.probe.prefix.blocks)
    del run
    timed = [quality[round(i * (len(quality) - 1) / max(args.layers - 1, 1))] for i in range(args.layers)]
    timed = list(dict.fromkeys(timed))
    result = {"model": args.model, "width_scale": args.width_scale, "steps": settings.steps, "prompts": len(prompts),
              "layers": len(names), "quality_layers": len(quality), "blocks": blocks, "setup_with_record_s": round(setup_s, 1),
              "mean_skipped_fraction_all_quality_layers": round(sum(skipped.values()) / len(skipped), 4),
              "timed_layers": len(timed), "mean_skipped_fraction_timed": round(sum(skipped[n] for n in timed) / len(timed), 4)}
    tables = {}
    for prefix in (False, True, False, True):  # alternated: the machine's load drifts
        table = analyze_sensitivity(pipe, prompts, settings, weight_widths=(4, 8), act_widths=(), layers=timed,
                                    groups=None, progress=False, record_bytes=None if prefix else 0)
        key = "prefix" if prefix else "whole"
        tables[key] = table.to_dict()["layers"]
        result.setdefault(f"{key}_evaluations_per_second", []).append(round(table.stats["evaluations_per_second"], 3))
    result["identical_tables"] = tables["prefix"] == tables["whole"]
    whole = sum(result["whole_evaluations_per_second"]) / 2
    result["speedup"] = round(sum(result["prefix_evaluations_per_second"]) / 2 / whole, 2)
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

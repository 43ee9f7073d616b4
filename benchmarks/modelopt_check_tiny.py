"""modelopt against our quantizers on the embedded flux-tiny, per layer and end to end.

Calibrates flux-tiny as the default compile does (64 training-split prompts, uniform RTN), expresses the
plan with :func:`calibrate.modelopt_bridge.to_modelopt` in both activation modes, and runs
:func:`~calibrate.modelopt_bridge.check_against_reference` with the real inputs each layer sees in the
quantized pipeline (8 prompts, every denoiser step). It also checks modelopt quantizing the FP weights
itself (ties) and compares the generated images (PSNR against our simulated pipeline, same seeds).

    python benchmarks/modelopt_check_tiny.py --bits w4a8 --out bench-out/modelopt-check-tiny.json
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from calibrate import modelopt_bridge as mb
from qsched.runtime.apply import quantize_
from calibrate.calibration import collect_activation_ranges
from calibrate.uniform import uniform_plan
from qsched.models.adapters import adapter_for
from qsched.core.bits import parse_bits
from qsched.runtime.generation import generate
from qsched.models.profiles import world_profile
from qsched.metrics import psnr
from qsched.tinyworld.model import TINY_SETTINGS, load_embedded


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", default="w4a8")
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--out", default="bench-out/modelopt-check-tiny.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pipe = load_embedded()
    fp = pipe.transformer
    prompts = world_profile().prompts("calibration", 64, 0)
    ranges = collect_activation_ranges(pipe, prompts, TINY_SETTINGS, seed=0, batch_size=8, progress=False)
    plan = uniform_plan(fp, adapter_for(fp), parse_bits(args.bits), args.group_size)
    reference = quantize_(copy.deepcopy(fp), plan, ranges)
    eval_prompts = prompts[:8]
    pipe.transformer = reference
    samples = mb.capture_inputs(reference, list(plan.layers),
                                lambda: generate(pipe, eval_prompts, TINY_SETTINGS, seed=1, batch_size=8))
    ours = generate(pipe, eval_prompts, TINY_SETTINGS, seed=1, batch_size=8)
    result = {"bits": args.bits, "group_size": args.group_size, "layers": len(plan.layers), "modes": {}}
    for mode in mb.ACTIVATION_MODES:
        quantized = mb.to_modelopt(copy.deepcopy(reference), plan, activations=mode)
        table = mb.check_against_reference(reference, quantized, plan, activations=mode, samples=samples)
        pipe.transformer = quantized
        images = generate(pipe, eval_prompts, TINY_SETTINGS, seed=1, batch_size=8)
        result["modes"][mode] = {"summary": mb.summarize(table),
                                 "image_psnr_vs_ours_db": round(float(psnr(images, ours).mean()), 2),
                                 "image_max_abs_diff": float((images - ours).abs().max()),
                                 "table": table}
        pipe.transformer = reference
    fp_table = mb.check_against_reference(fp, plan=plan, act_ranges=ranges)  # modelopt rounds the FP weights itself
    result["from_fp_weights"] = {"summary": mb.summarize(fp_table),
                                 "layers_with_code_differences": {n: r["reason"] for n, r in fp_table.items()
                                                                  if not r["weight_match"]}}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, allow_nan=False))
    for mode, r in result["modes"].items():
        print(f"{mode}: {json.dumps(r['summary'])}; images PSNR vs ours {r['image_psnr_vs_ours_db']} dB")
    print(f"from FP weights: {json.dumps(result['from_fp_weights']['summary'])}")


if __name__ == "__main__":
    main()

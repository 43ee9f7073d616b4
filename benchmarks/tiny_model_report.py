"""flux-tiny report: judged accuracy by step count, and how uniform RTN quantization degrades it.

All numbers on held-out prompts (the world's test split) with seeds not used in training; quantized
models are compared against the FP model on the same prompts and seeds.

    python benchmarks/tiny_model_report.py --prompts 1024 --out bench-out/tiny-report.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from calibrate.calibration import calibrate
from qsched.recipe import CalibrationConfig, QuantizationConfig
from qsched.core.bits import parse_bits
from qsched.runtime.generation import generate
from qsched.models.profiles import world_profile
from qsched.tinyworld.judge import confidence_interval, judge, psnr, quality_score, ssim
from qsched.tinyworld.model import TINY_SETTINGS, WEIGHTS_DIR, load_embedded
from qsched.tinyworld.world import sample_batch


def judged(images, prompts) -> dict:
    v = judge(images, prompts)
    return {"accuracy": round(float(v.accuracy), 4), "ci95": round(float(confidence_interval(v.accuracy, len(prompts))), 4),
            "score": round(float(v.score), 4), "quality": round(float(quality_score(images).mean()), 4),
            "per_attribute": {k: round(float(x), 4) for k, x in v.per_attribute.items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=1024)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 20])
    p.add_argument("--bits", nargs="+", default=["w8a8", "w4a8", "w3a8", "w2a16"])
    p.add_argument("--weights", default=str(WEIGHTS_DIR), help="a flux-tiny weights dir (default: the shipped one)")
    p.add_argument("--out", default="bench-out/tiny-report.json")
    args = p.parse_args(argv)
    _, prompts = sample_batch(seed=args.seed, n=args.prompts, split="test")
    weights = Path(args.weights)
    pipe = load_embedded(weights)
    report = {"prompts": args.prompts, "seed": args.seed, "split": "test",
              "params": {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                         for name in ("transformer", "vae", "text_encoder", "text_encoder_2")},
              "weight_file_bytes": sum(f.stat().st_size for f in weights.rglob("*.safetensors"))}
    batch16 = prompts[:16]
    generate(pipe, batch16, TINY_SETTINGS, batch_size=16)  # warm-up
    clock = {"in_transformer": 0.0}  # the transformer's share: how much capacity the latency budget leaves

    def started(module, inputs):
        clock["started"] = time.perf_counter()

    def finished(module, inputs, output):
        clock["in_transformer"] += time.perf_counter() - clock["started"]

    hooks = [pipe.transformer.register_forward_pre_hook(started), pipe.transformer.register_forward_hook(finished)]
    t = time.perf_counter()
    for _ in range(5):
        generate(pipe, batch16, TINY_SETTINGS, batch_size=16)
    elapsed = time.perf_counter() - t
    for h in hooks:
        h.remove()
    report["seconds_per_4step_batch16"] = round(elapsed / 5, 4)
    report["transformer_share_of_latency"] = round(clock["in_transformer"] / elapsed, 3)

    report["fp_by_steps"] = {}
    fp_images = {}
    for steps in args.steps:
        settings = dataclasses.replace(TINY_SETTINGS, steps=steps)
        fp_images[steps] = generate(pipe, prompts, settings, seed=args.seed, batch_size=64, progress=f"FP {steps} steps")
        report["fp_by_steps"][steps] = judged(fp_images[steps], prompts)
        print(f"FP {steps:2d} steps: {report['fp_by_steps'][steps]}", flush=True)

    reference = fp_images.get(4)
    if reference is None:
        reference = generate(pipe, prompts, TINY_SETTINGS, seed=args.seed, batch_size=64)
    report["uniform_rtn_4steps"] = {}
    cal_prompts = world_profile().prompts("calibration", 64, 0)
    for bits in args.bits:
        qpipe = load_embedded(weights)
        calibrate(qpipe, parse_bits(bits), cal_prompts, TINY_SETTINGS, QuantizationConfig(method="uniform", rounding="rtn"),
                  calibration=CalibrationConfig(batch_size=16), progress=False)
        images = generate(qpipe, prompts, TINY_SETTINGS, seed=args.seed, batch_size=64, progress=f"{bits}")
        row = judged(images, prompts)
        row.update({"psnr_vs_fp": round(float(psnr(reference, images).mean()), 3),
                    "ssim_vs_fp": round(float(ssim(reference, images).mean()), 4)})
        report["uniform_rtn_4steps"][bits] = row
        print(f"{bits}: {row}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("fp_by_steps", "uniform_rtn_4steps")}, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

"""MixDQ mixed precision against uniform round-to-nearest on the embedded flux-tiny model, side by side.

For each target (default W8A8, W4A8, W3.5A8, W3A8) both methods calibrate a fresh copy of the shipped
model on the same calibration prompts (uniform RTN only exists at integer widths), then generate the
same held-out prompts and seeds at 4 steps. Reported per row: judged accuracy (±95 %), continuous score,
PSNR/SSIM against FP, average weight bits and denoiser size. MixDQ uses the recipe defaults
(:class:`qsched.recipe.QuantizationConfig`); its sensitivity table is computed once and cached in
``--work``, so later targets reuse it.

The default rows are ``uniform`` (round-to-nearest: the baseline), ``uniform-gptq`` (GPTQ rounding,
:mod:`calibrate.gptq`, to separate its gain from the allocation's) and ``mixdq`` (the recipe defaults,
GPTQ included).

``--ablation`` gives the rows of MixDQ's ablation, each adding one thing to the previous: ``naive``
(uniform RTN, text tokens as they come) → ``+bos`` (BOS/outlier-aware text layers,
:mod:`calibrate.fp_tokens`) → ``+gptq`` (GPTQ weight rounding) → ``+sqnr-only`` (mixed precision with every layer scored by SQNR) → ``+decoupled`` (content layers by
SSIM: full MixDQ), plus ``mixdq-rtn`` (full MixDQ with round-to-nearest), ``mixdq-no-fp-acts`` (full MixDQ without FP-activation layers),
``mixdq-floor-3`` (no layer under 3 bits), ``uniform-mse`` / ``mixdq-mse`` with clipped weight scales
(:func:`qsched.runtime.quantizers.weight_scale`) instead of max scales, and ``mixdq-in-context`` (with and
without the floor): sensitivity probed around the operating point (``sensitivity_context: uniform``). Fractional targets have no uniform rows. On flux-tiny ``+bos`` equals ``naive``:
its text stream is T5 (no BOS) and ``benchmarks/text_outliers.py`` finds no outlier tokens in it; each
row's ``fp_tokens`` says what the calibration did.

    python benchmarks/mixdq_tiny.py --prompts 1024 --out bench-out/mixdq-tiny.json
    python benchmarks/mixdq_tiny.py --ablation --bits w8a8 w4a8 --prompts 1024 --out bench-out/mixdq-ablation.json
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from calibrate.calibration import calibrate
from calibrate.mixdq_run import MixDQRun
from qsched.core.bits import parse_bits
from qsched.runtime.generation import generate
from qsched.models.profiles import world_profile
from qsched.recipe import CalibrationConfig, QuantizationConfig
from qsched.tinyworld.judge import confidence_interval, judge, psnr, ssim
from qsched.tinyworld.model import TINY_SETTINGS, WEIGHTS_DIR, load_embedded
from qsched.tinyworld.world import sample_batch


def _row(images, reference, prompts) -> dict:
    verdict = judge(images, prompts)
    return {"accuracy": round(float(verdict.accuracy), 4),
            "ci95": round(float(confidence_interval(verdict.accuracy, len(prompts))), 4),
            "score": round(float(verdict.score), 4),
            "psnr_vs_fp": round(float(psnr(reference, images).mean()), 3) if reference is not None else None,
            "ssim_vs_fp": round(float(ssim(reference, images).mean()), 4) if reference is not None else None}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=1024, help="held-out prompts (test split)")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--bits", nargs="+", default=["w8a8", "w4a8", "w3.5a8", "w3a8"])
    p.add_argument("--calibration-prompts", type=int, default=64)
    p.add_argument("--allocation-study", action="store_true",
                   help="MixDQ with and without the width floor, groups normalised by spread and by budget")
    p.add_argument("--ablation", action="store_true",
                   help="rows naive → +bos → +sqnr-only → +decoupled (and MixDQ without FP activations)")
    p.add_argument("--only", nargs="+", default=None, help="run only these row names (e.g. uniform mixdq)")
    p.add_argument("--content-weight", type=float, default=None, help="override the recipe's content_weight")
    p.add_argument("--normalise", choices=["spread", "budget"], default=None, help="override the recipe's normalise")
    p.add_argument("--sensitivity-prompts", type=int, default=None, help="override the recipe's sensitivity_prompts")
    p.add_argument("--objective-study", action="store_true",
                   help="MixDQ's objective: decoupled (SSIM content + SQNR quality), the same with 4x the "
                        "sensitivity prompts, and SQNR for every layer")
    p.add_argument("--weights", default=str(WEIGHTS_DIR))
    p.add_argument("--work", default="bench-out/mixdq-work", help="sensitivity cache (reruns are cheap)")
    p.add_argument("--out", default="bench-out/mixdq-tiny.json")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)

    _, prompts = sample_batch(seed=args.seed, n=args.prompts, split="test")
    cal = world_profile().prompts("calibration", args.calibration_prompts, 0)
    fp = load_embedded(Path(args.weights))
    reference = generate(fp, prompts, TINY_SETTINGS, seed=args.seed, batch_size=64, progress="FP")
    report = {"prompts": args.prompts, "seed": args.seed, "steps": TINY_SETTINGS.steps,
              "fp": _row(reference, None, prompts), "rows": []}
    print("FP", report["fp"], flush=True)
    q = QuantizationConfig()
    if args.content_weight is not None:
        q = replace(q, content_weight=args.content_weight)
    if args.normalise:
        q = replace(q, normalise=args.normalise)
    if args.sensitivity_prompts:
        q = replace(q, sensitivity_prompts=args.sensitivity_prompts)
    # (row, config): each ablation row adds one thing to the one before it
    uniform = replace(q, method="uniform", rounding="rtn")
    if args.ablation:
        variants = [("naive", replace(uniform, bos_aware=False)), ("+bos", uniform),
                    ("+gptq", replace(uniform, rounding="gptq")),
                    ("+sqnr-only", replace(q, objective="sqnr")), ("+decoupled", q),
                    ("mixdq-rtn", replace(q, rounding="rtn")),
                    ("mixdq-no-fp-acts", replace(q, fp_act_fraction=0.0)),
                    ("mixdq-floor-3", replace(q, min_weight_bits=3)),
                    ("uniform-mse", replace(q, method="uniform", weight_scale="mse")),
                    ("mixdq-mse", replace(q, weight_scale="mse")),
                    ("mixdq-in-context", replace(q, sensitivity_context="uniform", min_weight_bits=3)),
                    ("mixdq-in-context-no-floor", replace(q, sensitivity_context="uniform"))]
    elif args.objective_study:  # does the SSIM content metric earn its place? (issue #15)
        variants = [("decoupled", q), (f"decoupled-{4 * q.sensitivity_prompts}-prompts",
                                       replace(q, sensitivity_prompts=4 * q.sensitivity_prompts)),
                    ("sqnr-only", replace(q, objective="sqnr"))]
    elif args.allocation_study:  # the width floor and the groups' normalisation, on one sensitivity table
        variants = [("uniform", uniform)] + [
            (f"mixdq-{norm}-{'floor3' if floor else 'nofloor'}", replace(q, normalise=norm, min_weight_bits=floor))
            for norm in ("spread", "budget") for floor in (None, 3)]
    else:  # the baseline is uniform round-to-nearest; uniform-gptq separates GPTQ's gain from the allocation's
        variants = [("uniform", uniform), ("uniform-gptq", replace(uniform, rounding="gptq")), ("mixdq", q)]
    if args.only:
        variants = [v for v in variants if v[0] in args.only]
    for bits in args.bits:
        spec = parse_bits(bits)
        for name, config in variants:
            if config.method == "uniform" and spec.is_fractional:
                continue
            pipe = load_embedded(Path(args.weights))
            t = time.perf_counter()
            result = calibrate(pipe, spec, cal, TINY_SETTINGS, config, calibration=CalibrationConfig(batch_size=16),
                               run=MixDQRun(work_dir=args.work), progress=False)
            seconds = time.perf_counter() - t
            images = generate(pipe, prompts, TINY_SETTINGS, seed=args.seed, batch_size=64, progress=f"{bits} {name}")
            row = {"bits": bits, "method": name, "sensitivity_prompts": config.sensitivity_prompts,
                   "objective": config.objective, "rounding": config.rounding, "weight_scale": config.weight_scale,
                   **_row(images, reference, prompts),
                   "average_weight_bits": round(result.plan.average_weight_bits(), 3),
                   "fp_act_layers": sum(1 for lp in result.plan.layers.values() if lp.act_bits is None),
                   "fp_tokens": result.fp_tokens.to_dict(), "calibrate_seconds": round(seconds, 1)}
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

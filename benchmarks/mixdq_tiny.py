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
from pathlib import Path

import torch

from calibrate.calibration import calibrate
from calibrate.mixdq import width_floor
from qsched.core.bits import parse_bits
from qsched.runtime.generation import generate
from qsched.models.profiles import world_profile
from qsched.recipe import QuantizationConfig
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
    content_weight = q.content_weight if args.content_weight is None else args.content_weight
    mixdq_options = {"content_weight": content_weight, "fp_act_fraction": q.fp_act_fraction,
                     "min_weight_bits": width_floor(q.min_weight_bits, q.rounding), "normalise": args.normalise or q.normalise,
                     "sensitivity_context": q.sensitivity_context}
    scale, rounding = q.weight_scale, q.rounding
    # (row, method, options, BOS-aware, calibrate() extras): each ablation row adds one thing to the one before it
    rtn = {"weight_scale": scale, "rounding": "rtn"}
    default = {"weight_scale": scale, "rounding": rounding}
    mse = {"weight_scale": "mse", "rounding": rounding}
    if args.ablation:
        variants = [("naive", "uniform", {}, False, rtn), ("+bos", "uniform", {}, True, rtn),
                    ("+gptq", "uniform", {}, True, {**rtn, "rounding": "gptq"}),
                    ("+sqnr-only", "mixdq", {**mixdq_options, "groups": {"*": "quality"}}, True, default),
                    ("+decoupled", "mixdq", mixdq_options, True, default),
                    ("mixdq-rtn", "mixdq", {**mixdq_options, "min_weight_bits": width_floor(q.min_weight_bits, "rtn")},
                     True, rtn),
                    ("mixdq-no-fp-acts", "mixdq", {**mixdq_options, "fp_act_fraction": 0.0}, True, default),
                    ("mixdq-floor-3", "mixdq", {**mixdq_options, "min_weight_bits": 3}, True, default),
                    ("uniform-mse", "uniform", {}, True, mse), ("mixdq-mse", "mixdq", mixdq_options, True, mse),
                    ("mixdq-in-context", "mixdq", {**mixdq_options, "sensitivity_context": "uniform"}, True, default),
                    ("mixdq-in-context-no-floor", "mixdq",
                     {**mixdq_options, "sensitivity_context": "uniform", "min_weight_bits": None}, True, default)]
    elif args.allocation_study:  # the width floor and the groups' normalisation, on one sensitivity table
        variants = [("uniform", "uniform", {}, q.bos_aware, rtn)] + [
            (f"mixdq-{norm}-{'floor3' if floor else 'nofloor'}", "mixdq",
             {**mixdq_options, "normalise": norm, "min_weight_bits": floor}, q.bos_aware, default)
            for norm in ("spread", "budget") for floor in (None, 3)]
    else:  # the baseline is uniform round-to-nearest; uniform-gptq separates GPTQ's gain from the allocation's
        variants = [("uniform", "uniform", {}, q.bos_aware, rtn),
                    ("uniform-gptq", "uniform", {}, q.bos_aware, {**rtn, "rounding": "gptq"}),
                    ("mixdq", "mixdq", mixdq_options, q.bos_aware, default)]
    if args.only:
        variants = [v for v in variants if v[0] in args.only]
    for bits in args.bits:
        spec = parse_bits(bits)
        for name, method, options, bos_aware, extras in variants:
            if method == "uniform" and spec.is_fractional:
                continue
            pipe = load_embedded(Path(args.weights))
            options = dict(options)
            groups = options.pop("groups", None)
            mixdq = None
            if method == "mixdq":
                mixdq = {"sensitivity_prompts": q.sensitivity_prompts, "weight_widths": q.weight_widths,
                         "act_widths": q.act_widths, "work_dir": args.work, **options}
            t = time.perf_counter()
            result = calibrate(pipe, spec, cal, TINY_SETTINGS, seed=0, batch_size=16, groups=groups, progress=False,
                               method=method, mixdq=mixdq, bos_aware=bos_aware, **extras)
            seconds = time.perf_counter() - t
            images = generate(pipe, prompts, TINY_SETTINGS, seed=args.seed, batch_size=64, progress=f"{bits} {name}")
            row = {"bits": bits, "method": name, **extras, **_row(images, reference, prompts),
                   "average_weight_bits": round(result.plan.average_weight_bits(), 3),
                   "fp_act_layers": sum(1 for lp in result.plan.layers.values() if lp.act_bits is None),
                   "fp_tokens": result.fp_tokens.to_dict(), "calibrate_seconds": round(seconds, 1)}
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

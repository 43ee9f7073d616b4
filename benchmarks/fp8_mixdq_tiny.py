"""MixDQ's FP8-or-FP choice on flux-tiny against uniform FP8, at several ``quantization.fp8_budget_bits``.

Each row is a compile of the embedded flux-tiny at ``--bits fp8`` (Q-Sched and the cache search off, no report,
so the rows differ only in the bit plan), scored by the compile's own fidelity record against FP on the
evaluation prompts: PSNR, SSIM and the judge's accuracy, with how many layers stayed FP and the plan's
size-weighted average weight width (FP layers count 16 bits).

    python benchmarks/fp8_mixdq_tiny.py --budgets 8 9 10 --eval-prompts 16 --out bench-out/fp8-mixdq-tiny.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import qsched
from qsched.recipe import parse_recipe


def _row(label: str, artifact, seconds: float) -> dict:
    m = artifact.manifest
    fidelity = m["metrics"]["fidelity"]
    layers = list(m["bit_plan"]["layers"].values())
    average = sum(l["params"] * (l.get("weight_bits") or 16) for l in layers) / sum(l["params"] for l in layers)
    return {"plan": label, "method": m["bit_plan"]["method"], "fp_layers": sum(l.get("weight_bits") is None for l in layers),
            "layers": len(layers), "average_weight_bits": round(average, 3), "psnr_vs_fp_db": fidelity.get("psnr_vs_fp"),
            "ssim_vs_fp": fidelity.get("ssim_vs_fp"), "accuracy": fidelity.get("accuracy"),
            "fp_accuracy": fidelity.get("fp_accuracy"), "compile_s": round(seconds, 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[8.0, 9.0, 10.0])
    p.add_argument("--eval-prompts", type=int, default=16)
    p.add_argument("--calibration-prompts", type=int, default=16)
    p.add_argument("--sensitivity-prompts", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench-out/fp8-mixdq-tiny.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = {"calibration": {"prompts": args.calibration_prompts, "batch_size": 8},
            "quantization": {"sensitivity_prompts": args.sensitivity_prompts},
            "coefficients": {"enabled": False}, "cache_search": {"enabled": False}, "report": {"samples": 0}}
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for label, uniform, budget in [("uniform fp8", True, None)] + [(f"mixdq fp8, budget {b:g}", False, b)
                                                                         for b in args.budgets]:
            data = json.loads(json.dumps(base))
            if budget is not None:
                data["quantization"]["fp8_budget_bits"] = budget
            start = time.perf_counter()
            art = qsched.compile("flux-tiny", "fp8", out=Path(root) / f"art-{len(rows)}", recipe=parse_recipe(data),
                                 uniform=uniform, eval_prompts=args.eval_prompts, progress=False)
            rows.append(_row(label, art, time.perf_counter() - start))
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""The default compile of flux-tiny against ``--uniform``, each as a user gets it, side by side.

Both run the whole default compile (the shipped recipe: MixDQ or uniform widths, then Q-Sched and the
cache search), are loaded back with ``export.load`` (scheduler coefficients and cache schedule applied,
drawing at the artifact's call defaults) and generate the same held-out prompts and seeds as the FP
model. Reported per artifact: judged accuracy (±95 %), PSNR/SSIM against FP, average weight bits, the
chosen cache point's MAC fraction, and the compile's wall time (on whatever machine runs it: say which).

    python benchmarks/default_vs_uniform.py --prompts 1024 --out bench-out/default-vs-uniform.json
    python benchmarks/default_vs_uniform.py --prompts 1024 --quantization-only --work bench-out/dvu-q \
        --out bench-out/default-vs-uniform-quantization.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import qsched
from qsched.runtime.generation import generate
from qsched.metrics import confidence_interval, psnr, ssim
from qsched.models.profiles import world_profile
from qsched.tinyworld.judge import judge
from qsched.tinyworld.model import TINY_SETTINGS, load_embedded


def _row(images, reference, prompts) -> dict:
    verdict = judge(images, prompts)
    return {"accuracy": round(float(verdict.accuracy), 4),
            "ci95": round(confidence_interval(verdict.accuracy, len(prompts)), 4),
            "psnr_vs_fp": round(float(psnr(reference, images).mean()), 3),
            "ssim_vs_fp": round(float(ssim(reference, images).mean()), 4)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", default="w4a8")
    p.add_argument("--prompts", type=int, default=1024, help="held-out prompts (the evaluation purpose's pool)")
    p.add_argument("--seed", type=int, default=2024, help="prompt draw and noise seed")
    p.add_argument("--work", default="bench-out/default-vs-uniform", help="where the two artifacts are written")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--quantization-only", action="store_true",
                   help="--no-qsched --no-cache-search for both: the allocation's effect alone")
    args = p.parse_args(argv)

    prompts = world_profile().prompts("evaluation", args.prompts, args.seed)
    reference = generate(load_embedded(), prompts, TINY_SETTINGS, seed=args.seed, batch_size=64)
    import export
    rows = {"fp": {**_row(reference, reference, prompts), "psnr_vs_fp": None, "ssim_vs_fp": None}}
    for name, uniform in (("default", False), ("uniform", True)):
        out = Path(args.work) / name
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        art = qsched.compile("flux-tiny", args.bits, out=out, uniform=uniform, progress=False, overwrite=True,
                             coefficients=not args.quantization_only, cache_search=not args.quantization_only)
        seconds = time.perf_counter() - start
        pipe = export.load(out)
        images = generate(pipe, prompts, TINY_SETTINGS, seed=args.seed, batch_size=64)
        cache = art.manifest["stages"]["cache_search"]
        rows[name] = {**_row(images, reference, prompts), "method": art.manifest["stages"]["calibrate"]["method"],
                      "average_weight_bits": art.manifest["stages"]["calibrate"]["average_weight_bits"],
                      "qsched": art.manifest["stages"]["coefficients"]["status"],
                      "cache_mac_fraction": cache.get("mac_fraction"), "compile_seconds": round(seconds, 1),
                      "stage_seconds": art.manifest["timings_s"]}
        print(name, json.dumps(rows[name]), flush=True)
    result = {"bits": args.bits, "prompts": len(prompts), "seed": args.seed, "rows": rows,
              "quantization_only": args.quantization_only}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

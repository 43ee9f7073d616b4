"""A LoRA on compressed flux-tiny: does it change the images the way it changes the FP model's?

Trains flux-tiny's style LoRA (:mod:`qsched.tinyworld.lora`, colour-inverted renders, peft), then for each
artifact and runtime generates held-out world prompts (test split, seeds 0..) four ways: FP, FP + LoRA,
compressed and compressed + LoRA (``pipe.load_lora_weights``). The compressed pipeline is taken twice:
as ``export.load`` returns it (``pipeline``: Q-Sched scheduler and cache schedule included) and as its
quantized denoiser alone (``denoiser``: the base scheduler, no cache), since the scheduler coefficients were
learned for the base model (``psnr_fp_lora_with_qsched_vs_fp_lora_db``: those coefficients on FP + LoRA), and
on the simulated runtime a third time with its activation quantizers off (``denoiser-wa16``: the static
activation ranges were calibrated without the LoRA). Reports mean PSNR of compressed vs FP (the
plain figure), of compressed + LoRA vs FP + LoRA (which should stay close to it) and of each pipeline with
and without the LoRA (how much the adapter moves the images).

    python benchmarks/lora_tiny.py --artifacts out/flux-tiny-w4a8 --prompts 64 --out bench-out/lora-tiny.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import export
from qsched.metrics import psnr
from qsched.runtime.generation import GenerationSettings, generate
from qsched.runtime.qlayers import float_activations_
from qsched.tinyworld.lora import save_style_lora, train_style_lora
from qsched.tinyworld.model import load_embedded
from qsched.tinyworld.world import sample_batch


def _mean_psnr(a, b) -> float:
    return round(float(psnr(a, b).mean()), 2)


def _denoiser_only(pipe) -> None:
    if getattr(pipe, "qsched_cache", None) is not None:
        pipe.qsched_cache.disable()
        pipe.qsched_cache = None
    if hasattr(pipe.scheduler, "unwrap"):
        pipe.scheduler = pipe.scheduler.unwrap()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", nargs="+", default=["out/flux-tiny-w4a8"])
    p.add_argument("--runtimes", nargs="+", default=["simulated", "native"])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--lora-steps", type=int, default=60)
    p.add_argument("--out", default="bench-out/lora-tiny.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    _, prompts = sample_batch(seed=2024, n=args.prompts, split="test")
    fp = load_embedded()
    t0 = time.perf_counter()
    state = train_style_lora(fp, steps=args.lora_steps, seed=0)
    result = {"prompts": len(prompts), "lora_steps": args.lora_steps, "lora_train_s": round(time.perf_counter() - t0, 1),
              "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        lora = save_style_lora(state, tmp)
        for art in args.artifacts:
            settings = GenerationSettings(**json.loads((Path(art) / "manifest.json").read_text())["generation"])
            fp.unload_lora_weights()
            fp_plain = generate(fp, prompts, settings, seed=0)
            fp.load_lora_weights(lora, adapter_name="style")
            fp_lora = generate(fp, prompts, settings, seed=0)
            variants = [(r, v) for r in args.runtimes for v in ("pipeline", "denoiser")]
            if "simulated" in args.runtimes:
                variants.append(("simulated", "denoiser-wa16"))
            for runtime, variant in variants:
                pipe = export.load(art, runtime=runtime)
                if variant.startswith("denoiser"):  # the quantized denoiser alone: the base scheduler, every step computed
                    _denoiser_only(pipe)
                if variant == "denoiser-wa16":  # its activation quantizers off: separates the activation ranges
                    float_activations_(pipe.transformer)  # (calibrated without the LoRA) from the weights
                plain = generate(pipe, prompts, settings, seed=0)
                t0 = time.perf_counter()
                pipe.load_lora_weights(lora, adapter_name="style")
                load_s = time.perf_counter() - t0
                with_lora = generate(pipe, prompts, settings, seed=0)
                row = {"artifact": art, "runtime": runtime, "variant": variant, "lora_load_s": round(load_s, 2),
                       "psnr_compressed_vs_fp_db": _mean_psnr(plain, fp_plain),
                       "psnr_compressed_lora_vs_fp_lora_db": _mean_psnr(with_lora, fp_lora),
                       "psnr_fp_vs_fp_lora_db": _mean_psnr(fp_plain, fp_lora),
                       "psnr_compressed_vs_compressed_lora_db": _mean_psnr(plain, with_lora),
                       "qsched_scheduler": type(pipe.scheduler).__name__,
                       "cache_schedule": getattr(pipe, "qsched_cache", None) is not None}
                if variant == "pipeline" and hasattr(pipe.scheduler, "unwrap"):  # the coefficients alone, on FP
                    base = fp.scheduler
                    fp.scheduler = pipe.scheduler
                    try:
                        fp_lora_qsched = generate(fp, prompts, settings, seed=0)
                    finally:
                        fp.scheduler = base
                    row["psnr_fp_lora_with_qsched_vs_fp_lora_db"] = _mean_psnr(fp_lora_qsched, fp_lora)
                result["rows"].append(row)
                print(json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

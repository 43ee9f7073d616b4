"""GGUF export of a compiled artifact, loaded by diffusers' single-file loader: images against our runtimes, sizes.

Copies the artifact (default ``out/flux-tiny-w4a8``) to a temporary folder, adds ``gguf/`` with
:func:`export.gguf_export.export_gguf`, loads it with diffusers' ``from_single_file(...,
quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))`` (:func:`~export.gguf_export.load_gguf_denoiser`)
and generates the artifact's evaluation prompts (same seeds, Q-Sched scheduler, no cache) with it and with our
simulated runtime at W*A16 (the same artifact with its activation quantizers switched off: GGUF has none)
and at the artifact's own widths.

    python benchmarks/gguf_tiny.py --artifact out/flux-tiny-w4a8 --out bench-out/gguf-tiny.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import export
from export.gguf_export import export_gguf, load_gguf_denoiser
from qsched.metrics import psnr
from qsched.runtime.generation import GenerationSettings, generate
from qsched.runtime.qlayers import float_activations_


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", default="out/flux-tiny-w4a8")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--out", default="bench-out/gguf-tiny.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(tmp) / "art"
        shutil.copytree(args.artifact, art)
        t0 = time.perf_counter()
        record = export_gguf(art)
        export_s = time.perf_counter() - t0
        manifest = json.loads((art / "manifest.json").read_text())
        settings = GenerationSettings(**manifest["generation"])
        prompts = (list(manifest.get("eval_prompts") or []) + list(manifest.get("calibration_prompts") or []))[:args.prompts]
        pipe = export.load(art)
        if getattr(pipe, "qsched_cache", None) is not None:
            pipe.qsched_cache.disable()
        ours_wa = generate(pipe, prompts, settings, seed=0)
        float_activations_(pipe.transformer)  # W*A16: the same weights, activations in floating point
        ours_a16 = generate(pipe, prompts, settings, seed=0)
        t0 = time.perf_counter()
        pipe.transformer = load_gguf_denoiser(art, compute_dtype=torch.float32)
        load_s = time.perf_counter() - t0
        theirs = generate(pipe, prompts, settings, seed=0)
        sizes = {rel: e["bytes"] for rel, e in manifest["files"].items()
                 if rel in manifest["denoiser"]["shards"] or rel.endswith(".gguf")}
        result = {"artifact": args.artifact, "bits": manifest["bits"], "prompts": len(prompts),
                  "psnr_gguf_vs_ours_wa16_db": [round(float(x), 2) for x in psnr(theirs, ours_a16)],
                  "psnr_gguf_vs_ours_artifact_widths_db": [round(float(x), 2) for x in psnr(theirs, ours_wa)],
                  "psnr_ours_wa16_vs_ours_artifact_widths_db": [round(float(x), 2) for x in psnr(ours_a16, ours_wa)],
                  "bytes": sizes, "gguf_counts": record["counts"], "substitutions": len(record["substitutions"]),
                  "fused": {k: v["type"] for k, v in record["fused"].items()}, "not_carried": record["not_carried"],
                  "export_s": round(export_s, 2), "load_s": round(load_s, 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

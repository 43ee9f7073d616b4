"""Full-size FLUX transformer latency and memory: BF16 against the native W8A8 / W4A8 runtimes (issue 7).

The FLUX.1-schnell transformer (12 B parameters, from the shipped config) is built at random init
directly on the device, block by block from one seed, so every variant holds identical weights. The
quantized variants replace each block's linears by :class:`qsched.runtime.qlayers.QuantLayer` (uniform
round-to-nearest, per-output-channel scales) and immediately by the native runtime layers of
:func:`export.runtime_torch.to_native_` (int8 x int8 ``torch._int_mm`` for W8A8; packed int4 unpacked on
the fly for W4A8), so the simulated FP copy never exists for more than one block. Activation ranges come
from one BF16 forward pass on the benchmark's own inputs (random weights: the ranges are placeholders,
the arithmetic is the real one).

What is timed: ``--steps`` denoiser calls (the sampler's transformer work for a ``--height`` x ``--width``
image; text encoders, VAE and scheduler excluded), median over ``--repeat`` rounds after ``--warmup``.
Memory: bytes of the model's tensors, and the peak CUDA memory of one timed round
(``torch.cuda.max_memory_allocated``). Variants run one after the other in one process; ratios are
against BF16 in the same run.

    python benchmarks/flux_full_latency.py --device cuda --out bench-out/flux-full-latency.json
    python benchmarks/flux_full_latency.py --device cuda --compile off regional   # eager, then compiled
    # issue 18's GPU table (BF16 eager/compiled against W8A8 int8, FP8, W4A8), in one run:
    python benchmarks/flux_full_latency.py --device cuda --variants bf16 w8a8 fp8 w4a8 --compile off regional \
        --repeat 3 --warmup 1 --out bench-out/flux-full-latency.json
    # CPU smoke test (2 double + 2 single blocks, 128x128):
    python benchmarks/flux_full_latency.py --device cpu --double-blocks 2 --single-blocks 2 \\
        --height 128 --width 128 --text-tokens 16 --repeat 1 --warmup 0 --out /tmp/flux-full-smoke.json
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from qsched.runtime.apply import set_submodule
from qsched.runtime.qlayers import QuantLayer
from calibrate.statistics import observe_inputs
from export.loader import compile_denoiser
from export.runtime_torch import to_native_
from qsched.models.adapters import adapter_for
from qsched.models.shipped_configs import build_denoiser, load_component_config

#: variant -> (weight bits, activation bits, format); fp8 is e4m3 W8A8 (``torch._scaled_mm`` on sm89+)
VARIANTS = {"bf16": (None, None, "int"), "w8a8": (8, 8, "int"), "fp8": (8, 8, "fp8"), "w4a8": (4, 8, "int"),
            "w4a16": (4, None, "int")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_random(model: str, device: torch.device, seed: int, double: int | None, single: int | None) -> nn.Module:
    """The denoiser at random init (std 0.02 weights, zero biases), materialised block by block on ``device``."""
    denoiser = build_denoiser(model, device="meta", dtype=torch.bfloat16)
    if double is not None:
        denoiser.transformer_blocks = denoiser.transformer_blocks[:double]
    if single is not None:
        denoiser.single_transformer_blocks = denoiser.single_transformer_blocks[:single]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for child in denoiser.children():
        parts = list(child) if isinstance(child, nn.ModuleList) else [child]
        for part in parts:
            part.to_empty(device=device)
            with torch.no_grad():
                for name, p in part.named_parameters():
                    if p.dim() >= 2:
                        p.copy_(torch.randn(p.shape, generator=gen).mul_(0.02).to(p.dtype))
                    elif name.endswith("bias"):
                        p.zero_()
                    else:
                        p.fill_(1.0)  # norm scales
    for name, buf in list(denoiser.named_buffers()):
        if buf.is_meta:  # none in FLUX today; rebuilt here if a diffusers version adds one
            raise RuntimeError(f"buffer {name} was not materialised")
    return denoiser.eval()


def make_inputs(config: dict, batch: int, height: int, width: int, text_tokens: int, device) -> dict:
    """Denoiser inputs of the right shapes for a ``height`` x ``width`` image (FLUX packs 2x2 latent patches)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    image_tokens = (height // 16) * (width // 16)
    dtype = torch.bfloat16
    inputs = {
        "hidden_states": torch.randn(batch, image_tokens, config["in_channels"], generator=gen).to(device, dtype),
        "encoder_hidden_states": torch.randn(batch, text_tokens, config["joint_attention_dim"], generator=gen).to(device, dtype),
        "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], generator=gen).to(device, dtype),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
        "img_ids": torch.zeros(image_tokens, 3, device=device),
        "txt_ids": torch.zeros(text_tokens, 3, device=device),
    }
    rows, cols = torch.meshgrid(torch.arange(height // 16), torch.arange(width // 16), indexing="ij")
    inputs["img_ids"][:, 1], inputs["img_ids"][:, 2] = rows.reshape(-1).float(), cols.reshape(-1).float()
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return inputs


def activation_ranges(denoiser: nn.Module, inputs: dict) -> dict[str, tuple[float, float]]:
    layers = adapter_for(denoiser).quantizable_layers(denoiser)
    with observe_inputs(layers) as observers, torch.inference_mode():
        denoiser(**inputs, return_dict=False)
    return {n: o.range for n, o in observers.items()}


def quantize_native_(denoiser: nn.Module, weight_bits: int, act_bits: int | None, ranges: dict,
                     format: str = "int") -> dict[str, int]:
    """Uniform RTN then the native runtime, one layer at a time (peak: one layer's simulated FP copy)."""
    paths: dict[str, int] = {}
    for name, module in adapter_for(denoiser).quantizable_layers(denoiser).items():
        quant = QuantLayer.from_module(module, weight_bits, act_bits, ranges.get(name) if act_bits else None,
                                       format=format)
        set_submodule(denoiser, name, quant)
        for path, count in to_native_(denoiser.get_submodule(name.rpartition(".")[0]) if "." in name else denoiser).items():
            paths[path] = paths.get(path, 0) + count
    return paths


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def time_variant(model, inputs: dict, steps: int, repeat: int, warmup: int, device: torch.device) -> dict:
    """Median of ``repeat`` rounds of ``steps`` calls, after one untimed-for-the-median first call (timed
    apart as ``first_call_s``: it includes any compilation) and ``warmup`` more rounds."""
    def run():
        out = None
        for _ in range(steps):
            out = model(**inputs, return_dict=False)[0]
        return out

    with torch.inference_mode():
        start = time.perf_counter()
        model(**inputs, return_dict=False)
        _sync(device)
        first = time.perf_counter() - start
        for _ in range(warmup):
            run()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            out = run()
            _sync(device)
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "first_call_s": round(first, 3), "peak_bytes": peak, "output": out.float().cpu()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-schnell", help="shipped FLUX config (flux-schnell or flux-dev)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--text-tokens", type=int, default=256, help="T5 tokens (schnell's max_sequence_length)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="denoiser calls per timed round")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", nargs="+", default=["off"], choices=("off", "full", "regional"),
                   help="time each variant in each of these modes, in order, on the same weights (export.load's "
                        "compile modes; e.g. --compile off regional)")
    p.add_argument("--double-blocks", type=int, default=None, help="keep only the first N double blocks (smoke tests)")
    p.add_argument("--single-blocks", type=int, default=None, help="keep only the first N single blocks (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-out/flux-full-latency.json")
    args = p.parse_args(argv)
    if args.compile not in (["off"], ["full"], ["regional"], ["off", "full"], ["off", "regional"]):
        p.error("--compile takes off and at most one of full / regional, off first (a compile is applied in place)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU; pass --device cpu for a smoke test")
    config = load_component_config(args.model, "transformer")
    inputs = make_inputs(config, args.batch, args.height, args.width, args.text_tokens, device)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or platform.machine()}
    report = {"env": env, "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": []}
    print(f"{args.model} transformer, {args.height}x{args.width}, {args.steps} steps, batch {args.batch} on {env['device']}")

    ranges, reference = None, None
    for variant in args.variants:
        weight_bits, act_bits, form = VARIANTS[variant]
        t0 = time.perf_counter()
        model = build_random(args.model, device, args.seed, args.double_blocks, args.single_blocks)
        if ranges is None and any(VARIANTS[v][1] for v in args.variants):
            ranges = activation_ranges(model, inputs)
        paths = quantize_native_(model, weight_bits, act_bits, ranges, form) if weight_bits else {}
        build_s = time.perf_counter() - t0
        for mode in args.compile:  # modes in order on the same weights; off must come before a compile
            torch._dynamo.reset()
            if mode != "off":
                compile_denoiser(model, mode)
            timing = time_variant(model, inputs, args.steps, args.repeat, args.warmup, device)
            out = timing.pop("output")
            if reference is None:
                reference = out
            rel = float((out - reference).abs().max() / reference.abs().max())
            row = {"variant": variant, "compile": mode, "state_bytes": state_bytes(model), "build_s": round(build_s, 1),
                   "layer_paths": paths, "max_rel_diff_vs_first": rel, **timing}
            report["rows"].append(row)
            peak = f"{row['peak_bytes'] / 2**30:6.2f} GiB peak" if row["peak_bytes"] else ""
            print(f"  {variant:<6} {mode:<8} {row['median_s'] * 1000:9.1f} ms  first call {row['first_call_s']:7.1f} s  "
                  f"weights {row['state_bytes'] / 2**30:6.2f} GiB  {peak}  max|Δ|/max vs first row {rel:.3f}  "
                  f"paths {paths}", flush=True)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = report["rows"][0]
    for row in report["rows"]:
        row["speedup_vs_first"] = round(base["median_s"] / row["median_s"], 3)
        row["memory_ratio_vs_first"] = round(base["state_bytes"] / row["state_bytes"], 3)
    print(f"\nvariant  compile   speed-up vs {base['variant']} {base['compile']}  smaller-by")
    for row in report["rows"]:
        print(f"{row['variant']:<8} {row['compile']:<9} {row['speedup_vs_first']:8.2f}x {row['memory_ratio_vs_first']:9.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()

"""Artifact size at real scale: a registry denoiser (FLUX.1-schnell by default) at random init.

The full transformer does not fit in this machine's memory in BF16 (23.8 GB), so it is built on the meta
device and each top-level block is materialised, quantized (uniform round-to-nearest, the same QuantLayer
the compiler uses), packed and streamed into a real artifact, one safetensors shard per block. Sizes are
read back from disk. Weights are random (normal, std 0.02): the size of a packed artifact does not depend
on the values; activation ranges are placeholders since nothing is calibrated here.

    python benchmarks/artifact_size.py --model flux-schnell --bits w8a8 w4a8 --out bench-out/size
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from qsched.runtime.apply import set_submodule
from qsched.runtime.qlayers import QuantLayer
from export.format import write_artifact
from export.save import denoiser_tensors, layer_specs
from qsched.models.adapters import adapter_for
from qsched.core.bits import parse_bits
from qsched.models.shipped_configs import build_denoiser


def materialise(module: nn.Module, seed: int) -> None:
    """Allocate a meta module on the CPU with deterministic random weights."""
    module.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def block_shards(denoiser: nn.Module, weight_bits: int, act_bits: int | None, specs: dict, seed: int):
    """Yield (shard name, tensors) per top-level child, quantizing every linear/conv in it."""
    adapter = adapter_for(denoiser)
    quantizable = set(adapter.quantizable_layers(denoiser))
    units = []
    for name, child in denoiser.named_children():
        if isinstance(child, nn.ModuleList):
            units += [(f"{name}.{i}", sub) for i, sub in enumerate(child)]
        else:
            units.append((name, child))
    covered = set()
    for index, (prefix, unit) in enumerate(units):
        materialise(unit, seed + index)
        for sub, module in list(unit.named_modules()):
            full = f"{prefix}.{sub}" if sub else prefix
            if full in quantizable:
                quant = QuantLayer.from_module(module, weight_bits, act_bits, (-4.0, 4.0) if act_bits else None)
                if sub:
                    set_submodule(unit, sub, quant)
                else:
                    set_submodule(denoiser, prefix, quant)
                    unit = quant
        specs.update({f"{prefix}.{k}" if k else prefix: v for k, v in layer_specs(unit).items()})
        tensors = {f"{prefix}.{k}": v for k, v in denoiser_tensors(unit).items()}
        covered.update(tensors)
        unit.to("meta")  # free the block before the next one
        yield f"transformer-{index:05d}.safetensors", tensors
    gen = torch.Generator().manual_seed(seed - 1)
    own = {k: torch.randn(v.shape, generator=gen).mul_(0.02).to(v.dtype)
           for k, v in denoiser.state_dict().items() if "." not in k}
    if own:  # tensors registered directly on the denoiser (PixArt's scale_shift_table; none in FLUX)
        yield "transformer-top.safetensors", own


def measure(model: str, bits: str, out: Path, seed: int, keep: bool) -> dict:
    spec = parse_bits(bits)
    with torch.device("meta"):
        denoiser = build_denoiser(model, device="meta", dtype=torch.bfloat16)
    params = sum(p.numel() for p in denoiser.parameters())
    linear_params = sum(m.weight.numel() for m in adapter_for(denoiser).quantizable_layers(denoiser).values())
    specs: dict = {}
    target = out / f"{model}-{spec}"
    t0 = time.perf_counter()
    manifest = {"source": {"model": model, "kind": "registry-random", "seed": seed}, "bits": str(spec),
                "note": "size benchmark: random weights, placeholder activation ranges"}
    shards = block_shards(denoiser, spec.uniform_weight_bits, spec.act_bits if spec.quantize_activations else None,
                          specs, seed)
    path = write_artifact(target, manifest, shards, overwrite=True)
    seconds = time.perf_counter() - t0
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    shard_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    ideal_codes = linear_params * spec.uniform_weight_bits / 8
    ideal_total = ideal_codes + (params - linear_params) * 2  # FP leftovers in BF16
    result = {"model": model, "bits": str(spec), "params": params, "quantized_params": linear_params,
              "bf16_bytes": params * 2, "artifact_bytes": on_disk, "shard_bytes": shard_bytes,
              "ideal_bytes": int(ideal_total), "compression_vs_bf16": round(params * 2 / on_disk, 4),
              "packing_overhead_pct": round(100 * (on_disk / ideal_total - 1), 3),
              "layers": len(specs), "seconds": round(seconds, 1)}
    if not keep:
        shutil.rmtree(path)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-schnell")
    p.add_argument("--bits", nargs="+", default=["w8a8", "w4a8"])
    p.add_argument("--out", default="bench-out/size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the written artifacts")
    args = p.parse_args(argv)
    results = [measure(args.model, b, Path(args.out), args.seed, args.keep) for b in args.bits]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.model}.json").write_text(json.dumps(results, indent=2))
    for r in results:
        print(f"{r['model']} {r['bits']}: BF16 {r['bf16_bytes'] / 1e9:.3f} GB -> artifact {r['artifact_bytes'] / 1e9:.3f} GB "
              f"({r['compression_vs_bf16']:.3f}x), overhead over ideal packing {r['packing_overhead_pct']:.2f}%, "
              f"{r['layers']} layers, {r['seconds']} s")


if __name__ == "__main__":
    main()

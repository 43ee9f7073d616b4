"""torchao's kernels against ours on one FLUX linear: which backend each quantized layer form should use.

Issue 18 asks to use a well-kept library's kernel wherever it beats ours for the same arithmetic. This puts
torchao's quantized linears (``torchao.quantization.quantize_`` on an ``nn.Linear``) beside the native
layers ``export.load(..., runtime="native")`` builds, side by side in one run, on one FLUX-size linear
(3072 -> 12288, the single-stream MLP up-projection) at ``--tokens`` rows:

* the reference: the float linear in the compute dtype (fp32 on a CPU, bf16 on a GPU), eager and compiled;
* ours (compiled, as ``export.load(compile=...)`` runs them): W8A8 int8 (``NativeInt8Linear``, static
  activation scale, ``torch._int_mm``), FP8 (``NativeFP8Linear``, ``torch._scaled_mm`` on sm89+, else the
  exact emulation), W4A16 (``NativeDequantLayer``: packed nibbles unpacked and dequantized per call);
* torchao (compiled): int8 with a static per-tensor activation scale (the arithmetic of our W8A8 but
  symmetric activations), int8 with dynamic per-token activations, FP8 dynamic per row and FP8 static per
  tensor (GPUs of compute capability 8.9+ only), and int4 weight-only with groups of 128 (tinygemm's
  ``tile_packed_to_4d`` layout on CUDA).

Per row: median ms, the ratio reference-eager ms / ms (> 1 is faster), the layer's weight bytes, and the
largest difference from the float output relative to its largest value (what each quantization costs;
torchao's int4 groups and symmetric activations are not our grids, so this is not a bit-identity check).
A variant the installed torch/torchao or the device cannot run is listed with the reason, not dropped.

    python benchmarks/torchao_backends.py --tokens 64 --repeats 1                   # CPU smoke test
    python benchmarks/torchao_backends.py --device cuda --tokens 4096 --repeats 20  # H100/H200 (scripts/gpu_checks.sh)

Needs ``pip install torchao`` (checked with 0.18.0); without it only our rows run.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from export.loader import compile_denoiser  # noqa: E402
from export.runtime_torch import NativeDequantLayer, NativeFP8Linear, NativeInt8Linear  # noqa: E402
from runtime_latency import median_seconds, quant_layer  # noqa: E402

ACT_RANGE = (-4.0, 6.0)  # the static activation range every static variant is calibrated to


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, looking inside tensor subclasses (torchao's quantized weights)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def module_bytes(module: nn.Module) -> int:
    return sum(tensor_bytes(t) for t in list(module.parameters()) + list(module.buffers()))


def ours(weight: torch.Tensor, bias: torch.Tensor) -> dict[str, callable]:
    """Builders of our native layers (weights in the compute dtype before quantization)."""
    return {"qsched W8A8 int8": lambda: NativeInt8Linear(quant_layer(weight, bias, 8, 8, ACT_RANGE)),
            "qsched FP8": lambda: NativeFP8Linear(quant_layer(weight, bias, 8, 8, ACT_RANGE, format="fp8")),
            "qsched W4A16": lambda: NativeDequantLayer(quant_layer(weight, bias, 4, None, ACT_RANGE))}


def torchao_configs(ndim: int) -> dict[str, callable]:
    """torchao configs by row name (each a callable, so one that fails to build is reported, not fatal)."""
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                      Float8StaticActivationFloat8WeightConfig, Int4WeightOnlyConfig,
                                      Int8DynamicActivationInt8WeightConfig, Int8StaticActivationInt8WeightConfig)
    from torchao.quantization.granularity import PerRow, PerTensor

    lo, hi = ACT_RANGE
    int8_scale = torch.full((1,) * ndim, max(-lo, hi) / 127.0)  # symmetric: torchao's static int8 activations
    fp8_scale = torch.full((1,) * ndim, max(-lo, hi) / 448.0)
    return {
        "torchao W8A8 int8 static": lambda: Int8StaticActivationInt8WeightConfig(act_quant_scale=int8_scale,
                                                                                 granularity=PerTensor()),
        "torchao W8A8 int8 dynamic": lambda: Int8DynamicActivationInt8WeightConfig(),
        "torchao FP8 dynamic per row": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        "torchao FP8 static": lambda: Float8StaticActivationFloat8WeightConfig(act_quant_scale=fp8_scale,
                                                                              granularity=PerTensor()),
        "torchao W4A16 g128": lambda: Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
    }


def build_torchao(linear: nn.Linear, config, device: torch.device) -> nn.Module:
    from torchao.quantization import quantize_

    module = copy.deepcopy(linear)
    config = config()
    for name in ("act_quant_scale", "scale"):  # static scales live on the layer's device
        value = getattr(config, name, None)
        if isinstance(value, torch.Tensor):
            setattr(config, name, value.to(device))
    quantize_(module, config)
    return module


def run(device: torch.device, tokens: list[int], repeats: int, warmup: int) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    k, n = 3072, 12288
    weight = (torch.randn(n, k, generator=gen) * 0.02).to(device, dtype)
    bias = (torch.randn(n, generator=gen) * 0.01).to(device, dtype)
    linear = nn.Linear(k, n, device=device, dtype=dtype).eval()
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)

    builders: dict[str, callable] = {"reference eager": lambda: linear, "reference compiled": lambda: linear}
    builders.update(ours(weight, bias))
    try:
        import torchao  # noqa: F401
        for name, config in torchao_configs(2).items():
            builders[name] = lambda config=config: build_torchao(linear, config, device)
    except ImportError as err:
        print(f"torchao not installed ({err}); only our rows run", file=sys.stderr)

    rows = []
    for m in tokens:
        x = (torch.randn(m, k, generator=gen) * 1.5).to(device, dtype)
        with torch.inference_mode():
            reference = F.linear(x, weight, bias).float()
        base_ms = None
        for name, build in builders.items():
            row = {"tokens": m, "variant": name, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
            try:
                module = build()
                if name != "reference eager":
                    module = copy.deepcopy(module) if name == "reference compiled" else module
                    compile_denoiser(module, "full")
                with torch.inference_mode():
                    out = module(x).float()
                timing = median_seconds(lambda: module(x), repeats, warmup, device)
                row.update(ms=timing["median_ms"], weight_bytes=module_bytes(module),
                           max_rel_diff=float((out - reference).abs().max() / reference.abs().max()))
                base_ms = row["ms"] if name == "reference eager" else base_ms
                row["vs_reference_eager"] = base_ms / row["ms"] if base_ms else None
            except Exception as err:  # a variant this torch/torchao/device cannot run is reported, not fatal
                first = (str(err).strip().splitlines() or [""])[0]
                row["skipped"] = f"{type(err).__name__}: {first[:160]}"
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    if "skipped" in row:
        return f"| {row['tokens']} | {row['variant']} | skipped: {row['skipped']} | | | |"
    ratio = f"{row['vs_reference_eager']:.2f}x" if row.get("vs_reference_eager") else ""
    return (f"| {row['tokens']} | {row['variant']} | {row['ms']:.3f} | {ratio} | {row['weight_bytes'] / 2**20:.1f} | "
            f"{row['max_rel_diff']:.2e} |")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (compiling) call")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on a CPU")
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    device = torch.device(args.device)
    print("| tokens | variant | ms | vs reference eager | weight MiB | max rel diff vs float |")
    print("|---|---|---:|---:|---:|---:|")
    rows = run(device, args.tokens, args.repeats, args.warmup)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()

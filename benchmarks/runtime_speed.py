"""Eager against torch.compile, fp32 against the native runtime: what compiling buys on this CPU.

Side by side in one run (median of ``--repeats`` timed calls after one untimed warm-up call, which for the
compiled variants is the compile; its time is reported separately):

1. FLUX-size linears (3072 -> 12288, the single-stream MLP up-projection, and with ``--down`` the
   12288 -> 3072 down-projection) at ``--tokens`` rows: fp32, native W8A8 (``torch._int_mm``, input
   quantization and rescale included), native W4A8 (packed nibbles dequantized per call) and FP8 W8A8
   (``export.runtime_torch.NativeFP8Linear``: e4m3 codes; on this CPU its exact fp32 emulation, the path every
   device without FP8 tensor cores takes), each eager and compiled (``export.loader.compile_denoiser``, the
   path ``export.load(compile=...)`` takes).
2. One denoiser step of flux-tiny (``qsched.models.registry.load_pipeline("flux-tiny")``), batch
   ``--batch``, the same variants, plus each output's distance from fp32 eager.

Prints one markdown table (ms, and the ratio fp32-eager ms / variant ms: > 1 is faster). One intra-op thread
by default (``--threads``), so numbers are comparable on a shared machine.

    python benchmarks/runtime_speed.py --threads 1 --repeats 5
    python benchmarks/runtime_speed.py --tokens 64 --repeats 1 --skip-denoiser     # smoke test
    python benchmarks/runtime_speed.py --tokens 1024 4096 --skip "native W8A8"     # without the slow int8 rows
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from export.loader import compile_denoiser
from export.runtime_torch import NativeDequantLayer, NativeFP8Linear, NativeInt8Linear, to_native_
from runtime_latency import capture_step, median_seconds, quant_layer, quantized_copy

CPU = torch.device("cpu")
ACT_RANGE = (-4.0, 6.0)


class _Linear(nn.Module):
    """fp32 reference linear as a module (so it compiles like the others)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight, requires_grad=False), nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first-call seconds, which includes any compile; median ms of ``repeats`` further calls)."""
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    first = time.perf_counter() - start
    return first, median_seconds(fn, repeats, 0, CPU)["median_ms"]


def compiled(module: nn.Module) -> nn.Module:
    module = copy.deepcopy(module)
    compile_denoiser(module, "full")
    return module


#: ``--skip`` values: the variant families (each runs eager and compiled)
FAMILIES = ("native W8A8", "native W4A8", "FP8 emulated")


def eager_and_compiled(variants: dict[str, nn.Module], skip=()) -> dict[str, nn.Module]:
    out = {}
    for name, module in variants.items():
        if name in skip:
            continue
        out[f"{name} eager"] = module
        out[f"{name} compiled"] = compiled(module)
    return out


def linear_rows(in_features: int, out_features: int, tokens: list[int], repeats: int, skip=()) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.02
    bias = torch.randn(out_features, generator=gen) * 0.01
    variants = eager_and_compiled({
        "fp32": _Linear(weight, bias),
        "native W8A8": NativeInt8Linear(quant_layer(weight, bias, 8, 8, ACT_RANGE)),
        "native W4A8": NativeDequantLayer(quant_layer(weight, bias, 4, 8, ACT_RANGE)),
        "FP8 emulated": NativeFP8Linear(quant_layer(weight, bias, 8, 8, ACT_RANGE, format="fp8"))}, skip)
    rows = []
    for m in tokens:
        x = torch.randn(m, in_features, generator=gen) * 1.5
        rows += measure(f"linear {in_features}->{out_features}, {m} tokens", variants, lambda mod: mod(x), repeats)
    return rows


def measure(case: str, variants: dict[str, nn.Module], call, repeats: int) -> list[dict]:
    """Time every variant on ``call(module)``; distances are from the first (fp32 eager) output."""
    rows, reference = [], None
    for name, module in variants.items():
        first, ms = timed(lambda: call(module), repeats)
        with torch.inference_mode():
            out = call(module).float()
        reference = out if reference is None else reference
        diff = float((out - reference).abs().max() / reference.abs().max())
        rows.append({"case": case, "variant": name, "ms": ms, "first_call_s": first, "max_rel_diff": diff})
        print(f"  {case:<38} {name:<22} {ms:10.2f} ms  (first call {first:6.1f} s)", flush=True)
    return rows


def denoiser_rows(batch: int, repeats: int) -> list[dict]:
    from qsched.models.registry import load_pipeline

    pipe, _ = load_pipeline("flux-tiny")
    inputs, ranges = capture_step(pipe, batch)
    fp32 = pipe.transformer.eval()
    natives = {}
    for label, wb, fmt in (("native W8A8", 8, "int"), ("native W4A8", 4, "int"), ("FP8 emulated", 8, "fp8")):
        natives[label] = quantized_copy(fp32, ranges, wb, 8, fmt)
        to_native_(natives[label])
    variants = eager_and_compiled({"fp32": fp32, **natives})
    tokens = inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1]
    case = f"flux-tiny denoiser, batch {batch} x {tokens} tokens"
    return measure(case, variants, lambda mod: mod(**inputs, return_dict=False)[0], repeats)


def markdown(rows: list[dict]) -> str:
    lines = ["| case | variant | ms | vs fp32 eager | max rel diff | first call s |", "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        base = next(r["ms"] for r in rows if r["case"] == row["case"] and r["variant"] == "fp32 eager")
        lines.append(f"| {row['case']} | {row['variant']} | {row['ms']:.2f} | {base / row['ms']:.2f}x | "
                     f"{row['max_rel_diff']:.1e} | {row['first_call_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median reported)")
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--down", action="store_true", help="also the 12288 -> 3072 down-projection")
    p.add_argument("--batch", type=int, default=1, help="images per flux-tiny denoiser step")
    p.add_argument("--skip-linear", action="store_true")
    p.add_argument("--skip-denoiser", action="store_true")
    p.add_argument("--skip", nargs="+", choices=FAMILIES, default=[],
                   help="leave these variants out of the linear rows (native W8A8 takes minutes per call at 4096 "
                        "tokens on a CPU without VNNI)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), cpu {torch.backends.cpu.get_cpu_capability()}")
    rows = []
    if not args.skip_linear:
        shapes = [(3072, 12288)] + ([(12288, 3072)] if args.down else [])
        for k, n in shapes:
            rows += linear_rows(k, n, args.tokens, args.repeats, args.skip)
    if not args.skip_denoiser:
        rows += denoiser_rows(args.batch, args.repeats)
    print("\n" + markdown(rows))
    return rows


if __name__ == "__main__":
    main()

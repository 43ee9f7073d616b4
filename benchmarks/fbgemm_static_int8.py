"""Is fbgemm's static int8 linear a CPU backend for our W8A8 layers? Speed against fp32 and exactness against
the W8A8 arithmetic the artifact stores, one FLUX-size linear, side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/fbgemm_static_int8.py --tokens 1024

``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` takes fp32 input with a static scale and zero
point, int8 per-channel weights, and returns fp32: our native layer's contract. It is timed against fp32
``F.linear``, and compared with the fake-quantized reference (the dequantized codes through fp32) once with
8-bit activation codes (ours) and once with 7-bit codes (fbgemm's ``reduce_range``: AVX2's u8×s8 pair sums
saturate int16 with full-range codes).
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F


def _time(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024])
    ap.add_argument("--in-features", type=int, default=3072)
    ap.add_argument("--out-features", type=int, default=12288)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*quantize_per_.*deprecated")
    k, n = args.in_features, args.out_features
    w, b = torch.randn(n, k) * 0.02, torch.randn(n) * 0.01
    wq = torch.quantize_per_channel(w, w.abs().amax(1) / 127, torch.zeros(n, dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(wq, b)
    op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    print(f"engine {torch.backends.quantized.engine}, {torch.get_num_threads()} thread(s), linear {k}->{n}")
    print("| tokens | fp32 ms | fbgemm int8 ms | speed-up | max error, 8-bit codes | max error, 7-bit codes | output max |")
    print("|---|---|---|---|---|---|---|")
    for m in args.tokens:
        x = torch.randn(m, k)
        errors = []
        for levels, zero in ((127.5, 128), (63.5, 64)):  # 8-bit codes (ours), then 7-bit (reduce_range)
            scale = float(x.abs().max() / levels)
            ref = F.linear(torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255), wq.dequantize(), b)
            errors.append((op(x, scale, zero, packed) - ref).abs().max().item())
        scale = float(x.abs().max() / 127.5)
        fp = _time(lambda: F.linear(x, w, b), args.repeat)
        q = _time(lambda: op(x, scale, 128, packed), args.repeat)
        print(f"| {m} | {fp * 1e3:.1f} | {q * 1e3:.1f} | {fp / q:.2f}× | {errors[0]:.2e} | {errors[1]:.2e} | "
              f"{ref.abs().max().item():.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

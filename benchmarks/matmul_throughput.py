"""Dense matmul throughput of this machine: the ``cpu`` figure of ``qcompile --plan``'s device table.

``qsched/planning/devices.py`` prices a compile's denoiser evaluations on a named device at the device's
dense throughput. For GPUs that is the vendor datasheet; a CPU has no such figure that torch reaches, so
this script measures one: a FLUX-size linear layer (``--tokens`` rows × ``--in-features`` →
``--out-features``; a FLUX attention projection, 3072 → 3072, by default) as ``F.linear``, the call every
``nn.Linear`` makes, in bf16 (the dtype a registry model compiles in) and fp32 (flux-tiny's): the median of
``--repeat`` timed calls after one untimed call, with torch's default thread count unless ``--threads`` says
otherwise. FLOPs = 2 × rows × in × out.

Why ``F.linear`` and not ``x @ w``: on a CPU without native bf16 instructions the two take different kernels;
on the 2-core AMD EPYC of the recorded figure, a bf16 ``torch.matmul`` with an untransposed [in, out] weight
ran at 0.35 GFLOP/s against 7.9 for ``F.linear`` (1 thread, 256 × 3072 → 3072).

    python benchmarks/matmul_throughput.py                      # the figure in qsched/planning/devices.py
    python benchmarks/matmul_throughput.py --tokens 512 --repeat 2   # a quick look
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F


def throughput(dtype: torch.dtype, tokens: int, in_features: int, out_features: int, repeat: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_features, generator=gen).to(dtype)
    w = torch.randn(out_features, in_features, generator=gen).to(dtype)  # nn.Linear's layout
    flops = 2.0 * tokens * in_features * out_features
    with torch.inference_mode():
        F.linear(x, w)  # untimed: thread pool and allocator warm-up
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            F.linear(x, w)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"dtype": str(dtype).removeprefix("torch."), "median_s": median, "tflops": flops / median / 1e12,
            "runs_s": times}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--in-features", type=int, default=3072)
    p.add_argument("--out-features", type=int, default=3072)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "shape": [args.tokens, args.in_features, args.out_features],
              "results": [throughput(d, args.tokens, args.in_features, args.out_features, args.repeat)
                          for d in (torch.bfloat16, torch.float32)]}
    for r in result["results"]:
        print(f"{r['dtype']:>9}: {r['tflops'] * 1e3:8.1f} GFLOP/s  (median {r['median_s'] * 1e3:.0f} ms, "
              f"{result['threads']} thread(s), {args.tokens}×{args.in_features}→{args.out_features})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

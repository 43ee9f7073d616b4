"""ILP solve time at real scale: FLUX.1-schnell's 502 linear layers, weights {2,3,4,5,6,8}, activations {4,8,FP}.

The layer table (names, groups, parameter counts) comes from the shipped config built on the meta device;
MACs use FLUX's token counts at 1024x1024 (4096 image tokens, 512 text tokens, one token for the
modulation and embedding linears). Scores are synthetic but shaped like measured ones (seeded): SQNR
grows ~6 dB per bit minus a per-layer difficulty, 1 - SSIM shrinks ~4x per bit from a per-layer level,
plus measurement noise.

    python benchmarks/ilp_flux.py [--repeat 3] [--seed 0] [--bops 0.9]
"""
from __future__ import annotations

import argparse
import math
import random
import time

from calibrate.allocation import allocate
from calibrate.sensitivity import LayerSensitivity, SensitivityTable, metric_for_group
from qsched.models.adapters import adapter_for
from qsched.models.shipped_configs import build_denoiser

WEIGHT_WIDTHS = [2, 3, 4, 5, 6, 8]
ACT_WIDTHS = [4, 8]
IMAGE_TOKENS, TEXT_TOKENS = 4096, 512


def tokens(name: str) -> int:
    """Tokens a FLUX linear sees per image per step (what its activation width costs)."""
    if name.startswith(("time_text_embed", "norm_out")) or ".norm" in name:
        return 1
    if name == "context_embedder" or "add_" in name or "ff_context" in name or "to_add_out" in name:
        return TEXT_TOKENS
    if name.startswith("single_transformer_blocks"):
        return IMAGE_TOKENS + TEXT_TOKENS
    return IMAGE_TOKENS


def flux_table(seed: int = 0) -> SensitivityTable:
    denoiser = build_denoiser("flux-schnell", device="meta")
    adapter = adapter_for(denoiser)
    rng = random.Random(seed)
    table = SensitivityTable(weight_widths=WEIGHT_WIDTHS, act_widths=ACT_WIDTHS)
    for name, module in adapter.quantizable_layers(denoiser).items():
        group = adapter.layer_group(name)
        metric = metric_for_group(group)
        params = module.weight.numel()
        entry = LayerSensitivity(group, params, metric, macs=float(params * tokens(name)))
        if metric == "sqnr":
            difficulty = rng.lognormvariate(math.log(8.0), 0.5)      # dB lost to outliers / fan-in
            outliers = rng.lognormvariate(math.log(12.0), 0.6)
            entry.weight = {b: 6.02 * b + 20.0 - difficulty + rng.gauss(0, 0.3) for b in WEIGHT_WIDTHS}
            entry.act = {a: 6.02 * a + 20.0 - outliers + rng.gauss(0, 0.3) for a in ACT_WIDTHS}
        else:
            level = rng.lognormvariate(math.log(0.3), 1.0)            # 1 - SSIM at 2 bits
            act_level = rng.lognormvariate(math.log(0.05), 1.2)       # 1 - SSIM at 4-bit activations
            entry.weight = {b: 1.0 - min(0.9, level * 4.0 ** (2 - b) * rng.uniform(0.8, 1.2)) for b in WEIGHT_WIDTHS}
            entry.act = {a: 1.0 - min(0.9, act_level * 16.0 ** ((4 - a) / 4) * rng.uniform(0.8, 1.2))
                         for a in ACT_WIDTHS}
        table.layers[name] = entry
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bops", type=float, default=None,
                        help="also solve w4a8 with BOPs capped at this fraction of the unconstrained optimum's")
    parser.add_argument("--time-limit", type=float, default=60.0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    table = flux_table(args.seed)
    groups = {g: sum(1 for l in table.layers.values() if l.group == g) for g in ("content", "quality")}
    params = sum(l.params for l in table.layers.values())
    print(f"FLUX.1-schnell table: {len(table.layers)} layers {groups}, {params / 1e9:.2f} B params, "
          f"built in {time.perf_counter() - t0:.1f} s")
    max_fp = math.ceil(0.01 * len(table.layers))
    for budget in (4.0, 3.5):
        for _ in range(args.repeat):
            res = allocate(table, budget, 8, weight_widths=WEIGHT_WIDTHS, act_widths=[4, 8, None], max_fp_act=max_fp)
            hist = {b: sum(1 for v in res.weight_bits.values() if v == b) for b in WEIGHT_WIDTHS}
            print(f"w{budget:g}a8: status {res.status}, solve {res.solve_seconds:.3f} s (model build "
                  f"{res.build_seconds:.3f} s), avg weight bits {res.average_weight_bits:.4f}, avg act bits "
                  f"{res.average_act_bits:.3f}, FP act layers {len(res.fp_act_layers)}, objective {res.objective:.4f}, "
                  f"widths {hist}")
    if args.bops:
        free = allocate(table, 4.0, 8, weight_widths=WEIGHT_WIDTHS, act_widths=[4, 8, None], max_fp_act=max_fp)
        res = allocate(table, 4.0, 8, weight_widths=WEIGHT_WIDTHS, act_widths=[4, 8, None], max_fp_act=max_fp,
                       max_bops=args.bops * free.bops, time_limit=args.time_limit)
        print(f"w4a8, BOPs <= {args.bops:g} x {free.bops:.3g}: status {res.status}, solve {res.solve_seconds:.1f} s, "
              f"objective {res.objective:.5f} (unconstrained {free.objective:.5f}), BOPs {res.bops / free.bops:.4f} x")


if __name__ == "__main__":
    main()

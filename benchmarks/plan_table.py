"""What the default compile of each registry model costs on one GPU, by ``qcompile --plan`` (nothing runs), and
which recipe knobs bring FLUX.1-schnell w4a8 under one GPU-hour and 80 GB.

    python benchmarks/plan_table.py --device h100

Prints two markdown tables: every registry model at w4a8 and w8a8 (sample rows per stage, predicted hours,
device and host peaks, the largest phase, and the device peak over the denoiser's bytes), then FLUX.1-schnell w4a8 under
a sequence of cheaper recipes (each row adds one knob to the one before).
"""
from __future__ import annotations

import argparse

from qsched.planning import plan_compile
from qsched.recipe import load_recipe

MODELS = ("flux-schnell", "flux-dev", "sdxl-turbo", "pixart-sigma")
#: each row adds its overrides to the previous row's
KNOBS = (
    ("default recipe", {}),
    ("+ quantization.sensitivity_prompts 2", {"quantization.sensitivity_prompts": 2}),
    ("+ quantization.sensitivity_prompts 1", {"quantization.sensitivity_prompts": 1}),
    ("+ quantization.weight_widths [3, 4, 8], act_widths [8]",
     {"quantization.weight_widths": (3, 4, 8), "quantization.act_widths": (8,)}),
    ("+ coefficients.budget 60", {"coefficients.budget": 60}),
)


def _row(label: str, plan) -> str:
    d = plan.to_dict()
    stages = d["totals"]["by_stage"]
    mem, hours = d["memory"], d["time"]["seconds"] / 3600
    over = max(mem["phases"], key=mem["phases"].get)
    return (f"| {label} | {d['totals']['sample_rows']:,} | {stages.get('calibrate', 0):,} | "
            f"{stages.get('coefficients', 0):,} | {stages.get('cache_search', 0):,} | {hours:.2f} h | "
            f"{mem['device_peak_bytes'] / 1e9:.1f} GB ({over}) | {mem['device_peak_bytes'] / mem['denoiser_bytes']:.2f}× | "
            f"{mem['host_peak_bytes'] / 1e9:.1f} GB |")


HEADER = ("| {} | sample rows | calibrate | coefficients | cache_search | time | device peak (largest phase) | "
          "device peak / denoiser | host peak |\n|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="h100", help="a --plan-device name")
    args = ap.parse_args(argv)
    print(HEADER.format("model, bits"))
    for model in MODELS:
        for bits in ("w4a8", "w8a8"):
            # the registry recipes name the hub's CLIP; the scorer does not change a count
            plan = plan_compile(model, bits, init="random", plan_device=args.device, scorer="world-judge")
            print(_row(f"{model} {bits}", plan), flush=True)
    print()
    print(HEADER.format("flux-schnell w4a8 recipe"))
    recipe = load_recipe("recipes/flux-schnell-w4a8.yaml")
    for label, overrides in KNOBS:
        recipe = recipe.override(overrides)
        plan = plan_compile("flux-schnell", "w4a8", recipe=recipe, init="random", plan_device=args.device)
        print(_row(label, plan), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

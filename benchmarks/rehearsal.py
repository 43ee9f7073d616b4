"""A full-size compile rehearsed at real depth on this machine, against what ``qcompile --plan`` predicts.

For each width scale F, this script

1. plans ``qcompile --model M --init random --width-scale F --recipe R`` (``qsched.plan``, nothing runs);
2. runs that compile in a child process (the default stages: MixDQ with GPTQ and sensitivity, Q-Sched, the
   cache search, export, the report) with a tiny random CLIP as the scorer, and measures, per stage: seconds,
   denoiser evaluations in sample rows (a wrapper on the denoiser class's ``forward`` counts the batch rows of
   every call, whatever calls it) and the peak resident memory (``/proc/self/statm`` sampled every 20 ms);
3. prints predicted against measured: evaluations per stage, peak host memory (above the process's resident
   size just before the compile starts: torch and the libraries are not the compile's), stage times, and the
   peak over the denoiser's bf16 bytes (issue #17's goal: at most 1.5×).

Usage (the shipped rehearsal recipe: 128², 64 text tokens, small prompt counts; fp32 is several times faster
than bf16 on CPUs without bf16 matrix units)::

    python benchmarks/rehearsal.py --widths 0.0417 0.0833 0.125 --threads 2 --json out/rehearsal.json

On a GPU (issue 17's check at real width; MixDQ scoped to two blocks so that it fits in a few minutes)::

    python benchmarks/rehearsal.py --device cuda --plan-device h200 --dtype bfloat16 --widths 1 \
        --override 'quantization.layers=["transformer_blocks.0.*", "single_transformer_blocks.37.*"]'
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = ROOT / "recipes" / "rehearsal" / "flux-schnell-w4a8.yaml"
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class _Meter:
    """The current stage's name, its denoiser sample rows and its peak resident bytes (a sampling thread)."""

    def __init__(self):
        self.stage, self.rows, self.peak, self.device_peak = "setup", {}, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(0.02):
            rss = _rss()
            self.peak[self.stage] = max(self.peak.get(self.stage, 0), rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._device_peak()
        self._stop.set()
        self._thread.join()

    def enter(self, stage: str):
        self._device_peak()
        self.stage = stage
        self.peak[stage] = max(self.peak.get(stage, 0), _rss())

    def _device_peak(self):
        """The finished stage's peak CUDA allocation (none on a CPU compile)."""
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.device_peak[self.stage] = max(self.device_peak.get(self.stage, 0), torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()

    def count(self, rows: int):
        self.rows[self.stage] = self.rows.get(self.stage, 0) + rows


def _count_denoiser_calls(meter: _Meter, class_name: str):
    """Wrap the denoiser class's ``forward`` so every call adds its batch rows to the current stage."""
    import diffusers
    from calibrate.sensitivity import _batch_of

    cls = getattr(diffusers, class_name)
    original = cls.forward

    def forward(self, *args, **kwargs):
        meter.count(_batch_of(args, kwargs))
        return original(self, *args, **kwargs)

    cls.forward = forward


def _import_the_compile() -> None:
    """Import what the compile will, before the baseline is read: the plan prices the compile's data, not the
    libraries' code (a few hundred MB of modules the first stage would otherwise add to the peak)."""
    import diffusers
    import transformers

    import cache_search.stage  # noqa: F401
    import calibrate.calibration  # noqa: F401
    import calibrate.mixdq  # noqa: F401
    import export.save  # noqa: F401
    import qsched.coefficients.stage  # noqa: F401
    import qsched.report.measure  # noqa: F401
    import qsched.stages  # noqa: F401
    from qsched.models.registry import load_source_pipeline  # noqa: F401

    for cls in ("FluxPipeline", "AutoencoderKL", "FluxTransformer2DModel"):
        getattr(diffusers, cls)
    for cls in ("CLIPTextModel", "T5EncoderModel", "CLIPModel"):
        getattr(transformers, cls)


def child(opts: dict) -> dict:
    """One compile, measured (runs in its own process so that its peak memory is its own)."""
    import torch

    import qsched.compiler as compiler
    from qsched.models.shipped_configs import denoiser_component, load_component_config

    torch.set_num_threads(opts["threads"])
    _import_the_compile()
    meter = _Meter()
    den = load_component_config(opts["model"], denoiser_component(opts["model"]))["_class_name"]
    _count_denoiser_calls(meter, den)
    stages, seconds = [], {}
    for name, stage in compiler.STAGES:
        def run(c, name=name, stage=stage):
            meter.enter(name)
            print(f"rehearsal: stage {name} starts", file=sys.stderr, flush=True)  # progress, for a time limit
            t0 = time.perf_counter()
            try:
                return stage(c)
            finally:
                seconds[name] = time.perf_counter() - t0
                print(f"rehearsal: stage {name} took {seconds[name]:.1f} s, {meter.rows.get(name, 0)} denoiser rows",
                      file=sys.stderr, flush=True)
        stages.append((name, run))
    compiler.STAGES = stages
    baseline = _rss()
    with meter:
        start = time.perf_counter()
        artifact = compiler.compile(model=opts["model"], bits=opts["bits"], out=opts["out"],
                                    recipe=_recipe(opts["recipe"], opts["overrides"]), uniform=opts["uniform"],
                                    init="random", width_scale=opts["width_scale"], dtype=opts["dtype"],
                                    device=opts.get("device", "cpu"),
                                    scorer=opts["scorer"], eval_prompts=opts["eval_prompts"], overwrite=True,
                                    progress=False)
        total = time.perf_counter() - start
    manifest = artifact.manifest
    return {"baseline_rss": baseline, "peak_rss": max(meter.peak.values()), "seconds": total,
            "device_peak": max(meter.device_peak.values(), default=0),
            "stages": {name: {"seconds": seconds.get(name),
                              "status": manifest["stages"].get(name, {}).get("status"),
                              "rows": meter.rows.get(name, 0), "peak_rss": meter.peak.get(name, 0),
                              "device_peak": meter.device_peak.get(name, 0)}
                       for name, _ in stages},
            "sensitivity": manifest["stages"].get("calibrate", {}).get("sensitivity")}


def _recipe(path: str, overrides: dict):
    from qsched.recipe import load_recipe

    return load_recipe(path).override(overrides)


def rehearse(width: float, args, scorer: Path) -> dict:
    import qsched

    overrides = dict(args.override)
    if args.measure:  # the plan's timed call uses the compile's thread count
        import torch
        torch.set_num_threads(args.threads)
    plan = qsched.plan(model=args.model, bits=args.bits, recipe=_recipe(str(args.recipe), overrides), init="random",
                       width_scale=width, dtype=args.dtype, uniform=args.uniform, scorer=str(scorer),
                       eval_prompts=args.eval_prompts, device=args.device, plan_device=args.plan_device,
                       measure=args.measure)
    run_dir = Path(args.work) / f"w{width:g}"
    if run_dir.exists():  # a cold work folder, as the plan assumes (no sensitivity table to resume)
        import shutil
        shutil.rmtree(run_dir)
    out = run_dir / "artifact"
    opts = {"model": args.model, "bits": args.bits, "out": str(out), "recipe": str(args.recipe), "width_scale": width,
            "dtype": args.dtype, "scorer": str(scorer), "eval_prompts": args.eval_prompts, "threads": args.threads,
            "overrides": overrides, "uniform": args.uniform, "device": args.device}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    # the child's log goes straight to ours (a run stopped at its time limit still shows how far it got);
    # only its last stdout line, the measurements, is read
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(opts)], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"the rehearsal at width {width} failed (exit {proc.returncode}; its log is above)")
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"width_scale": width, "uniform": args.uniform, "overrides": overrides, "plan": plan.to_dict(),
            "measured": measured}


def table(results: list[dict]) -> str:
    lines = ["| width × | denoiser params | stage | evaluations plan | measured | ratio | seconds plan | seconds measured | "
             "peak host above baseline: plan | measured | ratio | peak / bf16 denoiser |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p, m = r["plan"], r["measured"]
        params = p["architecture"]["denoiser_parameters"]
        by_stage = p["totals"]["by_stage"]
        pred_mem = p["memory"]["host_peak_bytes"]
        meas_mem = m["peak_rss"] - m["baseline_rss"]
        planned_seconds = p["time"].get("seconds_by_stage") or {}
        for stage, s in m["stages"].items():
            pr = by_stage.get(stage, 0)
            ratio = f"{s['rows'] / pr:.2f}" if pr else "-"
            lines.append(f"| {r['width_scale']:g} | {params / 1e6:.1f} M | {stage} | {pr:,} | {s['rows']:,} | {ratio} | "
                         f"{planned_seconds.get(stage, 0):.1f} | {(s['seconds'] or 0):.1f} | | | | |")
        total_p, total_m = p["totals"]["sample_rows"], sum(s["rows"] for s in m["stages"].values())
        lines.append(f"| {r['width_scale']:g} | {params / 1e6:.1f} M | **total** | {total_p:,} | {total_m:,} | "
                     f"{total_m / max(total_p, 1):.2f} | {p['time'].get('seconds') or 0:.1f} | {m['seconds']:.1f} | "
                     f"{pred_mem / 1e6:,.0f} MB | "
                     f"{meas_mem / 1e6:,.0f} MB | {meas_mem / max(pred_mem, 1):.2f} | "
                     f"{meas_mem / (2 * params):.2f} |")
    return "\n".join(lines)


def _override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    parsed = json.loads(value)
    return key, tuple(parsed) if isinstance(parsed, list) else parsed


def memory_table(results: list[dict]) -> str:
    """Peak resident memory above the baseline per stage, against the plan's largest phase of that stage."""
    lines = ["| width × | stage | plan: largest phase | MB | measured MB | ratio |", "|---|---|---|---|---|---|"]
    for r in results:
        p, m = r["plan"], r["measured"]
        phases = p["memory"]["phases"]
        for stage, s in m["stages"].items():
            names = [k for k in phases if k.split(":")[0] == stage or (stage == "export" and k.startswith("export"))]
            if not names:
                continue
            name = max(names, key=phases.get)
            measured = s["peak_rss"] - m["baseline_rss"]
            lines.append(f"| {r['width_scale']:g} | {stage} | {name} | {phases[name] / 1e6:,.0f} | {measured / 1e6:,.0f} | "
                         f"{measured / max(phases[name], 1):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="flux-schnell")
    ap.add_argument("--bits", default="w4a8")
    ap.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    ap.add_argument("--widths", type=float, nargs="+", default=[0.0417, 0.0833])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--eval-prompts", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "out" / "rehearsal"))
    ap.add_argument("--device", default="cpu", help="the compile's --device (cuda on a GPU machine)")
    ap.add_argument("--plan-device", default="cpu", help="the plan's --plan-device (h100, h200 ... on a GPU)")
    ap.add_argument("--uniform", action="store_true", help="compile with --uniform (no MixDQ sensitivity)")
    ap.add_argument("--override", action="append", default=[], type=_override, metavar="KEY=JSON",
                    help="a recipe override, e.g. quantization.layers='[\"transformer_blocks.0.*\"]' (repeatable)")
    ap.add_argument("--measure", action="store_true",
                    help="price the plan's time by one timed denoiser call here (qcompile --plan --plan-measure)")
    ap.add_argument("--json", type=Path, help="write every plan and measurement here")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from qsched.models.prompts import HELD_OUT_PROMPTS, REAL_MODEL_PROMPTS
    from qsched.scoring.tiny_clip import save_tiny_clip

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        scorer = save_tiny_clip(Path(tmp) / "tiny-clip", REAL_MODEL_PROMPTS + HELD_OUT_PROMPTS)
        for width in args.widths:
            results.append(rehearse(width, args, scorer))
            print(table(results[-1:]), flush=True)
    print(table(results))
    print()
    print(memory_table(results))
    for r in results:
        if r["measured"].get("device_peak"):
            print(f"width {r['width_scale']:g}: device peak plan {r['plan']['memory']['device_peak_bytes'] / 1e9:.2f} GB, "
                  f"measured {r['measured']['device_peak'] / 1e9:.2f} GB; time plan "
                  f"{r['plan']['time']['seconds']:.0f} s, measured {r['measured']['seconds']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

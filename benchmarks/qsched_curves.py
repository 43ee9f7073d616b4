"""Q-Sched on flux-tiny: Q-Sched's own 50×50 grid vs our per-step CMA-ES, on several quantized models.

For each quantized model (``--models``, e.g. ``w4a8:uniform`` for round-to-nearest W4A8 or
``w4a8:mixdq`` for MixDQ's mixed precision at the same budget; ``fp`` searches the unquantized model) both searches see only the quantized
pipeline (4 steps) and the reference-free JAQ (world judge score + k · world quality score) on the same
train prompts with one fixed seed. A held-out *guard* prompt set is scored whenever a method's train best
changes (the curves), and the result is the guarded candidate with the best guard JAQ (``--select``).
Then FP, quantized, quantized + each method are judged on a third, larger prompt set (disjoint from
both) with a different seed; differences are paired per prompt (same prompts, same noise), which is
what makes a 1–2 point gap measurable at all: the table gives each difference with its 95 % interval and
the fraction of the FP–quantized gap that Q-Sched closes.

    python benchmarks/qsched_curves.py --models w4a8:uniform w4a8:mixdq --out bench-out/qsched-curves.json
    python benchmarks/qsched_curves.py --random-model --grid-size 2 --budget 6 --prompts 2 \\
        --eval-prompts 4 --cal-prompts 4 --models w4a8:uniform --out /tmp/qsched-smoke.json   # smoke test only
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from calibrate.calibration import calibrate
from qsched.core.bits import parse_bits
from qsched.core.errors import ModelNotFoundError
from qsched.runtime.generation import generate
from qsched.coefficients.jaq import jaq, scorer_terms
from qsched.scoring.scorer import WorldJudgeScorer
from qsched.coefficients.optimize import learn_coefficients
from qsched.models.profiles import world_profile
from qsched.recipe import CalibrationConfig, QuantizationConfig
from calibrate.mixdq_run import MixDQRun
from qsched.runtime.schedulers import QSchedScheduler
from qsched.metrics import paired_difference
from qsched.tinyworld.judge import confidence_interval, judge, quality_score
from qsched.tinyworld.model import TINY_SETTINGS, build_tiny_pipeline, load_embedded
from qsched.tinyworld.world import sample_batch


def load_fp(random_model: bool):
    """The FP pipeline: the trained embedded model, or (smoke tests only) a random one."""
    if random_model:
        pipe = build_tiny_pipeline(seed=0)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return load_embedded()


def unique_prompts(seed: int, n: int, split: str, exclude: set[str]) -> list[str]:
    """``n`` distinct captions of ``split`` not in ``exclude`` (so the evaluation set is disjoint)."""
    out: list[str] = []
    draw = 0
    while len(out) < n:
        _, captions = sample_batch(seed=seed + draw, n=max(4 * n, 64), split=split)
        for c in captions:
            if c not in exclude and c not in out:
                out.append(c)
                if len(out) == n:
                    break
        draw += 1
        if draw > 50:
            raise RuntimeError(f"could not draw {n} distinct {split} prompts")
    return out


def judged(images, prompts, k: float) -> dict:
    """Judged accuracy (± 95 %), continuous score, quality and JAQ, plus the per-prompt values to pair."""
    v = judge(images, prompts)
    quality = np.asarray(quality_score(images), dtype=float)
    per_prompt = {"correct": np.asarray(v.correct, dtype=float).tolist(),
                  "jaq": (np.asarray(v.scores, dtype=float) + k * quality).tolist()}
    return {"accuracy": round(float(v.accuracy), 4),
            "ci95": round(float(confidence_interval(v.accuracy, len(prompts))), 4),
            "score": round(float(v.score), 4), "quality": round(float(quality.mean()), 4),
            "jaq": round(float(v.score) + k * float(quality.mean()), 4), "_per_prompt": per_prompt}


def paired(a: dict, b: dict, key: str) -> tuple[float, float]:
    """Mean of ``b - a`` per prompt and its 95 % half-width (normal approximation over the prompts)."""
    return paired_difference(a["_per_prompt"][key], b["_per_prompt"][key])


def quantize(pipe, name: str, cal, settings, work: str):
    """Calibrate ``pipe`` in place: ``bits:method`` with method ``uniform`` (RTN) or ``mixdq``; ``fp`` leaves
    it unquantized (what the coefficients buy the sampler itself)."""
    if name == "fp":
        return None
    bits, _, method = name.partition(":")
    method = method or "uniform"
    if method not in ("uniform", "mixdq"):
        raise SystemExit(f"unknown quantization method {method!r} in {name!r}: use uniform or mixdq")
    config = QuantizationConfig(method=method, rounding="rtn" if method == "uniform" else "gptq")
    return calibrate(pipe, parse_bits(bits), cal, settings, config, calibration=CalibrationConfig(batch_size=16),
                     run=MixDQRun(work_dir=work), progress=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["w4a8:uniform"],
                   help="quantized models as bits:method (method: uniform or mixdq), or fp for the "
                                                         "unquantized model")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=24, help="train prompts and held-out guard prompts (each)")
    p.add_argument("--eval-prompts", type=int, default=1024, help="third prompt set for the final numbers")
    p.add_argument("--cal-prompts", type=int, default=64, help="prompts for the activation ranges")
    p.add_argument("--grid-size", type=int, default=50)
    p.add_argument("--grid-range", type=float, nargs=2, default=(0.8, 1.2))
    p.add_argument("--budget", type=int, default=250, help="CMA-ES configurations on the train prompts")
    p.add_argument("--patience", type=int, default=None, help="stop CMA-ES after this many runs without a "
                                                               "guard improvement")
    p.add_argument("--select", choices=["guard", "train"], default="guard")
    p.add_argument("--sigma0", type=float, default=0.05)
    p.add_argument("--bounds", type=float, nargs=2, default=(0.7, 1.3))
    p.add_argument("--k", type=float, default=2.0, help="JAQ = TC + k·IQ")
    p.add_argument("--seed", type=int, default=0, help="search seed (sampling noise shared by every candidate)")
    p.add_argument("--eval-seed", type=int, default=2024)
    p.add_argument("--methods", nargs="+", default=["grid", "cma"], choices=["grid", "cma", "nelder-mead"])
    p.add_argument("--work", default="bench-out/mixdq-work", help="MixDQ sensitivity cache")
    p.add_argument("--random-model", action="store_true", help="random tiny pipeline (smoke tests only)")
    p.add_argument("--out", default="bench-out/qsched-curves.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    t_start = time.perf_counter()
    settings = replace(TINY_SETTINGS, steps=args.steps)

    try:
        fp = load_fp(args.random_model)
    except ModelNotFoundError as err:
        print(f"error: {err}\n(the trained flux-tiny weights are needed; for a smoke test pass --random-model)",
              file=sys.stderr)
        return 2
    cal = world_profile().prompts("calibration", args.cal_prompts, 0)
    train = unique_prompts(20_000, args.prompts, "train", set())
    heldout = unique_prompts(30_000, args.prompts, "test", set())
    evaluation = unique_prompts(args.eval_seed, args.eval_prompts, "test", set(heldout))
    terms = scorer_terms(WorldJudgeScorer())

    def objective(images, prompts):
        return jaq(images, prompts, *terms, k=args.k)

    report = {"model": "random flux-tiny (smoke test)" if args.random_model else "flux-tiny (embedded)",
              "steps": args.steps, "k": args.k, "seed": args.seed, "eval_seed": args.eval_seed,
              "select": args.select, "train_prompts": train, "heldout_prompts": heldout,
              "eval_prompts": len(evaluation),
              "grid": {"size": args.grid_size, "range": list(args.grid_range)},
              "cma": {"budget": args.budget, "sigma0": args.sigma0, "bounds": list(args.bounds),
                      "patience": args.patience},
              "models": {}}

    def evaluate(pipe, label):
        images = generate(pipe, evaluation, settings, seed=args.eval_seed, batch_size=64, progress=label)
        row = judged(images, evaluation, args.k)
        print(f"{label:>24}: accuracy {row['accuracy']:.4f} ± {row['ci95']:.4f}  quality {row['quality']:.4f}  "
              f"JAQ {row['jaq']:.4f}", flush=True)
        return row

    fp_row = evaluate(fp, "fp")
    report["fp"] = {k: v for k, v in fp_row.items() if not k.startswith("_")}
    for name in args.models:
        qpipe = load_fp(args.random_model)
        quantize(qpipe, name, cal, settings, args.work)
        entry = {"methods": {}, "eval": {}}
        report["models"][name] = entry
        q_row = fp_row if name == "fp" else evaluate(qpipe, name)
        rows = {name: q_row}
        base = qpipe.scheduler
        for method in args.methods:
            kwargs = dict(grid_size=args.grid_size, grid_range=tuple(args.grid_range)) if method == "grid" \
                else dict(budget=args.budget, sigma0=args.sigma0, bounds=tuple(args.bounds), patience=args.patience)
            res = learn_coefficients(qpipe, train, heldout, settings, objective, method=method, seed=args.seed,
                                     batch_size=len(train), progress=True, select=args.select, **kwargs)
            entry["methods"][method] = res.to_dict()  # history = the curve (held-out JAQ vs train runs)
            print(f"{name} {method}: train JAQ {res.identity_train_jaq:.4f} -> {res.train_jaq:.4f} (best "
                  f"{res.best_train_jaq:.4f}), guard {res.identity_heldout_jaq:.4f} -> {res.heldout_jaq:.4f} "
                  f"(selected at run {res.selected_at}); {res.runs} runs + {res.heldout_runs} guard runs in "
                  f"{res.seconds:.1f} s", flush=True)
            print(f"  coefficients cx={[round(v, 4) for v in res.coefficients.cx]} "
                  f"ce={[round(v, 4) for v in res.coefficients.ce]}", flush=True)
            qpipe.scheduler = QSchedScheduler.wrap(base, res.coefficients)
            try:
                rows[f"{name}+{method}"] = evaluate(qpipe, f"{name}+{method}")
            finally:
                qpipe.scheduler = base
        for label, row in rows.items():
            out = {k: v for k, v in row.items() if not k.startswith("_")}
            for key in ("correct", "jaq"):
                d, ci = paired(q_row, row, key)
                out[f"{key}_vs_quantized"] = [round(d, 4), round(ci, 4)]
                d, ci = paired(fp_row, row, key)
                out[f"{key}_vs_fp"] = [round(d, 4), round(ci, 4)]
            gap = fp_row["accuracy"] - q_row["accuracy"]
            out["accuracy_gap_closed"] = round((row["accuracy"] - q_row["accuracy"]) / gap, 3) if gap else None
            gap = fp_row["jaq"] - q_row["jaq"]
            out["jaq_gap_closed"] = round((row["jaq"] - q_row["jaq"]) / gap, 3) if gap else None
            entry["eval"][label] = out
            print(f"  {label:>24}: Δacc vs quantized {out['correct_vs_quantized'][0]:+.4f} ± "
                  f"{out['correct_vs_quantized'][1]:.4f}, vs FP {out['correct_vs_fp'][0]:+.4f} ± "
                  f"{out['correct_vs_fp'][1]:.4f}; gap closed: accuracy {out['accuracy_gap_closed']}, "
                  f"JAQ {out['jaq_gap_closed']}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))  # after each model: partial results survive
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    print(f"wall time {report['seconds']} s")
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

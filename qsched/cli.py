"""``qcompile``: the command line over :func:`qsched.compile`.

It parses arguments and calls the API, nothing else. Errors caused by the input print one line
(``qcompile: error: …``) and exit with status 2; no traceback, no partial artifact.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

from qsched.core.bits import VALID_FORMS

EXAMPLES = """examples:
  qcompile --model flux-tiny --bits w4a8 --out out/flux-tiny-w4a8
  qcompile --model flux-schnell --bits w4a8
  qcompile --model ./my-local-pipeline --bits w8a8 --uniform --bundle
  qcompile --model flux-schnell --init random --bits w4a8 --device cuda
  qcompile --model flux-tiny --bits fp8 --uniform           # FP8 e4m3 W8A8 (torch._scaled_mm on sm89+ GPUs)
  qcompile --model flux-tiny --bits fp8                     # MixDQ: FP8 or FP per layer (quantization.fp8_budget_bits)
  qcompile --model flux-schnell --bits w3.5a8 --device cuda --ray auto   # sensitivity and cache search on Ray
  qcompile --model flux-schnell --init random --bits w4a8 --plan --plan-device h100   # cost it, compile nothing
  qcompile --model flux-schnell --init random --width-scale 0.0625 --bits w4a8 --scorer ./tiny-clip   # rehearse it

drawing with an artifact (export.load: its scheduler, cache schedule and sampler settings; one PNG per prompt):
  qcompile generate out/flux-tiny-w4a8 --prompt "a red circle above a blue square" --out images
  qcompile generate out/flux-schnell-w4a8 --prompts-file prompts.txt --device cuda --compile regional

the artifact's report (report.html, written by every compile):
  qcompile report out/flux-tiny-w4a8           regenerate it
  qcompile view out/flux-tiny-w4a8 [--port P]  serve it on http://127.0.0.1:P/ (prints the URL, opens nothing)"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qcompile", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compress a few-step text-to-image diffusion pipeline into one artifact "
                    "(mixed-precision quantization, Q-Sched scheduler coefficients, cache schedule).")
    p.add_argument("--model", default="flux-tiny",
                   help="registry name (flux-schnell, flux-dev, sdxl-turbo, pixart-sigma, flux-tiny), "
                        "a hub id (org/name) or a local diffusers directory (default: flux-tiny, the embedded model)")
    p.add_argument("--bits", default="w4a8", help=f"target widths: {VALID_FORMS} (default: w4a8)")
    p.add_argument("--out", help="artifact directory to write (default: out/<model>-<bits>)")
    p.add_argument("--recipe", help="recipe YAML (default: the shipped recipe for the model and bits, if any)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration and evaluation (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--init", choices=("pretrained", "random"), default="pretrained",
                   help="'random' builds a registry model's full-size architecture from shipped configs, no download")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="load and compute the pipeline in this dtype (default auto: bf16 for registry models, the "
                        "stored dtype for local ones, fp32 for flux-tiny); float32 is several times faster on CPUs "
                        "without bf16 matrix units")
    p.add_argument("--width-scale", type=float, metavar="F",
                   help="with --init random: hidden widths × F in (0, 1], depth kept (attention heads scaled, each "
                        "head at its real size): a rehearsal of the full-size compile on a small machine")
    p.add_argument("--uniform", action="store_true",
                   help="every layer at the given widths (round-to-nearest or GPTQ rounding) instead of MixDQ's mixed "
                        "precision, which integer budgets such as w4a8 use by default")
    p.add_argument("--scorer", metavar="CLIP",
                   help="what judges images for Q-Sched, the cache search and the report: a local CLIP directory, "
                        "a hub id, or 'world-judge' (default: the recipe's, else the model's: flux-tiny's world "
                        "judge, CLIP ViT-L/14 from the hub for the registry's real models)")
    p.add_argument("--no-qsched", action="store_true", help="skip learning Q-Sched scheduler coefficients")
    p.add_argument("--no-cache-search", action="store_true", help="skip the cache-schedule search")
    p.add_argument("--cache-budget", type=float, metavar="FRACTION",
                   help="cache-search operating point: best quality within this fraction of no-cache MACs "
                        "(default: the cheapest point within 2%% of no-cache quality)")
    p.add_argument("--bundle", action="store_true", help="store every pipeline component: the artifact loads without the source model")
    p.add_argument("--eval-prompts", type=int, default=8, help="prompts used to measure fidelity against FP (0 skips; default 8)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run sensitivity analysis and cache-search evaluations on Ray: 'auto' (join this machine's "
                        "cluster, else start a local one), 'local', or a cluster address such as 10.0.0.1:6379")
    p.add_argument("--ray-workers", type=int, metavar="N",
                   help="Ray workers to start, each loading the model once (default: one per GPU with a CUDA "
                        "--device, else one per CPU)")
    p.add_argument("--export", action="append", choices=("onnx", "modelopt", "gguf"), default=[],
                   help="add an optional export to the artifact (repeatable); modelopt: an nvidia-modelopt "
                        "checkpoint for the TensorRT path, checked per layer (pip install qsched[modelopt]); onnx: the "
                        "denoiser as an ONNX graph (int8 QDQ, 4-bit MatMulNBits) for onnxruntime (pip install "
                        "qsched[onnx]); gguf: a FLUX denoiser as gguf/denoiser.gguf for ComfyUI-GGUF and diffusers "
                        "(pip install qsched[gguf])")
    p.add_argument("--plan", action="store_true",
                   help="compile nothing: print what this compile would cost (denoiser evaluations per stage, peak "
                        "memory, wall time on --plan-device), worked out from the recipe and the architecture on the "
                        "meta device; --out is not checked and nothing is written")
    p.add_argument("--plan-device", metavar="DEVICE",
                   help="with --plan: the device to price the compile on: h100, h200, a100, l40s, 4090 or cpu "
                        "(default: cpu for --device cpu, else h100)")
    p.add_argument("--plan-measure", action="store_true",
                   help="with --plan: time one denoiser call on --device (random weights, the compile's calibration "
                        "batch and resolution) and price every evaluation at it instead of a datasheet figure; the "
                        "denoiser is built for real, so this needs its memory on --device")
    p.add_argument("--json", action="store_true", help="with --plan: print the plan as one JSON object")
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _validate_model(model: str, init: str) -> None:
    """The checks :func:`qsched.models.registry.load_pipeline` makes, without loading anything."""
    from qsched.models.registry import check_model
    check_model(model, init)


#: exports that express FP8 (e4m3) layers; the others refuse `--bits fp8` before the compile
FP8_EXPORTS = ("modelopt", "onnx")

_RAY_ADDRESS = re.compile(r"^(ray://)?[\w.\-\[\]:]+:(\d{1,5})$")


def _validate(args, spec) -> None:
    """Every flag, before any model is loaded, so bad input costs nothing and writes nothing. With ``--plan``,
    what only the compiling machine can answer is left out: whether it has the ``--device``, the optional extras
    (Ray, modelopt, onnx, gguf) installed, and a writable ``--out``."""
    from qsched.core.errors import QschedError
    if not args.plan:
        for flag, given in (("--plan-device", args.plan_device is not None), ("--json", args.json),
                            ("--plan-measure", args.plan_measure)):
            if given:
                why = " (a compile always prints its JSON summary)" if flag == "--json" else ""
                raise QschedError(f"{flag} goes with --plan{why}; add --plan or drop {flag}")
    _validate_model(args.model, args.init)
    from qsched.models.width_scale import check_width_scale
    check_width_scale(args.width_scale, args.init, args.model)
    from qsched.core.cli_support import check_device
    check_device(args.device, available=not args.plan or args.plan_measure)  # a measured plan runs on it
    if not 0 <= args.seed < 2**32:  # numpy's RandomState (the Q-Sched search) takes 32-bit seeds
        raise QschedError(f"--seed {args.seed} is out of range: use an integer from 0 to {2**32 - 1}")
    if args.eval_prompts < 0:
        raise QschedError(f"--eval-prompts {args.eval_prompts} is negative: use 0 to skip the evaluation, or more")
    if args.scorer is not None and not args.scorer.strip():
        raise QschedError("--scorer is empty: give a local CLIP directory, a hub id, or world-judge")
    if args.scorer is not None and os.sep in args.scorer.strip("/").replace("/", "", 1) and not Path(args.scorer).is_dir():
        raise QschedError(f"--scorer {args.scorer}: no such directory; give a local CLIP directory (saved with "
                          "save_pretrained), a hub id (org/name), or world-judge")
    if args.cache_budget is not None:
        if not (math.isfinite(args.cache_budget) and 0.0 < args.cache_budget <= 1.0):
            raise QschedError(f"--cache-budget {args.cache_budget} must be a fraction of no-cache MACs in (0, 1], "
                              "e.g. 0.6")
        if args.no_cache_search:
            raise QschedError("--cache-budget picks a cache-search point, but --no-cache-search skips the search; "
                              "drop one of them")
    if spec.format == "fp8":  # before the compile: these exports have no FP8 form, each would refuse it after
        from qsched.runtime.qlayers import refuse_fp8
        for name in args.export:
            if name not in FP8_EXPORTS:
                refuse_fp8([spec.format], f"--export {name}")
    if spec.is_fractional and args.uniform:
        raise QschedError(f"--bits {spec} is a fractional budget, which needs mixed precision; use an integer "
                          "weight width with --uniform, or drop --uniform")
    if args.recipe is not None:
        if not args.recipe.strip():
            raise QschedError("--recipe is empty; give a recipe YAML file or leave --recipe out for the default")
        from qsched.recipe import load_recipe
        load_recipe(args.recipe)
    if args.ray is not None:
        match = _RAY_ADDRESS.match(args.ray)
        if not args.ray.strip():  # else `--ray ""` would quietly mean auto
            raise QschedError("--ray needs a value: auto, local, or a cluster address such as 10.0.0.1:6379")
        if args.ray not in ("auto", "local") and not (match and 0 < int(match.group(2)) < 65536):
            raise QschedError(f"invalid --ray {args.ray!r}: expected auto, local, HOST:PORT (e.g. 10.0.0.1:6379) "
                              "or ray://HOST:PORT")
    if args.plan:
        return
    if args.ray is not None or args.ray_workers is not None:
        from qsched.distributed import _ray
        _ray()  # not installed: say so now, not at the first distributed stage
    if "modelopt" in args.export:
        from calibrate.modelopt_bridge import require_modelopt
        require_modelopt()
    if "onnx" in args.export:
        from export.runtime_onnx import require_onnx
        require_onnx()
    if "gguf" in args.export:
        from export.gguf_export import check_model_family, require_gguf
        require_gguf()
        check_model_family(args.model)
    if args.out is not None and not args.out.strip():
        raise QschedError("--out is empty; give an artifact directory or leave --out out for the default")
    from qsched.compiler import check_out
    check_out(Path(args.out or f"out/{Path(args.model).name}-{spec}"), args.overwrite)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("report", "view"):  # subcommands; every compile command line starts with a flag
        from qsched.report.cli import main as report_main
        return report_main(argv)
    if argv and argv[0] == "generate":
        from export.generate import main as generate_main
        return generate_main(argv[1:])
    args = build_parser().parse_args(argv)
    from qsched.core.errors import QschedError
    try:
        from qsched.core.bits import parse_bits
        spec = parse_bits(args.bits)
        _validate(args, spec)
        ray = None
        if args.ray is not None or args.ray_workers is not None:
            from qsched.distributed import RayConfig
            ray = RayConfig(address=args.ray or "auto", workers=args.ray_workers)
        if args.plan:
            return _plan(args, spec, ray)
        from qsched.compiler import compile as run_compile
        artifact = run_compile(model=args.model, bits=spec, out=args.out, recipe=args.recipe, seed=args.seed,
                               device=args.device, init=args.init, width_scale=args.width_scale, dtype=args.dtype,
                               uniform=args.uniform,
                               coefficients=not args.no_qsched,
                               cache_search=not args.no_cache_search, bundle=args.bundle,
                               eval_prompts=args.eval_prompts, overwrite=args.overwrite, progress=not args.quiet,
                               cache_budget=args.cache_budget, ray=ray, scorer=args.scorer)
        exports = {}
        if "modelopt" in args.export:
            from export.runtime_modelopt import export_modelopt
            exports["modelopt"] = export_modelopt(artifact.path, overwrite=args.overwrite)
        if "onnx" in args.export:  # onnx/ added to the artifact in place, atomically
            from export.runtime_onnx import export_onnx
            record = export_onnx(artifact.path, overwrite=args.overwrite)
            exports["onnx"] = {**{k: record[k] for k in ("graph", "steps", "counts")},
                               "switched": (record.get("switched") or {}).get("graph")}
        if "gguf" in args.export:  # gguf/ added to the artifact in place, atomically
            from export.gguf_export import export_gguf
            record = export_gguf(artifact.path, overwrite=args.overwrite)
            exports["gguf"] = {**{k: record[k] for k in ("file", "bytes", "counts")},
                               "substitutions": len(record["substitutions"])}  # the list: manifest["gguf"]
    except QschedError as err:
        print(f"qcompile: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qcompile: interrupted; no artifact was written", file=sys.stderr)
        return 130
    summary = {"artifact": str(artifact.path), "bits": artifact.manifest["bits"],
               "stages": {name: stage.get("status", "?") + (f" ({stage['method']})" if stage.get("method") else "")
                          + (f": {stage['reason']}" if stage.get("reason") else "")
                          for name, stage in artifact.manifest.get("stages", {}).items()}, **artifact.metrics}
    if exports:
        summary["exports"] = exports
    print(json.dumps(summary, indent=2))
    return 0


def _plan(args, spec, ray) -> int:
    """``--plan``: the :class:`qsched.planning.CompilePlan` of this command line, as a table or (``--json``) one
    JSON object, like a compile's summary."""
    from qsched.planning import plan_compile, render_text

    plan = plan_compile(model=args.model, bits=spec, recipe=args.recipe, init=args.init, width_scale=args.width_scale,
                        dtype=args.dtype, uniform=args.uniform,
                        coefficients=not args.no_qsched, cache_search=not args.no_cache_search,
                        cache_budget=args.cache_budget, scorer=args.scorer, seed=args.seed, device=args.device,
                        eval_prompts=args.eval_prompts, bundle=args.bundle, ray=ray, plan_device=args.plan_device,
                        measure=args.plan_measure)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else render_text(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())

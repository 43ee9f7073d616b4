"""``qcompile generate DIR --prompt …``: draw images with a compiled artifact the way a deployment would.

The artifact is loaded by :func:`export.load` (checksums, nothing unpickled) on the runtime asked for
(default ``native``: the integer and packed layers a deployment runs, with the artifact's Q-Sched scheduler,
cache schedule and call defaults) and, optionally, compiled (``--compile full|regional``). One PNG per
prompt is written. The first batch pays any compilation, so the summary times it apart from the later ones:
a user sees both what the compile costs and what a call costs. Every input is checked before the model is
loaded; an existing image is never replaced without ``--overwrite``.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from qsched.core.errors import ArtifactError, QschedError

RUNTIMES = ("native", "simulated", "onnx")


def image_names(prompts: list[str]) -> list[str]:
    """``NN-slug.png`` per prompt: numbered (prompts may repeat), readable, filesystem-safe."""
    width = max(2, len(str(len(prompts) - 1)))
    return [f"{i:0{width}d}-{re.sub(r'[^a-z0-9]+', '-', p.lower()).strip('-')[:48] or 'prompt'}.png"
            for i, p in enumerate(prompts)]


def check_request(path, prompts: list[str], out, runtime: str, compile: str | bool, device: str, batch_size: int,
                  seed: int, overwrite: bool) -> tuple[Path, list[Path]]:
    """Everything :func:`generate_images` can refuse, before anything is loaded: returns the artifact folder
    and the image paths. Raises :class:`QschedError` (one line: what was wrong and what to do)."""
    from export.format import read_manifest
    from export.loader import compile_mode
    from qsched.core.cli_support import check_device

    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise QschedError("give at least one non-empty prompt (--prompt TEXT, repeatable, or --prompts-file FILE)")
    if runtime not in RUNTIMES:
        raise QschedError(f"unknown runtime {runtime!r}; use {', '.join(RUNTIMES)}")
    mode = compile_mode(compile)
    if mode != "off" and runtime == "onnx":
        raise QschedError(f"--compile {mode} needs a torch runtime (native or simulated); onnxruntime optimises "
                          "its own graph")
    if batch_size < 1:
        raise QschedError(f"--batch {batch_size} must be at least 1")
    if not 0 <= seed < 2**63:
        raise QschedError(f"--seed {seed} is out of range: use an integer from 0 to {2**63 - 1}")
    check_device(device)
    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise ArtifactError(f"{path} is not an artifact (no manifest.json); give a folder written by qcompile")
    manifest = read_manifest(path, verify=False)  # one JSON read; load() verifies every checksum
    if runtime == "onnx" and "onnx" not in manifest:
        raise ArtifactError(f"{path} has no ONNX export; add one with `qcompile ... --export onnx` or use "
                            "--runtime native")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QschedError(f"--out {out} is a file; give a folder for the images")
    if out.resolve() == path.resolve() or path.resolve() in out.resolve().parents:
        raise QschedError(f"--out {out} is inside the artifact, which must hold only the files its manifest "
                          "lists; write the images elsewhere")
    targets = [out / name for name in image_names(prompts)]
    taken = [t for t in targets if t.exists()]
    if taken and not overwrite:
        raise QschedError(f"{taken[0]} already exists ({len(taken)} of the images would be replaced); pass "
                          "--overwrite or choose another --out")
    return path, targets


def generate_images(path, prompts: list[str], out, runtime: str = "native", compile: str | bool = "off",
                    device: str = "cpu", batch_size: int = 4, seed: int = 0, overwrite: bool = False) -> dict:
    """Load the artifact at ``path``, draw ``prompts`` in batches of ``batch_size`` (batch ``i`` seeded with
    ``seed + i``, the compile's own convention) and write one PNG each into ``out``. Returns a plain record:
    the image paths, the settings, the load time and each batch's wall time (the first includes any compile).
    """
    import torch

    from export.loader import compile_mode, load

    path, targets = check_request(path, prompts, out, runtime, compile, device, batch_size, seed, overwrite)
    start = time.perf_counter()
    pipe = load(path, runtime=runtime, device=device, compile=compile)
    load_seconds = time.perf_counter() - start
    targets[0].parent.mkdir(parents=True, exist_ok=True)
    batches = []
    for b, first in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[first:first + batch_size]
        start = time.perf_counter()
        with torch.inference_mode():
            images = pipe(chunk, generator=torch.Generator("cpu").manual_seed(seed + b), output_type="pil").images
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        batches.append({"prompts": len(chunk), "seconds": round(time.perf_counter() - start, 4)})
        for image, target in zip(images, targets[first:first + batch_size]):
            part = target.with_name(target.name + ".part")
            image.save(part, format="PNG")
            os.replace(part, target)  # a reader never sees half an image
    later = [b["seconds"] for b in batches[1:]]
    return {"artifact": str(path), "runtime": runtime, "compile": compile_mode(compile), "device": device,
            "seed": seed, "batch_size": batch_size, "call_defaults": _plain(getattr(pipe, "call_defaults", {})),
            "images": [str(t) for t in targets], "load_seconds": round(load_seconds, 4), "batches": batches,
            "first_batch_seconds": batches[0]["seconds"],
            "later_batch_seconds": round(sum(later) / len(later), 4) if later else None}


def _plain(values: dict) -> dict:
    return {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool, type(None)))}


def build_parser():
    from qsched.core.cli_support import OneLineParser

    p = OneLineParser(prog="qcompile generate",
                      description="Draw images with a compiled artifact as a deployment would (export.load: "
                                  "checksums, no unpickling; the artifact's scheduler, cache schedule and sampler "
                                  "settings) and write one PNG per prompt. Prints a JSON summary with the timings; "
                                  "the first batch includes any compilation.")
    p.add_argument("dir", metavar="DIR", help="an artifact directory written by qcompile")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", metavar="FILE", help="a text file with one prompt per line (blank lines skipped)")
    p.add_argument("--out", metavar="FOLDER", help="where the PNGs go (default: DIR-images beside the artifact)")
    p.add_argument("--runtime", choices=RUNTIMES, default="native",
                   help="native: the integer/packed layers a deployment runs (default); simulated: the compile's "
                        "reference; onnx: the artifact's ONNX export on onnxruntime")
    p.add_argument("--compile", choices=("off", "full", "regional"), default="off",
                   help="torch.compile the denoiser: full, or regional (each repeated block once); default off")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--batch", type=int, default=4, help="prompts per pipeline call (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="batch i draws with seed + i (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace images already in --out")
    return p


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise QschedError(f"--prompts-file {args.prompts_file}: cannot read it ({e.__class__.__name__}); give a "
                              "UTF-8 text file with one prompt per line") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    return prompts


def main(argv: list[str]) -> int:
    """``qcompile generate …`` (``argv`` without the word ``generate``)."""
    args = build_parser().parse_args(argv)
    try:
        out = args.out or f"{Path(args.dir).resolve()}-images"
        record = generate_images(args.dir, _read_prompts(args), out, runtime=args.runtime, compile=args.compile,
                                 device=args.device, batch_size=args.batch, seed=args.seed, overwrite=args.overwrite)
    except QschedError as err:
        print(f"qcompile: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qcompile: interrupted; the images written so far are complete", file=sys.stderr)
        return 130
    print(json.dumps(record, indent=2))
    return 0

"""Resident memory of the ONNX runtime with a cache schedule: one switched graph against one graph per step.

An artifact's ONNX export with a cache schedule is, by default, one *switched* graph: whatever a step skips
sits in ``If`` nodes (``export.onnx_graph.switched_graph``), so one onnxruntime session serves every step.
The earlier layout (``export_onnx(..., switched=False)``) has one cut graph per distinct reuse pattern, all
pointing at one data file on disk, and :class:`export.runtime_onnx.OnnxDenoiser` makes one session per graph.

Why the switched graph: what each session holds is mostly onnxruntime's own pre-packed (``MatMulNBits``,
gemms) or rewritten (int8 -> uint8 codes under ``session.x64quantprecision``) copy of the quantized weights
(tenth session, onnxruntime 1.32, CPU EP). Handing every session the same initializers
(``SessionOptions.add_initializer``) was built and measured and saved nothing: onnxruntime re-packs per
session, and its ``PrepackedWeightsContainer``, which would share the packed copies, is only in the C API.

Builds (under ``--out``, reused when present) an ONNX export of flux-tiny with a ``--steps`` cache schedule
whose steps 1.. each reuse a different set of components (attention only, MLPs only, everything, ...), so
``steps`` cut graphs, quantized uniformly at each ``--bits`` (w4a8: 4-bit ``MatMulNBits``; w8a8: int8 QDQ,
``MatMulIntegerToFloat``), in both layouts: the embedded trained flux-tiny (a few MB of weights), and with
``--heads N`` also a wider random-init FLUX-shaped transformer in the same tiny pipeline (N heads of 32,
width 32 N, the same depth). Then each variant runs in a fresh subprocess (so they do not share allocator
state), one intra-op thread:

* ``switched``: ``export.load(path, runtime="onnx")`` of the default export (one session);
* ``cut-graphs``: the same for the per-step layout (one session per distinct step);
* ``no-prepack``: the switched export with onnxruntime's ``session.disable_prepacking`` (an experiment, not
  a shipped setting: the ``MatMulNBits`` copies go, at about 2.3x the generation time).

Reported per variant, as RSS (``VmRSS``) above the process's RSS once the pipeline is loaded (text
encoders, VAE; no session yet): after creating every session, and after one generation (``--steps`` steps,
two prompts); the first session's increment and the mean of each further one; the weights' bytes (the data
file); the generation's seconds; and the largest difference of its image from the ``switched`` variant's
(0 = bit-identical).

    python benchmarks/onnx_memory.py --out bench-out/onnx-memory
    python benchmarks/onnx_memory.py --heads 32 --out bench-out/onnx-memory     # also a 1024-wide FLUX
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

VARIANTS = ("switched", "cut-graphs", "no-prepack")
PROMPTS = ["a red circle on the left", "a blue square above a green triangle"]
MB = 1 << 20
# what steps 1, 2, ... reuse, in turn: component-name sets of qsched.runtime.cache_schedule (None = all)
PATTERNS = ({"attn"}, {"ff", "ff_context", "proj_mlp"}, None, {"proj_out"}, {"attn", "proj_out"})


def _rss() -> int:
    """VmRSS of this process in bytes."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS"))
    return int(line.split()[1]) * 1024


# ------------------------------------------------------------------------------------------ building

def schedule_for(transformer, steps: int):
    """A schedule whose step s >= 1 reuses ``PATTERNS[s - 1]`` (cycled): up to five distinct step graphs."""
    import numpy as np

    from qsched.runtime.cache_schedule import CacheSchedule, block_layout

    blocks = block_layout(transformer)
    base = CacheSchedule(steps, blocks)
    table = np.zeros((steps, len(base.slots)), dtype=bool)
    for step in range(1, steps):
        pattern = PATTERNS[(step - 1) % len(PATTERNS)]
        table[step] = [pattern is None or comp in pattern for _, comp in base.slots]
    return CacheSchedule(steps, blocks, table)


def tiny_pipeline(heads: int | None, seed: int):
    """The embedded trained flux-tiny, or (``heads``) a random-init one of width 32 * heads."""
    import torch

    from qsched.tinyworld.model import SHIPPED_TRANSFORMER_CONFIG, build_tiny_pipeline, load_embedded

    if heads is None:
        return load_embedded()
    torch.manual_seed(seed)
    return build_tiny_pipeline(seed=seed, shipped=True,
                               transformer_config=dict(SHIPPED_TRANSFORMER_CONFIG, num_attention_heads=heads))


def build(out: Path, bits: str, heads: int | None, steps: int, seed: int = 0) -> Path:
    """A uniformly quantized flux-tiny artifact with the schedule above and its ONNX export (static shapes),
    switched; beside it (``<out>-cut``) a copy exported as one cut graph per step."""
    import shutil

    import dataclasses

    import torch
    from torch import nn

    from calibrate.statistics import observe_inputs
    from export.runtime_onnx import export_onnx
    from export.save import save_quantized
    from qsched.core.bitplan import BitPlan, LayerPlan
    from qsched.core.bits import parse_bits
    from qsched.runtime.apply import quantize_
    from qsched.runtime.generation import generate
    from qsched.tinyworld.model import TINY_SETTINGS

    spec = parse_bits(bits)
    wbits, abits = spec.uniform_weight_bits, None if spec.act_bits >= 16 else spec.act_bits
    settings = dataclasses.replace(TINY_SETTINGS, steps=steps)
    pipe = tiny_pipeline(heads, seed)
    denoiser = pipe.transformer
    layers = {n: m for n, m in denoiser.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    with observe_inputs(layers, momentum=None) as observers:
        generate(pipe, PROMPTS[:1], settings, seed=seed)
    ranges = {n: o.range for n, o in observers.items() if o.calls}
    plan = BitPlan(layers={n: LayerPlan(wbits, abits, params=m.weight.numel()) for n, m in layers.items()},
                   method="uniform-rtn", target=bits)
    schedule = schedule_for(denoiser, steps)
    with torch.no_grad():
        quantize_(denoiser, plan, ranges)
    manifest = {"source": {"kind": "benchmark", "model": "flux-tiny" if heads is None else f"flux-tiny-{heads}h"},
                "bits": bits, "generation": settings.to_dict(), "calibration_prompts": PROMPTS,
                "cache": {"schedule": schedule.to_dict(), "pareto_front": None}}
    path = save_quantized(out, pipe, "transformer", plan, manifest, bundle=True, overwrite=True)
    export_onnx(path, dynamic=False)
    cut = _cut_path(path)
    shutil.rmtree(cut, ignore_errors=True)
    shutil.copytree(path, cut)
    export_onnx(cut, dynamic=False, overwrite=True, switched=False)
    return path


def _cut_path(path: Path) -> Path:
    return Path(path).parent / f"{Path(path).name}-cut"


# ------------------------------------------------------------------------------------------- child

def child(variant: str, path: str) -> dict:
    """Runs in the subprocess: load the pipeline, make every step graph's session, generate once."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import export
    from qsched.runtime.generation import GenerationSettings, generate

    if variant == "cut-graphs":
        path = str(_cut_path(path))
    pipe = export.load(path, runtime="onnx")
    denoiser = pipe.transformer
    denoiser.threads = 1
    if variant == "no-prepack":
        session = denoiser.record["session"]
        denoiser.record = {**denoiser.record, "session": {
            **session, "config": {**session["config"], "session.disable_prepacking": "1"}}}
    switched = denoiser.record.get("switched")
    graphs = [switched["graph"]] if switched else list(dict.fromkeys(denoiser.record["steps"]))
    result = {"variant": variant, "graphs": len(graphs), "loaded": _rss(), "sessions": []}
    for graph in graphs:
        denoiser.session(graph)
        result["sessions"].append(_rss())
    settings = GenerationSettings(**pipe.qsched_manifest["generation"])
    start = time.perf_counter()
    image = generate(pipe, PROMPTS, settings, seed=3, batch_size=2)
    result["generate_s"] = round(time.perf_counter() - start, 2)
    result["generated"] = _rss()
    result["data_bytes"] = sum((Path(path) / rel).stat().st_size for rel in pipe.qsched_manifest["files"]
                               if rel.endswith(".onnx.data"))
    np.save(_image_file(_switched_path(path), variant), image.numpy())
    return result


def _switched_path(path) -> Path:
    return Path(str(path).removesuffix("-cut"))


def _image_file(path, variant: str) -> Path:
    """Where a child leaves its image (beside the artifact: its folder is the manifest's)."""
    return Path(path).parent / f"{Path(path).name}.image-{variant}.npy"


def run_child(variant: str, path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", variant, str(path)], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode:
        return {"variant": variant, "error": proc.stderr.strip()[-800:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def row(model: str, bits: str, r: dict, reference) -> str:
    """One markdown row, MB above the RSS after loading the pipeline."""
    import numpy as np

    if "error" in r:
        return f"| {model} | {bits} | {r['variant']} | error: {r['error'].splitlines()[-1]} |"
    base, sess = r["loaded"], r["sessions"]
    steps = [b - a for a, b in zip([base] + sess[:-1], sess)]
    further = sum(steps[1:]) / max(1, len(steps) - 1)
    image = np.load(_image_file(r["path"], r["variant"]))
    diff = float(np.abs(image - reference).max()) if reference is not None else float("nan")
    return (f"| {model} | {bits} | {r['variant']} | {r['data_bytes'] / MB:.1f} | {r['graphs']} | "
            f"{(sess[-1] - base) / MB:.1f} | {(r['generated'] - base) / MB:.1f} | {steps[0] / MB:.1f} | "
            f"{further / MB:.1f} | {r['generate_s']:.2f} | {diff:.2g} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-out/onnx-memory")
    p.add_argument("--bits", nargs="+", default=["w4a8", "w8a8"], help="uniform widths, one export each")
    p.add_argument("--heads", type=int, nargs="*", default=[],
                   help="also measure random-init transformers of these many 32-wide heads (flux-tiny: 4)")
    p.add_argument("--steps", type=int, default=4, help="schedule steps = step graphs (at most 6 distinct)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    import numpy as np

    out = Path(args.out)
    lines = [("| model | bits | variant | weights MB | sessions | after sessions MB | after generation MB | "
              "first session MB | each further session MB | generation s | max image diff vs switched |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    results = []
    for heads in [None, *args.heads]:
        model = "flux-tiny" if heads is None else f"flux-tiny x{heads} heads (random)"
        for bits in args.bits:
            path = out / f"{'tiny' if heads is None else f'h{heads}'}-{bits}-s{args.steps}"
            if not (path / "manifest.json").is_file():
                build(path, bits, heads, args.steps)
            runs = [dict(run_child(v, path), path=str(path)) for v in args.variants]
            ok = any(r["variant"] == "switched" and "error" not in r for r in runs)
            reference = np.load(_image_file(path, "switched")) if ok else None
            for r in runs:
                lines.append(row(model, bits, r, reference))
                results.append({"model": model, "bits": bits, **r})
                print(lines[-1], file=sys.stderr, flush=True)  # progress: the table is printed at the end
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx_memory.json").write_text(json.dumps(results, indent=2))
    print("RSS in MB above the process's RSS after loading the pipeline (no session yet); "
          "one intra-op thread.")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

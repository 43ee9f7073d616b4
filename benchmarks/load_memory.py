"""Peak memory of loading a w4a8 FLUX.1-schnell denoiser (random init) against its BF16 original.

Every measurement runs in a fresh subprocess and reads the kernel's own counters (``VmHWM``/``VmRSS`` in
``/proc/self/status``; ``ru_maxrss`` agrees). Variants:

* ``bf16``: the BF16 transformer loaded the cheapest way (built on the meta device, safetensors tensors
  assigned, no random init first): the floor for any BF16 loader.
* ``w4a8-simulated``: ``export.load``'s denoiser path, ``runtime="simulated"``: integer codes in int8 and
  scales; the FP weights are dequantized (and cached) at the first forward, so after one step the
  simulation holds an FP copy too. This is the search/validation runtime, not the deployment one.
* ``w4a8-native``: ``runtime="native"``: the W4 weights stay packed (two codes per byte) and are
  dequantized per forward. This is the deployment number. ``export.load`` streams it
  (:func:`export.loader.build_native_denoiser`): each layer's stored tensors are read from its shard into
  memory of their own (no mapping), turned into its native layer, the packed bytes kept as stored.
* ``w4a8-native-legacy``: the same native model built the way ``export.load`` did before streaming (every
  shard loaded, ``build_denoiser`` unpacking every layer's codes to int8, then ``to_native_`` packing them
  again), kept as the "before" of the comparison.

Reported per variant, as bytes above the process's RSS after its imports: the load's peak (``VmHWM``),
RSS after the load and after one denoiser forward (64 image + 16 text tokens), split into anonymous
memory and file-backed pages (safetensors maps the shards; touched pages of a mapping count in RSS while
any tensor still views it; they are clean and reclaimable, but resident), RSS after ``malloc_trim(0)``
(the C allocator keeps freed heap pages, e.g. the loader's transient int8 codes, until trimmed), and
the bytes the model's own tensors occupy.

The denoiser path means what :func:`export.load` does to the denoiser (read the manifest, then
``build_native_denoiser`` for native; load the shards and ``build_denoiser`` for simulated) without the
text encoders and VAE: those are the same FP modules
for every variant (T5-XXL alone is 9.5 GB in BF16) and would only add a constant.

FLUX.1-schnell in BF16 is 23.8 GB and this machine has 24 GiB shared with other jobs, so the full model
is not loaded here. Instead the same config is built with fewer blocks, in "units" of one double-stream
block plus two single-stream blocks (FLUX.1-schnell has 19 double and 38 single blocks = 19 units), at
several depths; each number is fitted as ``a + b * units`` and extrapolated to 19 units. The fit's
residuals show whether memory really is linear in depth. ``--full`` also writes the full-size w4a8
artifact (about 6 GB, minutes) and loads it natively, but only when the extrapolated peak is under
``--limit-gib``; every child is killed if its RSS crosses that limit.

    python benchmarks/load_memory.py --units 1 2 3 --full --out bench-out/load-memory
    python benchmarks/load_memory.py --units 1 2 3 --variants w4a8-native w4a8-native-legacy   # before/after
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

FULL_UNITS = 19  # FLUX.1-schnell: 19 double-stream + 38 single-stream blocks
VARIANTS = ("bf16", "w4a8-simulated", "w4a8-native", "w4a8-native-legacy")
GIB = 1 << 30


def _status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def scaled_config(model: str, units: int) -> dict:
    from qsched.models.shipped_configs import load_component_config

    cfg = dict(load_component_config(model, "transformer"))
    cfg["num_layers"], cfg["num_single_layers"] = units, 2 * units
    return cfg


def meta_denoiser(cfg: dict):
    import torch

    from qsched.models.shipped_configs import _build_diffusers

    return _build_diffusers(cfg, "meta", torch.bfloat16)


# ------------------------------------------------------------------------------------------ writing

def write_pair(model: str, units: int, out: Path, seed: int = 0, with_bf16: bool = True) -> tuple[Path, Path]:
    """A w4a8 artifact and a BF16 safetensors folder of the same random weights, one block at a time."""
    import torch

    from artifact_size import block_shards, materialise
    from qsched.core.bitplan import BitPlan, LayerPlan
    from export.format import write_artifact
    from safetensors.torch import save_file

    cfg = scaled_config(model, units)
    art, bf16 = out / f"{model}-{units}u-w4a8", out / f"{model}-{units}u-bf16"
    specs: dict = {}
    denoiser = meta_denoiser(cfg)
    shard_names = []

    def shards():
        for name, tensors in block_shards(denoiser, 4, 8, specs, seed):
            shard_names.append(name)
            yield name, tensors

    # the manifest needs the shard list and layer specs, which the generator fills in as it goes: write the
    # shards first under a placeholder manifest, then write the real manifest with the same writer.
    tmp_manifest = {"note": "placeholder"}
    path = write_artifact(art, tmp_manifest, shards(), overwrite=True)
    from export.format import read_manifest
    manifest = read_manifest(path, verify=False)
    plan = BitPlan(layers={n: LayerPlan(4, 8) for n in specs}, method="uniform-rtn", target="w4a8")
    manifest.update({"denoiser": {"attr": "transformer", "class": cfg["_class_name"],
                                  "config": {k: v for k, v in cfg.items()}, "shards": shard_names},
                     "layers": specs, "bit_plan": plan.to_dict(), "bits": "w4a8",
                     "note": f"load-memory benchmark: {model} config with {units} double and {2 * units} single "
                             f"blocks, random weights, placeholder activation ranges"})
    files = manifest.pop("files")
    manifest.pop("schema_version")
    (path / "manifest.json").write_text(json.dumps({**manifest, "files": files, "schema_version": 1},
                                                   sort_keys=True, indent=2) + "\n")

    if not with_bf16:
        return path, bf16
    # BF16: the same seeds through the same materialise(), saved per block
    shutil.rmtree(bf16, ignore_errors=True)
    bf16.mkdir(parents=True)
    denoiser = meta_denoiser(cfg)
    units_list = []
    for name, child in denoiser.named_children():
        units_list += [(f"{name}.{i}", sub) for i, sub in enumerate(child)] if isinstance(child, torch.nn.ModuleList) \
            else [(name, child)]
    for index, (prefix, unit) in enumerate(units_list):
        materialise(unit, seed + index)
        save_file({f"{prefix}.{k}": v.contiguous() for k, v in unit.state_dict().items()},
                  str(bf16 / f"transformer-{index:05d}.safetensors"))
        unit.to("meta")
    (bf16 / "config.json").write_text(json.dumps(cfg, indent=2))
    return path, bf16


# ------------------------------------------------------------------------------------------- child

def _flux_inputs(cfg: dict, image_tokens: int = 64, text_tokens: int = 16):
    import torch

    gen = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, image_tokens, cfg["in_channels"], generator=gen, dtype=torch.bfloat16),
                encoder_hidden_states=torch.randn(1, text_tokens, cfg["joint_attention_dim"], generator=gen,
                                                  dtype=torch.bfloat16),
                pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=gen, dtype=torch.bfloat16),
                timestep=torch.full((1,), 0.5, dtype=torch.bfloat16), img_ids=torch.zeros(image_tokens, 3),
                txt_ids=torch.zeros(text_tokens, 3), return_dict=False)


def child(variant: str, path: str) -> dict:
    """Runs in the subprocess: load one variant, then one denoiser forward; report memory at each point."""
    import torch

    torch.set_num_threads(1)
    import diffusers  # noqa: F401  (imports are not the load: measured before it)

    import export.loader  # noqa: F401
    from export.format import load_shard, read_manifest
    from export.loader import build_denoiser, build_native_denoiser

    result = {"variant": variant, "before": _status()}
    t0 = time.perf_counter()
    if variant == "bf16":
        from safetensors.torch import load_file

        cfg = json.loads((Path(path) / "config.json").read_text())
        denoiser = meta_denoiser(cfg)
        state = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            state.update(load_file(str(f)))
        denoiser.load_state_dict(state, assign=True, strict=True)
        del state
    elif variant == "w4a8-native":  # exactly export.load's denoiser path for runtime="native"
        manifest = read_manifest(path, verify=False)
        cfg = manifest["denoiser"]["config"]
        denoiser = build_native_denoiser(manifest, path)
    else:  # simulated: export.load's path; legacy native: what export.load did before streaming
        manifest = read_manifest(path, verify=False)
        cfg = manifest["denoiser"]["config"]
        tensors = {}
        for shard in manifest["denoiser"]["shards"]:
            tensors.update(load_shard(path, shard))
        denoiser = build_denoiser(manifest, tensors)
        if variant == "w4a8-native-legacy":
            from export.runtime_torch import to_native_
            to_native_(denoiser)
        del tensors
    result["load_s"] = round(time.perf_counter() - t0, 2)
    result["after_load"] = _status()
    with torch.no_grad():
        out = denoiser(**_flux_inputs(cfg))[0]
    result["after_step"] = _status()
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back: what is left is what the model holds
    result["after_trim"] = _status()
    result["step_output_finite"] = bool(torch.isfinite(out.float()).all())
    result["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["params"] = sum(p.numel() for p in denoiser.parameters()) + sum(b.numel() for b in denoiser.buffers())
    # what the model's tensors occupy (simulation's dequantized cache included): RSS above this is allocator
    # slack (freed unpacked codes the C allocator keeps) and pages of the mmapped shards still resident
    cached = sum(m._dequantized.nbytes for m in denoiser.modules() if getattr(m, "_dequantized", None) is not None)
    result["model_bytes"] = sum(t.nbytes for t in list(denoiser.parameters()) + list(denoiser.buffers())) + cached
    return result


def run_child(variant: str, path: Path, limit_gib: float) -> dict:
    """One variant in a fresh process, killed if its RSS crosses ``limit_gib`` (polled every 20 ms; an
    address-space limit 4 GiB above it backs that up)."""
    limit = int(limit_gib * GIB)

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit + 4 * GIB, limit + 4 * GIB))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "--child", variant, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=cap)
    killed, peak_seen = False, 0
    while proc.poll() is None:
        try:
            rss = int(next(l for l in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                           if l.startswith("VmRSS")).split()[1]) * 1024
        except (OSError, StopIteration):
            rss = 0
        peak_seen = max(peak_seen, rss)
        if rss > limit:
            proc.kill()
            killed = True
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    if killed or proc.returncode:
        return {"variant": variant, "error": "killed: RSS above the limit" if killed else stderr.strip()[-800:],
                "peak_seen": peak_seen}
    return json.loads(stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- analysis

def fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b x``; returns (a, b, largest relative residual)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    worst = max(abs(a + b * x - y) / y for x, y in zip(xs, ys))
    return a, b, worst


def summarise(runs: dict[int, dict[str, dict]], full_units: int) -> dict:
    """Per variant: load peak (VmHWM), RSS after load, RSS after one step, each minus the process's RSS
    before loading (imports), fitted over depth and extrapolated to the full model."""
    table = {}
    for variant in VARIANTS:
        rows = {u: r[variant] for u, r in runs.items() if variant in r and "error" not in r[variant]}
        if not any(variant in r for r in runs.values()):
            continue
        if len(rows) < 2:
            table[variant] = {"error": "fewer than two depths measured"}
            continue
        us = sorted(rows)
        entry = {"units": us}
        for label, key, field in (("load_peak", "after_load", "VmHWM"), ("after_load", "after_load", "VmRSS"),
                                  ("after_step", "after_step", "VmRSS"), ("overall_peak", "after_step", "VmHWM"),
                                  ("after_step_anon", "after_step", "RssAnon"), ("after_step_file", "after_step", "RssFile"),
                                  ("after_trim", "after_trim", "VmRSS"), ("after_trim_anon", "after_trim", "RssAnon")):
            base = "RssAnon" if field == "RssAnon" else "RssFile" if field == "RssFile" else "VmRSS"
            ys = [rows[u][key][field] - rows[u]["before"][base] for u in us]
            a, b, resid = fit(us, ys)
            entry[label] = {"measured_gb": [round(y / 1e9, 3) for y in ys], "per_unit_gb": round(b / 1e9, 4),
                            "intercept_gb": round(a / 1e9, 4), "max_rel_residual": round(resid, 4),
                            "full_model_gb": round((a + b * full_units) / 1e9, 2)}
        ys = [rows[u]["model_bytes"] for u in us]
        a, b, _ = fit(us, ys)
        entry["model_tensors"] = {"measured_gb": [round(y / 1e9, 3) for y in ys], "full_model_gb": round((a + b * full_units) / 1e9, 2)}
        entry["imports_rss_gb"] = round(rows[us[0]]["before"]["VmRSS"] / 1e9, 3)
        entry["params"] = [rows[u]["params"] for u in us]
        table[variant] = entry
    return table


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-schnell")
    p.add_argument("--units", type=int, nargs="+", default=[1, 2, 4],
                   help="depths to measure: one unit = 1 double + 2 single blocks (full FLUX.1 = 19)")
    p.add_argument("--out", default="bench-out/load-memory")
    p.add_argument("--limit-gib", type=float, default=18.0, help="kill any child whose RSS crosses this")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="what to load")
    p.add_argument("--full", action="store_true", help="also write and load the full w4a8 artifact if it fits")
    p.add_argument("--keep", action="store_true", help="keep the written artifacts")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[int, dict[str, dict]] = {}
    for units in args.units:
        art, bf16 = write_pair(args.model, units, out / "work", with_bf16="bf16" in args.variants)
        runs[units] = {v: run_child(v, bf16 if v == "bf16" else art, args.limit_gib) for v in args.variants}
        for v, r in runs[units].items():
            print(f"{units} unit(s) {v}: " + (r.get("error") or
                  f"load peak {(r['after_load']['VmHWM'] - r['before']['VmRSS']) / 1e9:.3f} GB, "
                  f"after load {(r['after_load']['VmRSS'] - r['before']['VmRSS']) / 1e9:.3f} GB, "
                  f"after one step {(r['after_step']['VmRSS'] - r['before']['VmRSS']) / 1e9:.3f} GB, "
                  f"model tensors {r['model_bytes'] / 1e9:.3f} GB "
                  f"(imports {r['before']['VmRSS'] / 1e9:.3f} GB, load {r['load_s']} s)"), flush=True)
        if not args.keep:
            shutil.rmtree(art)
            shutil.rmtree(bf16, ignore_errors=True)
    result = {"model": args.model, "units_measured": args.units, "full_units": FULL_UNITS,
              "note": "bytes above the process's RSS after imports; full_model_gb is the linear fit "
                      "a + b*units extrapolated to 19 units (19 double + 38 single blocks), not a measurement",
              "runs": {str(u): r for u, r in runs.items()}, "fit": summarise(runs, FULL_UNITS)}
    if args.full:
        predicted = result["fit"].get("w4a8-native", {}).get("load_peak", {}).get("full_model_gb")
        if predicted is None or predicted * 1e9 + 1.5 * GIB > args.limit_gib * GIB:
            result["full"] = {"skipped": f"extrapolated native load peak {predicted} GB (+ imports) is above "
                                         f"--limit-gib {args.limit_gib}"}
        else:
            art, _ = write_pair(args.model, FULL_UNITS, out / "work", with_bf16=False)
            result["full"] = run_child("w4a8-native", art, args.limit_gib)
            if not args.keep:
                shutil.rmtree(out / "work")
    (out / f"{args.model}.json").write_text(json.dumps(result, indent=2))
    for variant, entry in result["fit"].items():
        if "error" in entry:
            print(f"{variant}: {entry['error']}")
            continue
        print(f"{variant}: load peak {entry['load_peak']['measured_gb']} GB at {entry['units']} units "
              f"-> {entry['load_peak']['full_model_gb']} GB at 19 (fit residual {entry['load_peak']['max_rel_residual']:.1%}); "
              f"after one step {entry['after_step']['full_model_gb']} GB (anon {entry['after_step_anon']['full_model_gb']}, "
              f"file-backed {entry['after_step_file']['full_model_gb']}), after malloc_trim {entry['after_trim']['full_model_gb']} GB, "
              f"model tensors {entry['model_tensors']['full_model_gb']} GB")
    full = result.get("full")
    if full and "after_load" in full:
        base = full["before"]
        print(f"full {FULL_UNITS} units w4a8-native (measured): load peak {(full['after_load']['VmHWM'] - base['VmRSS']) / 1e9:.2f} GB, "
              f"after load {(full['after_load']['VmRSS'] - base['VmRSS']) / 1e9:.2f} GB "
              f"(file-backed {(full['after_load']['RssFile'] - base['RssFile']) / 1e9:.2f}), "
              f"after one step {(full['after_step']['VmRSS'] - base['VmRSS']) / 1e9:.2f} GB, overall peak "
              f"{(full['after_step']['VmHWM'] - base['VmRSS']) / 1e9:.2f} GB, after malloc_trim "
              f"{(full['after_trim']['VmRSS'] - base['VmRSS']) / 1e9:.2f} GB, model tensors {full['model_bytes'] / 1e9:.2f} GB, "
              f"load {full['load_s']} s (imports {base['VmRSS'] / 1e9:.2f} GB)")
    elif full:
        print("full:", json.dumps(full)[:400])


if __name__ == "__main__":
    main()

"""Quantized pipeline → artifact directory.

The denoiser is stored as packed integer codes plus scales (two int4 codes per byte for widths ≤ 4, int8
otherwise; FP8 layers' e4m3 codes as safetensors F8_E4M3), FP tensors for everything not quantized, and a manifest describing every layer, so that
:func:`export.loader.load` can rebuild it without pickle and without the source denoiser's weights.

The denoiser is written as a diffusers component folder (``<attr>/config.json`` carrying a
``quantization_config``, ``<attr>/diffusion_pytorch_model.safetensors``) and a bundle as ``save_pretrained``
lays a pipeline out (``model_index.json``, ``vae/``, ...), so diffusers' own ``from_pretrained`` loads the
artifact too (:mod:`export.diffusers_quantizer`).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from qsched.core.bitplan import BitPlan
from qsched.runtime.qlayers import QuantLayer

from export.format import write_artifact
from export.packing import pack_int

#: The denoiser's weights inside its folder: the name diffusers' ``from_pretrained`` looks for.
DENOISER_WEIGHTS = "diffusion_pytorch_model.safetensors"


def layer_specs(denoiser: torch.nn.Module) -> dict[str, dict]:
    """How to rebuild each QuantLayer: kind, weight shape, conv arguments, bias, dtype."""
    specs = {}
    for name, module in denoiser.named_modules():
        if isinstance(module, QuantLayer):
            weight = module.qweight if module.weight_bits is not None else module.weight
            specs[name] = {"kind": module.kind, "weight_shape": list(weight.shape),
                           "conv_args": {k: list(v) if isinstance(v, tuple) else v for k, v in module.conv_args.items()},
                           "has_bias": module.bias is not None, "dtype": str(module.compute_dtype).removeprefix("torch."),
                           "weight_bits": module.weight_bits, "act_bits": module.act_bits, "group_size": module.group_size}
            if module.format != "int":  # omitted for integer layers: their manifests stay as before
                specs[name]["format"] = module.format
            if module.fp_token_positions:  # BOS rows served in FP; their tensors are in the shard
                specs[name]["fp_tokens"] = list(module.fp_token_positions)
    return specs


def denoiser_tensors(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The denoiser's state with every integer weight packed; keys are module paths plus tensor names. FP8 codes
    are stored as they are (safetensors' F8_E4M3: one byte each, nothing to pack)."""
    tensors = {}
    quant = {name: m for name, m in denoiser.named_modules() if isinstance(m, QuantLayer)}
    for key, value in denoiser.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if leaf == "qweight" and owner in quant and quant[owner].format == "int":
            value = pack_int(value, quant[owner].weight_bits)
        tensors[key] = value.detach().contiguous().cpu()
    return tensors


def scheduler_record(scheduler) -> dict:
    """The scheduler as plain JSON: diffusers base class and config, plus Q-Sched coefficients if wrapped."""
    from qsched.runtime.schedulers import QSchedScheduler

    if isinstance(scheduler, QSchedScheduler):
        rec = scheduler.to_dict()
        return {"class": rec["base_class"], "config": _finite_config(rec["base_class"], rec["base_config"]),
                "coefficients": rec["coefficients"], "interpolate": rec["interpolate"]}
    name = type(scheduler).__name__
    return {"class": name, "config": _finite_config(name, json.loads(scheduler.to_json_string())), "coefficients": None}


def _finite_config(class_name: str, config: dict) -> dict:
    """The config without non-finite floats, which JSON cannot hold (DPM-Solver, PixArt's sampler, defaults
    ``lambda_min_clipped`` to -inf). Such an entry is left out when it is the class default, which
    ``from_config`` restores; any other non-finite value is refused rather than silently changed."""
    import inspect
    import math

    import diffusers

    defaults = inspect.signature(getattr(diffusers, class_name).__init__).parameters
    out = {}
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            default = defaults[key].default if key in defaults else None
            if not (isinstance(default, float) and (default == value or math.isnan(default) and math.isnan(value))):
                raise ValueError(f"scheduler config {key}={value} is not finite and not the class default; "
                                 "an artifact cannot store it")
            continue
        out[key] = value
    return out


def bundle_shards_and_files(pipe, denoiser_attr: str) -> tuple[dict, dict]:
    """Every pipeline component except the denoiser, as saved by ``save_pretrained`` (for ``--bundle``), at
    the paths it saved them to, ``model_index.json`` included. A Q-Sched scheduler is bundled as its
    diffusers base; the coefficients live in the manifest."""
    from qsched.runtime.schedulers import QSchedScheduler

    shards, files = {}, {}
    scheduler = pipe.scheduler
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(scheduler, QSchedScheduler):
            pipe.scheduler = scheduler.unwrap()
        try:
            pipe.save_pretrained(tmp, safe_serialization=True)
        finally:
            pipe.scheduler = scheduler
        root = Path(tmp)
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if not path.is_file() or rel.parts[0] == denoiser_attr:
                continue
            target = rel.as_posix()
            if path.suffix == ".safetensors":
                shards[target] = load_file(path)
            else:
                files[target] = path.read_bytes()
    return shards, files


def save_quantized(out_dir, pipe, denoiser_attr: str, plan: BitPlan, manifest: dict,
                   bundle: bool = False, extra_files: dict[str, bytes] | None = None, overwrite: bool = False,
                   fp_params: int | None = None, finalize=None) -> Path:
    """Write the artifact atomically; ``manifest`` carries the compile's results, this adds the layer specs
    and, given the source denoiser's parameter count, the measured size against BF16. ``finalize(tmp_dir)``
    adds unlisted views (``report.html``) before the rename (see :func:`export.format.write_artifact`)."""
    from export.diffusers_quantizer import component_config

    denoiser = getattr(pipe, denoiser_attr)
    config = json.loads(denoiser.to_json_string())
    specs = layer_specs(denoiser)
    manifest = dict(manifest)
    manifest.update({
        "denoiser": {"attr": denoiser_attr, "class": type(denoiser).__name__, "config": config,
                     "shards": [f"{denoiser_attr}/{DENOISER_WEIGHTS}"]},
        "pipeline_class": type(pipe).__name__,
        "bit_plan": plan.to_dict(),
        "layers": specs,
        "scheduler": scheduler_record(pipe.scheduler),
        "bundle": bool(bundle),
        "components": [],
    })
    tensors = denoiser_tensors(denoiser)
    shards = {manifest["denoiser"]["shards"][0]: tensors}
    if fp_params is not None:
        from qsched.scoring.fidelity import size_metrics
        packed = sum(t.numel() * t.element_size() for t in tensors.values())
        manifest["metrics"] = {**manifest.get("metrics", {}), "size": size_metrics(fp_params, packed)}
    files = dict(extra_files or {})
    files[f"{denoiser_attr}/config.json"] = component_config(config, specs, denoiser.dtype)
    if bundle:
        extra_shards, extra = bundle_shards_and_files(pipe, denoiser_attr)
        shards.update(extra_shards)
        files.update(extra)
        manifest["components"] = sorted({rel.split("/")[0] for rel in [*extra_shards, *extra] if "/" in rel})
    return write_artifact(out_dir, manifest, shards, files, overwrite=overwrite, finalize=finalize)

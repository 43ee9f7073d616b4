"""The architecture a plan prices, without weights: the denoiser built on the meta device from its config,
every other component sized from its config or its safetensors header, at the dtype the compile loads it in.

Three sources, as :func:`qsched.models.registry.load_pipeline` has them:

* a registry model (``flux-schnell``, ``sdxl-turbo`` ...): the public configs shipped in ``qsched/configs``,
  in bf16, which is what both ``--init random`` and the hub load (``torch_dtype=torch.bfloat16``);
* the embedded ``flux-tiny``: its shipped weights directory, in fp32 (``load_embedded`` computes in fp32);
* a local diffusers directory: its ``model_index.json`` and component configs; diffusers components in fp32
  (``from_pretrained`` with no ``torch_dtype``), transformers components in their stored dtype (transformers 5
  loads ``dtype="auto"``).

A hub id that is not a registry name cannot be planned: a plan downloads nothing.
"""
from __future__ import annotations

import json
import struct
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qsched.core.errors import ModelNotFoundError

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


@dataclass
class Architecture:
    """What a plan knows about the model: its meta-device denoiser and what every component weighs."""

    model: str
    source: str                          # where the architecture came from, in words
    pipeline_class: str
    denoiser_attr: str                   # "transformer" | "unet"
    denoiser: nn.Module                  # on the meta device, at ``dtype``
    dtype: torch.dtype                   # the denoiser's compute dtype in the compile
    component_bytes: dict[str, int] = field(default_factory=dict)  # weighted components, at their load dtype
    scheduler_class: str = ""
    vae_scale_factor: int = 8
    settings_pipe: object = None         # what qsched.stages.generation_settings reads for a local pipeline
    text_length: int | None = None       # a CLIP-conditioned UNet's prompt length (its tokenizer's)


def resolve(model: str, init: str = "pretrained", width_scale: float | None = None,
            dtype: str = "auto") -> Architecture:
    """The :class:`Architecture` of ``model`` (what ``qcompile --model model --init init --width-scale F``
    would load)."""
    from qsched.models.registry import REGISTRY, check_model, torch_dtype

    if init not in ("pretrained", "random"):  # load_pipeline's check
        raise ModelNotFoundError(f"invalid --init {init!r}: expected 'pretrained' or 'random'")
    check_model(model, init)
    forced = torch_dtype(dtype)
    if model in REGISTRY and REGISTRY[model].embedded:
        from qsched.tinyworld.model import WEIGHTS_DIR

        return _local(model, Path(WEIGHTS_DIR), forced or torch.float32,
                      f"the embedded flux-tiny weights ({_short(forced or torch.float32)})")
    if model in REGISTRY:
        return _shipped(model, init, width_scale or 1.0, forced or torch.bfloat16)
    path = Path(model).expanduser()
    if path.is_dir():
        return _local(model, path, forced, f"the local pipeline {path}")
    raise ModelNotFoundError(
        f"cannot plan {model!r} without downloading it (a plan reads no weights and no hub): plan a registry name "
        "(its shipped configs describe the hub model), a local diffusers directory, or flux-tiny")


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _shipped(name: str, init: str, width_scale: float = 1.0, dtype: torch.dtype = torch.bfloat16) -> Architecture:
    from qsched.models.shipped_configs import build_component, components, denoiser_component, load_component_config

    index = load_component_config(name, "model_index")
    den_name = denoiser_component(name)
    sizes, denoiser = {}, None
    for comp in components(name):
        if comp == "scheduler":
            continue
        module = build_component(name, comp, device="meta", dtype=dtype, width_scale=width_scale)
        sizes[comp] = module_bytes(module)
        if comp == den_name:
            denoiser = module
    vae = load_component_config(name, "vae") if "vae" in components(name) else {}
    how = "built at random init on --device" if init == "random" else "the hub checkpoint's layout"
    if width_scale != 1:
        how += f", widths × {width_scale:g}"
    return Architecture(name, f"the shipped {name} configs (qsched/configs/{name}; {how}), {_short(dtype)}", index["_class_name"],
                        den_name, denoiser, dtype, sizes, load_component_config(name, "scheduler")["_class_name"],
                        _vae_scale_factor(vae), None, 77 if den_name == "unet" else None)


def _local(model: str, root: Path, force_dtype: torch.dtype | None, source: str) -> Architecture:
    import diffusers

    try:
        index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"cannot read {root / 'model_index.json'} ({err}); save a complete pipeline with "
                                 "pipe.save_pretrained()") from None
    entries = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
               and all(isinstance(x, str) for x in v)}
    den_name = next((n for n in ("transformer", "unet") if n in entries), None)
    if den_name is None:
        raise ModelNotFoundError(f"{root} has no transformer or unet component: not a supported diffusion pipeline")
    sizes, denoiser, dtype = {}, None, torch.float32
    for comp, (library, class_name) in entries.items():
        if comp.startswith(("tokenizer", "scheduler", "feature_extractor")) or not (root / comp).is_dir():
            continue
        load_dtype = force_dtype or (torch.float32 if library == "diffusers" else _stored_dtype(root / comp))
        if comp == den_name:
            cls = getattr(diffusers, class_name, None)
            if cls is None:
                raise ModelNotFoundError(f"{root}: unknown denoiser class {class_name!r}")
            config = cls.load_config(str(root / comp))
            with torch.device("meta"):
                denoiser = cls.from_config(config)
            denoiser = nn.Module.to(denoiser, dtype=load_dtype).eval()
            dtype = load_dtype
            sizes[comp] = module_bytes(denoiser)
        else:
            sizes[comp] = _stored_elements(root / comp) * _itemsize(load_dtype)
    den_config = dict(denoiser.config)
    vae = _read_json(root / "vae" / "config.json") if "vae" in entries else {}
    scheduler = entries.get("scheduler", ["", ""])[1]
    pipe_cls = getattr(diffusers, index.get("_class_name", ""), None)
    # the attributes qsched.models.registry.default_settings reads from a loaded pipeline, without loading it
    stub = type(index.get("_class_name", "Pipeline"), (), {"__call__": pipe_cls.__call__} if pipe_cls else {})()
    stub.vae = types.SimpleNamespace(config=types.SimpleNamespace(**vae)) if vae else None
    stub.vae_scale_factor = _vae_scale_factor(vae)
    stub.default_sample_size = den_config.get("sample_size") or 128
    lengths = {}
    for tok in ("tokenizer", "tokenizer_2"):
        if tok in entries:
            length = _read_json(root / tok / "tokenizer_config.json").get("model_max_length")
            lengths[tok] = length
            setattr(stub, tok, types.SimpleNamespace(model_max_length=length))
    clip_length = lengths.get("tokenizer") if den_name == "unet" else None
    return Architecture(model, source, index.get("_class_name", ""), den_name, denoiser, dtype, sizes, scheduler,
                        stub.vae_scale_factor, stub, int(clip_length) if isinstance(clip_length, int) else None)


def module_bytes(module: nn.Module) -> int:
    """Parameters and buffers, at their dtypes (meta tensors know theirs)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _vae_scale_factor(vae_config: dict) -> int:
    """What the pipelines compute: 2 ** (len(vae.config.block_out_channels) - 1), 8 without a VAE config."""
    blocks = vae_config.get("block_out_channels")
    return 2 ** (len(blocks) - 1) if blocks else 8


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _headers(folder: Path) -> list[dict]:
    """The JSON headers of a folder's safetensors files (the first 8 bytes give the header's length)."""
    out = []
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            out.append(json.loads(f.read(length)))
    return out


def _stored_elements(folder: Path) -> int:
    total = 0
    for header in _headers(folder):
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for dim in info["shape"]:
                    n *= int(dim)
                total += n
    return total


def _stored_dtype(folder: Path) -> torch.dtype:
    """The dtype most stored elements have (transformers 5 loads a checkpoint in it); fp32 when unknown."""
    counts: dict[str, int] = {}
    for header in _headers(folder):
        for name, info in header.items():
            if name != "__metadata__" and info.get("dtype") in _SAFETENSORS_DTYPES:
                n = 1
                for dim in info["shape"]:
                    n *= int(dim)
                counts[info["dtype"]] = counts.get(info["dtype"], 0) + n
    floating = {k: v for k, v in counts.items() if _SAFETENSORS_DTYPES[k].is_floating_point}
    return _SAFETENSORS_DTYPES[max(floating, key=floating.get)] if floating else torch.float32

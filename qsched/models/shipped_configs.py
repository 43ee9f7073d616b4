"""Configs of the full-size supported models, shipped inside the package.

Why: the compiler must reason about the *real* architectures (layer names, shapes, parameter
counts, which ``nn.Linear`` layers to quantise) on machines that cannot reach the model hub and
cannot hold the weights. The public ``config.json`` files of each model are therefore copied into
``qsched/configs/<name>/<component>.json`` and the modules are built from them at random init,
by default on the ``meta`` device, where a 12 B-parameter transformer costs no memory.

``model_index.json`` mirrors the hub pipeline index (diffusers ignores keys starting with ``_``)
and adds a ``_qsched`` entry: the hub id, which component is the denoiser, and the default
generation settings (steps, guidance, resolution).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from qsched.core.errors import ModelNotFoundError, QschedError

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"

#: Registry name -> hub id of the model whose public configs are shipped.
SHIPPED: dict[str, str] = {
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "sdxl-turbo": "stabilityai/sdxl-turbo",
    "pixart-sigma": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
}

# Components built with diffusers (``_class_name``) vs transformers (``architectures``).
_DIFFUSERS_COMPONENTS = ("transformer", "unet", "vae", "scheduler")


def _check_name(name: str) -> None:
    if name not in SHIPPED:
        known = ", ".join(sorted(SHIPPED))
        raise ModelNotFoundError(f"no shipped config for model {name!r}; known names: {known}")


def components(name: str) -> list[str]:
    """Component names with a shipped config for ``name`` (``model_index`` excluded)."""
    _check_name(name)
    return sorted(p.stem for p in (CONFIG_ROOT / name).glob("*.json") if p.stem != "model_index")


@lru_cache(maxsize=None)
def _read(name: str, component: str) -> dict[str, Any]:
    with open(CONFIG_ROOT / name / f"{component}.json", encoding="utf-8") as f:
        return json.load(f)


def load_component_config(name: str, component: str) -> dict[str, Any]:
    """The shipped config dict of one component; a fresh copy, safe to mutate."""
    _check_name(name)
    if component != "model_index" and component not in components(name):
        raise QschedError(
            f"model {name!r} has no shipped {component!r} config; "
            f"available: {', '.join(components(name) + ['model_index'])}"
        )
    return copy.deepcopy(_read(name, component))


def scaled_component_config(name: str, component: str, width_scale: float = 1.0) -> dict[str, Any]:
    """:func:`load_component_config` at hidden-width ``width_scale`` (:mod:`qsched.models.width_scale`): the
    components are scaled together, since one reads another's width (FLUX's text projections)."""
    if width_scale == 1:
        return load_component_config(name, component)
    from qsched.models.width_scale import scale_configs

    configs = {c: load_component_config(name, c) for c in components(name) if c != "scheduler"}
    if component not in configs:
        return load_component_config(name, component)
    return scale_configs(configs, width_scale)[component]


def _qsched_entry(name: str) -> dict[str, Any]:
    return load_component_config(name, "model_index")["_qsched"]


def hub_id(name: str) -> str:
    """Hub id of the real checkpoint (weights are never fetched from here at run time)."""
    return _qsched_entry(name)["hub_id"]


def denoiser_component(name: str) -> str:
    """``"transformer"`` for the DiTs (FLUX, PixArt), ``"unet"`` for SDXL-Turbo."""
    return _qsched_entry(name)["denoiser"]


def default_settings(name: str) -> dict[str, Any]:
    """Default generation settings (num_inference_steps, guidance_scale, height, width, ...)."""
    return dict(_qsched_entry(name)["defaults"])


@contextlib.contextmanager
def _construct_in(device: str | torch.device, dtype: torch.dtype):
    """Construct parameters directly on ``device`` and in ``dtype``.

    Setting the default dtype during construction (rather than ``.to(dtype)`` afterwards) keeps a
    real CPU build of FLUX at 24 GB in bf16 instead of peaking at 48 GB in fp32.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast stragglers (PixArt's fixed sin-cos ``pos_embed`` buffer is made in fp32 from numpy).

    ``nn.Module.to`` is called directly: diffusers' override only adds a quantisation check and a
    warning (irrelevant for a random-init model) that would be printed on every build.
    """
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.is_floating_point() and t.dtype != dtype for t in tensors):
        torch.nn.Module.to(model, dtype=dtype)
    return model.eval()


def _build_diffusers(cfg: dict[str, Any], device, dtype) -> torch.nn.Module:
    import diffusers

    cls = getattr(diffusers, cfg["_class_name"])
    # The public PixArt config carries legacy Transformer2DModel keys the class no longer takes;
    # diffusers would ignore them anyway, but with a warning on every build.
    accepted = set(inspect.signature(cls.__init__).parameters)
    cfg = {k: v for k, v in cfg.items() if k.startswith("_") or k in accepted}
    with _construct_in(device, dtype):
        model = cls.from_config(cfg)
    return _cast(model, dtype)


def _build_transformers(cfg: dict[str, Any], device, dtype) -> torch.nn.Module:
    import transformers

    cfg = dict(cfg)
    arch = cfg.pop("architectures")[0]
    # Hub bookkeeping, not architecture: the dtype is the caller's choice here.
    for key in ("_name_or_path", "torch_dtype", "dtype", "transformers_version"):
        cfg.pop(key, None)
    cls = getattr(transformers, arch)
    config = cls.config_class.from_dict(cfg)
    with _construct_in(device, dtype):
        model = cls(config)
    return _cast(model, dtype)


def build_component(
    name: str,
    component: str,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.bfloat16,
    width_scale: float = 1.0,
) -> torch.nn.Module:
    """Build one module (denoiser, ``vae``, ``text_encoder``, ``text_encoder_2``) at random init.

    ``device="meta"`` (the default) allocates nothing: shapes and parameter counts only. Any other
    device allocates the full model; for FLUX that is ~24 GB in bf16. ``width_scale`` < 1 shrinks the hidden
    widths and keeps the depth (:mod:`qsched.models.width_scale`).
    """
    if component == "scheduler":
        raise QschedError("the scheduler is not a module; use build_scheduler(name)")
    cfg = scaled_component_config(name, component, width_scale)
    if component in _DIFFUSERS_COMPONENTS:
        return _build_diffusers(cfg, device, dtype)
    return _build_transformers(cfg, device, dtype)


def build_denoiser(
    name: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16, width_scale: float = 1.0
) -> torch.nn.Module:
    """The denoiser (FluxTransformer2DModel / UNet2DConditionModel / PixArtTransformer2DModel)."""
    _check_name(name)
    return build_component(name, denoiser_component(name), device=device, dtype=dtype, width_scale=width_scale)


def build_scheduler(name: str):
    """The shipped noise scheduler of ``name`` (diffusers class from its ``_class_name``)."""
    import diffusers

    cfg = load_component_config(name, "scheduler")
    return getattr(diffusers, cfg["_class_name"]).from_config(cfg)

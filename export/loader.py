"""Artifact directory → diffusers pipeline that generates with the quantized denoiser.

Loading reads only JSON and safetensors (never pickle), verifies checksums and the schema version, and
rebuilds the denoiser on the meta device so its FP weights are never materialised twice.
"""
from __future__ import annotations

from pathlib import Path

import torch

from calibrate.apply import set_submodule
from calibrate.qlayers import QuantLayer
from qsched.errors import ArtifactError

from .format import load_shard, read_manifest
from .packing import unpack_int


def _diffusers_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ArtifactError(f"artifact needs diffusers class {name!r}, which this diffusers ({diffusers.__version__}) lacks; upgrade diffusers")
    return cls


def build_denoiser(manifest: dict, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Rebuild the quantized denoiser from its config, layer specs and stored tensors."""
    info = manifest["denoiser"]
    cls = _diffusers_class(info["class"])
    config = {k: v for k, v in info["config"].items() if not k.startswith("_")}
    with torch.device("meta"):
        denoiser = cls.from_config(config)
        for name, spec in manifest["layers"].items():
            layer = QuantLayer(spec["kind"], tuple(spec["weight_shape"]), spec["weight_bits"], spec["act_bits"],
                               spec["group_size"], {k: tuple(v) if isinstance(v, list) else v for k, v in spec["conv_args"].items()},
                               spec["has_bias"], getattr(torch, spec["dtype"]))
            set_submodule(denoiser, name, layer)
    state = dict(tensors)
    for name, spec in manifest["layers"].items():
        if spec["weight_bits"] is not None:
            key = f"{name}.qweight"
            state[key] = unpack_int(state[key], spec["weight_bits"], tuple(spec["weight_shape"]))
    expected = set(denoiser.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ArtifactError(f"artifact denoiser tensors do not match its manifest (missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]}); the artifact is corrupt or from an incompatible qsched")
    denoiser.load_state_dict(state, assign=True, strict=True)
    _materialise_leftover_buffers(denoiser, cls, config)
    return denoiser.eval()


def _materialise_leftover_buffers(denoiser, cls, config) -> None:
    """Non-persistent buffers (e.g. fixed positional tables) are not in the state dict: recompute them."""
    leftovers = [n for n, b in denoiser.named_buffers() if b.is_meta]
    if not leftovers:
        return
    reference = cls.from_config(config)  # small models only have such buffers in practice (e.g. PixArt pos_embed)
    reference_buffers = dict(reference.named_buffers())
    for name in leftovers:
        owner, _, leaf = name.rpartition(".")
        module = denoiser.get_submodule(owner) if owner else denoiser
        module.register_buffer(leaf, reference_buffers[name].clone(), persistent=False)


def _other_components(manifest: dict, path: Path, denoiser):
    """The pipeline around the denoiser: bundled in the artifact, or loaded from the recorded source."""
    attr = manifest["denoiser"]["attr"]
    if manifest.get("bundle"):
        pipeline_cls = _diffusers_class(manifest["pipeline_class"])
        return pipeline_cls.from_pretrained(str(path / "components"), local_files_only=True, **{attr: denoiser})
    source = manifest["source"]
    from qsched.models import load_source_pipeline
    return load_source_pipeline(source, manifest["pipeline_class"], **{attr: denoiser})


def build_scheduler(record: dict):
    """The artifact's scheduler: its diffusers base, wrapped with Q-Sched coefficients when it has them."""
    base = _diffusers_class(record["class"]).from_config(record["config"])
    if record.get("coefficients"):
        from qsched.schedulers import QSchedScheduler
        return QSchedScheduler.wrap(base, record["coefficients"], interpolate=bool(record.get("interpolate")))
    return base


def load(path, device: str = "cpu", verify: bool = True, runtime: str = "simulated"):
    """Load an artifact written by ``qcompile`` and return a ready diffusers pipeline.

    ``runtime="native"`` swaps the simulated layers for integer/packed ones (:mod:`export.runtime_torch`).
    """
    if runtime not in ("simulated", "native"):
        raise ArtifactError(f"unknown runtime {runtime!r}; use 'simulated' or 'native'")
    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    tensors = {}
    for shard in manifest["denoiser"]["shards"]:  # large denoisers are written one block group per shard
        tensors.update(load_shard(path, shard))
    denoiser = build_denoiser(manifest, tensors)
    if runtime == "native":
        from .runtime_torch import to_native_
        to_native_(denoiser)
    pipe = _other_components(manifest, path, denoiser)
    scheduler = manifest.get("scheduler")
    if scheduler:
        pipe.scheduler = build_scheduler(scheduler)
    cache = (manifest.get("cache") or {}).get("schedule")
    if cache:  # the chosen cache schedule, applied through the pipeline's own __call__
        from cache_search.caching import enable_cache
        from cache_search.schedule import CacheSchedule
        pipe.qsched_cache = enable_cache(pipe, CacheSchedule.from_dict(cache))
    pipe.set_progress_bar_config(disable=True)
    pipe.qsched_manifest = manifest
    return pipe.to(device)

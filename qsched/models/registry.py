"""Model loading: registry names, hub ids, local diffusers directories, shipped configs at random init,
and the embedded trained tiny model.

Every loader returns the pipeline together with a :class:`SourceRef`, which the artifact records so that
``export.load`` can rebuild the components it did not store. Every load passes ``use_safetensors=True``:
weights are read from safetensors only, never from a pickle (``.bin``) that diffusers would otherwise
fall back to, so a pipeline without safetensors is an error naming the fix.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qsched.core.errors import ModelNotFoundError
from qsched.runtime.generation import GenerationSettings


#: the CLIP that judges the registry's real models by default (CLIPScore's usual ViT-L/14); a user without
#: the hub passes a local directory with ``--scorer`` or the recipe's ``scorer``
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


@dataclass(frozen=True)
class RegistryEntry:
    hub_id: str | None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    embedded: bool = False
    scorer: str | None = DEFAULT_CLIP  # see qsched.models.profiles


def _registry() -> dict[str, RegistryEntry]:
    from qsched.models.shipped_configs import SHIPPED, default_settings as shipped_defaults

    entries = {}
    for name, hub in SHIPPED.items():
        d = shipped_defaults(name)
        entries[name] = RegistryEntry(hub, GenerationSettings(d["num_inference_steps"], d["height"], d["width"],
                                                              d["guidance_scale"], d.get("max_sequence_length")))
    entries["flux-tiny"] = RegistryEntry(None, embedded=True, scorer="world-judge")
    return entries


REGISTRY: dict[str, RegistryEntry] = _registry()
DEFAULT_MODEL = "flux-tiny"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ALTERNATIVES = ("use a local diffusers directory (--model /path/to/pipeline), the embedded model "
                 "(--model flux-tiny), or --init random to build a registry architecture from shipped configs")
_SAFETENSORS_HINT = "qsched reads weights from safetensors only (never pickle); re-save it with save_pretrained(safe_serialization=True)"


@dataclass(frozen=True)
class SourceRef:
    """Where a pipeline came from, enough to load its components again."""

    model: str
    kind: str  # "embedded" | "registry-random" | "local" | "hub"
    revision: str | None = None
    seed: int | None = None
    width_scale: float | None = None  # registry-random at reduced width (qsched.models.width_scale)
    dtype: str | None = None  # registry-random built in a dtype other than bf16

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("width_scale", "dtype"):  # recorded only where they were given
            if data[key] is None:
                del data[key]
        return data


def check_model(model: str, init: str = "pretrained") -> None:
    """The checks :func:`load_pipeline` makes of ``model`` and ``init``, without loading anything: a
    :class:`ModelNotFoundError` line for an empty name, ``--init random`` on a non-registry model, a directory
    that is not a pipeline, a file, or a name that is none of registry name, local directory and hub id."""
    if not model.strip():
        raise ModelNotFoundError(f"--model is empty; give a registry name ({', '.join(sorted(REGISTRY))}), "
                                 "a hub id (org/name) or a local diffusers directory")
    if model in REGISTRY:
        return
    if init == "random":
        raise ModelNotFoundError(f"--init random needs a registry model, one of {sorted(REGISTRY)}; got {model!r}")
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise ModelNotFoundError(f"{model} is a directory but not a diffusers pipeline (no model_index.json); "
                                 "save one with pipe.save_pretrained()")
    if path.exists() and not path.is_dir():
        raise ModelNotFoundError(f"--model {model} is a file; expected a diffusers pipeline directory, "
                                 "a registry name or a hub id")
    if not path.is_dir() and not _HUB_ID.match(model):
        raise ModelNotFoundError(f"unknown model {model!r}: not a registry name ({', '.join(sorted(REGISTRY))}), "
                                 "an existing local directory, or a hub id like 'org/name'")


def default_settings(model: str, pipe=None) -> GenerationSettings:
    """The registry's sampler settings for ``model``; for other models, read from the pipeline."""
    if model in REGISTRY:
        if REGISTRY[model].embedded:
            from qsched.tinyworld.model import TINY_SETTINGS
            return TINY_SETTINGS
        return REGISTRY[model].settings
    settings = GenerationSettings()
    vae = getattr(pipe, "vae", None)
    size = getattr(getattr(vae, "config", None), "sample_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if not size and getattr(pipe, "default_sample_size", None):
        size = pipe.default_sample_size * getattr(pipe, "vae_scale_factor", 8)
    if size:
        settings.height = settings.width = int(size)
    settings.max_sequence_length = _text_length(pipe)
    return settings


def _text_length(pipe) -> int | None:
    """The text length a local pipeline was built for, where its call takes ``max_sequence_length`` and its
    long-text tokenizer (FLUX's T5 ``tokenizer_2``, PixArt's ``tokenizer``) is shorter than diffusers' 512
    default: padding a 16-token model's text to 512 tokens changes what it draws and costs 30× the time."""
    import inspect

    if pipe is None or "max_sequence_length" not in inspect.signature(type(pipe).__call__).parameters:
        return None
    tokenizer = getattr(pipe, "tokenizer_2", None) or getattr(pipe, "tokenizer", None)
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if isinstance(length, int) and 0 < length < 512 else None


def _hub_error(model: str, err: Exception) -> ModelNotFoundError:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    detail = (str(err).strip().splitlines() or [""])[0][:160]
    why = "the hub is disabled (HF_HUB_OFFLINE=1)" if offline else \
        f"the hub is unreachable or has no such model ({type(err).__name__}: {detail})"
    return ModelNotFoundError(f"cannot load {model!r} from the Hugging Face hub: {why}; {_ALTERNATIVES}")


#: ``--dtype`` names: the dtype every component is loaded and computed in (default: the source's own)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of a ``--dtype`` name (None: the source's own)."""
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ModelNotFoundError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_pipeline(model: str, init: str = "pretrained", device: str = "cpu", dtype: torch.dtype | None = None,
                  seed: int = 0, revision: str | None = None, width_scale: float | None = None):
    """Load ``model`` and return ``(pipeline, SourceRef)``.

    ``init="random"`` builds a registry model's full-size architecture from configs shipped in the
    package, with random weights (for measuring speed and memory without a download); ``width_scale`` in
    (0, 1] shrinks its widths and keeps its depth (a rehearsal of the full-size compile).
    """
    if init not in ("pretrained", "random"):
        raise ModelNotFoundError(f"invalid --init {init!r}: expected 'pretrained' or 'random'")
    from qsched.models.width_scale import check_width_scale
    check_width_scale(width_scale, init, model)
    if model in REGISTRY and REGISTRY[model].embedded:
        from qsched.tinyworld.model import load_embedded
        return _place(load_embedded(), device, dtype), SourceRef(model, "embedded")
    if init == "random":
        if model not in REGISTRY:
            raise ModelNotFoundError(f"--init random needs a registry model, one of {sorted(REGISTRY)}; got {model!r}")
        from qsched.models.random_init import build_random_pipeline
        pipe = build_random_pipeline(model, dtype=dtype or torch.bfloat16, seed=seed, device=device,
                                     width_scale=width_scale or 1.0)
        name = None if dtype in (None, torch.bfloat16) else str(dtype).removeprefix("torch.")  # a DTYPES key
        return pipe, SourceRef(model, "registry-random", seed=seed, width_scale=width_scale, dtype=name)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(f"{model} is a directory but not a diffusers pipeline (no model_index.json); save one with pipe.save_pretrained()")
        from diffusers import DiffusionPipeline
        pipe = _from_local(DiffusionPipeline, str(path), torch_dtype=dtype)
        return _place(pipe, device, None), SourceRef(str(path.resolve()), "local")
    hub_id = REGISTRY[model].hub_id if model in REGISTRY else model
    if not _HUB_ID.match(hub_id):
        raise ModelNotFoundError(f"unknown model {model!r}: not a registry name ({', '.join(sorted(REGISTRY))}), "
                                 f"an existing local directory, or a hub id like 'org/name'")
    return _load_from_hub(hub_id, revision, device, dtype)


def _load_from_hub(hub_id: str, revision: str | None, device: str, dtype):
    from diffusers import DiffusionPipeline
    try:
        pipe = DiffusionPipeline.from_pretrained(hub_id, revision=revision, torch_dtype=dtype or torch.bfloat16,
                                                 use_safetensors=True, low_cpu_mem_usage=True)
    except (OSError, ValueError, ConnectionError) as err:  # hub errors subclass OSError/ValueError
        raise _hub_error(hub_id, err) from None
    except Exception as err:  # requests/httpx errors when the network is down
        if "connect" in type(err).__name__.lower() or "timeout" in type(err).__name__.lower():
            raise _hub_error(hub_id, err) from None
        raise
    return _place(pipe, device, None), SourceRef(hub_id, "hub", revision=revision)


def _from_local(cls, path: str, **kwargs):
    """``cls.from_pretrained`` on a local directory, safetensors only; a directory holding only ``.bin``
    weights (or otherwise unreadable) is one :class:`ModelNotFoundError` line."""
    try:
        return cls.from_pretrained(path, local_files_only=True, use_safetensors=True, low_cpu_mem_usage=True, **kwargs)
    except (OSError, ValueError) as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        hint = _SAFETENSORS_HINT if "safetensors" in detail else "save a complete pipeline with pipe.save_pretrained()"
        raise ModelNotFoundError(f"cannot load the pipeline in {path} ({detail}); {hint}") from None


def _place(pipe, device: str, dtype):
    if dtype is not None:
        pipe.to(dtype=dtype)
    return pipe.to(device)


def state_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's tensors (names, shapes, bytes): identifies the source weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def source_denoiser_config(source: dict, attr: str) -> dict | None:
    """The denoiser config the artifact's source has *now*, where it can be read without loading weights or the
    network (the embedded model, a local directory); None for a hub source (its revision pins it)."""
    kind, model = source["kind"], source["model"]
    if kind == "embedded":
        from qsched.tinyworld.model import WEIGHTS_DIR
        folder = WEIGHTS_DIR
    elif kind == "local":
        folder = Path(model)
    else:
        return None
    try:
        return json.loads((folder / attr / "config.json").read_text())
    except (OSError, ValueError):
        return None  # missing or unreadable: load_source_pipeline says so in its own words


@functools.lru_cache(maxsize=1)
def embedded_denoiser_digests() -> frozenset[str]:
    """:func:`state_digest` of the embedded flux-tiny denoiser as installed now, in each dtype a compile may
    load it in: what an artifact compiled from it recorded, unless the shipped weights have changed since.
    (Cheap: the embedded denoiser is a few MB. A hub source is pinned by its revision instead.)"""
    from diffusers import FluxTransformer2DModel

    from qsched.tinyworld.model import WEIGHTS_DIR
    denoiser = FluxTransformer2DModel.from_pretrained(str(WEIGHTS_DIR), subfolder="transformer", local_files_only=True,
                                                      use_safetensors=True, torch_dtype=torch.float32)
    # .to() casts in place: fp32 and then fp16 are exact for the stored fp16 values, so bf16 comes last and
    # each cast equals loading in that dtype
    return frozenset(state_digest(denoiser.to(dtype)) for dtype in (torch.float32, torch.float16, torch.bfloat16))


def load_source_pipeline(source: dict, pipeline_class: str, **components):
    """Rebuild the pipeline an artifact was compiled from, with ``components`` (the quantized denoiser)
    passed in so that the source's own denoiser weights are never loaded."""
    import diffusers

    kind, model = source["kind"], source["model"]
    if kind == "embedded":
        from qsched.tinyworld.model import load_embedded
        return load_embedded(**components)
    if kind == "registry-random":
        from qsched.models.random_init import build_random_pipeline
        return build_random_pipeline(model, seed=source.get("seed") or 0, width_scale=source.get("width_scale") or 1.0,
                                     dtype=DTYPES.get(source.get("dtype") or "bfloat16", torch.bfloat16), **components)
    cls = getattr(diffusers, pipeline_class, diffusers.DiffusionPipeline)
    if kind == "local":
        if not Path(model).is_dir():
            raise ModelNotFoundError(f"the artifact's source pipeline {model} no longer exists; "
                                     "recompile with --bundle to make the artifact self-contained")
        return _from_local(cls, model, **components)
    try:
        return cls.from_pretrained(model, revision=source.get("revision"), use_safetensors=True, **components)
    except (OSError, ValueError, ConnectionError) as err:
        raise _hub_error(model, err) from None

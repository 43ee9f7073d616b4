"""Reference-free image scores from a ``transformers`` CLIP: CLIPScore and CLIP-IQA.

Why: on real models Q-Sched's JAQ loss needs a text-consistency term (TC: does the image match
its prompt?) and an image-quality term (IQ) that need no reference images, and the cache search
needs a quality objective that is cheap and comparable across configurations. Both come from one
CLIP forward per image.

Conventions:

* images are float ``[n, 3, H, W]`` in ``[0, 1]``: what a diffusers pipeline returns with
  ``output_type="pt"``. CLIP's preprocessing (bicubic resize of the short side, centre crop,
  mean/std normalisation) is done here in torch, so neither PIL nor torchvision is needed and the
  images can stay on the GPU.
* CLIPScore uses the torchmetrics scale ``max(100 * cos, 0)`` (so scores read like 20-35 for a
  trained CLIP), not Hessel et al.'s ``max(2.5 * cos, 0)``; pass ``w=2.5`` to get the paper's.
* CLIP-IQA (Wang et al. 2023): for each antonym pair ``(positive, negative)``, softmax over
  ``100 * cos`` of the two prompts, probability of the positive one, averaged over the pairs.

Nothing is ever downloaded implicitly in an offline session: ``load_clip`` with a hub id honours
``HF_HUB_OFFLINE`` and turns every "cannot reach the hub" failure into a one-line
:class:`~qsched.core.errors.ModelNotFoundError` naming the alternative (a local directory).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from qsched.core.errors import ModelNotFoundError, QschedError

# OpenAI CLIP's normalisation; used when a saved CLIP comes without an image-processor config.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_IQA_PAIRS: tuple[tuple[str, str], ...] = (("Good photo.", "Bad photo."),)

_LOCAL_HINT = (
    "pass a local directory with a saved CLIP instead "
    "(CLIPModel and CLIPProcessor/tokenizer written with save_pretrained)"
)


@dataclass
class ClipBundle:
    """A loaded CLIP with what is needed to preprocess images and tokenize prompts."""

    model: Any  # transformers.CLIPModel, in eval mode
    tokenizer: Any
    resize_shortest: int  # short side after resize
    crop_size: tuple[int, int]  # (height, width) of the centre crop = the model's input
    mean: torch.Tensor  # [3]
    std: torch.Tensor  # [3]
    max_length: int  # text positions of the model
    device: torch.device
    source: str


# --------------------------------------------------------------------------- loading


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_offline() -> bool:
    """Offline if asked by the environment now, or as huggingface_hub read it at import."""
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


def _looks_like_path(source: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else can only mean a directory."""
    return (
        source.startswith((".", "/", "~"))
        or os.sep in source.strip("/").replace("/", "", 1)
        or (os.altsep is not None and os.altsep in source)
    )


def _hub_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError, ValueError]
    try:
        from huggingface_hub import errors as hub_errors

        errors.append(hub_errors.HfHubHTTPError)
    except Exception:  # pragma: no cover
        pass
    for mod, name in (("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(mod), name))
        except Exception:
            pass
    return tuple(errors)


def _read_image_config(source: str, local: bool, offline: bool) -> dict[str, Any]:
    """The image-processor settings, from ``preprocessor_config.json`` (hub layout) or the
    ``image_processor`` entry of ``processor_config.json`` (what transformers 5 saves)."""
    for filename in ("preprocessor_config.json", "processor_config.json"):
        if local:
            path = Path(source) / filename
            if not path.is_file():
                continue
        else:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            try:
                path = Path(hf_hub_download(source, filename, local_files_only=offline))
            except EntryNotFoundError:
                continue
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        data = data.get("image_processor", data)
        if "image_mean" in data or "crop_size" in data or "size" in data:
            return data
    return {}


def _edge(value: Any, key: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, int):
        return value
    return int(value.get(key, value.get("height", default)))


def load_clip(
    source: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ClipBundle:
    """Load a CLIP from a local ``save_pretrained`` directory or a hub id.

    Raises :class:`ModelNotFoundError` (one line, naming the local-directory alternative) when a
    hub id cannot be fetched: offline (``HF_HUB_OFFLINE=1``) and not cached, hub unreachable, or no
    such repository; and when a directory does not exist or holds no CLIP.
    """
    from transformers import AutoTokenizer, CLIPModel

    source = str(source)
    local = Path(source).expanduser().is_dir()
    if local:
        source = str(Path(source).expanduser())
    elif _looks_like_path(source):
        raise ModelNotFoundError(f"CLIP directory {source!r} does not exist; {_LOCAL_HINT}")
    offline = _hub_offline()
    only_local = local or offline
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=only_local, use_safetensors=True)  # never pickle
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=only_local)
        image_cfg = _read_image_config(source, local, offline)
    except _hub_errors() as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if local:
            raise ModelNotFoundError(
                f"{source!r} is not a saved CLIP directory ({first}); {_LOCAL_HINT}"
            ) from err
        if offline:
            why = "the Hugging Face hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache"
        elif type(err).__name__ in ("RepositoryNotFoundError", "GatedRepoError") or (
            type(err.__cause__).__name__ in ("RepositoryNotFoundError", "GatedRepoError")
        ):
            why = "no such (accessible) model on the Hugging Face hub"
        else:
            why = "the Hugging Face hub is unreachable"
        raise ModelNotFoundError(f"cannot load CLIP {source!r}: {why}; {_LOCAL_HINT}") from err

    device = torch.device(device)
    model = model.to(device=device, dtype=dtype).eval()
    vision_size = int(model.config.vision_config.image_size)
    crop = image_cfg.get("crop_size")
    crop_hw = (_edge(crop, "height", vision_size), _edge(crop, "width", vision_size))
    shortest = _edge(image_cfg.get("size"), "shortest_edge", min(crop_hw))
    mean = torch.tensor(image_cfg.get("image_mean", OPENAI_CLIP_MEAN), dtype=torch.float32, device=device)
    std = torch.tensor(image_cfg.get("image_std", OPENAI_CLIP_STD), dtype=torch.float32, device=device)
    return ClipBundle(
        model=model,
        tokenizer=tokenizer,
        resize_shortest=shortest,
        crop_size=crop_hw,
        mean=mean,
        std=std,
        max_length=int(model.config.text_config.max_position_embeddings),
        device=device,
        source=source,
    )


# --------------------------------------------------------------------------- embeddings


def preprocess(bundle: ClipBundle, images: torch.Tensor) -> torch.Tensor:
    """CLIP's image preprocessing in torch: short side to ``resize_shortest`` (bicubic,
    antialiased, like the PIL path), centre crop, clamp to [0, 1], normalise."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise QschedError(f"images must be a float tensor [n, 3, H, W] in [0, 1]; got {shape}")
    x = images.to(device=bundle.device, dtype=torch.float32)
    h, w = x.shape[-2:]
    ch, cw = bundle.crop_size
    s = bundle.resize_shortest
    if s < max(ch, cw):  # degenerate processor config: resize straight to the crop
        nh, nw = ch, cw
    elif h <= w:
        nh, nw = s, max(s, int(s * w / h))
    else:
        nh, nw = max(s, int(s * h / w)), s
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - ch) // 2, (nw - cw) // 2
    x = x[..., top : top + ch, left : left + cw].clamp(0.0, 1.0)
    return (x - bundle.mean[:, None, None]) / bundle.std[:, None, None]


@torch.no_grad()
def image_embeddings(bundle: ClipBundle, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Unit-norm projected image embeddings, float32 ``[n, d]``."""
    model = bundle.model
    dtype = next(model.parameters()).dtype
    out = []
    for start in range(0, images.shape[0], batch_size):
        pix = preprocess(bundle, images[start : start + batch_size]).to(dtype)
        pooled = model.vision_model(pixel_values=pix).pooler_output
        out.append(F.normalize(model.visual_projection(pooled).float(), dim=-1))
    return torch.cat(out) if out else torch.empty(0, model.config.projection_dim)


@torch.no_grad()
def text_embeddings(bundle: ClipBundle, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Unit-norm projected text embeddings, float32 ``[len(texts), d]`` (truncated to the
    model's text length, as CLIP was trained)."""
    model = bundle.model
    out = []
    texts = list(texts)
    for start in range(0, len(texts), batch_size):
        tok = bundle.tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=bundle.max_length,
            return_tensors="pt",
        )
        pooled = model.text_model(
            input_ids=tok["input_ids"].to(bundle.device),
            attention_mask=tok["attention_mask"].to(bundle.device),
        ).pooler_output
        out.append(F.normalize(model.text_projection(pooled).float(), dim=-1))
    return torch.cat(out)


# --------------------------------------------------------------------------- scores


def clip_score(
    bundle: ClipBundle,
    images: torch.Tensor,
    prompts: Sequence[str] | str,
    w: float = 100.0,
    batch_size: int = 16,
) -> np.ndarray:
    """CLIPScore of each image against its prompt: ``max(w * cos(img, text), 0)``, shape ``[n]``.

    ``w=100`` (default) is the torchmetrics scale; ``w=2.5`` is Hessel et al. (2021). A single
    string prompt is used for every image.
    """
    n = int(images.shape[0])
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    if len(prompts) != n:
        raise QschedError(f"clip_score needs one prompt per image; got {len(prompts)} prompts for {n} images")
    if n == 0:
        return np.zeros(0)
    img = image_embeddings(bundle, images, batch_size)
    txt = text_embeddings(bundle, prompts)
    cos = (img * txt).sum(-1)
    return (w * cos).clamp_min(0.0).double().cpu().numpy()


def clip_iqa(
    bundle: ClipBundle,
    images: torch.Tensor,
    prompt_pairs: Sequence[tuple[str, str]] = DEFAULT_IQA_PAIRS,
    batch_size: int = 16,
) -> np.ndarray:
    """CLIP-IQA quality in ``[0, 1]`` per image, shape ``[n]``: for each ``(positive, negative)``
    pair, ``softmax(100 * cos)`` probability of the positive prompt, averaged over the pairs."""
    pairs = [tuple(p) for p in prompt_pairs]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise QschedError("clip_iqa needs at least one (positive, negative) prompt pair")
    n = int(images.shape[0])
    if n == 0:
        return np.zeros(0)
    img = image_embeddings(bundle, images, batch_size)
    txt = text_embeddings(bundle, [t for pair in pairs for t in pair])  # [2P, d]
    logits = (100.0 * img @ txt.T).view(n, len(pairs), 2)
    return logits.softmax(-1)[..., 0].mean(-1).double().cpu().numpy()

"""One way to run any supported pipeline: the sampler settings a compile calibrates and measures with."""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class GenerationSettings:
    """Sampler settings; defaults come from the model registry, recipes may override them."""

    steps: int = 4
    height: int = 1024
    width: int = 1024
    guidance_scale: float = 0.0
    max_sequence_length: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def generate(pipe, prompts: list[str], settings: GenerationSettings, seed: int = 0, batch_size: int = 8,
             progress: bool | str = False) -> torch.Tensor:
    """Images in [0,1], shape [n,3,H,W]; batch ``i`` uses generator seed ``seed + i`` so runs are reproducible.

    ``progress`` (True or a label) shows one bar over the prompts instead of diffusers' per-call bars.
    """
    pipe.set_progress_bar_config(disable=True)
    out = []
    label = progress if isinstance(progress, str) else "generating"
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=label, unit="batch", disable=not progress, leave=False):
        kwargs = dict(call_arguments(pipe, settings), output_type="pt",
                      generator=torch.Generator("cpu").manual_seed(seed + start // batch_size))
        with torch.inference_mode():
            images = pipe(prompts[start:start + batch_size], **kwargs).images
        out.append(images.float().cpu())
    return torch.cat(out)


_BINNED_SAMPLE_SIZES = (32, 64, 128)  # PixArt's aspect-ratio bins exist only for its 256/512/1024 models


def _family_kwargs(pipe) -> dict:
    """Call arguments some pipelines need to honour ``settings`` as given. PixArt snaps sizes to its
    aspect-ratio bins and refuses a denoiser of any other sample size, so binning is off for those; its
    caption cleaning needs bs4 and ftfy and, without them, is skipped anyway with two warnings per call."""
    import importlib.util

    params = inspect.signature(type(pipe).__call__).parameters
    kwargs = {}
    size = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "sample_size", None)
    if "use_resolution_binning" in params and size not in _BINNED_SAMPLE_SIZES:
        kwargs["use_resolution_binning"] = False
    if "clean_caption" in params and not all(importlib.util.find_spec(m) for m in ("bs4", "ftfy")):
        kwargs["clean_caption"] = False
    return kwargs


def call_arguments(pipe, settings: GenerationSettings) -> dict:
    """The call arguments that make ``pipe`` draw at ``settings``: one definition for the compile's own
    sampling and for a loaded artifact's call defaults (:func:`with_call_defaults`)."""
    kwargs = dict(num_inference_steps=settings.steps, height=settings.height, width=settings.width,
                  guidance_scale=settings.guidance_scale)
    if settings.max_sequence_length:
        kwargs["max_sequence_length"] = settings.max_sequence_length
    kwargs.update(_family_kwargs(pipe))
    return kwargs


def with_call_defaults(pipe, settings: GenerationSettings):
    """Make ``pipe(prompt)`` draw at ``settings``; arguments the caller passes still win.

    diffusers' own defaults are not what an artifact was compiled and measured at (FluxPipeline pads text
    to 512 tokens and picks 28 steps at its default size), so a bare call would draw something other than
    the report shows. The pipeline's class is swapped for a same-named subclass whose ``__call__`` fills
    in what the caller left out; the defaults stay visible as ``pipe.call_defaults``.
    """
    base = type(pipe)
    signature = inspect.signature(base.__call__)
    defaults = {k: v for k, v in call_arguments(pipe, settings).items() if k in signature.parameters}

    def __call__(self, *args, **kwargs):
        given = signature.bind_partial(self, *args, **kwargs).arguments
        return base.__call__(self, *args, **{**{k: v for k, v in self.call_defaults.items() if k not in given},
                                             **kwargs})

    cls = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                        "__qualname__": base.__qualname__, "__doc__": base.__doc__})
    pipe.__class__ = cls
    pipe.call_defaults = defaults
    return pipe

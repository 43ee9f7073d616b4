"""Each prompt's text embeddings computed once and kept in host memory, so the text encoders can leave the
compile's device.

A compile samples a few hundred prompts thousands of times (calibration, sensitivity probes, Q-Sched, the
cache search, the report), and a diffusers pipeline encodes its prompt on every call. Without a cache the
text encoders stay on the device for the whole compile: at FLUX.1 size T5-XXL alone is 9.5 GB in BF16, 40 %
of the transformer it conditions. :class:`TextEmbeddingCache` wraps the pipeline's own ``encode_prompt``,
so tokenisation, padding, pooling and classifier-free guidance stay exactly as each pipeline writes them:
every prompt is encoded once, its rows are kept on the host, and later calls assemble their batch from the
stored rows. :meth:`TextEmbeddingCache.precompute` encodes a list of prompts with the options the
pipeline's ``__call__`` passes (it runs the call and stops it right after encoding), and
:func:`release_text_encoders` then moves the encoders off the device.

Calls the cache cannot key (tensors or lists among the options, ``num_images_per_prompt`` above one, no
prompt) go to the pipeline's own method unchanged. The cache knows no model: which outputs carry one row
per prompt is learnt by encoding batches of two sizes.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass

import torch
from torch import nn

_CALL_ONLY = ("prompt", "device", "num_images_per_prompt")


class _Encoded(Exception):
    """Raised by the wrapper during :meth:`TextEmbeddingCache.precompute` once a batch is encoded, so the
    pipeline's call stops before it samples."""


@dataclass
class TextEmbeddingStats:
    """What the cache did: prompts encoded by the text encoders (``encoded_rows``, the two structure probes'
    extra rows included), rows served from the store (``served_rows``), calls passed through uncached
    (``bypassed_calls``), rows encoded after :meth:`TextEmbeddingCache.precompute` (``late_rows``: prompts
    nobody listed ahead, encoded on the host once the encoders are released, which is slow), the rows stored
    and their bytes."""

    encoded_rows: int = 0
    served_rows: int = 0
    bypassed_calls: int = 0
    late_rows: int = 0
    stored_rows: int = 0
    stored_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def is_text_encoder(component: str) -> bool:
    """diffusers names a pipeline's text encoders ``text_encoder``, ``text_encoder_2``, ..."""
    return component.startswith("text_encoder")


def text_encoders(pipe) -> dict[str, nn.Module]:
    """The pipeline's text encoders, by component name."""
    components = getattr(pipe, "components", {}) or {}
    return {name: m for name, m in components.items() if is_text_encoder(name) and isinstance(m, nn.Module)}


class TextEmbeddingCache:
    """Installed on one pipeline by :func:`cache_text_embeddings`; :meth:`remove` gives the pipeline back."""

    def __init__(self, pipe):
        self.pipe = pipe
        self._signature = inspect.signature(type(pipe).encode_prompt)
        self._rows: dict[tuple, tuple] = {}          # (options, prompt) -> per-row outputs, one row each
        self._layout: dict[tuple, tuple] = {}        # options -> per output: "row", "shared" or None
        self._shared: dict[tuple, tuple] = {}        # options -> outputs without a row per prompt
        self._tuple: dict[tuple, bool] = {}          # options -> whether encode_prompt returned a tuple
        self._stopping = False
        self._precomputed = False
        self._homes: dict[str, torch.device] = {}    # released encoder -> the device it came from
        self.stats = TextEmbeddingStats()
        pipe.encode_prompt = self.encode_prompt      # an instance attribute shadows the class's method

    # --- the wrapper -----------------------------------------------------------------------------------

    def encode_prompt(self, *args, **kwargs):
        bound = self._signature.bind(self.pipe, *args, **kwargs)
        bound.apply_defaults()
        given = dict(bound.arguments)
        given.pop(next(iter(self._signature.parameters)))  # self
        for name, param in self._signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                given.update(given.pop(name, {}) or {})
        prompt, device = given.get("prompt"), given.get("device")
        options = {k: v for k, v in given.items() if k not in _CALL_ONLY}
        if prompt is None or given.get("num_images_per_prompt", 1) != 1 or not _keyable(options) or (
                not isinstance(prompt, str) and not all(isinstance(p, str) for p in prompt)):
            self.stats.bypassed_calls += 1
            if self._stopping:  # nothing to store: stop the precompute's call before it samples
                raise _Encoded
            return type(self.pipe).encode_prompt(self.pipe, *args, **kwargs)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        key = tuple(sorted((k, repr(v)) for k, v in options.items()))
        missing = list(dict.fromkeys(p for p in prompts if (key, p) not in self._rows))
        if missing:
            self._encode(missing, key, options)
        if self._stopping:
            raise _Encoded
        self.stats.served_rows += len(prompts)
        target = torch.device(device) if device is not None else self.pipe._execution_device
        rows = [self._rows[(key, p)] for p in prompts]
        out, shared = [], iter(self._shared[key])
        for i, kind in enumerate(self._layout[key]):
            if kind == "row":
                out.append(torch.cat([r[i] for r in rows]).to(target))
            else:
                value = next(shared)
                out.append(value.to(target) if isinstance(value, torch.Tensor) else value)
        return tuple(out) if self._tuple[key] else out[0]

    def _encode(self, missing: list[str], key: tuple, options: dict) -> None:
        """Encode ``missing`` where the encoders are, learning the output layout on the first batch: one row per
        prompt is what grows with the batch (a one-prompt batch against a larger one)."""
        if key not in self._layout:
            first = self._call([missing[0]], options)
            rest = missing[1:] if len(missing) >= 3 else [missing[0], missing[0]]
            other = self._call(rest, options)
            self._tuple[key] = isinstance(first, tuple)
            first, other = _as_tuple(first), _as_tuple(other)
            self._layout[key] = tuple(_kind(a, b, len(rest)) for a, b in zip(first, other))
            self._shared[key] = tuple(a.to("cpu") if isinstance(a, torch.Tensor) else a
                                      for a, kind in zip(first, self._layout[key]) if kind != "row")
            self._store(key, [missing[0]], first)
            if len(missing) >= 3:
                self._store(key, rest, other)
            else:
                self._store(key, missing[1:], self._call(missing[1:], options) if len(missing) == 2 else None)
            return
        self._store(key, missing, self._call(missing, options))

    def _call(self, prompts: list[str], options: dict):
        """The pipeline's own ``encode_prompt`` on the encoders' device, outside inference mode (so stored rows
        can meet autograd later) and without gradients."""
        self.stats.encoded_rows += len(prompts)
        if self._precomputed and not self._stopping:
            self.stats.late_rows += len(prompts)
        with torch.inference_mode(False), torch.no_grad():
            return type(self.pipe).encode_prompt(self.pipe, prompt=prompts, device=self.encoder_device(),
                                                 num_images_per_prompt=1, **options)

    def _store(self, key: tuple, prompts: list[str], outputs) -> None:
        if outputs is None:
            return
        outputs = _as_tuple(outputs)
        for j, p in enumerate(prompts):
            row = tuple(o[j:j + 1].to("cpu", copy=True) if kind == "row" else None
                        for o, kind in zip(outputs, self._layout[key]))
            self._rows[(key, p)] = row
            self.stats.stored_rows += 1
            self.stats.stored_bytes += sum(t.numel() * t.element_size() for t in row if t is not None)

    # --- precompute, release, remove -------------------------------------------------------------------

    def precompute(self, prompts: list[str], call_kwargs: dict, batch_size: int = 8) -> int:
        """Encode every prompt of ``prompts`` not yet stored, with the options ``pipe(prompt, **call_kwargs)``
        passes to ``encode_prompt``: the call runs and is stopped right after encoding, before any sampling.
        Returns the number of prompts newly encoded."""
        unique = list(dict.fromkeys(prompts))
        before = self.stats.stored_rows
        self._stopping = True
        try:
            for start in range(0, len(unique), batch_size):
                try:
                    self.pipe(unique[start:start + batch_size], **{**call_kwargs, "output_type": "latent"})
                except _Encoded:
                    continue
                raise RuntimeError(f"{type(self.pipe).__name__}.__call__ did not call encode_prompt: its text "
                                   "embeddings cannot be computed ahead")
        finally:
            self._stopping = False
        self._precomputed = True
        return self.stats.stored_rows - before

    def encoder_device(self) -> torch.device:
        for module in text_encoders(self.pipe).values():
            for p in module.parameters():
                return p.device
        return self.pipe._execution_device

    def remove(self) -> None:
        """Give the pipeline its own ``encode_prompt`` back, and released encoders their device; the stored rows
        are dropped."""
        if self.pipe.__dict__.get("encode_prompt") == self.encode_prompt:
            del self.pipe.__dict__["encode_prompt"]
        encoders = text_encoders(self.pipe)
        for name, device in self._homes.items():
            encoders[name].to(device)
        self._homes.clear()
        self._rows.clear()


def cache_text_embeddings(pipe) -> TextEmbeddingCache:
    """Install a :class:`TextEmbeddingCache` on ``pipe`` (any diffusers pipeline with ``encode_prompt``)."""
    if not callable(getattr(type(pipe), "encode_prompt", None)):
        raise TypeError(f"{type(pipe).__name__} has no encode_prompt to cache")
    return TextEmbeddingCache(pipe)


def release_text_encoders(pipe, cache: TextEmbeddingCache, to: str | torch.device = "cpu") -> int:
    """Move ``pipe``'s text encoders to ``to`` (host memory) once their embeddings are cached; the denoiser and
    the VAE stay where they are, and :meth:`TextEmbeddingCache.remove` moves the encoders back. Returns the
    bytes moved (0 when they were there already)."""
    to = torch.device(to)
    moved = 0
    for name, module in text_encoders(pipe).items():
        tensors = list(module.parameters()) + list(module.buffers())
        if tensors and tensors[0].device != to:
            moved += sum(t.numel() * t.element_size() for t in tensors)
            cache._homes.setdefault(name, tensors[0].device)
            module.to(to)
    return moved


def _keyable(options: dict) -> bool:
    return all(v is None or isinstance(v, (bool, int, float, str)) for v in options.values())


def _as_tuple(outputs) -> tuple:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def _kind(one, many, rows: int) -> str | None:
    """``row`` when an output has one row per prompt (its first dimension is 1 for one prompt and ``rows`` for
    ``rows`` prompts), ``shared`` for any other tensor, None for a missing one."""
    if not isinstance(one, torch.Tensor):
        return None
    if isinstance(many, torch.Tensor) and one.dim() and one.shape[0] == 1 and many.shape[0] == rows:
        return "row"
    return "shared"

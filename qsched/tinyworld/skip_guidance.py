"""Skip-layer guidance: push a transformer's prediction away from what it predicts with some blocks skipped.

Why: classifier-free guidance contrasts the caption with the empty one; skip-layer guidance (as SD 3.5 uses it)
contrasts the whole model with a weakened copy of itself, v + scale · (v − v_skip), on the same caption, so it
needs no unconditional branch and sharpens what the skipped blocks add. A skipped block returns its inputs (both
streams) unchanged. Measured on flux-tiny by ``benchmarks/tiny_skip_guidance.py``.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def _identity(module, args, kwargs, output):
    """A block's forward hook that hands its inputs on: (encoder_hidden_states, hidden_states), as Flux blocks return."""
    return kwargs["encoder_hidden_states"], kwargs["hidden_states"]


def block_paths(double: int, single: int) -> list[str]:
    """The module paths of a Flux transformer's blocks, ``double`` dual-stream then ``single`` single-stream."""
    return [f"transformer_blocks.{i}" for i in range(double)] + [f"single_transformer_blocks.{i}" for i in range(single)]


@contextmanager
def skipped(transformer, blocks: list[str]):
    """Within the context, the named blocks (module paths such as ``single_transformer_blocks.2``) are skipped."""
    known = block_paths(len(transformer.transformer_blocks), len(transformer.single_transformer_blocks))
    missing = [b for b in blocks if b not in known]
    if missing:
        raise ValueError(f"no block {missing[0]!r} in the transformer; name blocks by module path, e.g. "
                         "transformer_blocks.0 or single_transformer_blocks.3")
    modules = dict(transformer.named_modules())
    handles = [modules[b].register_forward_hook(_identity, with_kwargs=True) for b in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def skip_layer_guidance(transformer, blocks: list[str], scale: float):
    """Within the context every call of ``transformer`` returns v + scale · (v − v_skip) (one extra call)."""
    busy = []

    def guide(module, args, kwargs, output):
        if busy:  # the inner, skipped call
            return None
        busy.append(True)
        try:
            with skipped(module, blocks):
                weak = module(*args, **kwargs)
        finally:
            busy.clear()
        strong_v, weak_v = _sample(output), _sample(weak)
        guided = strong_v + scale * (strong_v - weak_v)
        return (guided, *output[1:]) if isinstance(output, tuple) else type(output)(sample=guided)

    handle = transformer.register_forward_hook(guide, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _sample(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample

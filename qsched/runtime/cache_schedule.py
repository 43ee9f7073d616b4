"""Cache schedules: which block components recompute and which reuse their last output, per denoising step.

A schedule is a boolean per (step, block, component): ``True`` = reuse the component's output stored at
its last computed step (re-gated with the current step's AdaLN gate by :mod:`qsched.runtime.caching`),
``False`` = recompute. Step 0 always computes (nothing is stored yet), so it is not part of the genome
the search evolves.

Components are the block children whose output is gated (or, for PixArt's cross-attention, added) before
it joins the residual stream:

* FLUX double-stream blocks (``FluxTransformerBlock``): ``attn`` (joint attention, both streams),
  ``ff`` (image MLP), ``ff_context`` (text MLP);
* FLUX single-stream blocks (``FluxSingleTransformerBlock``): ``attn``, ``proj_mlp`` (MLP up-projection,
  before its GELU), ``proj_out`` (the shared output projection of the concatenated attn and MLP outputs);
* PixArt blocks (``BasicTransformerBlock``): ``attn1`` (self-attention), ``attn2`` (cross-attention),
  ``ff``.

Blocks are named by their module path in the denoiser (``transformer_blocks.3``), as everywhere in
qsched, so a schedule is tied to an architecture, not to weights.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

FORMAT = "qsched-cache-schedule"
VERSION = 1

# Block class name -> its cacheable components, in execution order.
BLOCK_COMPONENTS: dict[str, tuple[str, ...]] = {
    "FluxTransformerBlock": ("attn", "ff", "ff_context"),
    "FluxSingleTransformerBlock": ("attn", "proj_mlp", "proj_out"),
    "BasicTransformerBlock": ("attn1", "attn2", "ff"),
}
# Which components the attention-only / FF-only heuristics cache. proj_out mixes both paths: neither.
ATTENTION_COMPONENTS = frozenset({"attn", "attn1", "attn2"})
FEEDFORWARD_COMPONENTS = frozenset({"ff", "ff_context", "proj_mlp"})

Blocks = tuple[tuple[str, tuple[str, ...]], ...]


def block_layout(model) -> Blocks:
    """The cacheable (block path, components) of a denoiser or of a pipeline's denoiser, in module order.

    Raises ValueError when the model has no supported block (better than a schedule that caches nothing).
    """
    denoiser = _denoiser(model)
    out = []
    for name, module in denoiser.named_modules():
        comps = BLOCK_COMPONENTS.get(type(module).__name__)
        if comps is None or not name:
            continue
        present = tuple(c for c in comps if getattr(module, c, None) is not None)  # PixArt may lack attn2
        if present:
            out.append((name, present))
    if not out:
        raise ValueError(f"{type(denoiser).__name__} has no cacheable block; supported block classes: "
                         f"{sorted(BLOCK_COMPONENTS)}")
    return tuple(out)


def _denoiser(model):
    from torch import nn

    for attr in ("transformer", "unet"):
        den = getattr(model, attr, None)
        if isinstance(den, nn.Module):
            return den
    if isinstance(model, nn.Module):
        return model
    raise TypeError(f"expected a diffusers pipeline or denoiser module, got {type(model).__name__}")


def _normalise_blocks(blocks: Iterable) -> Blocks:
    out = []
    for item in blocks:
        if isinstance(item, dict):
            name, comps = item["name"], item["components"]
        else:
            name, comps = item
        comps = tuple(str(c) for c in comps)
        if not comps or len(set(comps)) != len(comps):
            raise ValueError(f"block {name!r} needs distinct, non-empty components, got {comps}")
        out.append((str(name), comps))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError("duplicate block names in a cache schedule layout")
    if not out:
        raise ValueError("a cache schedule needs at least one block")
    return tuple(out)


class CacheSchedule:
    """Immutable reuse table ``[steps, slots]`` over the slots (block, component) of ``blocks``.

    Equality and hashing are by (steps, blocks, table), so schedules can be deduplicated in sets.
    """

    __slots__ = ("steps", "blocks", "slots", "_slot_index", "_reuse", "_key")

    def __init__(self, steps: int, blocks: Iterable, reuse=None):
        self.steps = int(steps)
        if self.steps < 1:
            raise ValueError(f"a schedule needs at least one step, got {steps}")
        self.blocks: Blocks = _normalise_blocks(blocks)
        self.slots: tuple[tuple[str, str], ...] = tuple((b, c) for b, comps in self.blocks for c in comps)
        self._slot_index = {s: i for i, s in enumerate(self.slots)}
        table = np.zeros((self.steps, len(self.slots)), dtype=bool) if reuse is None else np.array(reuse, dtype=bool)
        if table.shape != (self.steps, len(self.slots)):
            raise ValueError(f"reuse table must be [{self.steps}, {len(self.slots)}], got {list(table.shape)}")
        if table[0].any():
            raise ValueError("step 0 must compute every component: there is no stored output to reuse yet")
        table.flags.writeable = False
        self._reuse = table
        self._key = (self.steps, self.blocks, table.tobytes())

    # --- queries ----------------------------------------------------------------------------------

    def reuses(self, step: int, block: str, component: str) -> bool:
        return bool(self._reuse[step, self._slot_index[(block, component)]])

    def slot(self, block: str, component: str) -> int:
        return self._slot_index[(block, component)]

    @property
    def table(self) -> np.ndarray:
        """Read-only bool array ``[steps, slots]`` (True = reuse)."""
        return self._reuse

    @property
    def num_reused(self) -> int:
        return int(self._reuse.sum())

    @property
    def reuse_fraction(self) -> float:
        return self.num_reused / self._reuse.size

    def same_layout(self, other: "CacheSchedule") -> bool:
        return self.steps == other.steps and self.blocks == other.blocks

    def __eq__(self, other) -> bool:
        return isinstance(other, CacheSchedule) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return (f"CacheSchedule(steps={self.steps}, blocks={len(self.blocks)}, slots={len(self.slots)}, "
                f"reused={self.num_reused}/{self._reuse.size})")

    # --- genome view (DEAP) -----------------------------------------------------------------------

    @staticmethod
    def genome_length(steps: int, blocks: Iterable) -> int:
        return (int(steps) - 1) * sum(len(c) for _, c in _normalise_blocks(blocks))

    def to_genome(self) -> list[int]:
        """Flat 0/1 list over steps 1..S-1 (step-major, then blocks, then components); step 0 is implicit."""
        return self._reuse[1:].astype(np.int8).ravel().tolist()

    @classmethod
    def from_genome(cls, genome: Sequence[int], steps: int, blocks: Iterable) -> "CacheSchedule":
        blocks = _normalise_blocks(blocks)
        n_slots = sum(len(c) for _, c in blocks)
        bits = np.asarray(list(genome), dtype=bool)
        if bits.size != (steps - 1) * n_slots:
            raise ValueError(f"genome has {bits.size} genes, layout needs {(steps - 1) * n_slots}")
        table = np.zeros((steps, n_slots), dtype=bool)
        table[1:] = bits.reshape(steps - 1, n_slots)
        return cls(steps, blocks, table)

    # --- JSON -------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-able; ``reuse`` lists, per block and component, the steps that reuse (readable and short)."""
        reuse = {b: {c: np.flatnonzero(self._reuse[:, self._slot_index[(b, c)]]).tolist() for c in comps}
                 for b, comps in self.blocks}
        return {"format": FORMAT, "version": VERSION, "steps": self.steps,
                "blocks": [{"name": b, "components": list(c)} for b, c in self.blocks], "reuse": reuse}

    @classmethod
    def from_dict(cls, data: dict) -> "CacheSchedule":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a cache schedule (format {data.get('format')!r})")
        if data.get("version") != VERSION:
            raise ValueError(f"unsupported cache schedule version {data.get('version')!r}")
        steps, blocks = int(data["steps"]), _normalise_blocks(data["blocks"])
        index = {s: i for i, s in enumerate((b, c) for b, comps in blocks for c in comps)}
        table = np.zeros((steps, len(index)), dtype=bool)
        for b, comps in data.get("reuse", {}).items():
            for c, reused_steps in comps.items():
                if (b, c) not in index:
                    raise ValueError(f"reuse entry for unknown component {b}.{c}")
                for s in reused_steps:
                    if not 0 <= int(s) < steps:
                        raise ValueError(f"reuse step {s} of {b}.{c} is outside 0..{steps - 1}")
                    table[int(s), index[(b, c)]] = True
        return cls(steps, blocks, table)

    # --- heuristics (the search's seeds and the baselines) ----------------------------------------

    @classmethod
    def no_cache(cls, steps: int, blocks: Iterable) -> "CacheSchedule":
        """Recompute everything: the uncached model."""
        return cls(steps, blocks)

    @classmethod
    def fora(cls, steps: int, blocks: Iterable, every_n: int) -> "CacheSchedule":
        """FORA: recompute every component on steps divisible by ``every_n``, reuse all on the others."""
        return cls._periodic(steps, blocks, every_n, lambda comp: True)

    @classmethod
    def attention_only(cls, steps: int, blocks: Iterable, every_n: int = 2) -> "CacheSchedule":
        """FORA restricted to attention components (attn / attn1 / attn2); MLPs always recompute."""
        return cls._periodic(steps, blocks, every_n, lambda comp: comp in ATTENTION_COMPONENTS)

    @classmethod
    def ff_only(cls, steps: int, blocks: Iterable, every_n: int = 2) -> "CacheSchedule":
        """FORA restricted to feed-forward components (ff / ff_context / proj_mlp); attention recomputes."""
        return cls._periodic(steps, blocks, every_n, lambda comp: comp in FEEDFORWARD_COMPONENTS)

    @classmethod
    def _periodic(cls, steps, blocks, every_n, selected) -> "CacheSchedule":
        if int(every_n) < 1:
            raise ValueError(f"every_n must be >= 1, got {every_n}")
        blocks = _normalise_blocks(blocks)
        cols = np.array([selected(c) for _, comps in blocks for c in comps], dtype=bool)
        rows = np.array([s % int(every_n) != 0 for s in range(int(steps))], dtype=bool)
        return cls(steps, blocks, rows[:, None] & cols[None, :])

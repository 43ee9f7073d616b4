"""Model profiles: the one place where what a compile knows about its model lives.

A :class:`ModelProfile` holds the generation settings, the scorer that judges images (its kind and
source), and the prompt sets by purpose with their seeds. The stages receive the profile; none asks which
model it is running. Two kinds of prompt vocabulary exist, and the scorer decides which one a model gets,
because a scorer can only judge prompts it understands:

* ``world-judge``: the tiny shape world's captions, judged by its programmatic judge (flux-tiny, or any
  model trained on that world: ``--scorer world-judge``);
* a CLIP (a local directory or a hub id): the shipped open-vocabulary prompt pools
  (:mod:`qsched.models.prompts`), scored by CLIPScore and CLIP-IQA.

Every purpose draws from a training or a held-out pool with its own seed offset, so train and guard sets
never overlap and two purposes on one pool draw different prompts. The offsets are part of each
artifact's identity (changing one changes the prompts a compile sees), so they live here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qsched.core.errors import QschedError
from qsched.runtime.generation import GenerationSettings

WORLD_JUDGE = "world-judge"


@dataclass(frozen=True)
class PromptSet:
    """Which pool a purpose draws from (``train`` or ``held-out``) and the offset added to the seed."""

    pool: str
    seed_offset: int


#: purpose -> prompt set. Calibration uses the recipe's ``calibration.seed``; the others the compile's seed.
#: MixDQ's sensitivity prompts and the report's sample prompts are the first of the calibration prompts.
PROMPT_SETS: dict[str, PromptSet] = {
    "calibration": PromptSet("train", 10_000),
    "qsched_train": PromptSet("train", 20_000),
    "qsched_guard": PromptSet("held-out", 30_000),
    "cache_train": PromptSet("train", 40_000),
    "cache_guard": PromptSet("held-out", 50_000),
    "evaluation": PromptSet("held-out", 60_000),
}


def world_prompts(pool: str, seed: int, n: int) -> list[str]:
    """``n`` captions of the tiny world's ``train`` or held-out (``test``) split, drawn from ``seed``."""
    from qsched.tinyworld.world import sample_batch

    return list(sample_batch(seed=seed, n=n, split="train" if pool == "train" else "test")[1])


def listed_prompts(pool: str, seed: int, n: int) -> list[str]:
    """``n`` prompts of the shipped training or held-out pool, in an order drawn from ``seed`` (cycling
    through the pool when ``n`` exceeds it)."""
    from qsched.models.prompts import HELD_OUT_PROMPTS, REAL_MODEL_PROMPTS

    items = REAL_MODEL_PROMPTS if pool == "train" else HELD_OUT_PROMPTS
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[order[i % len(items)]] for i in range(n)]


class ModelProfile:
    """What a compile knows about its model: settings, scorer, prompts by purpose.

    ``scorer_source``: ``world-judge`` or a CLIP (local directory or hub id); None when no scorer is
    configured (then only stages that need none can run), ``scorer`` the loaded one.
    """

    def __init__(self, name: str, settings: GenerationSettings, scorer_source: str | None, scorer=None):
        self.name, self.settings, self.scorer_source, self._scorer = name, settings, scorer_source, scorer

    @property
    def world(self) -> bool:
        """Whether prompts come from the tiny world (the judge's vocabulary) rather than the shipped pools."""
        return self.scorer_source == WORLD_JUDGE

    def prompts(self, purpose: str, n: int, seed: int = 0) -> list[str]:
        """``n`` prompts for ``purpose`` (a key of :data:`PROMPT_SETS`) drawn with ``seed``."""
        if purpose not in PROMPT_SETS:
            raise QschedError(f"unknown prompt purpose {purpose!r}; expected one of {', '.join(PROMPT_SETS)}")
        if n <= 0:
            return []
        chosen = PROMPT_SETS[purpose]
        draw = world_prompts if self.world else listed_prompts
        return draw(chosen.pool, chosen.seed_offset + seed, n)

    def scorer(self):
        """The loaded :class:`qsched.scoring.scorer.Scorer`, or None when the profile has none."""
        return self._scorer

    def to_dict(self) -> dict:
        return {"name": self.name, "settings": self.settings.to_dict(), "scorer": self.scorer_source,
                "prompt_sets": {k: {"pool": v.pool, "seed_offset": v.seed_offset} for k, v in PROMPT_SETS.items()}}


def no_scorer_message(model: str) -> str:
    return (f"{model} has no image scorer for Q-Sched and the cache search: pass --scorer with a local CLIP "
            f"directory (or set `scorer:` in the recipe), or pass --no-qsched --no-cache-search, or use "
            f"--model flux-tiny")


def default_scorer(model: str) -> str | None:
    """The registry's scorer for ``model`` (the world's judge for flux-tiny, a hub CLIP for the registry's
    real models); None for other models, which must name one."""
    from qsched.models.registry import REGISTRY

    entry = REGISTRY.get(model)
    return entry.scorer if entry is not None else None


def world_profile(name: str = "flux-tiny") -> ModelProfile:
    """The embedded world model's profile (its settings, the world's judge): what the benchmarks draw from."""
    from qsched.tinyworld.model import TINY_SETTINGS

    return ModelProfile(name, TINY_SETTINGS, WORLD_JUDGE)

"""How much one prompt's images vary with the noise, against how much the world's own scenes of it vary.

Why: the judge scores each image alone, so a sampler that always draws the same easy layout of a prompt
(a lower noise temperature, strong guidance) gains accuracy at a cost the judge cannot see. Two numbers per
prompt, each the mean over pairs of its draws:

- ``layout``: the fraction of the pixels that either draw gives an object colour (the judge's palette rule)
  on which the two disagree, so 0 when the objects sit in the same places and 1 when they share no pixel;
- ``background``: the RGB distance between the two judged background colours.

:func:`reference_draws` renders fresh scenes of the same prompts (new layout, unstated sizes, background)
as the training data draws them; a model's diversity divided by theirs is 1 when it varies as the data does.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from qsched.metrics import paired_difference, to_uint8_hwc
from qsched.tinyworld import world
from qsched.tinyworld.judge import background_color, palette_labels


def _labels(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the palette index where the pixel shows an object, -1 on background; and the background colour."""
    bg = background_color(img)
    nearest, assigned = palette_labels(img, bg)
    return np.where(assigned, nearest, -1), bg


def layout_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Disagreement of two label maps on the pixels where either shows an object (0 if neither shows one)."""
    union = (a >= 0) | (b >= 0)
    return float((a[union] != b[union]).mean()) if union.any() else 0.0


@dataclass
class DiversityResult:
    """Per-prompt mean pairwise ``layout`` and ``background`` distances (see the module docstring)."""

    layout: np.ndarray
    background: np.ndarray

    def summary(self, reference: "DiversityResult | None" = None, base: "DiversityResult | None" = None) -> dict:
        """Means with their 95 % half-widths over prompts; the ratio of means to ``reference`` (the world's own
        scenes of the same prompts) and the paired difference from ``base`` (another model, same prompts)."""
        out = {}
        for name in ("layout", "background"):
            x = getattr(self, name)
            half = 1.96 * x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
            row = {"mean": round(float(x.mean()), 4), "ci95": round(float(half), 4)}
            if reference is not None:
                ref = getattr(reference, name).mean()
                row["ratio"] = round(float(x.mean() / ref), 4) if ref > 0 else None
            if base is not None:
                d, ci = paired_difference(getattr(base, name), x)
                row["paired"] = [round(d, 4), round(ci, 4)]
            out[name] = row
        return out


def diversity(images) -> DiversityResult:
    """``images``: [prompts, draws, ...] (any per-image layout :func:`to_uint8_hwc` accepts), two draws or more."""
    images = np.asarray(images)
    if images.ndim < 4 or images.shape[1] < 2:
        raise ValueError(f"need [prompts, draws >= 2, ...] images, got shape {images.shape}")
    n, draws = images.shape[:2]
    flat = to_uint8_hwc(images.reshape(n * draws, *images.shape[2:]))
    read = [_labels(img) for img in flat]
    layout, background = np.zeros(n), np.zeros(n)
    pairs = list(combinations(range(draws), 2))
    for p in range(n):
        maps = read[p * draws:(p + 1) * draws]
        layout[p] = np.mean([layout_distance(maps[i][0], maps[j][0]) for i, j in pairs])
        background[p] = np.mean([np.linalg.norm(maps[i][1] - maps[j][1]) for i, j in pairs])
    return DiversityResult(layout, background)


def reference_draws(prompts: list[str], draws: int, seed: int, size: int = 32) -> np.ndarray:
    """uint8 [prompts, draws, size, size, 3]: fresh world scenes of each prompt, deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([world.render(world.scene_for(world.parse_prompt(p), rng), size)
                               for _ in range(draws)]) for p in prompts])

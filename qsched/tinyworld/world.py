"""The procedural "shape world" that the tiny text-to-image model is trained on.

Why a procedural world: compression decisions (JAQ's text-consistency and image-quality terms,
per-layer sensitivity metrics, cache-search objectives) need images whose correctness a program can
check exactly and cheaply (see :mod:`qsched.tinyworld.judge`).  So the world is built for judging:

* flat colours that are far apart in RGB (pairwise distance >= 150), on dark/neutral backgrounds that
  are at least ~120 away from every object colour, so a pixel's colour names its object;
* a small caption grammar whose exact inverse is :func:`parse_prompt`;
* scenes that always satisfy their caption, with strict margins: objects keep a gap between their
  bounding boxes, and positions/relations are sampled well inside the regions the judge accepts
  (:func:`satisfies_position`, :func:`satisfies_relation` define what the words mean);
* enough variety (position and size jitter, optional size words, counts, attribute binding across
  objects, background tint) that a model has to generate rather than memorise;
* determinism from a seed, and a held-out prompt split chosen by a stable hash of the caption
  (``hashlib``, never the salted built-in ``hash``).

Coordinates are normalised: x to the right, y downwards, both in [0, 1]; pixel ``j`` covers
``[j/size, (j+1)/size)``.  Scenes are resolution-independent: the same seed gives the same captions
and layouts at 32 and at 64 pixels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

# --- palette and geometry -------------------------------------------------------------------------

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 200, 50),
    "blue": (40, 70, 240),
    "yellow": (235, 215, 40),
    "purple": (200, 50, 210),
    "cyan": (40, 220, 220),
    "white": (240, 240, 240),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 22),
    "charcoal": (56, 56, 60),
    "gray": (80, 80, 84),
    "brown": (52, 38, 28),
    "slate": (26, 38, 56),
    "olive": (34, 48, 34),
}
BACKGROUND_TINT = 8  # per-image uniform shift of each background channel, in [-8, 8]

HALF_EXTENT = {"small": 0.11, "large": 0.17}  # half of the bounding-box side, normalised
SIZE_JITTER = 0.06  # relative jitter of the half extent
MARGIN = 0.04  # minimum distance from any object to the image border
GAP = 0.06  # minimum gap between the bounding boxes of two objects (about 2 px at 32 px)
SUPERSAMPLE = 4  # anti-aliasing: 4x4 sub-pixel samples per pixel (deterministic)

# --- grammar --------------------------------------------------------------------------------------

NUMBER_WORDS = {2: "two", 3: "three"}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
    "top left": "in the top left corner",
    "top right": "in the top right corner",
    "bottom left": "in the bottom left corner",
    "bottom right": "in the bottom right corner",
}
RELATION_PHRASES: dict[str, str] = {
    "above": "above",
    "below": "below",
    "left of": "to the left of",
    "right of": "to the right of",
}

# Caption kinds, with {obj} = "a [small|large] <colour> <shape>" and {objs} its plural.
TEMPLATES: dict[str, str] = {
    "single": "{obj}",
    "position": "{obj} <position>",
    "pair": "{obj} and {obj}",
    "relation": "{obj} <relation> {obj}",
    "count": "<two|three> {objs}",
    "count_plus": "two {objs} and {obj}",
}
KIND_PROBS: dict[str, float] = {
    "single": 0.12,
    "position": 0.22,
    "pair": 0.16,
    "relation": 0.25,
    "count": 0.15,
    "count_plus": 0.10,
}
SIZE_MENTION_PROB = 0.5

HELD_OUT_FRACTION = 0.125
_SPLIT_SALT = "tinyworld-split-v1:"


def _vocab() -> list[str]:
    words = {"a", "and", *NUMBER_WORDS.values(), *SIZES, *COLOR_NAMES, *SHAPES}
    words |= {s + "s" for s in SHAPES}
    for phrase in (*POSITION_PHRASES.values(), *RELATION_PHRASES.values()):
        words |= set(phrase.split())
    return sorted(words)


VOCAB: list[str] = _vocab()
_GROUP_WORDS = 4  # article/number, size, colour, shape
MAX_WORDS: int = max(
    _GROUP_WORDS + max(len(p.split()) for p in POSITION_PHRASES.values()),
    2 * _GROUP_WORDS + max(len(p.split()) for p in RELATION_PHRASES.values()),
    2 * _GROUP_WORDS + 1,  # "... and ..."
)


# --- data types -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about a group of identical objects (``size`` None: not stated)."""

    color: str
    shape: str
    size: str | None = None
    count: int = 1


@dataclass(frozen=True)
class PromptSpec:
    """A parsed caption: its template kind, its object groups, and the constraint on them.

    ``position`` constrains ``groups[0]``; ``relation`` reads "groups[0] <relation> groups[1]".
    """

    kind: str
    groups: tuple[ObjectSpec, ...]
    position: str | None = None
    relation: str | None = None

    @property
    def n_objects(self) -> int:
        return sum(g.count for g in self.groups)


@dataclass(frozen=True)
class Obj:
    """One rendered object: bounding-box centre (cx, cy) and half extent, normalised."""

    group: int
    color: str
    shape: str
    size: str
    cx: float
    cy: float
    half: float


@dataclass(frozen=True)
class Scene:
    spec: PromptSpec
    objects: tuple[Obj, ...]
    background: tuple[int, int, int]


# --- semantics of the position and relation words (shared with the judge) --------------------------


def satisfies_position(position: str, x: float, y: float) -> bool:
    """Whether a bounding-box centre (x, y) is "<position>" in the image (what the judge accepts)."""
    ok = True
    words = position.split()
    if "left" in words:
        ok &= x < 0.4
    if "right" in words:
        ok &= x > 0.6
    if "top" in words:
        ok &= y < 0.4
    if "bottom" in words:
        ok &= y > 0.6
    if position == "center":
        ok &= abs(x - 0.5) < 0.15 and abs(y - 0.5) < 0.15
    return bool(ok)


def relation_offsets(relation: str, a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """(displacement of ``a`` from ``b`` along the relation's direction, |offset across it|)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along = {"above": dy, "below": -dy, "left of": dx, "right of": -dx}[relation]
    across = abs(dx) if relation in ("above", "below") else abs(dy)
    return along, across


def satisfies_relation(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether object centre ``a`` is "<relation>" object centre ``b``: at least 0.1 of the image
    along the relation's direction, and more along it than across it (a 90-degree cone)."""
    along, across = relation_offsets(relation, a, b)
    return along >= 0.1 and across <= along


# Generation is stricter than judging, so every rendered scene satisfies its caption with margin.
_POSITION_RANGES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {}
_LOW, _HIGH, _MID, _CENTRE = (0.12, 0.30), (0.70, 0.88), (0.30, 0.70), (0.42, 0.58)
for _name in POSITION_PHRASES:
    _w = _name.split()
    _x = _LOW if "left" in _w else _HIGH if "right" in _w else _CENTRE if _name == "center" else _MID
    _y = _LOW if "top" in _w else _HIGH if "bottom" in _w else _CENTRE if _name == "center" else _MID
    _POSITION_RANGES[_name] = (_x, _y)
_RELATION_MIN_ALONG = 0.3  # generated relations: along >= 0.3 and across <= 0.5 * along
_LAYOUT_TRIES = 1000


# --- captions and parsing -------------------------------------------------------------------------


def _group_phrase(g: ObjectSpec) -> str:
    words = ["a" if g.count == 1 else NUMBER_WORDS[g.count]]
    if g.size is not None:
        words.append(g.size)
    words += [g.color, g.shape if g.count == 1 else g.shape + "s"]
    return " ".join(words)


def format_prompt(spec: PromptSpec) -> str:
    """The caption of a :class:`PromptSpec` (inverse of :func:`parse_prompt`)."""
    first = _group_phrase(spec.groups[0])
    if spec.kind in ("single", "count"):
        return first
    if spec.kind == "position":
        return f"{first} {POSITION_PHRASES[spec.position]}"
    if spec.kind == "relation":
        return f"{first} {RELATION_PHRASES[spec.relation]} {_group_phrase(spec.groups[1])}"
    return f"{first} and {_group_phrase(spec.groups[1])}"


def group_word_spans(spec: PromptSpec) -> list[tuple[int, int]]:
    """[start, stop) word indices of each object group in ``format_prompt(spec)``: the first group opens the
    caption; a second one (pair, count_plus or relation) closes it."""
    n0 = len(_group_phrase(spec.groups[0]).split())
    spans = [(0, n0)]
    if len(spec.groups) > 1:
        total = len(format_prompt(spec).split())
        spans.append((total - len(_group_phrase(spec.groups[1]).split()), total))
    return spans


def caption(scene: Scene) -> str:
    return format_prompt(scene.spec)


class _Parser:
    def __init__(self, prompt: str):
        self.prompt = prompt
        self.words = prompt.strip().rstrip(".").lower().split()
        self.i = 0

    def fail(self, expected: str) -> ValueError:
        got = repr(self.words[self.i]) if self.i < len(self.words) else "the end of the prompt"
        return ValueError(
            f"prompt {self.prompt!r} is outside the tinyworld grammar: expected {expected} "
            f"at word {self.i + 1}, got {got}. Templates: {', '.join(TEMPLATES.values())}"
        )

    def peek(self) -> str | None:
        return self.words[self.i] if self.i < len(self.words) else None

    def take(self, allowed, expected: str) -> str:
        word = self.peek()
        if word not in allowed:
            raise self.fail(expected)
        self.i += 1
        return word

    def phrase(self, phrases: dict[str, str]) -> str | None:
        """Consume the longest phrase that matches here; return its key, or None."""
        for key, text in sorted(phrases.items(), key=lambda kv: -len(kv[1].split())):
            words = text.split()
            if self.words[self.i : self.i + len(words)] == words:
                self.i += len(words)
                return key
        return None

    def group(self) -> ObjectSpec:
        numbers = {"a": 1, **{w: n for n, w in NUMBER_WORDS.items()}}
        count = numbers[self.take(numbers, "'a', 'two' or 'three'")]
        size = self.take(SIZES, "a size") if self.peek() in SIZES else None  # optional
        color = self.take(COLOR_NAMES, f"a colour ({', '.join(COLOR_NAMES)})")
        shapes = {(s if count == 1 else s + "s"): s for s in SHAPES}
        shape = shapes[self.take(shapes, f"a shape ({', '.join(shapes)})")]
        return ObjectSpec(color, shape, size, count)


def parse_prompt(prompt: str) -> PromptSpec:
    """Parse a caption of the grammar into a :class:`PromptSpec`; ValueError if it is not one."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    p = _Parser(prompt)
    first = p.group()
    second = None
    position = relation = None
    if p.peek() is None:
        kind = "single" if first.count == 1 else "count"
    elif first.count == 1 and (position := p.phrase(POSITION_PHRASES)):
        kind = "position"
    elif first.count == 1 and (relation := p.phrase(RELATION_PHRASES)):
        kind, second = "relation", p.group()
    elif p.peek() == "and" and first.count <= 2:
        p.i += 1
        kind, second = ("pair" if first.count == 1 else "count_plus"), p.group()
    else:
        raise p.fail("a position, a relation or 'and'" if first.count == 1 else "the end of the prompt")
    if p.peek() is not None:
        raise p.fail("the end of the prompt")
    if second is not None:
        if second.count != 1:
            raise ValueError(f"prompt {prompt!r} is outside the tinyworld grammar: the second object must be 'a ...'")
        if (second.color, second.shape) == (first.color, first.shape):
            raise ValueError(
                f"prompt {prompt!r} is outside the tinyworld grammar: two groups need a different colour or shape"
            )
    groups = (first,) if second is None else (first, second)
    return PromptSpec(kind, groups, position, relation)


# --- prompt split ---------------------------------------------------------------------------------


def is_held_out(text: str) -> bool:
    """Whether a caption belongs to the held-out (test) prompts: a stable sha256 of the caption."""
    digest = hashlib.sha256((_SPLIT_SALT + text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < HELD_OUT_FRACTION


# --- sampling -------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _random_group(rng: np.random.Generator, count: int = 1, exclude: ObjectSpec | None = None) -> ObjectSpec:
    while True:
        color, shape = _pick(rng, COLOR_NAMES), _pick(rng, SHAPES)
        if exclude is None or (color, shape) != (exclude.color, exclude.shape):
            break
    size = _pick(rng, SIZES) if rng.random() < SIZE_MENTION_PROB else None
    return ObjectSpec(color, shape, size, count)


def _sample_spec(rng: np.random.Generator, kind_probs: dict[str, float]) -> PromptSpec:
    kinds = list(kind_probs)
    kind = kinds[int(rng.choice(len(kinds), p=list(kind_probs.values())))]
    if kind == "single":
        return PromptSpec(kind, (_random_group(rng),))
    if kind == "position":
        return PromptSpec(kind, (_random_group(rng),), position=_pick(rng, tuple(POSITION_PHRASES)))
    if kind == "count":
        return PromptSpec(kind, (_random_group(rng, count=int(rng.integers(2, 4))),))
    first = _random_group(rng, count=2 if kind == "count_plus" else 1)
    second = _random_group(rng, exclude=first)
    relation = _pick(rng, tuple(RELATION_PHRASES)) if kind == "relation" else None
    return PromptSpec(kind, (first, second), relation=relation)


def _uniform(rng: np.random.Generator, lo: float, hi: float, half: float) -> float:
    lo, hi = max(lo, MARGIN + half), min(hi, 1.0 - MARGIN - half)
    return float(rng.uniform(lo, hi)) if hi > lo else 0.5 * (lo + hi)


def _boxes_apart(a: Obj, b: Obj) -> bool:
    sep = a.half + b.half + GAP
    return abs(a.cx - b.cx) >= sep or abs(a.cy - b.cy) >= sep


def _sample_layout(rng: np.random.Generator, spec: PromptSpec) -> tuple[Obj, ...] | None:
    """Place the objects of ``spec``; None if no valid layout was found (the caller resamples)."""
    members = [(gi, g) for gi, g in enumerate(spec.groups) for _ in range(g.count)]
    sizes = [g.size if g.size is not None else _pick(rng, SIZES) for _, g in members]
    halves = [HALF_EXTENT[s] * (1.0 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)) for s in sizes]
    for _ in range(_LAYOUT_TRIES):
        objs = []
        for (gi, g), size, half in zip(members, sizes, halves):
            xr, yr = _POSITION_RANGES[spec.position] if spec.position and gi == 0 else ((0, 1), (0, 1))
            cx, cy = _uniform(rng, *xr, half), _uniform(rng, *yr, half)
            objs.append(Obj(gi, g.color, g.shape, size, cx, cy, half))
        if spec.relation:
            along, across = relation_offsets(spec.relation, (objs[0].cx, objs[0].cy), (objs[1].cx, objs[1].cy))
            if along < _RELATION_MIN_ALONG or across > 0.5 * along:
                continue
        if all(_boxes_apart(a, b) for i, a in enumerate(objs) for b in objs[i + 1 :]):
            return tuple(objs)
    return None


def _sample_background(rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.array(_pick(rng, tuple(BACKGROUNDS.values())))
    tint = rng.integers(-BACKGROUND_TINT, BACKGROUND_TINT + 1, size=3)
    return tuple(int(v) for v in np.clip(base + tint, 0, 255))


def _sample_scene(rng: np.random.Generator, kind_probs: dict[str, float]) -> Scene:
    while True:
        spec = _sample_spec(rng, kind_probs)
        objects = _sample_layout(rng, spec)
        if objects is not None:
            break
    return Scene(spec, objects, _sample_background(rng))


def scene_for(spec: PromptSpec, rng: np.random.Generator, tries: int = 10) -> Scene:
    """A random scene of a given caption: fresh layout, unstated sizes and background, as the training data
    draws them (the reference for how much one prompt's images should vary)."""
    for _ in range(tries):
        objects = _sample_layout(rng, spec)
        if objects is not None:
            return Scene(spec, objects, _sample_background(rng))
    raise ValueError(f"no layout of {format_prompt(spec)!r} found in {tries} tries")


def reweighted_kinds(weights: dict[str, float]) -> dict[str, float]:
    """:data:`KIND_PROBS` with each named caption kind's share multiplied by its weight, renormalised
    (a training ablation: more of the kinds the model gets wrong, e.g. ``{"relation": 2.0}``)."""
    unknown = set(weights) - set(KIND_PROBS)
    if unknown or any(w < 0 for w in weights.values()):
        raise ValueError(f"kind weights must be >= 0 for kinds among {', '.join(KIND_PROBS)}; got {weights}")
    raw = {k: p * weights.get(k, 1.0) for k, p in KIND_PROBS.items()}
    total = sum(raw.values())
    if total <= 0:
        raise ValueError("kind weights leave no caption kind to sample")
    return {k: v / total for k, v in raw.items()}


def sample_scenes(
    rng: np.random.Generator, n: int, split: str = "train", kind_probs: dict[str, float] | None = None
) -> list[Scene]:
    """``n`` random scenes whose captions are in ``split``: "train", "test" (held-out captions only)
    or "all"; caption kinds drawn from ``kind_probs`` (default :data:`KIND_PROBS`)."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    probs = KIND_PROBS if kind_probs is None else kind_probs
    scenes: list[Scene] = []
    while len(scenes) < n:
        scene = _sample_scene(rng, probs)
        if split == "all" or is_held_out(caption(scene)) == (split == "test"):
            scenes.append(scene)
    return scenes


# --- rendering ------------------------------------------------------------------------------------


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership in the unit shape: (u, v) relative to the box centre, in half extents, y down."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "triangle":  # apex at the top, base at the bottom
        return (v <= 1.0) & (np.abs(u) <= 0.5 * (v + 1.0))
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def shape_coverage(
    shape: str, cx: float, cy: float, hx: float, hy: float, size: int, ss: int = SUPERSAMPLE
) -> np.ndarray:
    """Fraction of each pixel of a ``size`` x ``size`` image covered by the shape ([size, size] float)."""
    cov = np.zeros((size, size))
    x0, x1 = max(0, int(np.floor((cx - hx) * size)) - 1), min(size, int(np.ceil((cx + hx) * size)) + 1)
    y0, y1 = max(0, int(np.floor((cy - hy) * size)) - 1), min(size, int(np.ceil((cy + hy) * size)) + 1)
    if x1 <= x0 or y1 <= y0:
        return cov
    xs = (np.arange(x0 * ss, x1 * ss) + 0.5) / (ss * size)
    ys = (np.arange(y0 * ss, y1 * ss) + 0.5) / (ss * size)
    inside = _inside(shape, ((xs - cx) / hx)[None, :], ((ys - cy) / hy)[:, None])
    cov[y0:y1, x0:x1] = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
    return cov


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Render a scene: uint8 [size, size, 3], flat colours with 4x4-supersampled edges."""
    img = np.empty((size, size, 3))
    img[:] = scene.background
    for obj in scene.objects:
        cov = shape_coverage(obj.shape, obj.cx, obj.cy, obj.half, obj.half, size)[..., None]
        img = img * (1.0 - cov) + np.asarray(COLORS[obj.color], dtype=float) * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def sample_batch(
    seed: int, n: int, size: int = 32, split: str = "train", kind_probs: dict[str, float] | None = None
) -> tuple[np.ndarray, list[str]]:
    """``n`` images (uint8 [n, size, size, 3]) and their captions, deterministic from ``seed``."""
    scenes = sample_scenes(np.random.default_rng(seed), n, split, kind_probs)
    images = np.stack([render(s, size) for s in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8)
    return images, [caption(s) for s in scenes]

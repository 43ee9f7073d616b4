"""A deterministic, programmatic judge of tinyworld images.

Why: the compiler needs cheap, exact answers to "does this image show its prompt?" and "how clean is
it?" for the tiny model trained on :mod:`qsched.tinyworld.world`.  These functions are JAQ's TC
(text consistency: :func:`judge`) and IQ (image quality: :func:`quality_score`) terms, the
sensitivity metrics of a layer under quantisation, and the objectives of the cache search
(:func:`psnr`, :func:`ssim` against the uncompressed model's images).  A sensitivity metric must
move with small degradations, so besides GenEval-style pass/fail the judge returns a continuous
score that drops with noise and blur even while the image is still judged correct.

How the judge reads an image (GenEval-style):

1. the background is the median colour of the one-pixel border (objects keep a margin from it);
2. a pixel belongs to palette colour k when k is its nearest palette colour, within ``COLOR_TOL``
   and nearer than the background; each colour mask is hole-filled and split into 8-connected
   components, and components below ``MIN_AREA_FRACTION`` of the image are ignored as specks;
3. each component is fitted with every shape: its coverage is estimated per pixel by projecting
   the pixel onto the segment background -> colour (exact for the anti-aliased renders), the
   shape's template is placed at the coverage centroid with the half extent implied by the
   coverage area, and the best soft IoU (also against slightly blurred templates) names the shape;
   the soft IoU with the sharp template is the object's fidelity; the fitted half extent gives
   small/large (threshold: geometric mean of the two nominal sizes), the fitted box centre gives
   the position.  Inputs are read as uint8, the world's native format;
4. for each object group of ``parse_prompt(prompt)`` the checks are: colour present, a component of
   that colour has the shape (binding), the number of such components equals the count, their size
   (when stated), the position (when stated), and the relation (when stated).

An image is correct when every check holds.  Extra objects are not penalised in correctness (as in
GenEval) but lower the continuous score.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from qsched.metrics import (MAX_PSNR, _as_float_hwc, confidence_interval, paired_difference,  # noqa: F401
                             psnr, ssim, to_uint8_hwc)  # (re-exported)
from qsched.tinyworld import world

COLOR_TOL = 80.0  # max RGB distance (0..255) from a palette colour for a pixel to count as that colour
MIN_AREA_FRACTION = 0.005  # components smaller than this fraction of the image are specks
SIZE_THRESHOLD = 2.0 * np.sqrt(world.HALF_EXTENT["small"] * world.HALF_EXTENT["large"])  # extent
QUALITY_TAU = 40.0  # RGB distance scale of the per-pixel purity term of quality_score
ATTRIBUTES = ("color", "shape", "count", "size", "position", "relation")
_BLUR_LEVELS = (0.5, 1.0)  # pixel sigmas of the blurred templates that shape classification also tries
_PAD = 4  # pixels of context around a component's box in which it is fitted

_PALETTE = np.array([world.COLORS[c] for c in world.COLOR_NAMES], dtype=float)  # [K, 3]


# --- input conversion -----------------------------------------------------------------------------


# --- object detection -----------------------------------------------------------------------------


@dataclass
class Detection:
    """One detected object: box centre and half extent (normalised), pixel area of its colour
    component, and ``fidelity``: soft IoU in [0, 1] of its coverage with the fitted ideal shape."""

    color: str
    shape: str
    size: str
    cx: float
    cy: float
    half: float
    area: int
    fidelity: float


def background_color(img: np.ndarray) -> np.ndarray:
    """Median colour of the one-pixel border of an [H, W, 3] image."""
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    return np.median(border.astype(float), axis=0)


def _distances(img: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RGB distances of each pixel to the palette [H, W, K] and to the background [H, W]."""
    pix = img.astype(float)
    d_pal = np.linalg.norm(pix[:, :, None, :] - _PALETTE[None, None], axis=-1)
    d_bg = np.linalg.norm(pix - bg, axis=-1)
    return d_pal, d_bg


def palette_labels(img: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's nearest palette colour (index into ``world.COLOR_NAMES``, [H, W]) and whether it is
    assigned to it: within ``COLOR_TOL`` and nearer than the background ([H, W] bool)."""
    d_pal, d_bg = _distances(img, bg)
    nearest, d_min = d_pal.argmin(axis=-1), d_pal.min(axis=-1)
    return nearest, (d_min < COLOR_TOL) & (d_min < d_bg)


def coverage_estimate(img: np.ndarray, color: str, bg: np.ndarray) -> np.ndarray:
    """Per-pixel coverage of ``color`` over the background: the pixel projected onto the segment
    background -> colour, clipped to [0, 1] (exact for an anti-aliased flat render)."""
    c = np.asarray(world.COLORS[color], dtype=float) - bg
    return np.clip((img.astype(float) - bg) @ c / max(c @ c, 1e-9), 0.0, 1.0)


def _shape_area(shape: str) -> float:
    """Area of the unit shape (half extent 1)."""
    return {"circle": np.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0}[shape]


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / union) if union > 0 else 0.0


def _fit(
    shape: str, alpha: np.ndarray, own: np.ndarray, origin: tuple[int, int], size: int
) -> tuple[float, float, float, float, float]:
    """Fit ``shape`` to a coverage map: (match, fidelity, cx, cy, half), lengths normalised.

    The half extent comes from the coverage area, the box centre from its centroid (a triangle's
    centroid sits a third of its half extent below its box centre).  ``fidelity`` is the soft IoU
    with the sharp template; ``match`` (used to pick the shape) is the best soft IoU with the
    template blurred by one of ``_BLUR_LEVELS``, so a slightly soft square still reads as a square.
    ``alpha`` and ``own`` are a window of the image whose top-left pixel is ``origin``."""
    area = alpha.sum()
    ys, xs = np.indices(alpha.shape)
    ys, xs = ys + origin[0], xs + origin[1]
    mx, my = (alpha * (xs + 0.5)).sum() / area / size, (alpha * (ys + 0.5)).sum() / area / size
    half = float(np.sqrt(area / _shape_area(shape)) / size)
    cy = my - half / 3.0 if shape == "triangle" else my
    h, w = alpha.shape
    t = world.shape_coverage(shape, mx, cy, half, half, size)[origin[0] : origin[0] + h, origin[1] : origin[1] + w]
    fidelity = _soft_iou(alpha, t)
    match = max(
        [fidelity] + [_soft_iou(alpha, ndimage.gaussian_filter(t, s, mode="constant") * own) for s in _BLUR_LEVELS]
    )
    return match, fidelity, float(mx), float(cy), half


def detect(image) -> list[Detection]:
    """Objects in one image (any layout accepted by :func:`to_uint8_hwc`; square images only).

    Colour components (see the module docstring) are fitted with every shape on their estimated
    coverage, taken over the component grown by two pixels (its anti-aliased fringe) minus pixels
    of other objects; see :func:`_fit` for how the shape is chosen and ``fidelity`` measured."""
    img = to_uint8_hwc(image)[0]
    size = img.shape[0]
    if img.shape[1] != size:
        raise ValueError(f"tinyworld images are square, got {img.shape[:2]}")
    bg = background_color(img)
    nearest, assigned = palette_labels(img, bg)
    min_area = max(3, int(MIN_AREA_FRACTION * size * size))
    found = []
    for k, color in enumerate(world.COLOR_NAMES):
        pixels = assigned & (nearest == k)
        if pixels.sum() < min_area:
            continue
        labels, _ = ndimage.label(ndimage.binary_fill_holes(pixels), structure=np.ones((3, 3)))
        alpha_k = coverage_estimate(img, color, bg)
        for i, box in enumerate(ndimage.find_objects(labels), start=1):
            y0, x0 = max(0, box[0].start - _PAD), max(0, box[1].start - _PAD)
            win = (slice(y0, box[0].stop + _PAD), slice(x0, box[1].stop + _PAD))
            comp = labels[win] == i
            if comp.sum() < min_area:
                continue
            own = ndimage.binary_dilation(comp, iterations=2) & ~(assigned[win] & ~comp)
            alpha = np.where(own, alpha_k[win], 0.0)
            fits = {shape: _fit(shape, alpha, own, (y0, x0), size) for shape in world.SHAPES}
            shape = max(fits, key=lambda s: fits[s][0])
            _, iou, cx, cy, half = fits[shape]
            found.append(
                Detection(
                    color=color,
                    shape=shape,
                    size="large" if 2.0 * half > SIZE_THRESHOLD else "small",
                    cx=cx,
                    cy=cy,
                    half=half,
                    area=int(comp.sum()),
                    fidelity=iou,
                )
            )
    return found


# --- judging --------------------------------------------------------------------------------------


@dataclass
class JudgeResult:
    """Per-image verdicts.  ``attributes[a][i]`` is the fraction of image i's checks of attribute a
    that held (NaN where the prompt has none); ``scores`` are the continuous scores in [0, 1]."""

    prompts: list[str]
    correct: np.ndarray
    scores: np.ndarray
    quality: np.ndarray
    attributes: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct)) if len(self.correct) else float("nan")

    @property
    def score(self) -> float:
        return float(np.mean(self.scores)) if len(self.scores) else float("nan")

    @property
    def per_attribute(self) -> dict[str, float]:
        out = {}
        for name, vals in self.attributes.items():
            vals = vals[~np.isnan(vals)]
            out[name] = float(vals.mean()) if len(vals) else float("nan")
        return out

    def paired_row(self, base: "JudgeResult | None", key: str = "paired") -> dict:
        """Accuracy with its 95 % interval, the paired difference in accuracy against ``base`` (the same prompts
        and noise; ``None``: this is the base) under ``key``, and per-attribute accuracy, rounded for a report."""
        d, ci = paired_difference(base.correct, self.correct) if base is not None else (0.0, 0.0)
        ci95 = confidence_interval(self.accuracy, len(self.correct))
        return {"accuracy": round(self.accuracy, 4), "ci95": round(ci95, 4), key: [round(d, 4), round(ci, 4)],
                "per_attribute": {a: round(x, 4) for a, x in self.per_attribute.items()}}

    def to_dict(self) -> dict:
        """Plain floats, JSON-serialisable (None where undefined, e.g. no relation prompts)."""

        def num(x: float) -> float | None:
            return None if np.isnan(x) else float(x)

        n = len(self.correct)
        return {
            "n": n,
            "accuracy": num(self.accuracy),
            "accuracy_ci95": confidence_interval(self.accuracy, n) if n else None,
            "score": num(self.score),
            "quality": float(np.mean(self.quality)) if n else None,
            "per_attribute": {k: num(v) for k, v in self.per_attribute.items()},
        }


def _check(spec: world.PromptSpec, dets: list[Detection]) -> tuple[dict[str, list[bool]], list[list[Detection]]]:
    checks: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    matched = []
    for g in spec.groups:
        same_color = [d for d in dets if d.color == g.color]
        cands = [d for d in same_color if d.shape == g.shape]
        matched.append(cands)
        checks["color"].append(bool(same_color))
        checks["shape"].append(bool(cands))
        checks["count"].append(len(cands) == g.count)
        if g.size is not None:
            checks["size"].append(bool(cands) and all(d.size == g.size for d in cands))
    if spec.position is not None:
        checks["position"].append(any(world.satisfies_position(spec.position, d.cx, d.cy) for d in matched[0]))
    if spec.relation is not None:
        checks["relation"].append(
            any(
                world.satisfies_relation(spec.relation, (a.cx, a.cy), (b.cx, b.cy))
                for a in matched[0]
                for b in matched[1]
            )
        )
    return checks, matched


def _fidelity(spec: world.PromptSpec, dets: list[Detection], matched: list[list[Detection]]) -> float:
    """Mean soft IoU over the expected objects (missing ones count 0), times the share of detected
    object area that the expected objects account for (extra objects lower it)."""
    total = 0.0
    for g, cands in zip(spec.groups, matched):
        total += sum(sorted((d.fidelity for d in cands), reverse=True)[: g.count])
    used = {id(d) for cands in matched for d in cands}
    all_area = sum(d.area for d in dets)
    share = sum(d.area for d in dets if id(d) in used) / all_area if all_area else 0.0
    return total / spec.n_objects * share


def judge(images, prompts) -> JudgeResult:
    """Judge images against prompts of the tinyworld grammar (ValueError on other prompts).

    Continuous score = c * (0.3 + 0.7 * F), where c is the fraction of checks that held and
    F = (fidelity + quality) / 2 (see :func:`_fidelity` and :func:`quality_score`).
    """
    batch = to_uint8_hwc(images)
    prompts = [prompts] * len(batch) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(batch):
        raise ValueError(f"got {len(batch)} images but {len(prompts)} prompts")
    specs = [world.parse_prompt(p) for p in prompts]
    quality = quality_score(batch)
    n = len(batch)
    correct, scores = np.zeros(n, dtype=bool), np.zeros(n)
    attributes = {a: np.full(n, np.nan) for a in ATTRIBUTES}
    for i, (img, spec) in enumerate(zip(batch, specs)):
        dets = detect(img)
        checks, matched = _check(spec, dets)
        flat = [ok for vals in checks.values() for ok in vals]
        for name, vals in checks.items():
            if vals:
                attributes[name][i] = float(np.mean(vals))
        correct[i] = all(flat)
        c = float(np.mean(flat))
        f = 0.5 * (_fidelity(spec, dets, matched) + quality[i])
        scores[i] = c * (0.3 + 0.7 * f)
    return JudgeResult(prompts, correct, scores, quality, attributes)


# --- no-reference quality -------------------------------------------------------------------------


def quality_score(images) -> np.ndarray:
    """No-reference quality in [0, 1] per image, for this world of flat colours.

    quality = purity * presence, where
    * purity = mean over pixels of exp(-(d / QUALITY_TAU)^2), d the RGB distance (0..255) of the pixel
      to the nearest of {palette colours, background colour}: a flat-colour image scores ~1 (only its
      anti-aliased edge pixels cost a little), Gaussian noise raises d everywhere, blur widens the
      band of in-between edge pixels;
    * presence = min(1, confident object pixels / half the smallest object's area), confident meaning
      within COLOR_TOL / 2 of a palette colour and nearer to it than to the background: it sends
      images in which blur (or anything else) has dissolved every object towards 0.
    """
    batch = to_uint8_hwc(images)
    out = np.zeros(len(batch))
    smallest = 0.5 * (2.0 * world.HALF_EXTENT["small"] * (1.0 - world.SIZE_JITTER)) ** 2
    for i, img in enumerate(batch):
        d_pal, d_bg = _distances(img, background_color(img))
        d_min = np.minimum(d_pal.min(axis=-1), d_bg)
        purity = np.exp(-((d_min / QUALITY_TAU) ** 2)).mean()
        confident = (d_pal.min(axis=-1) < COLOR_TOL / 2) & (d_pal.min(axis=-1) < d_bg)
        presence = min(1.0, confident.sum() / (0.5 * smallest * img.shape[0] * img.shape[1]))
        out[i] = purity * presence
    return out

"""Generic image metrics: full-reference PSNR and SSIM, image conversion and accuracy intervals.

Why here and not in the tiny world: every model's fidelity against FP, MixDQ's content metric and the
cache search's fidelity term use them, whatever scores content (the world's judge or a CLIP).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

MAX_PSNR = 100.0


def _as_float_hwc(images) -> np.ndarray:
    """Any accepted image batch as float64 [n, H, W, 3] in [0, 1]."""
    if hasattr(images, "detach"):  # torch tensor
        images = images.detach().cpu().float().numpy()
    elif isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im) for im in images])
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"images must be [n,H,W,3] or [n,3,H,W], got shape {arr.shape}")
    if arr.shape[-1] != 3 and arr.shape[1] == 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[-1] != 3:
        raise ValueError(f"images must have 3 colour channels, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return np.clip(arr.astype(np.float64), 0.0, 1.0)


def to_uint8_hwc(images) -> np.ndarray:
    """uint8 [n,H,W,3] from uint8 [n,H,W,3] or float [0,1] [n,3,H,W]/[n,H,W,3] (numpy or torch)."""
    arr = np.asarray(images) if not hasattr(images, "detach") else None
    if arr is not None and arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[-1] == 3:
        return arr
    return np.rint(_as_float_hwc(images) * 255.0).astype(np.uint8)


def psnr(a, b) -> np.ndarray:
    """PSNR in dB per image, images compared in [0, 1]; identical images give MAX_PSNR (100 dB)."""
    x, y = _as_float_hwc(a), _as_float_hwc(b)
    mse = ((x - y) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        val = 10.0 * np.log10(1.0 / mse)
    return np.minimum(val, MAX_PSNR)


SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03


def ssim(a, b) -> np.ndarray:
    """Mean SSIM per image (Wang et al. 2004), averaged over the RGB channels.

    Gaussian window sigma 1.5 truncated at 3.5 sigma (11 x 11), data range L = 1, C1 = (0.01 L)^2,
    C2 = (0.03 L)^2, population (not sample) covariances, reflect padding and a 5-pixel border crop
    before averaging -- the settings of scikit-image's ``gaussian_weights=True`` protocol.
    """
    x, y = _as_float_hwc(a), _as_float_hwc(b)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    sig = (0, SSIM_SIGMA, SSIM_SIGMA, 0)

    def blur(z):
        return ndimage.gaussian_filter(z, sigma=sig, truncate=SSIM_TRUNCATE, mode="reflect")

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    pad = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    return s[:, pad:-pad, pad:-pad, :].mean(axis=(1, 2, 3))


def confidence_interval(p: float, n: int, z: float = 1.96, method: str = "wilson") -> float:
    """Half-width of the 95% (z = 1.96) interval of an accuracy ``p`` measured on ``n`` samples:
    Wilson score interval (default; sound near 0 and 1) or the normal approximation."""
    if n <= 0:
        raise ValueError("n must be positive")
    if method == "normal":
        return float(z * np.sqrt(p * (1.0 - p) / n))
    if method != "wilson":
        raise ValueError(f"method must be 'wilson' or 'normal', got {method!r}")
    return float(z / (1.0 + z * z / n) * np.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)))


def paired_difference(a, b, z: float = 1.96) -> tuple[float, float]:
    """Mean of ``b - a`` per sample and its 95 % half-width (normal approximation over the samples).

    Why paired: two models judged on the same prompts and noise share most of their per-prompt luck, so
    the interval of the difference is far tighter than the two unpaired intervals side by side.
    """
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if d.shape[0] < 2:
        return float(d.mean()) if d.size else float("nan"), float("nan")
    return float(d.mean()), float(z * d.std(ddof=1) / np.sqrt(d.shape[0]))

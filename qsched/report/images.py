"""Sample images as PNG bytes (stored in the artifact) and as ``data:`` URIs (inlined in ``report.html``).

Why PNG through Pillow: the artifact must never hold pickles, and a PNG is what a browser shows directly,
so the report can inline the stored bytes unchanged. Images larger than :data:`MAX_SIDE` are shrunk
first: a report of a 1024² model should stay a few MB, and the page shows thumbnails anyway.
"""
from __future__ import annotations

import base64
import io

import numpy as np

MAX_SIDE = 256  # longest side of a stored sample image, in pixels


def png_bytes(image, max_side: int = MAX_SIDE) -> bytes:
    """One image (float [3,H,W] or [H,W,3] in [0, 1], numpy or torch) as PNG bytes, at most ``max_side``."""
    from PIL import Image

    from qsched.metrics import to_uint8_hwc

    pixels = to_uint8_hwc(image)[0]
    img = Image.fromarray(np.ascontiguousarray(pixels))  # uint8 [H, W, 3]: RGB
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """A PNG's bytes as a ``data:image/png;base64,…`` URI (no network, no separate file)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")

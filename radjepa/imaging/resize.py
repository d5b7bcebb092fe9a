"""Geometry: shorter side to ``size``, centre square kept, in one antialiased resample.

Cropping the centre square in source coordinates and resampling it once is the same as resizing
the shorter side and then centre-cropping, without a second interpolation. Pillow's float ("F")
resampling is antialiased when downscaling and deterministic across machines.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["resize_center_crop"]

# reducing_gap lets Pillow box-reduce by an integer factor first (exact, fast) and then run
# Lanczos on an image at least 2x the target: visually indistinguishable, several times faster.
_REDUCING_GAP = 2.0


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D float image so its shorter side is ``size``, then keep the centre square.

    Returns float32 ``[size, size]``; values may overshoot the input range slightly (Lanczos),
    so callers clip after this.
    """
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    h, w = image.shape
    side = min(h, w)
    left = (w - side) / 2.0
    top = (h - side) / 2.0
    src = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))  # float32 -> mode "F"
    if side == size and left == int(left) and top == int(top):
        box = (int(left), int(top), int(left) + side, int(top) + side)
        return np.asarray(src.crop(box), dtype=np.float32)
    out = src.resize(
        (size, size),
        resample=Image.Resampling.LANCZOS,
        box=(left, top, left + side, top + side),
        reducing_gap=_REDUCING_GAP if side >= 2 * size else None,
    )
    return np.asarray(out, dtype=np.float32)

"""The percentile window: how an image with no display transform of its own is shown."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["percentile_window"]

_PERCENTILE_SAMPLE = 1_000_000  # pixels; the window is estimated on a strided subsample
# Pixels per block of the windowing arithmetic: the float64 temporaries of a whole 8192^2
# radiograph were ~1.5 GB; in blocks they stay a few MB beside the float32 result.
_BLOCK_PIXELS = 1 << 18


def percentile_window(
    values: np.ndarray, mask: np.ndarray | None, pct: tuple[float, float]
) -> np.ndarray:
    """``values`` onto [0, 1] (float32) between their ``pct`` percentiles (padding ``mask`` left
    out), for an image that says nothing of how to show it: a DICOM without a VOI, a 16-bit PNG
    without a declared depth.

    The percentiles are taken on ``values`` as they are (a 16-bit raster's integers, exactly),
    and each block of rows is windowed in the arithmetic the whole image was: the result is that
    image rounded to float32, which the resize works in anyway, at 4 bytes per pixel.
    """
    step = max(1, math.ceil(math.sqrt(values.size / _PERCENTILE_SAMPLE)))
    sample = values[::step, ::step]
    if mask is not None:
        sample = sample[~mask[::step, ::step]]
    if sample.size == 0:
        return np.zeros(values.shape, dtype=np.float32)
    lo, hi = np.percentile(sample, pct)
    if hi <= lo:
        if sample.max() <= lo:
            return np.zeros(values.shape, dtype=np.float32)
        return np.greater(values, lo).astype(np.float32)
    out = np.empty(values.shape, dtype=np.float32)
    rows = max(1, _BLOCK_PIXELS // max(1, values.shape[1]))
    for start in range(0, values.shape[0], rows):
        block = values[start : start + rows]
        out[start : start + rows] = np.clip((block - lo) / (hi - lo), 0.0, 1.0)
    return out

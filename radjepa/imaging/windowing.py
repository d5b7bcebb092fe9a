"""The percentile window: how an image with no display transform of its own is shown."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["percentile_window"]

_PERCENTILE_SAMPLE = 1_000_000  # pixels; the window is estimated on a strided subsample


def percentile_window(
    values: np.ndarray, mask: np.ndarray | None, pct: tuple[float, float]
) -> np.ndarray:
    """``values`` onto [0, 1] between their ``pct`` percentiles (padding ``mask`` left out),
    for an image that says nothing of how to show it: a DICOM without a VOI, a 16-bit PNG
    without a declared depth."""
    step = max(1, math.ceil(math.sqrt(values.size / _PERCENTILE_SAMPLE)))
    sample = values[::step, ::step]
    if mask is not None:
        sample = sample[~mask[::step, ::step]]
    if sample.size == 0:
        return np.zeros(values.shape, dtype=np.float64)
    lo, hi = np.percentile(sample, pct)
    if hi <= lo:
        return (
            np.zeros(values.shape, dtype=np.float64)
            if sample.max() <= lo
            else ((values > lo).astype(np.float64))
        )
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)

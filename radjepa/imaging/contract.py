"""The value contract of a stored image: the one place that says what a pixel value means.

Every image that leaves :func:`radjepa.imaging.decode.decode_image` (and so every row of an
ingest shard and every image the HTTP API embeds) obeys this contract:

- single channel, square ``size x size`` (default 256), row-major, ``uint8`` (0..255) or
  ``uint16`` (0..65535);
- display polarity MONOCHROME2: 0 is black (least attenuation shown dark, i.e. air), the maximum
  is white (bone). For DICOM this is the value *after* the modality LUT (rescale slope/intercept
  or Modality LUT Sequence), then the VOI LUT (window centre/width or VOI LUT Sequence, else a
  robust percentile window over the non-padding pixels), then inversion for MONOCHROME1 or
  Presentation LUT Shape INVERSE (the two describe one inversion, never applied twice);
- pixel-padding values (PixelPaddingValue / PixelPaddingRangeLimit) are excluded from the
  percentile window and shown black;
- colour inputs become grey with the ITU-R BT.601 luma weights;
- geometry: the shorter side is resized to ``size`` with an antialiased Lanczos filter and the
  centre square is kept (one deterministic resample of the centre crop); sides and square are
  the patient's, so a DICOM with oblong pixels (its Pixel Spacing) is not stored stretched.

The model-input scaling on top of this lives in ``radjepa.transforms.to_model_input``.
"""

from __future__ import annotations

from typing import Final

import numpy as np

__all__ = [
    "AGE_CAP_YEARS",
    "DEFAULT_SIZE",
    "DEFAULT_WINDOW_PERCENTILES",
    "DTYPES",
    "LUMA_WEIGHTS",
    "MAX_PIXELS",
    "META_FIELDS",
    "PID_FIELDS",
    "PSEUDONYM_HEX_CHARS",
    "dtype_max",
    "luma",
    "to_stored",
]

DTYPES: Final = ("uint8", "uint16")
# Largest source image decoded (rows x columns). Chest radiographs are at most ~4300 px a side;
# the limit is checked from the header before any pixel is decoded, because a few KB of
# compressed data can claim gigapixels. Measured as RSS over the decode's start, a 16-bit grey
# raster peaks near 8.5 bytes per pixel (decoded integers, float32 display, the resize's copy;
# see ``windowing.percentile_window``), a colour one ~15 (see ``luma``), a 16-bit DICOM ~15-18
# (codec buffers, float32 values and display, MONOCHROME1's inversion): 8192^2 bounds one decode
# near 0.55-1.2 GB.
MAX_PIXELS: Final = 8192 * 8192
DEFAULT_SIZE: Final = 256
DEFAULT_WINDOW_PERCENTILES: Final = (0.5, 99.5)
AGE_CAP_YEARS: Final = 90
PSEUDONYM_HEX_CHARS: Final = 32
LUMA_WEIGHTS: Final = (0.299, 0.587, 0.114)  # ITU-R BT.601

# Keyed pseudonyms of the DICOM identifiers (radjepa.imaging.deid): what embeddings indexes
# carry and similar-case search returns in place of patient, study, series and instance ids
PID_FIELDS: Final[tuple[str, ...]] = ("patient_pid", "study_pid", "series_pid", "instance_pid")

# The de-identified metadata allow-list: exactly these keys leave the decoder (and they are the
# metadata columns of the Parquet shard schema in radjepa.shards). Nothing else ever does.
META_FIELDS: Final[tuple[str, ...]] = (
    "image_id",
    *PID_FIELDS,
    "source_hash",
    "sex",
    "view_position",
    "modality",
    "manufacturer",
    "photometric",
    "transfer_syntax",
    "format",
    "age_years",
    "orig_height",
    "orig_width",
    "pixel_spacing_mm",
)


def dtype_max(dtype: str) -> int:
    """Largest stored value for a contract dtype (255 or 65535)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return int(np.iinfo(dtype).max)


def luma(rgb: np.ndarray, vmax: float) -> np.ndarray:
    """BT.601 grey in [0, 1] (float32) of an ``[..., 3]`` integer image with full scale ``vmax``.

    Accumulated one channel at a time in float32: a float64 ``rgb @ weights`` would hold ~34
    bytes per pixel at its peak, which for a large colour upload is gigabytes.
    """
    w = np.asarray(LUMA_WEIGHTS, dtype=np.float32) / np.float32(vmax)
    grey = rgb[..., 0] * w[0]
    grey += rgb[..., 1] * w[1]
    grey += rgb[..., 2] * w[2]
    return grey


def to_stored(display: np.ndarray, dtype: str) -> np.ndarray:
    """Map display values in [0, 1] (MONOCHROME2) onto the stored integer range, rounding."""
    vmax = dtype_max(dtype)
    out = np.clip(display, 0.0, 1.0) * vmax
    return np.rint(out).astype(dtype)

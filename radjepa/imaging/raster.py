"""PNG / JPEG bytes -> display image in [0, 1] via Pillow (8/16-bit grey, colour -> grey).

Raster files are already display-ready (no LUTs), so values are only scaled by their bit depth:
8-bit by 255; 16-bit ("I;16", "I") as :func:`sixteen_bit_display` says. EXIF orientation is
applied, as every viewer does.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from radjepa.imaging.contract import MAX_PIXELS, luma
from radjepa.imaging.errors import ImageRejected
from radjepa.imaging.windowing import percentile_window

__all__ = ["raster_display"]

# Pillow logs every EXIF tag it parses with its value at DEBUG (an ImageDescription or Artist
# holding a patient's name): a worker or replica run at DEBUG wrote them to its log. A level
# set for Pillow's logger on purpose is left alone.
if logging.getLogger("PIL").level == logging.NOTSET:
    logging.getLogger("PIL").setLevel(logging.INFO)


def raster_display(
    data: bytes, window_percentiles: tuple[float, float] = (0.5, 99.5)
) -> tuple[np.ndarray, str]:
    """Decode PNG/JPEG bytes; returns (float image in [0, 1], photometric-like mode name).
    ``window_percentiles`` (``ingest.window_percentiles``) shows a 16-bit grey image that does
    not say its depth."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise ImageRejected(
                    "too_large", f"{img.width}x{img.height} pixels exceeds {MAX_PIXELS}"
                )
            if getattr(img, "n_frames", 1) > 1:
                raise ImageRejected("multi_frame", f"{img.n_frames} frames in one raster file")
            img.load()
            # a phone photo of a film, or an export tool, stores the pixels turned and says so
            # in EXIF: stored as read, the image lay on its side where viewers show it upright
            ImageOps.exif_transpose(img, in_place=True)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard fires inside open() for the largest claims, before ours can
        raise ImageRejected("too_large", f"more than {MAX_PIXELS} pixels") from None
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", "not a decodable PNG/JPEG") from None
    except (OSError, SyntaxError, ValueError) as err:
        reason = "truncated" if "truncated" in str(err).lower() else "decode_error"
        raise ImageRejected(reason, f"raster decode failed ({type(err).__name__})") from None
    mode = img.mode
    if mode in ("1", "L", "P", "LA", "PA", "RGB", "RGBA", "CMYK", "YCbCr"):
        if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "P", "PA"):
            return luma(np.asarray(img.convert("RGB")), 255.0), "RGB"
        grey = np.asarray(img.convert("L"), dtype=np.float32)
        return grey / np.float32(255.0), "MONOCHROME2"
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # the integers as decoded (2 bytes a pixel for "I;16"), and the image let go of: a
        # float64 copy and the window's float64 temporaries held ~26 bytes a pixel, 1.7 GB for
        # a compressible 690 KB upload near MAX_PIXELS
        arr = np.asarray(img)
        del img
        return sixteen_bit_display(arr, data, window_percentiles), "MONOCHROME2"
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr), "MONOCHROME2"
    raise ImageRejected("unsupported_photometric", f"raster mode {mode!r}")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sixteen_bit_display(
    arr: np.ndarray, data: bytes, window_percentiles: tuple[float, float]
) -> np.ndarray:
    """A 16-bit grey raster (its integers) onto [0, 1], float32.

    With a PNG ``sBIT`` chunk (the depth of the source): the samples are scaled up to 16 bits,
    as the PNG specification has encoders do, so by 65535; a writer that left them unscaled
    (none above ``2**sBIT - 1``) by that. Without one, the depth the values use cannot be told
    (12-bit detector values written as they are into a 16-bit PNG, a common research export,
    fill 1/16 of the range: divided by 65535 they were stored almost black, 17 grey levels at
    8 bits), so the image is shown as a DICOM without a VOI is: between its
    ``window_percentiles``.
    """
    declared = _png_significant_bits(data)
    if declared is None:
        return percentile_window(arr, None, window_percentiles)
    top = 2.0**declared - 1.0
    scale = top if 0 < declared < 16 and float(arr.max(initial=0)) <= top else 65535.0
    # divided in float64 a buffer at a time and stored as float32: no full-size float64 copy
    out = np.empty(arr.shape, dtype=np.float32)
    np.divide(arr, np.float64(scale), out=out, casting="same_kind")
    return np.clip(out, 0.0, 1.0, out=out)


def _png_significant_bits(data: bytes) -> int | None:
    """A greyscale PNG's sBIT (1-16), read from the chunks before its image data."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if kind == b"sBIT" and length >= 1:
            bits = data[pos + 8]
            return bits if 1 <= bits <= 16 else None
        if kind in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None

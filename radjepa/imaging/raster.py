"""PNG / JPEG bytes -> display image in [0, 1] via Pillow (8/16-bit grey, colour -> grey).

Raster files are already display-ready (no LUTs), so values are only scaled by the bit depth:
8-bit by 255, 16-bit ("I;16", "I") by 65535.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from radjepa.imaging.contract import MAX_PIXELS, luma
from radjepa.imaging.errors import ImageRejected

__all__ = ["raster_display"]


def raster_display(data: bytes) -> tuple[np.ndarray, str]:
    """Decode PNG/JPEG bytes; returns (float image in [0, 1], photometric-like mode name)."""
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
        arr = np.asarray(img).astype(np.float64)
        return np.clip(arr / 65535.0, 0.0, 1.0), "MONOCHROME2"
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr), "MONOCHROME2"
    raise ImageRejected("unsupported_photometric", f"raster mode {mode!r}")

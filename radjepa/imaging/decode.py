"""The one public decoder: bytes of DICOM, PNG or JPEG -> contract image + de-identified meta.

Ingest (one call per file inside Ray actors) and the HTTP API call exactly this function, so a
training image and a served image are produced by the same code. The format is sniffed from the
content (DICM magic, PNG and JPEG signatures, else a guarded forced DICOM read), never from the
file name, which may be missing or lie.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from radjepa.imaging.contract import (
    DEFAULT_SIZE,
    DEFAULT_WINDOW_PERCENTILES,
    META_FIELDS,
    dtype_max,
    to_stored,
)
from radjepa.imaging.deid import (
    ID_SCHEME_KEYED,
    PATIENT_ID,
    check_id_scheme,
    check_patient_identity,
    content_id,
    keyed_hash,
    resolve_secret,
)
from radjepa.imaging.errors import REASONS, ImageRejected
from radjepa.imaging.resize import resize_center_crop

__all__ = [
    "REASONS",
    "DecodedImage",
    "ImageRejected",
    "decode_image",
    "resolve_secret",
    "sniff_format",
]

_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"


@dataclass(frozen=True)
class DecodedImage:
    """A contract image ``pixels`` [size, size] and its allow-listed metadata (``META_FIELDS``).

    ``pixel_aspect``: the source pixel's height over its width, as the resize used it (a mask
    drawn on the source's pixel grid is resized with it, ``eval.segmentation``)."""

    pixels: np.ndarray
    meta: dict[str, Any]
    pixel_aspect: float = 1.0


def sniff_format(data: bytes) -> str | None:
    """'dicom', 'png', 'jpeg', or None when the bytes look like none of them."""
    from radjepa.imaging.dicom import looks_like_raw_dataset

    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(_PNG):
        return "png"
    if data.startswith(_JPEG):
        return "jpeg"
    if looks_like_raw_dataset(data):
        return "dicom"
    return None


def _empty_meta(image_id: str, source_hash: str | None, fmt: str) -> dict[str, Any]:
    meta: dict[str, Any] = dict.fromkeys(META_FIELDS)
    meta.update(image_id=image_id, source_hash=source_hash, format=fmt)
    return meta


def _decode_display(
    data: bytes,
    fmt: str,
    window_percentiles: tuple[float, float],
    secret: bytes,
    meta: dict[str, Any],
    reject_burned_in: bool,
    patient_identity: str,
    reject_for_processing: bool = False,
) -> tuple[np.ndarray, float]:
    """Display image in [0, 1] for sniffed bytes and its pixel aspect (see ``DecodedImage``);
    fills the format-specific ``meta`` keys."""
    if fmt == "dicom":
        from radjepa.imaging.deid import burned_in_text, dicom_meta
        from radjepa.imaging.dicom import (
            dicom_display,
            for_processing,
            pixel_aspect,
            read_dataset,
        )
        from radjepa.imaging.value_validation import unvalidated_values

        with unvalidated_values():  # pydicom's checks quote the values they find wrong
            ds = read_dataset(data)
            burned_in = burned_in_text(ds) if reject_burned_in else None
            if burned_in is not None:
                raise ImageRejected("burned_in_annotation", burned_in)
            if reject_for_processing and for_processing(ds):
                raise ImageRejected(
                    "for_processing",
                    "a radiograph's raw detector data (FOR PROCESSING), not an image to show",
                )
            display = dicom_display(ds, window_percentiles)
            ts = ds.file_meta.get("TransferSyntaxUID")
            meta.update(dicom_meta(ds, secret, ts, patient_identity))
            return display, pixel_aspect(ds)
    from radjepa.imaging.raster import raster_display

    display, photometric = raster_display(data, window_percentiles)
    meta["photometric"] = photometric
    return display, 1.0


# No radiograph is this small or this elongated: an icon, a 1x1 placeholder, a scanned strip
# or a secondary-capture banner would be stretched or centre-cropped into a square of noise that
# looks like any other image to training and to the similar-case index. Full-spine and long-leg
# radiographs stay under 4:1.
MIN_SIDE = 16
MAX_ASPECT = 4.0


def _check_proportions(shape: tuple[int, ...], pixel_aspect: float) -> None:
    """Refuse what cannot be a radiograph; proportions are the patient's (oblong pixels count
    at their height over width, ``pixel_aspect``)."""
    if min(shape) < MIN_SIDE:
        raise ImageRejected(
            "too_small", f"{shape[0]}x{shape[1]} pixels; the shorter side is under {MIN_SIDE}"
        )
    height, width = shape[0] * pixel_aspect, float(shape[1])
    short, long = min(height, width), max(height, width)
    if long / short > MAX_ASPECT:
        oblong = "" if pixel_aspect == 1.0 else f" of {pixel_aspect:.3g}:1 (height:width)"
        raise ImageRejected(
            "extreme_aspect",
            f"{shape[0]}x{shape[1]} pixels{oblong}; the centre square would keep "
            f"{short / long:.0%} of it (at most {MAX_ASPECT:g}:1 is decoded)",
        )


def decode_image(
    data: bytes,
    *,
    size: int = DEFAULT_SIZE,
    dtype: str = "uint8",
    window_percentiles: tuple[float, float] = DEFAULT_WINDOW_PERCENTILES,
    secret: bytes,
    source_name: str | None = None,
    max_bytes: int | None = None,
    reject_burned_in: bool = False,
    patient_identity: str = PATIENT_ID,
    id_scheme: str = ID_SCHEME_KEYED,
    reject_for_processing: bool = False,
) -> DecodedImage:
    """Decode one file's bytes into the stored image contract (see ``imaging.contract``).

    ``secret`` keys the pseudonyms and the hash of ``source_name`` (the raw name never appears
    in the result). ``reject_burned_in`` refuses DICOMs whose pixels may hold text
    (:func:`radjepa.imaging.deid.burned_in_text`): it escapes header de-identification, so
    ingest keeps such files out of shards, while the HTTP API (which stores nothing) embeds
    them. ``patient_identity`` says what the patient pseudonym covers
    (``radjepa.imaging.deid.PATIENT_IDENTITIES``): the API must use the scheme its index's
    shards were ingested with, or an upload's patient matches no archive row. ``id_scheme`` says
    how ``meta["image_id"]`` is made from the bytes (:func:`radjepa.imaging.deid.content_id`):
    keyed by ``secret`` unless a destination (or the index the API searches) still uses the
    unkeyed ids it was started with. ``reject_for_processing`` refuses a radiograph's raw
    detector data (:func:`radjepa.imaging.dicom.for_processing`), as ingest does by default.
    Raises :class:`ImageRejected` with a stable reason for unusable input.
    """
    dtype_max(dtype)  # validates dtype and the schemes before any work
    check_patient_identity(patient_identity)
    check_id_scheme(id_scheme)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageRejected("empty", "zero-length input")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageRejected("too_large", f"{len(data)} bytes exceeds the limit of {max_bytes}")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRejected("not_an_image", "not DICOM, PNG or JPEG")
    image_id = content_id(data, secret, id_scheme)
    source_hash = keyed_hash(secret, "source", source_name) if source_name is not None else None
    meta = _empty_meta(image_id, source_hash, fmt)
    try:
        display, aspect = _decode_display(
            data,
            fmt,
            tuple(window_percentiles),
            secret,
            meta,
            reject_burned_in,
            patient_identity,
            reject_for_processing,
        )
    except (ImageRejected, KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError):
        raise
    except BaseException as err:  # pydicom parses lazily: corrupt elements fail on access
        raise ImageRejected("decode_error", f"malformed {fmt} ({type(err).__name__})") from None
    if display.ndim != 2 or min(display.shape) < 1:
        raise ImageRejected("not_2d", f"decoded image has shape {display.shape}")
    _check_proportions(display.shape, aspect)
    meta["orig_height"], meta["orig_width"] = int(display.shape[0]), int(display.shape[1])
    pixels = to_stored(resize_center_crop(display, size, aspect), dtype)
    if pixels.min() == pixels.max():
        # a uniform image (a blank secondary capture, an image that is all padding, a Rescale
        # Slope of 0, a window collapsed on a flat image) carries nothing to learn or to
        # match: stored, it was one more all-black "radiograph" in training and the index
        raise ImageRejected("blank", f"every stored pixel is {pixels.flat[0]}: a uniform image")
    return DecodedImage(pixels=pixels, meta=meta, pixel_aspect=aspect)

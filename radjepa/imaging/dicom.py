"""DICOM bytes -> display image in [0, 1] (MONOCHROME2) + the dataset, per the value contract.

Order (DICOM PS3.3 C.11): stored values -> modality LUT (rescale or Modality LUT Sequence) ->
VOI LUT (VOI LUT Sequence, else window centre/width, else a robust percentile window over the
non-padding pixels) -> inversion for MONOCHROME1 / Presentation LUT Shape INVERSE. Compressed
pixel data goes through pydicom 3's decoders (pylibjpeg plugins). Anything that is not one 2-D
radiograph raises :class:`ImageRejected` with a named reason rather than guessing.
"""

from __future__ import annotations

import io
import logging
import math
import struct
import zlib
from collections.abc import Collection
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info
from pydicom.pixels import get_decoder
from pydicom.pixels.processing import apply_color_lut
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
)

from radjepa.imaging.codestream import declared_size
from radjepa.imaging.contract import MAX_PIXELS, luma
from radjepa.imaging.deid import PHOTOMETRICS, positive_pair
from radjepa.imaging.errors import ImageRejected
from radjepa.imaging.value_validation import without_value_validation
from radjepa.imaging.windowing import percentile_window

__all__ = ["dicom_display", "looks_like_raw_dataset", "pixel_aspect", "read_dataset"]

log = logging.getLogger(__name__)

# Groups a DICOM data set without preamble/meta plausibly starts with (file meta, identifying
# / SOP common module, patient module). Other bytes are not force-read: junk stays junk.
_FIRST_GROUPS = (0x0002, 0x0008, 0x0010)
# A deflated data set is inflated at most this far: the largest accepted image (3 samples of
# 16 bits) plus generous room for the other elements. Deflate reaches ~1000:1, so the file-size
# limit alone would let a 512 MB file claim half a terabyte.
_MAX_INFLATED = MAX_PIXELS * 3 * 2 + (64 << 20)
_REQUIRED = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
)
# Codec plugins written in Rust raise pyo3's PanicException, a BaseException, on corrupt
# streams; those are bad input too. Only these genuinely fatal signals propagate.
_FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError)


def _quoted(value: object, known: Collection[str]) -> str:
    """A file-supplied code for an error message, only when it is a standard value: anything
    else may be free text typed into the wrong field (a name), which messages never quote."""
    text = str(value)
    return repr(text) if text in known else "<non-standard value>"


def _quoted_syntax(ts: UID) -> str:
    return repr(str(ts)) if ts.is_transfer_syntax else "<non-standard value>"


def looks_like_raw_dataset(data: bytes) -> bool:
    """Whether bytes without a DICM preamble start like a raw DICOM data set."""
    if len(data) < 8:
        return False
    le, be = struct.unpack("<H", data[:2])[0], struct.unpack(">H", data[:2])[0]
    return le in _FIRST_GROUPS or be in _FIRST_GROUPS


@without_value_validation
def read_dataset(data: bytes) -> Dataset:
    """Parse DICOM bytes (with or without preamble/file meta) and settle the transfer syntax."""
    has_magic = len(data) >= 132 and data[128:132] == b"DICM"
    deflated = _split_deflated(data) if has_magic else None
    try:
        if deflated is not None:
            meta, body = deflated
            read = _inflate(body)
            ds = pydicom.dcmread(io.BytesIO(read), force=True)
            ds.file_meta = meta
        else:
            read = data
            ds = pydicom.dcmread(io.BytesIO(data), force=not has_magic)
    except (InvalidDicomError, EOFError, struct.error, OSError) as err:
        raise ImageRejected(
            "truncated" if _is_eof(err) else "not_an_image",
            f"unreadable DICOM ({type(err).__name__})",
        ) from None
    except (*_FATAL, ImageRejected):
        raise
    except BaseException as err:  # pydicom raises many types on hostile bytes
        raise ImageRejected("decode_error", f"DICOM parse failed ({type(err).__name__})") from None
    if len(ds) == 0:
        if (has_magic or looks_like_raw_dataset(data)) and _reads_before_pixels(
            read, force=deflated is not None or not has_magic
        ):
            # pydicom drops every element it read, without a word, where the bytes end inside
            # an undefined-length Pixel Data: a compressed image cut off in transfer read as
            # junk ("no DICOM data elements found", not_an_image without a preamble)
            raise ImageRejected(
                "truncated", "the encapsulated Pixel Data ends early: the file is cut off"
            )
        # a DICM preamble followed by nothing usable is a cut-off transfer, not junk
        raise ImageRejected(
            "truncated" if has_magic else "not_an_image", "no DICOM data elements found"
        )
    if "PixelData" not in ds and not _read_to_the_end(ds, read):
        # pydicom stops without a word where the bytes end (or where a data set read in the
        # wrong byte order turns to garbage): an image cut off before its pixels read as one
        # of a PACS export's non-images
        raise ImageRejected(
            "truncated",
            "the data set ends inside an element, before any Pixel Data element: the file is "
            "cut off, or not in the transfer syntax it declares",
        )
    _settle_transfer_syntax(ds)
    return ds


def _reads_before_pixels(data: bytes, force: bool) -> bool:
    """Whether the data set read up to its Pixel Data holds elements: what tells a compressed
    image cut inside its pixels from bytes that hold no data set at all."""
    try:
        head = pydicom.dcmread(io.BytesIO(data), force=force, stop_before_pixels=True)
    except _FATAL:
        raise
    except BaseException:  # unreadable before its pixels too: nothing to tell
        return False
    return len(head) > 0


def _read_to_the_end(ds: Dataset, data: bytes) -> bool:
    """Whether the element read last (the highest tag: a data set is in ascending order) ends
    where the bytes do, zero padding after it allowed, or that cannot be told (a sequence:
    pydicom keeps no offset for one of undefined length, and reports and RT structure sets end
    in one). A file cut between two elements cannot be told from a complete one whose pixels
    were stripped; a cut inside an element leaves it short or drops it."""
    if not len(ds):
        return True
    last = ds.get_item(max(ds.keys()))
    tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    if tell is None or length is None or length == 0xFFFFFFFF or last.VR == "SQ":
        return True
    end = int(tell) + int(length)
    return end <= len(data) and not data[end:].strip(b"\0")


def _split_deflated(data: bytes) -> tuple[FileMetaDataset, bytes] | None:
    """(file meta, compressed rest) of a Deflated Explicit VR Little Endian file, else None.

    pydicom inflates such a file whole; splitting it here lets :func:`_inflate` bound that.
    """
    fp = io.BytesIO(data)
    fp.seek(132)
    try:
        meta = _read_file_meta_info(fp)
    except _FATAL:
        raise
    except BaseException:  # a broken meta group: the ordinary read reports it
        return None
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return None
    return meta, data[fp.tell() :]


def _inflate(body: bytes) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, _MAX_INFLATED)
    except zlib.error:
        raise ImageRejected("decode_error", "the deflated data set is corrupt") from None
    if inflater.unconsumed_tail:
        raise ImageRejected(
            "too_large", f"the deflated data set inflates beyond {_MAX_INFLATED} bytes"
        )
    if not inflater.eof:
        raise ImageRejected("truncated", "the deflated data set ends early")
    return out


def _is_eof(err: BaseException) -> bool:
    text = str(err).lower()
    short = isinstance(err, struct.error) and "requires a buffer" in text  # a header cut short
    return isinstance(err, EOFError) or short or "end of file" in text or "truncat" in text


def _settle_transfer_syntax(ds: Dataset) -> None:
    # Files without file meta carry no Transfer Syntax UID: derive it from how pydicom actually
    # parsed the data set (implicit/explicit VR, endianness). Encapsulated pixel data cannot be
    # guessed safely and is rejected later by the decoder check.
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    if ds.file_meta.get("TransferSyntaxUID"):
        return
    implicit, little = ds.original_encoding
    if implicit is None:
        implicit, little = True, True
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _sop_class(ds: Dataset) -> str:
    """' (SOP class <its standard name>)' for a message, or '' when the class is not one of
    the standard's. A PACS export holds a DICOMDIR and, per study, reports, presentation states
    and key-object notes beside the images; all were "the DICOM holds no Pixel Data element",
    which reads like broken images. Named, they read as the non-images they are."""
    for where, keyword in ((ds, "SOPClassUID"), (ds.file_meta, "MediaStorageSOPClassUID")):
        try:
            uid = where.get(keyword)
        except _FATAL:
            raise
        except BaseException:  # a broken element: the class is only a hint here
            continue
        if isinstance(uid, UID) and uid.type == "SOP Class":  # in the standard's registry
            return f" (SOP class {uid.name})"
    return ""


def _check_single_image(ds: Dataset) -> UID:
    if "PixelData" not in ds:
        other = "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
        raise ImageRejected(
            "no_pixel_data",
            "float pixel data is not a radiograph"
            if other
            else f"the DICOM holds no Pixel Data element{_sop_class(ds)}",
        )
    if ds["PixelData"].is_empty:  # zero length (a stripped export): its value is None
        raise ImageRejected("no_pixel_data", "the Pixel Data element is empty")
    # Type 1 in the Image Pixel Module, and pydicom's decoders read every one of them: a
    # missing one is named here rather than surfacing as an AttributeError from the decoder
    for key in _REQUIRED:
        if ds.get(key) in (None, ""):
            raise ImageRejected("missing_attribute", f"required attribute {key} is missing")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageRejected("multi_frame", f"{frames} frames; only single 2-D images are used")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows < 1 or cols < 1:
        raise ImageRejected("not_2d", "Rows or Columns is zero")
    if rows * cols > MAX_PIXELS:  # before decoding: a few KB of JPEG 2000 can claim gigapixels
        raise ImageRejected("too_large", f"{rows}x{cols} pixels exceeds {MAX_PIXELS}")
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples not in (1, 3):
        raise ImageRejected("unsupported_photometric", f"{samples} samples per pixel")
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    grey = ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
    if (samples == 1) != (photometric in grey):
        raise ImageRejected(
            "unsupported_photometric",
            f"photometric {_quoted(photometric, PHOTOMETRICS)} with {samples} sample(s)",
        )
    if photometric in PHOTOMETRICS and ds.PhotometricInterpretation != photometric:
        # read here (and in the metadata) without case or padding, but pydicom's decoders
        # match the exact code: 'monochrome2' from a lax writer was decode_error (ValueError)
        ds.PhotometricInterpretation = photometric
    ts = UID(ds.file_meta.TransferSyntaxUID)
    if not ts.is_transfer_syntax:
        # a vendor's private syntax, or a standard one newer than pydicom: how its pixels are
        # encoded is unknown here (and UID.is_compressed raises on it)
        raise ImageRejected(
            "unsupported_transfer_syntax",
            f"transfer syntax {_quoted_syntax(ts)} is not one pydicom can decode",
        )
    if samples == 3:
        _check_colour_model(photometric, ts)
    if samples == 3 and ds.get("PlanarConfiguration") in (None, ""):
        _settle_planar_configuration(ds, ts)
    elem = ds["PixelData"]
    if ts.is_compressed or elem.is_undefined_length:
        if not ts.is_compressed:
            raise ImageRejected(
                "unsupported_transfer_syntax",
                "encapsulated pixel data with no compressed transfer syntax",
            )
        try:
            available = get_decoder(ts).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise ImageRejected(
                "unsupported_transfer_syntax", f"no decoder for {_quoted_syntax(ts)}"
            )
        _check_stream_size(ds, rows, cols)
    else:
        bits = int(ds.BitsAllocated)
        # native YBR_FULL_422 stores two luma and one Cb/Cr pair per two pixels (PS3.3 C.7.6.3)
        per_pixel = 2 if photometric == "YBR_FULL_422" else samples
        expected = rows * cols * per_pixel * math.ceil(bits / 8)
        if bits == 1:
            expected = math.ceil(rows * cols * samples / 8)
        if len(ds.PixelData) < expected:
            raise ImageRejected(
                "truncated", f"pixel data has {len(ds.PixelData)} of {expected} bytes"
            )
    return ts


# what pydicom hands back for each 3-sample photometric: RGB, as RGB; YBR_FULL(_422) converted to
# RGB; YBR_ICT/RCT, RGB from the JPEG 2000 codec (its inverse colour transform); YBR_PARTIAL_*,
# the YCbCr as stored (see :func:`_colour_luma`)
_COLOUR_MODELS = frozenset(
    {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422"}
)


# DX, MG and intra-oral X-ray Image Storage - For Processing (PS3.4 B.5)
_FOR_PROCESSING_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.2.1",
        "1.2.840.10008.5.1.4.1.1.1.3.1",
    }
)


def for_processing(ds: Dataset) -> bool:
    """Whether a DICOM holds a projection radiograph's raw detector data (Presentation Intent
    Type ``FOR PROCESSING``, or a For Processing SOP class): meant for CAD, not display, and
    without a display transform it is percentile-windowed into a flat, unprocessed-looking
    image; exports that carry it usually carry the processed twin of the same exposure (another
    SOP Instance UID, so not caught as a duplicate), and both went into training."""
    intent = str(ds.get("PresentationIntentType") or "").strip().upper()
    return intent == "FOR PROCESSING" or str(ds.get("SOPClassUID") or "").strip() in (
        _FOR_PROCESSING_CLASSES
    )


def _check_colour_model(photometric: str, ts: UID) -> None:
    """Refuse a 3-sample photometric whose pixels would be read as RGB without being RGB: a
    retired one (HSV, ARGB, CMYK) or an unknown code reached the RGB path; YBR_ICT/RCT outside
    JPEG 2000 (the only streams that carry them) kept their YCbCr; a native YBR_PARTIAL_422
    (retired, sub-sampled) was quarantined as ``truncated``."""
    if photometric not in _COLOUR_MODELS:
        raise ImageRejected(
            "unsupported_photometric",
            f"photometric {_quoted(photometric, PHOTOMETRICS)} with 3 samples is not a colour "
            "model decoded here (RGB or YBR_*)",
        )
    if photometric in ("YBR_ICT", "YBR_RCT") and ts not in JPEG2000TransferSyntaxes:
        raise ImageRejected(
            "unsupported_photometric",
            f"photometric {photometric} belongs to JPEG 2000 streams, not transfer syntax "
            f"{_quoted_syntax(ts)}",
        )
    if photometric.startswith("YBR_PARTIAL") and not ts.is_compressed:
        raise ImageRejected(
            "unsupported_photometric", f"photometric {photometric} in native (uncompressed) pixels"
        )


def _colour_luma(stored: np.ndarray, photometric: str, bits: int) -> np.ndarray:
    """A colour image's grey: Rec. 601 luma of RGB; for YBR_PARTIAL_*, which pydicom leaves as
    stored, its Y channel (that luma already), from its partial range (16-235 at 8 bits,
    PS3.3 C.7.6.3.1.2) onto [0, 1]. Read as RGB, its Cb and Cr at mid-grey had squeezed the
    image into about a quarter of the range."""
    if not photometric.startswith("YBR_PARTIAL"):
        return luma(stored, float(2**bits - 1))
    unit = float(2 ** (bits - 8))
    y = (stored[..., 0].astype(np.float32) - 16.0 * unit) / (219.0 * unit)
    return np.clip(y, 0.0, 1.0)


def _check_stream_size(ds: Dataset, rows: int, cols: int) -> None:
    """Refuse a compressed frame whose stream declares another size than Rows x Columns,
    before its codec allocates that size (see ``codestream``)."""
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    except _FATAL:
        raise
    except BaseException as err:  # a broken item structure: no frame to decode either
        raise ImageRejected(
            "decode_error", f"encapsulated pixel data unreadable ({type(err).__name__})"
        ) from None
    size = declared_size(frame)
    if size is None or size == (rows, cols):
        return
    if size[0] == 0:
        raise ImageRejected(
            "decode_error",
            "the compressed frame declares 0 lines and no DNL segment gives them",
        )
    if size[0] * size[1] > MAX_PIXELS:
        raise ImageRejected(
            "too_large",
            f"the compressed frame declares {size[0]}x{size[1]} pixels (exceeds {MAX_PIXELS}); "
            f"Rows and Columns say {rows}x{cols}",
        )
    raise ImageRejected(
        "decode_error",
        f"the compressed frame declares {size[0]}x{size[1]} pixels, "
        f"Rows and Columns say {rows}x{cols}",
    )


def _settle_planar_configuration(ds: Dataset, ts: UID) -> None:
    """A colour image without Planar Configuration (Type 1C: required when Samples per Pixel is
    above 1), which pydicom's decoders demand even where it means nothing: quarantined as
    decode_error "(AttributeError ...)", the cause unnamed.

    In compressed data the codec orders the samples and the standard calls the value irrelevant
    (PS3.5 8.2, A.4), so it is set to 0, as it should have been written. In native data it
    says whether samples are interleaved or planes, which the bytes cannot tell: the file is
    ``missing_attribute``, named, like a missing Type 1 attribute.
    """
    if not ts.is_compressed:
        raise ImageRejected(
            "missing_attribute", "required attribute PlanarConfiguration is missing"
        )
    ds.PlanarConfiguration = 0


def _padding_mask(stored: np.ndarray, ds: Dataset, signed: bool) -> np.ndarray | None:
    """Where the stored values are Pixel Padding Value (up to Pixel Padding Range Limit).

    Both are stored values, US or SS by Pixel Representation like the LUT first-mapped value
    (:func:`_us_or_ss`): a signed padding of -2048 written as US 63488 still matches.
    """
    pad = ds.get("PixelPaddingValue")
    if pad is None:
        return None
    try:
        lo = hi = _us_or_ss(int(pad), ds["PixelPaddingValue"].VR, signed)
        limit = ds.get("PixelPaddingRangeLimit")
        if limit is not None:
            limit = _us_or_ss(int(limit), ds["PixelPaddingRangeLimit"].VR, signed)
            lo, hi = min(lo, limit), max(lo, limit)
    except (TypeError, ValueError):
        return None
    mask = (stored >= lo) & (stored <= hi)
    return mask if mask.any() else None


def _first(value: Any) -> float:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _window(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """DICOM window centre/width (PS3.3 C.11.2.1.2) onto [0, 1]; None when absent or invalid."""
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    try:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(c) and math.isfinite(w)):
        # "NaN" or "inf" in a DS: every pixel NaN or one value (quarantined as blank), where a
        # window that says nothing usable means the percentile window, as an absent one does
        return None
    func = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if func == "SIGMOID" and w > 0:
        with np.errstate(over="ignore"):  # exp overflows to inf far below a narrow window: 0
            return 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    if func == "LINEAR_EXACT" and w > 0:
        return np.clip((values - c) / w + 0.5, 0.0, 1.0)
    if func == "LINEAR" and w >= 1:
        return np.clip((values - (c - 0.5)) / max(w - 1.0, 1.0) + 0.5, 0.0, 1.0)
    return None


def _us_or_ss(value: int, vr: str, signed: bool) -> int:
    """A 'US or SS' value read from the file, in the domain of the values it describes.

    Its VR follows the sign of those values (PS3.3 C.11.1 and C.11.2: the LUT Descriptor's
    first-mapped value), but explicit-VR writers often encode a negative one as US (-2048 as
    63488), which pydicom keeps as written. For a signed domain a US value of 32768 or more is
    that negative number; for an unsigned domain it is the value it says (a LUT may start at
    40000 of a 16-bit range).

    The other way round too: a VOI LUT's descriptor follows Pixel Representation, so signed
    stored values whose rescale makes the modality output unsigned (intercept +32768) have a
    first-mapped value of 40000 written, or read under implicit VR, as SS -25536; kept
    negative, every pixel mapped to the LUT's last entry.
    """
    if signed and vr == "US" and value >= 32768:
        return value - 65536
    if not signed and vr == "SS" and value < 0:
        return value + 65536
    return value


def _lut(ds: Dataset, keyword: str, signed_input: bool) -> tuple[int, np.ndarray]:
    """(first input value mapped, entries) of the first item of a Modality or VOI LUT Sequence.

    Read here rather than through pydicom's ``apply_*`` functions, which map with the
    first-mapped value as written (a negative one written as US sent every pixel to the first
    entry), index an 8-bit VOI LUT with uint8 indices (input 300 read entry 44: bands instead of
    the display curve) and read 8-bit entries packed two per word as 16-bit words.
    """
    item = ds[keyword][0]
    entries, written = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
    table = _lut_entries(item, ds, entries, int(item.LUTDescriptor[2]), keyword)
    return _us_or_ss(written, item["LUTDescriptor"].VR, signed_input), table


def _lut_entries(item: Dataset, ds: Dataset, entries: int, bits: int, keyword: str) -> np.ndarray:
    """The ``entries`` values of a LUT Data element, US values or OW bytes.

    OW holds 16-bit words in the data set's byte order, except that the standard stores 8-bit
    entries "equivalent to 8 bits allocated", two per word (PS3.3 C.11.1.1.1, C.11.2.1.1);
    many writers put one 8-bit entry per word instead, so the element's length says which.
    """
    value = item["LUTData"].value
    if isinstance(value, (bytes, bytearray)):
        if bits == 8 and len(value) in (entries, entries + 1):
            table = np.frombuffer(value, np.uint8, count=entries)
        else:
            little = ds.original_encoding[1]
            if little is None:
                little = ds.file_meta.TransferSyntaxUID != ExplicitVRBigEndian
            count = min(entries, len(value) // 2)
            table = np.frombuffer(value, "<u2" if little else ">u2", count=count)
    else:
        table = np.asarray([value] if isinstance(value, int) else list(value or ()), np.int64)
        if bits == 8 and len(table) == (entries + 1) // 2 < entries:
            # the same two-per-word packing written with VR US: each word's low byte, then its
            # high byte (the first entry is the first byte of a little-endian word)
            table = np.stack([table & 0xFF, table >> 8], axis=1).reshape(-1)[:entries]
    if len(table) < entries:
        raise ImageRejected(
            "decode_error",
            f"the {keyword.removesuffix('Sequence').replace('LUT', ' LUT')}'s LUT Data holds "
            f"{len(table)} of the {entries} entries its descriptor declares",
        )
    return table.astype(np.int64)


def _map_lut(values: np.ndarray, first: int, table: np.ndarray) -> np.ndarray:
    """``table`` applied to integer ``values``: below ``first`` -> the first entry, past the end
    -> the last (PS3.3 C.11.1, C.11.2)."""
    work = np.int32 if values.dtype.itemsize <= 2 else np.int64  # stored 16-bit: 4 B/pixel
    index = np.clip(values.astype(work) - work(first), 0, len(table) - 1)
    return table[index]


def _modality(stored: np.ndarray, ds: Dataset, signed: bool) -> np.ndarray:
    """Modality LUT Sequence (its input is the stored value, signed by Pixel Representation),
    else rescale slope/intercept, else the stored values unchanged."""
    if not ds.get("ModalityLUTSequence"):
        slope, intercept = _rescale(ds)
        if slope == 1.0 and intercept == 0.0:
            return stored
        return stored.astype(np.float64) * slope + intercept
    first, table = _lut(ds, "ModalityLUTSequence", signed)
    return _map_lut(stored, first, table)


def _rescale(ds: Dataset) -> tuple[float, float]:
    """Rescale Slope and Intercept, a missing or empty one as the identity's (1, 0).

    pydicom's ``apply_modality_lut`` applied them only when both were present, and multiplied
    by an empty one: an Intercept alone was ignored (a window written in rescaled units then
    fell on stored values, 1024 off for CT-like data), an empty Slope was a TypeError."""
    values = []
    for key, identity in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = ds.get(key)
        if raw in (None, "") or (isinstance(raw, (list, tuple)) and not raw):
            values.append(identity)
            continue
        try:
            value = _first(raw)
        except (TypeError, ValueError, IndexError):
            raise ImageRejected("decode_error", f"{key} is not a number") from None
        if not math.isfinite(value):
            raise ImageRejected("decode_error", f"{key} is not a finite number")
        values.append(value)
    return values[0], values[1]


def _voi_sequence(values: np.ndarray, ds: Dataset, signed: bool) -> np.ndarray | None:
    """VOI LUT Sequence onto [0, 1], scaled by the LUT's own output range.

    The LUT's input is the modality output ``values``: signed when the modality step can
    output a negative value (see :func:`_signed_modality_output`).
    """
    if not ds.get("VOILUTSequence"):
        return None
    signed_input = _signed_modality_output(ds, signed, values)
    first, table = _lut(ds, "VOILUTSequence", signed_input)
    lo, hi = float(table.min()), float(table.max())
    mapped = _map_lut(np.rint(values).astype(np.int64), first, table).astype(np.float64)
    return (mapped - lo) / (hi - lo) if hi > lo else np.zeros_like(mapped)


def _signed_modality_output(ds: Dataset, signed: bool, values: np.ndarray) -> bool:
    """Whether the modality output's range reaches below zero, read from the header: the
    stored range (Bits Stored, Pixel Representation) through the rescale; a Modality LUT's
    entries are unsigned. Decided by one image's pixels instead, two images of one series (the
    same header, one without a pixel below the intercept's zero) read the VOI LUT's first
    mapped value written as US (-1024 as 64512) in two domains: one windowed as the standard
    says, the other all one value."""
    if ds.get("ModalityLUTSequence"):
        return False
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope, intercept = _rescale(ds)  # read (and refused when unreadable) by _modality first
    return min(slope * low, slope * high) + intercept < 0


def _palette_max(ds: Dataset, rgb: np.ndarray) -> float:
    """Full scale of a palette's entries: its descriptor's bit depth (8 or 16), not the array
    dtype (pydicom returns 8-bit palettes as uint16). Some writers put 8-bit entries in the
    high byte while the descriptor says 8; values above 255 mean 16-bit scale."""
    descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
    bits = int(descriptor[2]) if descriptor is not None and len(descriptor) == 3 else 16
    return 255.0 if bits == 8 and int(rgb.max()) <= 255 else 65535.0


# Where a pixel's proportions are written, most specific first: Pixel Spacing (in the patient),
# Imager Pixel Spacing (at the detector: CR and DX), Nominal Scanned Pixel Spacing (a digitised
# film), Pixel Aspect Ratio (no physical size, required only where none of the others is). The
# first three are row spacing then column spacing, the last vertical then horizontal: each is a
# pixel's height, then its width.
_PIXEL_PROPORTIONS = (
    "PixelSpacing",
    "ImagerPixelSpacing",
    "NominalScannedPixelSpacing",
    "PixelAspectRatio",
)
# a ratio this close to 1 is rounding in the header (0.139\0.1390001); resampling for it would
# only blur the image a little
_SQUARE_WITHIN = 0.005
# no detector has pixels this oblong: a header saying so is damaged, and the next source (or
# square pixels) is taken instead of storing the image squeezed to a sliver
_MAX_PIXEL_ASPECT = 4.0


def pixel_aspect(ds: Dataset) -> float:
    """A pixel's height over its width, from the header (1.0 where it says nothing usable).

    Nearly every chest radiograph has square pixels; a CR reader or a digitiser with oblong
    ones was stored stretched (heart and lungs narrower or wider than they are), and the same
    anatomy looked different to the encoder and to similar-case search than from a square
    detector."""
    for key in _PIXEL_PROPORTIONS:
        pair = positive_pair(ds.get(key))
        if pair is None:
            continue
        ratio = pair[0] / pair[1]
        if not 1 / _MAX_PIXEL_ASPECT <= ratio <= _MAX_PIXEL_ASPECT:
            log.debug("%s gives a pixel aspect of %.3g: not used", key, ratio)
            continue
        return 1.0 if abs(ratio - 1.0) <= _SQUARE_WITHIN else ratio
    return 1.0


@without_value_validation
def dicom_display(ds: Dataset, window_percentiles: tuple[float, float]) -> np.ndarray:
    """Decoded, LUT-applied, MONOCHROME2 image of a single-frame dataset, float in [0, 1]."""
    ts = _check_single_image(ds)
    try:
        stored = ds.pixel_array
    except _FATAL:
        raise
    except BaseException as err:  # incl. Rust codec panics (pyo3 PanicException)
        reason = "truncated" if _is_eof(err) or "less than expected" in str(err) else "decode_error"
        log.debug("pixel decode failed (%s): %s", ts, err)
        raise ImageRejected(
            reason,
            f"pixel data could not be decoded ({type(err).__name__}, "
            f"transfer syntax {_quoted_syntax(ts)})",
        ) from None
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(stored, ds)
        return luma(rgb, _palette_max(ds, rgb))
    if stored.ndim == 3 and stored.shape[-1] == 3:  # colour images carry no LUT semantics
        return _colour_luma(stored, photometric, bits)
    if stored.ndim != 2:
        raise ImageRejected("not_2d", f"decoded pixel array has shape {stored.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageRejected(
            "unsupported_photometric",
            f"photometric {_quoted(photometric, PHOTOMETRICS)} with 1 sample",
        )
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    mask = _padding_mask(stored, ds, signed)
    # float32 is exact for 16-bit stored values and halves the memory of a large radiograph;
    # 32-bit ones above 2**24 lose their low bits in it, which a narrow window shows as steps
    work = np.float32 if stored.dtype.itemsize <= 2 else np.float64
    values = _modality(stored, ds, signed).astype(work, copy=False)
    display = _voi_sequence(values, ds, signed)
    if display is None:
        display = _window(values, ds)
    if display is None:
        display = percentile_window(values, mask, window_percentiles)
    inverse = str(ds.get("PresentationLUTShape") or "").strip().upper() == "INVERSE"
    if photometric == "MONOCHROME1" or inverse:
        display = 1.0 - display
    if mask is not None:
        display = np.where(mask, 0.0, display)
    return display

"""The decoder against its value contract, with real DICOM bytes built by pydicom at test time."""

from __future__ import annotations

import io
import zlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from dicom_factory import (
    MARKER_STRINGS,
    deflated,
    gradient,
    make_dicom,
)
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from radjepa.imaging.contract import MAX_PIXELS, META_FIELDS
from radjepa.imaging.decode import DecodedImage, ImageRejected, decode_image
from radjepa.imaging.deid import (
    DEV_SECRET,
    DevelopmentKeyRefused,
    SecretRefused,
    age_years,
    keyed_hash,
    resolve_secret,
)
from radjepa.imaging.errors import REASONS
from radjepa.imaging.resize import resize_center_crop
from radjepa.shards import SHARD_SCHEMA, pixels_from_bytes, pixels_to_bytes

SECRET = b"test-secret-0123456789abcdef"
N = 64  # square sources decoded at size N: no resampling, so values are checked exactly


def decode(data: bytes, size: int = N, **kw) -> DecodedImage:
    return decode_image(data, size=size, secret=SECRET, **kw)


def stored(display: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(display, 0, 1) * 255).astype(np.uint8)


def percentile_display(values: np.ndarray, pct=(0.5, 99.5)) -> np.ndarray:
    lo, hi = np.percentile(values.astype(np.float64), pct)
    return np.clip((values - lo) / (hi - lo), 0, 1)


# --- the contract table: bit depth x LUT x MONOCHROME1/2 -----------------------------------


def _case(bits: int, lut: str) -> tuple[dict, np.ndarray]:
    """Factory kwargs and the expected MONOCHROME2 display (float [0, 1]) for one table cell."""
    px = gradient(N, N, bits=bits, seed=bits)
    v = px.astype(np.float64)
    vmax = 2**bits - 1
    if lut == "none":
        return {}, percentile_display(v)
    if lut == "rescale":  # a positive linear map does not change a percentile window
        return {"rescale": (2.5, -1024.0)}, percentile_display(v * 2.5 - 1024)
    if lut == "modality_lut_seq":  # a reversing modality LUT
        table = np.arange(vmax + 1)[::-1]
        return {"modality_lut": table}, percentile_display(table[px].astype(np.float64))
    if lut == "window":
        c, w = vmax * 0.4, vmax * 0.5
        expected = np.clip((v - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
        return {"window": (c, w)}, expected
    if lut == "voi_lut_seq":  # a square-root display curve with 16-bit output
        table = np.rint(65535 * np.sqrt(np.arange(vmax + 1) / vmax)).astype(np.int64)
        return {"voi_lut": table}, table[px] / 65535.0
    raise AssertionError(lut)


LUTS = ["none", "rescale", "modality_lut_seq", "window", "voi_lut_seq"]


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("lut", LUTS)
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_contract_table(bits: int, lut: str, photometric: str) -> None:
    kwargs, expected = _case(bits, lut)
    px = gradient(N, N, bits=bits, seed=bits)
    out = decode(make_dicom(px, bits=bits, photometric=photometric, **kwargs))
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    assert out.pixels.dtype == np.uint8 and out.pixels.shape == (N, N)
    diff = np.abs(out.pixels.astype(int) - stored(expected).astype(int))
    assert diff.max() <= 1, f"max error {diff.max()} for {bits}-bit {lut} {photometric}"
    if lut in ("none", "rescale", "modality_lut_seq"):  # the robust window spans the range
        assert out.pixels.min() == 0 and out.pixels.max() == 255


@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("window", [False, True])
def test_monochrome1_twin_decodes_identically(bits: int, window: bool) -> None:
    """The same radiograph stored as MONOCHROME1 (inverted values) gives the same image."""
    vmax = 2**bits - 1
    px = gradient(N, N, bits=bits, seed=3)
    twin = (vmax - px.astype(np.int64)).astype(px.dtype)
    kw2 = {"window": (vmax * 0.45, vmax * 0.6)} if window else {}
    # DICOM LINEAR windows centre on c - 0.5, so the mirrored centre is vmax + 1 - c
    kw1 = {"window": (vmax + 1 - vmax * 0.45, vmax * 0.6)} if window else {}
    m2 = decode(make_dicom(px, bits=bits, photometric="MONOCHROME2", **kw2))
    m1 = decode(make_dicom(twin, bits=bits, photometric="MONOCHROME1", **kw1))
    assert np.abs(m1.pixels.astype(int) - m2.pixels.astype(int)).max() <= 1


def test_presentation_lut_inverse_inverts_once() -> None:
    px = gradient(N, N, bits=12)
    plain = decode(make_dicom(px)).pixels.astype(int)
    inverse = decode(make_dicom(px, presentation_inverse=True)).pixels.astype(int)
    both = decode(make_dicom(px, photometric="MONOCHROME1", presentation_inverse=True))
    assert np.abs(inverse - (255 - plain)).max() <= 1
    assert np.array_equal(both.pixels.astype(int), inverse)  # MONOCHROME1 + INVERSE = one flip


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_padding_excluded_from_window_and_shown_black(photometric: str) -> None:
    px = (gradient(N, N, bits=12).astype(np.int64) // 2 + 1000).astype(np.uint16)
    px[:, :8] = 4095  # collimator padding (the value is arbitrary; it is declared below)
    out = decode(make_dicom(px, photometric=photometric, padding=4095)).pixels
    assert (out[:, :8] == 0).all()
    interior = percentile_display(px[:, 8:].astype(np.float64))
    if photometric == "MONOCHROME1":
        interior = 1 - interior
    assert np.abs(out[:, 8:].astype(int) - stored(interior).astype(int)).max() <= 1
    undeclared = decode(make_dicom(px, photometric=photometric)).pixels
    assert not np.array_equal(undeclared, out)


def test_padding_range_limit() -> None:
    px = gradient(N, N, bits=12)
    px[:4] = 5
    px[4:8] = 10
    out = decode(make_dicom(px, padding=0, padding_limit=12)).pixels
    assert (out[:8] == 0).all() and out[8:].max() == 255


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("limit", [None, 63500])
def test_signed_padding_written_as_us_is_still_padding(photometric: str, limit) -> None:
    """Pixel Padding Value (and Range Limit) are US or SS by Pixel Representation; a signed
    -2048 written as US 63488 matched no pixel, so the padding entered the window and showed
    white under MONOCHROME1."""
    import pydicom

    px = (gradient(N, N, bits=12).astype(np.int32) // 2 - 1000).astype(np.int16)
    px[:, :8] = -2048 if limit is None else np.arange(-2048, -2040)  # collimator padding
    ds = pydicom.dcmread(io.BytesIO(make_dicom(px, bits=12, signed=True, photometric=photometric)))
    ds.PixelPaddingValue = 63488  # -2048 as an unsigned 16-bit pattern
    ds["PixelPaddingValue"].VR = "US"
    if limit is not None:
        ds.PixelPaddingRangeLimit = limit  # -2036
        ds["PixelPaddingRangeLimit"].VR = "US"
    buf = io.BytesIO()
    ds.save_as(buf)
    out = decode(buf.getvalue()).pixels
    assert (out[:, :8] == 0).all()
    interior = percentile_display(px[:, 8:].astype(np.float64))
    if photometric == "MONOCHROME1":
        interior = 1 - interior
    assert np.abs(out[:, 8:].astype(int) - stored(interior).astype(int)).max() <= 1


def _with_lut(data: bytes, keyword: str, table: np.ndarray, first: int, vr: str) -> bytes:
    """``data`` with a one-item Modality or VOI LUT Sequence whose LUT Descriptor's
    first-mapped value is written as ``first`` with VR ``vr``."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(io.BytesIO(data))
    item = Dataset()
    item.LUTDescriptor = [len(table), first, 16]
    item["LUTDescriptor"].VR = vr
    item.LUTData = np.asarray(table, dtype="<u2").tobytes()
    item["LUTData"].VR = "OW"
    if keyword == "ModalityLUTSequence":
        item.ModalityLUTType = "US"
    setattr(ds, keyword, Sequence([item]))
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


@pytest.mark.parametrize(
    "case",
    [
        "signed_voi_us",
        "signed_voi_ss",
        "rescaled_voi_us",
        "rescaled_voi_us_no_pixel_below_zero",
        "unsigned_voi_high",
        "signed_modality_us",
    ],
)
def test_lut_first_mapped_value_is_read_in_the_input_domain(case: str) -> None:
    """A LUT Descriptor's first-mapped value is US or SS by the sign of the LUT's input, and
    writers often encode a negative one as US (-2048 as 63488). Taken as written, every pixel
    fell below it: the VOI cases decoded to an all-black image and the signed Modality LUT to
    decode_error (OverflowError). An unsigned input keeps a first value of 32768 as it is."""
    sqrt = np.rint(65535 * np.sqrt(np.arange(4096) / 4095)).astype(np.int64)
    unsigned = gradient(N, N, bits=12, seed=5)
    signed = (unsigned.astype(np.int32) - 2048).astype(np.int16)  # -2048..2047
    if case.startswith("signed_voi"):
        first, vr = (63488, "US") if case.endswith("_us") else (-2048, "SS")
        base = make_dicom(signed, bits=12, signed=True)
        data = _with_lut(base, "VOILUTSequence", sqrt, first, vr)
        expected = sqrt[signed.astype(np.int64) + 2048] / 65535.0
    elif case == "rescaled_voi_us":  # unsigned pixels, but the rescale output is signed
        base = make_dicom(unsigned, bits=12, rescale=(1.0, -2048.0))
        data = _with_lut(base, "VOILUTSequence", sqrt, 63488, "US")
        expected = sqrt[unsigned] / 65535.0
    elif case == "rescaled_voi_us_no_pixel_below_zero":
        # the same header, but this image has no pixel below the intercept's zero: the domain
        # was decided by the pixels, so the first value read 63488 and the image came out
        # blank (its series sibling above decoded as the standard says)
        bright = (2048 + unsigned // 2).astype(np.uint16)  # 2048..4095: rescaled 0..2047
        base = make_dicom(bright, bits=12, rescale=(1.0, -2048.0))
        data = _with_lut(base, "VOILUTSequence", sqrt, 63488, "US")
        expected = sqrt[bright] / 65535.0
    elif case == "unsigned_voi_high":  # a LUT over the upper half of an unsigned 16-bit range
        px = gradient(N, N, bits=16, seed=5)
        upper = np.rint(65535 * np.sqrt(np.arange(32768) / 32767)).astype(np.int64)
        data = _with_lut(make_dicom(px, bits=16), "VOILUTSequence", upper, 32768, "US")
        expected = upper[np.clip(px.astype(np.int64) - 32768, 0, 32767)] / 65535.0
    else:  # a reversing Modality LUT over signed stored values
        table = np.arange(4096)[::-1]
        base = make_dicom(signed, bits=12, signed=True)
        data = _with_lut(base, "ModalityLUTSequence", table, 63488, "US")
        expected = percentile_display(table[signed.astype(np.int64) + 2048].astype(np.float64))
    out = decode(data).pixels
    assert np.abs(out.astype(int) - stored(expected).astype(int)).max() <= 1


def _with_lut_data(data: bytes, keyword: str, descriptor: list[int], lut_data, vr: str) -> bytes:
    """``data`` with a one-item Modality or VOI LUT Sequence holding ``lut_data`` as written
    (US values, or OW bytes laid out by the caller), in ``data``'s own transfer syntax."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(io.BytesIO(data))
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.LUTData = lut_data
    item["LUTData"].VR = vr
    if keyword == "ModalityLUTSequence":
        item.ModalityLUTType = "US"
    setattr(ds, keyword, Sequence([item]))
    ts = ds.file_meta.TransferSyntaxUID
    out = io.BytesIO()
    ds.save_as(
        out,
        enforce_file_format=True,
        little_endian=ts != ExplicitVRBigEndian,
        implicit_vr=ts == ImplicitVRLittleEndian,
    )
    return out.getvalue()


@pytest.mark.parametrize("keyword", ["VOILUTSequence", "ModalityLUTSequence"])
@pytest.mark.parametrize(
    ("layout", "syntax"),
    [
        ("us", ExplicitVRLittleEndian),
        ("words", ExplicitVRLittleEndian),
        ("words", ExplicitVRBigEndian),
        ("words", ImplicitVRLittleEndian),
        ("packed", ExplicitVRLittleEndian),
        ("packed", ImplicitVRLittleEndian),
        ("packed_us", ExplicitVRLittleEndian),
    ],
)
def test_lut_with_8_bit_entries_maps_every_input(keyword: str, layout: str, syntax: str) -> None:
    """A 12-bit -> 8-bit LUT (LUT Descriptor [4096, 0, 8]), the classic CR/DX VOI LUT.

    pydicom's apply_voi indexes an 8-bit LUT with uint8 indices, so input 300 read entry 44:
    the VOI case was stored as ok with a sawtooth of bands instead of the display curve. The
    standard stores 8-bit entries "equivalent to 8 bits allocated" (two per OW word, PS3.3
    C.11.1.1.1, C.11.2.1.1), which pydicom read as 16-bit words (decode_error); many writers
    put one entry per 16-bit word instead. Every layout must give the same image.
    """
    px = gradient(N, N, bits=12, seed=11)
    if keyword == "VOILUTSequence":  # a square-root display curve
        table = np.rint(255 * np.sqrt(np.arange(4096) / 4095)).astype(np.int64)
        expected = table[px] / 255.0
    else:  # a reversing, 16:1 quantising modality LUT
        table = (np.arange(4096) // 16)[::-1]
        expected = percentile_display(table[px].astype(np.float64))
    big = syntax == ExplicitVRBigEndian
    if layout == "us":
        lut_data, vr = [int(v) for v in table], "US"
    elif layout == "words":
        lut_data, vr = table.astype(">u2" if big else "<u2").tobytes(), "OW"
    elif layout == "packed_us":  # two per word, written as US words: was decode_error
        lut_data, vr = [int(v) for v in np.frombuffer(table.astype(np.uint8), "<u2")], "US"
    else:
        lut_data, vr = table.astype(np.uint8).tobytes(), "OW"
    base = make_dicom(px, bits=12, transfer_syntax=syntax)
    data = _with_lut_data(base, keyword, [4096, 0, 8], lut_data, vr)
    out = decode(data).pixels
    assert np.abs(out.astype(int) - stored(expected).astype(int)).max() <= 1


def test_lut_shorter_than_its_descriptor_is_a_named_decode_error() -> None:
    px = gradient(N, N, bits=12, seed=11)
    data = _with_lut_data(
        make_dicom(px, bits=12), "VOILUTSequence", [4096, 0, 16], bytes(4096), "OW"
    )
    with pytest.raises(ImageRejected) as err:
        decode(data)
    assert err.value.reason == "decode_error"
    assert "LUT Data" in err.value.message


@pytest.mark.parametrize(
    "syntax",
    [RLELossless, JPEG2000Lossless, ExplicitVRBigEndian, ImplicitVRLittleEndian, "deflate", "raw"],
)
@pytest.mark.parametrize("bits", [8, 16])
def test_lossless_transfer_syntaxes_decode_identically(syntax: str, bits: int) -> None:
    px = gradient(N, N, bits=bits, seed=7)
    reference = decode(make_dicom(px, bits=bits)).pixels
    if syntax == "deflate":
        data = deflated(px, bits=bits)
    elif syntax == "raw":  # no preamble, no file meta: forced read + transfer-syntax fallback
        data = make_dicom(px, bits=bits, raw=True)
        assert data[128:132] != b"DICM"
    else:
        data = make_dicom(px, bits=bits, transfer_syntax=syntax)
    out = decode(data)
    assert np.array_equal(out.pixels, reference)
    assert out.meta["format"] == "dicom"


@pytest.mark.parametrize("syntax", [JPEG2000, JPEGBaseline8Bit])
def test_lossy_transfer_syntaxes_decode_close(syntax: str) -> None:
    px = gradient(N, N, bits=8, seed=9)
    reference = decode(make_dicom(px, bits=8)).pixels.astype(int)
    out = decode(make_dicom(px, bits=8, transfer_syntax=syntax))
    assert out.meta["transfer_syntax"] == syntax
    assert np.abs(out.pixels.astype(int) - reference).mean() < 4


def test_rgb_secondary_capture_becomes_luma_grey() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(N, N, 3), dtype=np.uint8)
    out = decode(make_dicom(rgb, bits=8, photometric="RGB"))
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255
    assert np.abs(out.pixels.astype(int) - stored(luma).astype(int)).max() <= 1
    assert out.meta["photometric"] == "RGB"


def test_uint16_output_and_shard_bytes_roundtrip() -> None:
    px = gradient(N, N, bits=16, seed=1)
    out = decode(make_dicom(px, bits=16), dtype="uint16")
    assert out.pixels.dtype == np.uint16 and out.pixels.max() == 65535
    back = pixels_from_bytes(pixels_to_bytes(out.pixels), N, N, "uint16")
    assert np.array_equal(back, out.pixels)
    assert pixels_to_bytes(out.pixels)[:2] == int(out.pixels[0, 0]).to_bytes(2, "little")


# --- real images ---------------------------------------------------------------------------


def test_real_nih_pngs(nih_dir) -> None:
    paths = sorted((nih_dir / "images").glob("*.png"))[:6]
    assert paths
    for p in paths:
        data = p.read_bytes()
        src = np.asarray(Image.open(p).convert("L"))
        same = decode(data, size=src.shape[0])
        assert np.array_equal(same.pixels, src)  # 256 px 8-bit grey: stored unchanged
        wide = decode(data, size=src.shape[0], dtype="uint16").pixels
        assert np.array_equal(wide, src.astype(np.uint16) * 257)
        small = decode(data, size=128).pixels
        ref = np.asarray(Image.open(p).convert("L").resize((128, 128), Image.Resampling.LANCZOS))
        assert np.abs(small.astype(int) - ref.astype(int)).mean() < 1.0
        assert same.meta["format"] == "png" and same.meta["orig_height"] == src.shape[0]


def test_real_png_as_jpeg_and_16bit_png(nih_dir, tmp_path) -> None:
    p = sorted((nih_dir / "images").glob("*.png"))[0]
    src = np.asarray(Image.open(p).convert("L"))
    buf = io.BytesIO()
    Image.fromarray(src).save(buf, format="JPEG", quality=95)
    jpeg = decode(buf.getvalue(), size=src.shape[0])
    assert jpeg.meta["format"] == "jpeg"
    assert np.abs(jpeg.pixels.astype(int) - src.astype(int)).mean() < 3
    buf = io.BytesIO()
    Image.fromarray(src.astype(np.uint16) * 257).save(buf, format="PNG")
    # declared 16 bits deep: the values as they are; undeclared: the percentile window
    declared = decode(_with_sbit(buf.getvalue(), 16), size=src.shape[0]).pixels
    assert np.array_equal(declared, src)
    windowed = decode(buf.getvalue(), size=src.shape[0]).pixels
    assert np.array_equal(windowed, stored(percentile_display(src.astype(np.float64))))


def test_resize_keeps_the_centre_square() -> None:
    img = np.zeros((100, 200), np.float32)
    img[:, 100:] = 1.0  # right half bright; the centre square is x in [50, 150)
    out = resize_center_crop(img, 50)
    assert out.shape == (50, 50)
    assert out[:, :20].max() < 0.05 and out[:, 30:].min() > 0.95
    assert np.array_equal(out, resize_center_crop(img, 50))  # deterministic


# --- rejections ----------------------------------------------------------------------------


def _not_2d() -> bytes:
    return make_dicom(gradient(N, N), extra={"Rows": 0})


def _bad_j2k() -> bytes:
    from pydicom.encaps import encapsulate

    data = make_dicom(gradient(N, N), transfer_syntax=JPEG2000Lossless)
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def _unsupported_syntax() -> bytes:
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(io.BytesIO(make_dicom(gradient(N, N))))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def _truncated_png(nih_dir) -> bytes:
    data = sorted((nih_dir / "images").glob("*.png"))[0].read_bytes()
    return data[: len(data) // 2]


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


REJECTIONS = {
    "empty": lambda nih: b"",
    "too_large": lambda nih: make_dicom(gradient(N, N)),  # with max_bytes=100 below
    "not_an_image": lambda nih: b"patient,finding\nDOE,none\n" * 20,
    "truncated": lambda nih: make_dicom(gradient(N, N))[:-1000],
    "multi_frame": lambda nih: make_dicom(gradient(N, N), frames=3),
    "no_pixel_data": lambda nih: make_dicom(with_pixels=False),
    "missing_attribute": lambda nih: make_dicom(gradient(N, N), drop=("Rows",)),
    "unsupported_transfer_syntax": lambda nih: _unsupported_syntax(),
    "unsupported_photometric": lambda nih: make_dicom(gradient(N, N), photometric="YBR_FULL"),
    "not_2d": lambda nih: _not_2d(),
    "too_small": lambda nih: make_dicom(gradient(8, 64)),
    "extreme_aspect": lambda nih: _png(np.zeros((40, 200), np.uint8)),
    "blank": lambda nih: make_dicom(np.full((N, N), 300, np.uint16)),
    "decode_error": lambda nih: _bad_j2k(),
    "for_processing": lambda nih: make_dicom(
        gradient(N, N), extra={"PresentationIntentType": "FOR PROCESSING"}
    ),
    "burned_in_annotation": lambda nih: make_dicom(
        gradient(N, N), extra={"BurnedInAnnotation": "YES"}
    ),
}


@pytest.mark.parametrize(
    "key", ["BitsStored", "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"]
)
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless])
def test_missing_pixel_module_attribute_is_named(key: str, syntax: str) -> None:
    """pydicom needs these Type 1 attributes to decode; without one the file was quarantined
    as decode_error "pixel data could not be decoded (AttributeError ...)"."""
    data = make_dicom(gradient(N, N), transfer_syntax=syntax, drop=(key,))
    with pytest.raises(ImageRejected) as err:
        decode(data)
    assert err.value.reason == "missing_attribute"
    assert key in err.value.message


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEGBaseline8Bit])
def test_colour_without_planar_configuration(syntax: str) -> None:
    """Planar Configuration is Type 1C (colour images) and pydicom's decoders demand it, even
    for compressed data, where the codec orders the samples: an RGB or YBR secondary capture
    without it was decode_error "pixel data could not be decoded (AttributeError ...)".
    Compressed, it is irrelevant (PS3.5 8.2) and the image decodes; native, it decides the
    sample layout, so the file is missing_attribute, named."""
    import pydicom

    rgb = np.stack([gradient(N, N, bits=8, seed=s) for s in range(3)], axis=-1)
    photometric = "YBR_FULL_422" if syntax == JPEGBaseline8Bit else "RGB"
    ds = pydicom.dcmread(io.BytesIO(make_dicom(rgb, bits=8, photometric="RGB")))
    if syntax == JPEGBaseline8Bit:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax == RLELossless:
        ds.compress(syntax, rgb)
    ds.PhotometricInterpretation = photometric
    with_it = io.BytesIO()
    ds.save_as(with_it)
    del ds.PlanarConfiguration
    without = io.BytesIO()
    ds.save_as(without)
    if syntax == ExplicitVRLittleEndian:
        with pytest.raises(ImageRejected) as err:
            decode(without.getvalue())
        assert err.value.reason == "missing_attribute"
        assert "PlanarConfiguration" in err.value.message
    else:
        got = decode(without.getvalue()).pixels
        assert np.array_equal(got, decode(with_it.getvalue()).pixels)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless])
def test_photometric_in_lower_case_decodes_as_written_in_upper_case(syntax: str) -> None:
    """The decoder and the metadata read Photometric Interpretation without case, as lax
    writers put 'monochrome1'; pydicom's decoders match the exact code, so such a file was
    decode_error "(ValueError ...)" instead of the image its upper-case twin is."""
    import pydicom

    data = make_dicom(4095 - gradient(N, N), photometric="MONOCHROME1", transfer_syntax=syntax)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PhotometricInterpretation = "monochrome1"  # as written, after encoding
    buf = io.BytesIO()
    ds.save_as(buf)
    lower = decode(buf.getvalue())
    assert np.array_equal(lower.pixels, decode(data).pixels)
    assert lower.meta["photometric"] == "MONOCHROME1"


def _non_image(sop_class: str, **attrs) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(make_dicom(with_pixels=False, drop=("PixelSpacing",))))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    for key, value in attrs.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _dicomdir(tmp_path) -> bytes:
    import pydicom
    from pydicom.fileset import FileSet

    image = make_dicom(gradient(N, N), extra={"SeriesNumber": 1, "InstanceNumber": 1})
    fs = FileSet()
    fs.add(pydicom.dcmread(io.BytesIO(image)))
    fs.write(tmp_path / "export")
    return (tmp_path / "export" / "DICOMDIR").read_bytes()


def test_non_image_objects_of_an_export_name_their_sop_class(tmp_path) -> None:
    """A PACS export holds a DICOMDIR and, per study, reports, presentation states and key
    object notes: each was "the DICOM holds no Pixel Data element", which reads like a broken
    image. The message now names the standard SOP class (never a non-standard UID)."""
    cases = {
        "Media Storage Directory Storage": _dicomdir(tmp_path),
        "Enhanced SR Storage": _non_image("1.2.840.10008.5.1.4.1.1.88.22", Modality="SR"),
        "Grayscale Softcopy Presentation State Storage": _non_image(
            "1.2.840.10008.5.1.4.1.1.11.1", Modality="PR"
        ),
        "Key Object Selection Document Storage": _non_image(
            "1.2.840.10008.5.1.4.1.1.88.59", Modality="KO"
        ),
        "Encapsulated PDF Storage": _non_image(
            "1.2.840.10008.5.1.4.1.1.104.1",
            Modality="DOC",
            MIMETypeOfEncapsulatedDocument="application/pdf",
            EncapsulatedDocument=b"%PDF-1.4\n% MARKER_NAME_7f3a\n%%EOF\n",
        ),
        # a stripped image: the name says it was one
        "Digital X-Ray Image Storage - For Presentation": make_dicom(with_pixels=False),
    }
    for name, data in cases.items():
        with pytest.raises(ImageRejected) as err:
            decode(data)
        assert err.value.reason == "no_pixel_data"
        assert err.value.message == f"the DICOM holds no Pixel Data element (SOP class {name})"
    private = _non_image("1.2.826.0.1.3680043.8.498.12345")  # not the standard's: not quoted
    with pytest.raises(ImageRejected) as err:
        decode(private)
    assert err.value.message == "the DICOM holds no Pixel Data element"


def test_empty_pixel_data_is_no_pixel_data() -> None:
    """A zero-length Pixel Data element reads as None: len(None) made it decode_error
    "malformed dicom (TypeError)"."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(make_dicom(gradient(N, N))))
    ds.PixelData = b""
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ImageRejected) as err:
        decode(buf.getvalue())
    assert err.value.reason == "no_pixel_data"
    assert "empty" in err.value.message


def test_every_reason_has_a_case() -> None:
    assert set(REJECTIONS) == set(REASONS)


@pytest.mark.parametrize("reason", sorted(REJECTIONS))
def test_rejection_reasons(reason: str, nih_dir) -> None:
    data = REJECTIONS[reason](nih_dir)
    with pytest.raises(ImageRejected) as err:
        decode(
            data,
            max_bytes=100 if reason == "too_large" else None,
            reject_burned_in=True,
            reject_for_processing=True,
        )
    assert err.value.reason == reason
    for marker in MARKER_STRINGS:
        assert marker not in err.value.message


def test_burned_in_annotation_is_refused_only_when_asked() -> None:
    # ingest refuses (text in the pixels escapes header de-identification); the HTTP API,
    # which stores nothing, embeds such images
    flagged = make_dicom(gradient(N, N), extra={"BurnedInAnnotation": "YES"})
    assert decode(flagged).pixels.shape == (N, N)
    clean = make_dicom(gradient(N, N), extra={"BurnedInAnnotation": "NO"})
    assert decode(clean, reject_burned_in=True).pixels.shape == (N, N)


def test_pixels_that_may_hold_text_are_refused_unless_flagged_no() -> None:
    # only an exact YES was refused: a multi-valued YES\NO, and an ultrasound or a screenshot
    # without the flag (PS3.15 E.3.1: cleaned data says NO), went into the shards with their text
    px = gradient(N, N)
    refused = {
        "YES\\NO": {"BurnedInAnnotation": ["YES", "NO"]},
        "US unflagged": {"Modality": "US"},
        "XA flagged empty": {"Modality": "XA", "BurnedInAnnotation": ""},
        "secondary capture": {"Modality": "", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7.2"},
    }
    for case, extra in refused.items():
        with pytest.raises(ImageRejected, match="burned_in_annotation") as err:
            decode(make_dicom(px, extra=extra), reject_burned_in=True)
        assert "pixels" in err.value.message, case
    kept = [
        {"Modality": "US", "BurnedInAnnotation": "NO"},
        {"Modality": "CR"},
        {},
        # a digitised chest film (public CXR sets are SC with Modality CR); and a VL
        # photographic class that only shares the secondary capture's prefix
        {"Modality": "CR", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"},
        {"Modality": "DX", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.77.1.4"},
    ]
    for extra in kept:  # cleaned data, and radiographs without the flag
        assert decode(make_dicom(px, extra=extra), reject_burned_in=True).pixels.shape == (N, N)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless])
def test_claimed_pixel_count_is_checked_before_decoding(syntax: str) -> None:
    # a few KB of compressed data can claim gigapixels: the header alone decides
    side = int(MAX_PIXELS**0.5) + 1
    data = make_dicom(gradient(N, N), transfer_syntax=syntax, extra={"Rows": side, "Columns": side})
    assert len(data) < 100_000
    with pytest.raises(ImageRejected) as err:
        decode(data)
    assert err.value.reason == "too_large"
    assert f"{side}x{side}" in err.value.message


def test_raster_bombs_are_too_large_not_junk() -> None:
    # beyond Pillow's own bomb guard (2 x 89.5 Mpx) and between ours and it
    for side in (14_000, 9_000):
        buf = io.BytesIO()
        Image.new("L", (side, side)).save(buf, format="PNG")
        with pytest.raises(ImageRejected) as err:
            decode(buf.getvalue())
        assert err.value.reason == "too_large", side


def test_colour_decode_memory_stays_near_the_grey_decode() -> None:
    # an upload of a few hundred KB may be a large colour image: the luma conversion must not
    # hold float64 copies of all three channels (it was ~35 bytes per pixel at its peak)
    import tracemalloc

    from radjepa.imaging.raster import raster_display

    side = 1500
    rgb = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    tracemalloc.start()
    try:
        grey, _ = raster_display(buf.getvalue())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert grey.dtype == np.float32
    assert peak / side**2 < 16


@pytest.mark.parametrize("sbit", [None, 12])
def test_sixteen_bit_decode_memory_holds_no_float64_copy(sbit: int | None) -> None:
    # a compressible 16-bit grey PNG of ~700 KB near MAX_PIXELS peaked at 1.7 GB in one decode:
    # a float64 copy of the raster and the window's float64 temporaries, ~24 bytes per pixel
    import tracemalloc

    from radjepa.imaging.raster import raster_display

    side = 2048
    ramp = np.arange(side, dtype=np.uint32)
    grey16 = ((ramp[:, None] * 7 + ramp[None, :] * 3) % 4096).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(grey16).save(buf, format="PNG")
    data = buf.getvalue() if sbit is None else _with_sbit(buf.getvalue(), sbit)
    tracemalloc.start()
    try:
        grey, _ = raster_display(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / side**2 < 10  # the integers (2), the float32 image (4), a few MB of blocks
    assert grey.dtype == np.float32


def _deflated_with_padding(padding_bytes: int) -> bytes:
    """A deflated DICOM whose data set ends in ``padding_bytes`` of trailing padding (FFFC,FFFC),
    compressed in chunks: a deflate bomb that never exists inflated in the test."""
    from pydicom.filereader import _read_file_meta_info

    small = deflated(gradient(N, N))
    fp = io.BytesIO(small)
    fp.seek(132)
    _read_file_meta_info(fp)
    head, body = small[: fp.tell()], zlib.decompress(small[fp.tell() :], -zlib.MAX_WBITS)
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [packer.compress(body)]
    parts.append(
        packer.compress(b"\xfc\xff\xfc\xffOB\x00\x00" + padding_bytes.to_bytes(4, "little"))
    )
    chunk = bytes(16 << 20)
    for _ in range(padding_bytes // len(chunk)):
        parts.append(packer.compress(chunk))
    parts.append(packer.compress(bytes(padding_bytes % len(chunk))))
    parts.append(packer.flush())
    return head + b"".join(parts)


def test_deflated_data_set_is_inflated_within_a_bound() -> None:
    modest = _deflated_with_padding(1 << 20)
    assert decode(modest).pixels.shape == (N, N)
    bomb = _deflated_with_padding(600 << 20)  # ~600 KB on disk
    assert len(bomb) < 2 << 20
    with pytest.raises(ImageRejected) as err:
        decode(bomb)
    assert err.value.reason == "too_large"
    with pytest.raises(ImageRejected) as err:
        decode(modest[:-200])
    assert err.value.reason == "truncated"


def _palette_dicom(indices: np.ndarray, lut: np.ndarray, bits: int) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(make_dicom(indices, bits=8)))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [len(lut), 0, bits])
        ds[f"{colour}PaletteColorLookupTableDescriptor"].VR = "US"
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.astype("<u2").tobytes())
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


@pytest.mark.parametrize("bits", [8, 16])
def test_palette_colour_is_scaled_by_its_descriptor(bits: int) -> None:
    # a grey ramp palette: display = index / 255 whether the entries are 8- or 16-bit
    indices = gradient(N, N, bits=8)
    lut = np.arange(256) * (257 if bits == 16 else 1)
    got = decode(_palette_dicom(indices, lut, bits)).pixels
    np.testing.assert_array_equal(got, indices)


def test_messages_quote_only_standard_codes() -> None:
    odd = make_dicom(gradient(N, N), photometric="DOE JOHN 19450317")
    with pytest.raises(ImageRejected) as err:
        decode(odd)
    assert "DOE" not in err.value.message and "1945" not in err.value.message
    with pytest.raises(ImageRejected) as err:
        decode(make_dicom(gradient(N, N), photometric="YBR_FULL"))
    assert "'YBR_FULL'" in err.value.message


@pytest.mark.parametrize(
    ("syntax", "encapsulated"),
    [
        ("1.2.840.113619.5.2", False),  # GE private Implicit VR Big Endian (DLX)
        ("1.3.46.670589.33.1.4.1", True),  # Philips private JPEG
        ("1.2.840.10008.1.2.8.1", True),  # Deflated Image Frame Compression: newer than pydicom
    ],
)
def test_unknown_transfer_syntax_is_unsupported_not_malformed(syntax: str, encapsulated: bool):
    """A well-formed file in a transfer syntax pydicom does not know was quarantined as
    decode_error "malformed dicom (ValueError)": UID.is_compressed raises on such a UID."""
    import pydicom
    from pydicom.encaps import encapsulate

    # pydicom refuses to write an unknown standard syntax: write a private stand-in of the
    # same length and put the real UID into the bytes
    stand_in = syntax.replace("1.2.840.10008.", "1.2.840.99999.")
    ds = pydicom.dcmread(io.BytesIO(make_dicom(gradient(N, N))))
    ds.file_meta.TransferSyntaxUID = stand_in
    if encapsulated:
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + bytes(60)])
        ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf)
    data = buf.getvalue().replace(stand_in.encode(), syntax.encode())  # same length
    with pytest.raises(ImageRejected) as err:
        decode(data)
    assert err.value.reason == "unsupported_transfer_syntax"
    assert "<non-standard value>" in err.value.message


def test_native_ybr_full_422_is_not_called_truncated() -> None:
    import pydicom

    rgb = np.stack([gradient(N, N, bits=8)] * 3, axis=-1)
    ds = pydicom.dcmread(io.BytesIO(make_dicom(rgb, bits=8, photometric="RGB")))
    # 4:2:2 stores Y0 Y1 Cb Cr per pixel pair; a grey image has Cb = Cr = 128
    grey = rgb[..., 0].reshape(N, N // 2, 2)
    pairs = np.concatenate([grey, np.full((N, N // 2, 2), 128, np.uint8)], axis=-1)
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = pairs.tobytes()
    out = io.BytesIO()
    ds.save_as(out)
    got = decode(out.getvalue()).pixels.astype(int)
    assert np.abs(got - rgb[..., 0].astype(int)).max() <= 1


def test_truncated_png_and_junk(nih_dir) -> None:
    with pytest.raises(ImageRejected) as err:
        decode(_truncated_png(nih_dir))
    assert err.value.reason in ("truncated", "decode_error")
    for junk in (zlib.compress(b"x" * 1000), b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"\x08\x00"):
        with pytest.raises(ImageRejected):
            decode(junk)


# --- de-identification ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "spacing"),
    [
        ({"PixelSpacing": [0.2, 0.1]}, 0.2),  # row spacing
        ({"PixelSpacing": None, "ImagerPixelSpacing": [0.15, 0.15]}, 0.15),
        ({"PixelSpacing": [0.0, 0.1], "ImagerPixelSpacing": [0.3, 0.3]}, 0.3),  # damaged
        ({"PixelSpacing": 0.143}, None),  # one value says neither axis
        ({"PixelSpacing": "text"}, None),  # '12' under a text VR was read as 1 mm
        ({"PixelSpacing": [150.0, 150.0]}, None),  # not a radiograph's
    ],
)
def test_meta_pixel_spacing_is_the_row_spacing_of_a_usable_pair(extra, spacing) -> None:
    if extra.get("PixelSpacing") == "text":
        import pydicom
        from pydicom.dataelem import DataElement

        ds = pydicom.dcmread(io.BytesIO(make_dicom(gradient(N, N))))
        ds["PixelSpacing"] = DataElement(0x00280030, "LO", "12")
        buf = io.BytesIO()
        ds.save_as(buf)
        data = buf.getvalue()
    else:
        data = make_dicom(gradient(N, N), extra=extra)
    got = decode(data).meta["pixel_spacing_mm"]
    assert got == (pytest.approx(spacing) if spacing else None)


def test_meta_is_the_allow_list_and_holds_no_identifiers() -> None:
    data = make_dicom(gradient(N, N))
    meta = decode(data, source_name="/archive/DOE^JOHN_MARKER/1.dcm").meta
    assert tuple(meta) == META_FIELDS
    metadata_columns = [
        n
        for n in SHARD_SCHEMA.names
        if n not in ("pixels", "height", "width", "dtype", "source_path")
    ]
    assert sorted(metadata_columns) == sorted(META_FIELDS)
    hashed = ("patient_pid", "study_pid", "series_pid", "instance_pid", "source_hash")
    # the pseudonyms of fresh UIDs held "1945" in 6 of 3,000 runs: the hashed fields are checked
    # to be hex, the others for the markers
    assert all(set(meta[k]) <= set("0123456789abcdef") for k in hashed)
    text = repr({k: v for k, v in meta.items() if k not in hashed})
    for marker in [*MARKER_STRINGS, "DOE", "JOHN", "1945"]:
        assert marker not in text
    assert meta["sex"] == "F" and meta["age_years"] == 45 and meta["view_position"] == "PA"
    assert meta["modality"] == "DX" and meta["manufacturer"] == "OTHER"  # no vendor known
    assert meta["pixel_spacing_mm"] == pytest.approx(0.143)
    assert all(len(meta[k]) == 32 for k in hashed)
    pa.Table.from_pylist([meta])  # arrow-compatible values


def test_pseudonyms_are_keyed_and_stable() -> None:
    data = make_dicom(gradient(N, N))
    a = decode_image(data, size=N, secret=b"k1" * 16).meta
    b = decode_image(data, size=N, secret=b"k1" * 16).meta
    c = decode_image(data, size=N, secret=b"k2" * 16).meta
    assert a["patient_pid"] == b["patient_pid"] != c["patient_pid"]
    assert a["patient_pid"] != a["study_pid"]
    other = decode(make_dicom(gradient(N, N))).meta  # same PatientID, new UIDs
    assert other["patient_pid"] == decode(data).meta["patient_pid"]
    assert other["study_pid"] != decode(data).meta["study_pid"]


# values pydicom's reading validation finds wrong, as older archives hold them
_INVALID_VALUES = {
    # leading-zero UID components
    "StudyInstanceUID": "1.2.840.0113654.19700317.1111",
    "SeriesInstanceUID": "1.2.840.0113654.19700317.2222",
    "SOPInstanceUID": "1.2.840.0113654.19700317.3333",
    "PatientID": "MARKER_PID_LONG_" + "7" * 60,  # an LO is at most 64 characters
}


def _said(caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder) -> list[str]:
    return [r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn]


def _with_invalid_values() -> bytes:
    from pydicom import config

    with config.disable_value_validation():  # pydicom would not write them otherwise
        return make_dicom(gradient(N, N), extra=_INVALID_VALUES)


def test_values_pydicom_finds_invalid_are_read_without_reaching_logs(caplog, recwarn) -> None:
    """pydicom's reading validation warns and logs what it finds wrong in a value it reads,
    a UID quoted whole, from inside the decoder into Ray worker logs, the ingest CLI's output
    and the API's server logs. Nothing is said; the pseudonyms are the HMAC of the text as
    written."""
    data = _with_invalid_values()
    caplog.clear()
    recwarn.clear()
    caplog.set_level("DEBUG")
    meta = decode(data).meta
    said = _said(caplog, recwarn)
    assert not [line for line in said if "0113654" in line or "VR" in line], said
    for domain, key in zip(
        ("study", "series", "instance"),
        ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
        strict=True,
    ):
        assert meta[f"{domain}_pid"] == keyed_hash(SECRET, domain, _INVALID_VALUES[key])
    assert meta["patient_pid"] == keyed_hash(SECRET, "patient", _INVALID_VALUES["PatientID"])


def test_a_header_cut_by_a_damaged_length_reaches_no_log(caplog, recwarn) -> None:
    """A damaged length of the file meta's Transfer Syntax UID made pydicom read the next
    kilobyte of the header as that UID, then warn and log it: the patient's name, ID and
    birth date, the institution, the accession number, in plain text."""
    data = bytearray(make_dicom(gradient(N, N)))
    at = data.index(b"\x02\x00\x10\x00UI")  # (0002,0010) UI, its 2-byte length after
    data[at + 6 : at + 8] = (1024).to_bytes(2, "little")
    caplog.clear()
    recwarn.clear()
    caplog.set_level("DEBUG")
    try:
        decode(bytes(data))
    except ImageRejected as err:
        assert "MARKER" not in str(err)
    said = _said(caplog, recwarn)
    assert not [line for line in said if any(v in line for v in MARKER_STRINGS)], said


@pytest.mark.parametrize(
    "charset",
    [
        "ISO_IR 100 DOE^JOHN",  # free text after the term: unknown
        "ISO 2022 IR 6\\DOE^JOHN",  # an unknown code extension
        "ISO_IR 192\\DOE^JOHN",  # a stand-alone set with an extension: "ignoring: DOE^JOHN"
    ],
)
def test_a_specific_character_set_pydicom_cannot_use_reaches_no_log(
    charset: str, caplog, recwarn
) -> None:
    """pydicom's charset look-up warns and logs the (0008,0005) value it cannot use, three
    times per file and whatever the validation mode: ``Unknown encoding 'ISO_IR 100
    DOE^JOHN'``. One line without the value is said instead, once per file; threads decoding
    at once say nothing either, and pydicom still warns the process's own reads."""
    from concurrent.futures import ThreadPoolExecutor

    from dicom_factory import MARKERS
    from pydicom import config
    from pydicom.charset import convert_encodings

    with config.disable_value_validation():  # pydicom would not write the value otherwise
        data = make_dicom(gradient(N, N), extra={"SpecificCharacterSet": charset})
    caplog.clear()
    recwarn.clear()
    caplog.set_level("DEBUG")
    meta = decode(data).meta
    said = _said(caplog, recwarn)
    assert not [line for line in said if "DOE" in line or "JOHN" in line], said
    assert [r.name for r in caplog.records if "Specific Character Set" in r.getMessage()] == [
        "radjepa.imaging.value_validation"
    ]
    assert meta["patient_pid"] == keyed_hash(SECRET, "patient", MARKERS["PatientID"])
    caplog.clear()
    recwarn.clear()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: decode(data), range(8)))
    said = _said(caplog, recwarn)
    assert not [line for line in said if "DOE" in line or "JOHN" in line], said
    with pytest.warns(UserWarning, match="Unknown encoding 'DOE JANE'"):
        convert_encodings(["DOE JANE"])  # not inside the decoder: pydicom's lines as they are


def test_the_callers_pydicom_validation_mode_is_kept_and_not_applied_to_decoding() -> None:
    """The decoder reads with validation off whatever the process set (a host that reads its
    own files strictly still gets every image decoded), and leaves the setting as it found it,
    also when decodes run in several threads at once (the API's request threads)."""
    from concurrent.futures import ThreadPoolExecutor

    from pydicom import config

    data = _with_invalid_values()
    uid = _INVALID_VALUES["SOPInstanceUID"]
    before = config.settings._reading_validation_mode
    try:
        config.settings.reading_validation_mode = config.RAISE
        # RAISE made a leading-zero UID a decode_error: the image was lost to quarantine
        assert decode(data).meta["instance_pid"] == keyed_hash(SECRET, "instance", uid)
        assert config.settings.reading_validation_mode == config.RAISE
        with ThreadPoolExecutor(4) as pool:
            metas = list(pool.map(lambda _: decode(data).meta, range(16)))
        assert len({m["study_pid"] for m in metas}) == 1
        assert config.settings.reading_validation_mode == config.RAISE
    finally:
        config.settings._reading_validation_mode = before


@pytest.mark.parametrize(
    ("value", "years"),
    [
        ("045Y", 45),
        ("006M", 0),
        ("030M", 2),
        ("010W", 0),
        ("003D", 0),
        ("095Y", 90),
        ("120Y", 90),
        ("45", None),
        ("", None),
        (None, None),
        ("MARKER", None),
    ],
)
def test_age_from_patient_age_only(value, years) -> None:
    assert age_years(value) == years


def test_no_age_from_birth_date() -> None:
    data = make_dicom(gradient(N, N), drop=("PatientAge",))
    assert decode(data).meta["age_years"] is None  # PatientBirthDate is present but never read


def test_resolve_secret(monkeypatch, caplog) -> None:
    monkeypatch.setenv("RADJEPA_TEST_SECRET", "a-long-enough-test-secret")
    with caplog.at_level("WARNING", logger="radjepa.imaging.deid"):
        assert resolve_secret("RADJEPA_TEST_SECRET") == b"a-long-enough-test-secret"
    assert not caplog.records
    monkeypatch.setenv("RADJEPA_TEST_SECRET", "a-long-enough-test-secret\n")  # a mounted file
    with caplog.at_level("WARNING", logger="radjepa.imaging.deid"):
        assert resolve_secret("RADJEPA_TEST_SECRET") == b"a-long-enough-test-secret\n"
    assert "whitespace" in caplog.text and "a-long-enough" not in caplog.text
    monkeypatch.delenv("RADJEPA_TEST_SECRET")
    # unset: the public development key only when the config opts in, never as a fallback
    with pytest.raises(DevelopmentKeyRefused) as refused:
        resolve_secret("RADJEPA_TEST_SECRET")
    assert "\n" not in str(refused.value)
    assert "RADJEPA_TEST_SECRET is not set" in str(refused.value)
    assert "ingest.allow_development_key=true" in str(refused.value)
    with caplog.at_level("WARNING", logger="radjepa.imaging.deid"):
        assert resolve_secret("RADJEPA_TEST_SECRET", allow_development_key=True) == DEV_SECRET
    assert "PUBLIC development key" in caplog.text
    # a short key: the fingerprint every destination records confirms a guess at it offline
    monkeypatch.setenv("RADJEPA_TEST_SECRET", "StMarys2024")
    caplog.clear()
    with caplog.at_level("WARNING", logger="radjepa.imaging.deid"):
        assert resolve_secret("RADJEPA_TEST_SECRET") == b"StMarys2024"
    assert "weakly keyed (the key fingerprint a destination records confirms" in caplog.text
    assert "StMarys" not in caplog.text


def test_a_secret_that_is_not_utf8_text_is_refused_in_one_line(monkeypatch) -> None:
    # the bytes 0xff 0xfe reach os.environ as surrogates: encoding them raised UnicodeEncodeError,
    # a traceback from ingest, and from a Ray task after Ray and Serve had started for serve
    monkeypatch.setenv("RADJEPA_TEST_SECRET", "\udcff\udcfe-rest-of-a-long-key")
    with pytest.raises(SecretRefused) as refused:
        resolve_secret("RADJEPA_TEST_SECRET", allow_development_key=True)
    assert str(refused.value).startswith("RADJEPA_TEST_SECRET is not UTF-8 text")
    assert "\n" not in str(refused.value) and "rest-of-a-long-key" not in str(refused.value)


def test_bad_arguments_fail_clearly() -> None:
    with pytest.raises(ValueError, match="dtype"):
        decode_image(b"x", secret=SECRET, dtype="float32")
    with pytest.raises(TypeError):
        decode_image("not bytes", secret=SECRET)  # type: ignore[arg-type]


def test_corrupted_bytes_only_ever_raise_image_rejected() -> None:
    """Random byte flips and cuts (incl. ones that make Rust codecs panic) are bad input."""
    rng = np.random.default_rng(0)
    px = gradient(32, 32, bits=8)
    bases = [
        make_dicom(px, bits=8),
        make_dicom(px, bits=8, transfer_syntax=RLELossless),
        make_dicom(px, bits=8, transfer_syntax=JPEG2000Lossless),
        make_dicom(px, bits=8, raw=True),
        make_dicom(px, bits=8, transfer_syntax=JPEGBaseline8Bit),
    ]
    outcomes = Counter()
    for i in range(400):
        data = bytearray(bases[i % len(bases)])
        for _ in range(int(rng.integers(1, 6))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        if i % 5 == 0:
            data = data[: int(rng.integers(1, len(data)))]
        try:
            decode_image(bytes(data), size=16, secret=SECRET)
            outcomes["ok"] += 1
        except ImageRejected as err:
            outcomes[err.reason] += 1
    assert set(outcomes) <= REASONS | {"ok"}
    assert outcomes["ok"] > 0 and sum(outcomes.values()) == 400


@pytest.mark.parametrize(
    ("shape", "reason"),
    [((1, 1), "too_small"), ((10, 9000), "too_small"), ((100, 401), "extreme_aspect")],
)
def test_degenerate_proportions_are_refused_and_radiograph_shapes_kept(shape, reason) -> None:
    # a 1x1 placeholder and a 9000x10 strip were stretched or centre-cropped into a square of
    # noise and stored (or embedded by the API) like any radiograph
    def ramp(shape: tuple[int, int]) -> np.ndarray:
        return (np.indices(shape).sum(axis=0) % 256).astype(np.uint8)

    with pytest.raises(ImageRejected) as err:
        decode(_png(ramp(shape)))
    assert err.value.reason == reason
    for ok in [(16, 16), (100, 400), (3000, 1000), (2500, 2048)]:  # full spine is about 3:1
        assert decode(_png(ramp(ok))).pixels.shape == (N, N)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _png(np.full((64, 64), 128, np.uint8)),  # a blank secondary capture
        lambda: make_dicom(np.full((N, N), 300, np.uint16)),  # a flat detector read-out
        lambda: make_dicom(gradient(N, N), extra={"RescaleSlope": "0", "RescaleIntercept": "100"}),
    ],
)
def test_a_uniform_image_is_blank_not_an_all_black_radiograph(make) -> None:
    # stored as ok, each was one more uniform square in training and in the similar-case index
    with pytest.raises(ImageRejected) as err:
        decode(make())
    assert err.value.reason == "blank"
    one = np.zeros((N, N), np.uint16)
    one[N // 2, N // 2] = 4000  # a single bright pixel is not blank
    assert decode(make_dicom(one)).pixels.max() > 0


def _banded(rows: int, cols: int, band_cols: int) -> np.ndarray:
    """A 12-bit image: a bright band over the first ``band_cols`` columns, a dark ramp down the
    rows elsewhere."""
    img = np.repeat(200 + 10 * np.arange(rows, dtype=np.uint16)[:, None] % 1000, cols, axis=1)
    img[:, :band_cols] = 3800
    return img


@pytest.mark.parametrize(
    "proportions",
    [
        {"PixelSpacing": [0.2, 0.1]},
        {"ImagerPixelSpacing": [0.3, 0.15], "PixelSpacing": None},
        {"NominalScannedPixelSpacing": [0.2, 0.1], "PixelSpacing": None},  # a digitised film
        {"PixelAspectRatio": [2, 1], "PixelSpacing": None},
        {"PixelSpacing": [0.0, 0.1], "ImagerPixelSpacing": [0.2, 0.1]},  # damaged: the next one
    ],
)
def test_oblong_pixels_are_stored_square_in_the_patient(proportions) -> None:
    # 100x200 pixels twice as tall as wide: a square in the patient, stored whole. Taken as
    # square pixels, the centre 100x100 was kept: the band over the left 20% was cut off and
    # what was left stretched to twice its width
    drop = tuple(k for k, v in proportions.items() if v is None)
    extra = {k: v for k, v in proportions.items() if v is not None}
    data = make_dicom(_banded(100, 200, 40), window=(2000, 4000), drop=drop, extra=extra)
    out = decode(data)
    assert out.pixel_aspect == 2.0 and out.pixels.shape == (N, N)
    bright = out.pixels.mean(axis=0) > 128
    assert bright[: int(0.2 * N) - 1].all() and not bright[int(0.2 * N) + 1 :].any()
    assert out.meta["orig_height"] == 100 and out.meta["orig_width"] == 200
    square = decode(make_dicom(_banded(100, 200, 40), window=(2000, 4000)))
    assert square.pixel_aspect == 1.0 and not (square.pixels.mean(axis=0) > 128).any()


@pytest.mark.parametrize(
    "spacing",
    [[0.139, 0.1390001], [1.0, 0.1], [-0.2, 0.1], "unparsable", [0.2], "text"],
    ids=["rounding", "absurd", "negative", "unparsable", "one-value", "text"],
)
def test_pixel_proportions_that_mean_nothing_leave_pixels_square(spacing) -> None:
    pixels = _banded(100, 200, 40)
    plain = decode(make_dicom(pixels, window=(2000, 4000), drop=("PixelSpacing",)))
    if spacing == "unparsable":  # written as bytes: pydicom refuses to set such a value
        data = make_dicom(pixels, window=(2000, 4000), extra={"PixelSpacing": [0.2, 0.1]})
        assert data.count(b"0.2\\0.1 ") == 1
        data = data.replace(b"0.2\\0.1 ", b"x.2\\0.1 ")
    elif spacing == "text":  # one value under a text VR: '12' was read as the pair (1, 2)
        import pydicom
        from pydicom.dataelem import DataElement

        ds = pydicom.dcmread(io.BytesIO(make_dicom(pixels, window=(2000, 4000))))
        ds["PixelSpacing"] = DataElement(0x00280030, "LO", "12")
        buf = io.BytesIO()
        ds.save_as(buf)
        data = buf.getvalue()
    else:
        data = make_dicom(pixels, window=(2000, 4000), extra={"PixelSpacing": spacing})
    out = decode(data)
    assert out.pixel_aspect == 1.0
    np.testing.assert_array_equal(out.pixels, plain.pixels)


def test_proportions_are_judged_in_the_patient() -> None:
    # 100x600 pixels three times as tall as wide is 300x600 in the patient (2:1): decoded;
    # 200x100 pixels four times as tall as wide is 800x100 (8:1): refused
    wide = decode(
        make_dicom(_banded(100, 600, 40), window=(2000, 4000), extra={"PixelSpacing": [0.3, 0.1]})
    )
    assert wide.pixel_aspect == pytest.approx(3.0)
    with pytest.raises(ImageRejected) as err:
        decode(
            make_dicom(
                _banded(200, 100, 40),
                window=(2000, 4000),
                drop=("PixelSpacing",),
                extra={"PixelAspectRatio": [4, 1]},
            )
        )
    assert err.value.reason == "extreme_aspect" and "of 4:1 (height:width)" in str(err.value)


def _with_sbit(png: bytes, bits: int) -> bytes:
    """A PNG with an sBIT chunk after its header (Pillow writes none)."""
    head = 8 + 12 + 13  # signature, then the IHDR chunk
    body = b"sBIT" + bytes([bits])
    chunk = len(body[4:]).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
    return png[:head] + chunk + png[head:]


def test_a_16_bit_png_is_shown_by_its_declared_depth_or_its_percentile_window() -> None:
    # 12-bit detector values written into a 16-bit PNG were scaled by 65535: stored at 0..16,
    # almost black, and taken for training and the index without a word
    ramp12 = np.tile(np.linspace(0, 4095, N).round().astype(np.uint16), (N, 1))
    buf = io.BytesIO()
    Image.fromarray(ramp12).save(buf, format="PNG")
    out = decode(buf.getvalue())  # no sBIT: the depth is unknown, so the percentile window
    assert np.array_equal(out.pixels, stored(percentile_display(ramp12.astype(np.float64))))
    assert len(np.unique(out.pixels)) == N
    # sBIT 12 as the PNG specification writes it: samples scaled up to 16 bits, so by 65535
    scaled = (ramp12.astype(np.uint32) * 65535 // 4095).astype(np.uint16)
    buf16 = io.BytesIO()
    Image.fromarray(scaled).save(buf16, format="PNG")
    assert np.array_equal(decode(_with_sbit(buf16.getvalue(), 12)).pixels, stored(scaled / 65535.0))
    # a writer that declared 12 bits and left them unscaled: by 4095, not almost black
    assert np.array_equal(decode(_with_sbit(buf.getvalue(), 12)).pixels, stored(ramp12 / 4095.0))
    dark = decode(_with_sbit(buf.getvalue(), 16)).pixels  # 16 bits declared: as they are
    assert np.array_equal(dark, stored(ramp12 / 65535.0)) and dark.max() == 16


def test_a_jpeg_s_exif_orientation_is_applied_as_viewers_do() -> None:
    # stored as read, a photo of a film taken with the phone turned lay on its side
    upright = np.zeros((128, 64), np.uint8)
    upright[:, :32] = 255  # bright left half
    turned = np.ascontiguousarray(np.rot90(upright, 1))  # the pixels as a turned camera stores
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    buf = io.BytesIO()
    Image.fromarray(turned).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    out = decode(buf.getvalue(), size=64)
    assert (out.meta["orig_height"], out.meta["orig_width"]) == (128, 64)
    assert out.pixels[:, :8].mean() > 200 and out.pixels[:, -8:].mean() < 40


@pytest.mark.parametrize("slope", ["", None])
def test_an_empty_or_missing_rescale_slope_is_one_and_an_intercept_alone_applies(slope) -> None:
    # pydicom's modality step needed both: an empty Slope was "malformed dicom (TypeError)", an
    # Intercept alone was ignored and a window in rescaled units fell on stored values
    px = gradient(bits=12)
    window = (1000.0 - 1024.0, 600.0)
    want = decode(make_dicom(px, rescale=(1.0, -1024.0), window=window)).pixels
    extra = {"RescaleIntercept": "-1024"} | ({"RescaleSlope": slope} if slope is not None else {})
    got = decode(make_dicom(px, window=window, extra=extra)).pixels
    assert np.array_equal(got, want)


def test_a_partial_range_ycbcr_jpeg_is_its_luma_and_other_colour_codes_are_named() -> None:
    # a JPEG labelled YBR_PARTIAL_422 (retired, still in archives) came back as stored YCbCr and
    # was read as RGB: mid-grey chroma squeezed it into about a quarter of the range
    ramp = np.tile(np.linspace(16, 235, N).round().astype(np.uint8), (N, 1))
    rgb = np.repeat(ramp[..., None], 3, axis=2)
    out = decode(make_dicom(rgb, bits=8, photometric="YBR_PARTIAL_422",
                            transfer_syntax=JPEGBaseline8Bit))  # fmt: skip
    want = stored(np.clip((ramp.astype(np.float64) - 16) / 219, 0, 1))
    assert np.abs(out.pixels.astype(int) - want.astype(int)).max() <= 3
    assert out.pixels.min() <= 3 and out.pixels.max() >= 252
    refused = {
        ("HSV", ExplicitVRLittleEndian): "with 3 samples is not a colour model decoded here",
        ("YBR_ICT", JPEGBaseline8Bit): "YBR_ICT belongs to JPEG 2000 streams",
        ("YBR_PARTIAL_422", ExplicitVRLittleEndian): "YBR_PARTIAL_422 in native",
    }
    for (photometric, syntax), says in refused.items():
        with pytest.raises(ImageRejected, match="unsupported_photometric") as err:
            decode(make_dicom(rgb, bits=8, photometric=photometric, transfer_syntax=syntax))
        assert says in str(err.value)


def test_exif_text_never_reaches_a_debug_log_and_a_listing_error_names_no_folder(caplog) -> None:
    # Pillow logs each EXIF tag's value at DEBUG as it parses them (for the orientation): a
    # name in ImageDescription reached the log of a worker run at DEBUG
    import logging

    from radjepa.ingest.sources import _reason

    exif = Image.Exif()
    exif[0x010E] = "MARKER_NAME_7f3a^JANE MRN 12345"  # ImageDescription
    buf = io.BytesIO()
    Image.fromarray(gradient(N, N, bits=8)).save(buf, format="JPEG", exif=exif.tobytes())
    with caplog.at_level(logging.DEBUG):
        decode(buf.getvalue())
    assert "MARKER_NAME" not in caplog.text
    # the OS names the subfolder a listing failed on, and folder names may be patients'
    said = _reason(PermissionError(13, "Permission denied", "/exports/MARKER_NAME_7f3a"))
    assert said == "Permission denied (in it or a folder below it)"
    # an object store's message names what it was given and what went wrong: kept, redacted
    remote = OSError("When listing objects under key 'raw' in bucket 'b': AWS Error ACCESS_DENIED")
    assert _reason(remote) == str(remote)
    assert "***" in _reason(OSError("cannot open s3://AKIAX:s3cr3t@bucket/raw"))


def test_raw_detector_data_is_refused_only_when_asked() -> None:
    # a DX "for processing" (raw data for CAD) was percentile-windowed into a flat image and
    # stored beside the processed twin of the same exposure
    px = gradient(N, N)
    by_class = make_dicom(px, extra={"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1.1"})
    by_intent = make_dicom(px, extra={"PresentationIntentType": "FOR PROCESSING"})
    for data in (by_class, by_intent):
        with pytest.raises(ImageRejected, match="for_processing: a radiograph's raw detector"):
            decode(data, reject_for_processing=True)
        assert decode(data).pixels.shape == (N, N)  # the API, and ingest with `keep`
    shown = make_dicom(px, extra={"PresentationIntentType": "FOR PRESENTATION"})
    assert decode(shown, reject_for_processing=True).pixels.shape == (N, N)


@pytest.mark.parametrize(
    ("written", "kept"),
    [
        ("GE MEDICAL SYSTEMS", "GE"),
        ("Philips Medical Systems", "PHILIPS"),
        ("Fuji Photo Film Co., ltd.", "FUJIFILM"),
        ("TOSHIBA_MEC", "CANON"),
        ("KODAK", "CARESTREAM"),
        ("KonicaMinolta", "KONICA MINOLTA"),
        ("DRTECH Corp", "DRTECH"),
        ("GEHC", "GE"),
        ("St Marys Hospital John Doe 12345", "OTHER"),
        ("GENERIC SCANNER", "OTHER"),
    ],
)
def test_manufacturer_is_a_known_vendor_or_other_never_the_text_written(written, kept):
    # free text by VR: a site's tools write the site's name there, or a patient's; it went into
    # every shard as written (plain characters only)
    from radjepa.imaging.deid import dicom_meta
    from radjepa.imaging.dicom import read_dataset

    ds = read_dataset(make_dicom(gradient(N, N)))
    ds.Manufacturer = written
    assert dicom_meta(ds, b"k" * 32, None)["manufacturer"] == kept

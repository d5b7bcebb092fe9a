"""Every transfer syntax and pixel encoding a chest X-ray archive holds, through the ingest decoder.

Each case is real DICOM bytes (written by pydicom, a codec, the JPEG Lossless encoder in
``jpeg_lossless``, or one of the files pydicom ships with its wheel) decoded by
:class:`radjepa.ingest.decoding.FileDecoder`, and compared with a display computed here with
numpy from the known source array: a wrongly inverted or windowed image stored as ok is the
failure that matters most, so nothing is compared only with the decoder's own output.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pydicom
import pytest
from dicom_factory import gradient, make_dicom
from jpeg_lossless import encode_lossless
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
)

from radjepa.imaging.codestream import declared_size
from radjepa.ingest.decoding import FileDecoder

N = 64  # square sources stored at N: no resampling, so values compare exactly


def ingest(data: bytes, size: int = N) -> dict:
    """One file through the ingest decoder (as a Ray Data actor runs it), as its result row."""
    settings = {"size": size, "dtype": "uint8", "window_percentiles": (0.5, 99.5)}
    decoder = FileDecoder(settings, b"test-secret-0123456789abcdef", set(), False)
    batch = pa.table(
        {"name": ["f.dcm"], "data": [data], "size_bytes": [len(data)], "read_error": [None]}
    )
    return decoder(batch).to_pylist()[0]


def stored_pixels(data: bytes, size: int = N) -> np.ndarray:
    row = ingest(data, size)
    assert row["status"] == "ok", (row["reason"], row["message"])
    return np.frombuffer(row["pixels"], np.uint8).reshape(row["height"], row["width"])


def quarantined(data: bytes) -> str:
    row = ingest(data)
    assert row["status"] == "quarantined"
    return row["reason"]


def as_stored(display: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(display, 0, 1) * 255).astype(np.uint8)


def percentile(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    lo, hi = np.percentile(v, (0.5, 99.5))
    return np.clip((v - lo) / (hi - lo), 0, 1)


def linear(values: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window onto [0, 1]."""
    return np.clip((values.astype(np.float64) - (c - 0.5)) / (w - 1) + 0.5, 0, 1)


def assert_display(data: bytes, expected: np.ndarray, tol: int = 1) -> None:
    got = stored_pixels(data, expected.shape[0]).astype(int)
    diff = np.abs(got - as_stored(expected).astype(int))
    assert diff.max() <= tol, f"max error {diff.max()}"


def edited(data: bytes, change) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    change(ds)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def source(bits: int, signed: bool = False) -> np.ndarray:
    px = gradient(N, N, bits=bits, seed=bits)
    if not signed:
        return px
    return (px.astype(np.int32) - 2 ** (bits - 1)).astype(np.int8 if bits == 8 else np.int16)


# --- JPEG Lossless (process 14): no encoder is installed, so tests/jpeg_lossless.py writes it --


@pytest.mark.parametrize(
    ("bits", "signed"), [(8, False), (12, False), (16, False), (12, True), (16, True)]
)
@pytest.mark.parametrize(
    ("syntax", "selection"),
    [(JPEGLosslessSV1, 1), (JPEGLossless, 1), (JPEGLossless, 4), (JPEGLossless, 7)],
)
def test_jpeg_lossless_is_exact(syntax: str, selection: int, bits: int, signed: bool) -> None:
    px = source(bits, signed)

    def compress(ds):
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([encode_lossless(px, bits, selection)])
        ds["PixelData"].VR = "OB"

    data = edited(make_dicom(px, bits=bits, signed=signed), compress)
    assert_display(data, percentile(px), tol=0)


# --- pydicom's bundled real files: JPEG-LS, JPEG 2000, RLE, byte orders, 12-bit JPEG ----------


def _bundled(name: str) -> bytes:
    path = get_testdata_file(name, download=False)  # in pydicom's wheel; never downloaded
    assert path is not None, f"{name} is not in this pydicom install"
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_RLE.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
    ],
)
def test_bundled_signed_mr_in_every_encoding(name: str) -> None:
    """One signed 16-bit image (window 600/1600) in seven encodings, against its raw bytes."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False))
    raw = np.frombuffer(ds.PixelData, "<i2").reshape(ds.Rows, ds.Columns)
    assert_display(_bundled(name), linear(raw, 600, 1600), tol=0)


def test_jpeg_extended_12_bit_keeps_its_12_bits() -> None:
    """JPGExtended.dcm (1.2.840.10008.1.2.4.51, 12-bit, 1024x256): no second 12-bit decoder
    exists here, so the check is that the stored image is the numpy window of the codec's
    values (which span more than 8 bits) and not, e.g., an 8-bit truncation."""
    from pydicom.pixels import pixel_array

    from radjepa.imaging.resize import resize_center_crop

    path = get_testdata_file("JPGExtended.dcm", download=False)
    values = pixel_array(path)
    assert values.max() > 255 and values.max() < 4096
    expected = resize_center_crop(percentile(values).astype(np.float32), 256)
    assert_display(_bundled("JPGExtended.dcm"), expected)


# --- encapsulation: Basic Offset Table, fragments, Extended Offset Table ----------------------


def _fragmented(stream: bytes, parts: int, bot: bool) -> bytes:
    """Pixel Data value: one frame split into ``parts`` fragments, with or without a BOT."""

    def item(b: bytes) -> bytes:
        b += b"\x00" * (len(b) % 2)
        return b"\xfe\xff\x00\xe0" + len(b).to_bytes(4, "little") + b

    k = len(stream) // parts & ~1  # fragments have even lengths: only the last is padded
    pieces = [stream[i * k : (i + 1) * k if i < parts - 1 else None] for i in range(parts)]
    offsets = (0).to_bytes(4, "little") if bot else b""
    return item(offsets) + b"".join(item(p) for p in pieces) + b"\xfe\xff\xdd\xe0" + bytes(4)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLosslessSV1])
@pytest.mark.parametrize("layout", ["fragments_bot", "fragments_no_bot", "extended_offsets"])
def test_encapsulated_fragments_and_offset_tables(syntax: str, layout: str) -> None:
    px = source(12)
    data = make_dicom(px, bits=12, transfer_syntax=syntax)
    frame = next(generate_frames(pydicom.dcmread(io.BytesIO(data)).PixelData, number_of_frames=1))

    def refragment(ds):
        if layout == "extended_offsets":
            ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = (
                encapsulate_extended([frame])
            )
        else:
            ds.PixelData = _fragmented(frame, 3, bot=layout == "fragments_bot")
        ds["PixelData"].VR = "OB"

    assert_display(edited(data, refragment), percentile(px), tol=0)


# --- Bits Stored < Bits Allocated with garbage in the unused high bits -------------------------


@pytest.mark.parametrize("encoding", ["native", "native_signed", "rle", "jpeg_lossless"])
def test_unused_high_bits_are_ignored(encoding: str) -> None:
    """Old modalities left overlay planes or junk in bits 12-15 of 12-bit pixels."""
    rng = np.random.default_rng(0)
    signed = encoding == "native_signed"
    px = source(12, signed)
    junk = rng.integers(0, 16, px.shape, dtype=np.uint16) << 12
    dirty = ((px.view(np.uint16) & 0x0FFF) | junk).astype(np.uint16)

    def as_12_bit(ds):
        ds.BitsStored, ds.HighBit = 12, 11
        if encoding == "jpeg_lossless":
            ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
            ds.PixelData = encapsulate([encode_lossless(dirty, 16)])
            ds["PixelData"].VR = "OB"
        elif encoding != "rle":
            ds.PixelData = dirty.tobytes()

    syntax = RLELossless if encoding == "rle" else ExplicitVRLittleEndian
    base = make_dicom(dirty.view(px.dtype), bits=16, signed=signed, transfer_syntax=syntax)
    data = edited(base, as_12_bit)
    assert_display(data, percentile(px), tol=0)


# --- LUT semantics the contract table does not cover -------------------------------------------


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("bits", [12, 16])
def test_signed_rescaled_windowed(bits: int, photometric: str) -> None:
    """Stored -> rescale -> window in rescaled units -> MONOCHROME1 inverted after the window."""
    px = source(bits, signed=True)
    data = make_dicom(
        px,
        bits=bits,
        signed=True,
        rescale=(2.0, -1024.0),
        window=(-200.0, 1500.0),
        photometric=photometric,
    )
    expected = linear(px.astype(np.float64) * 2 - 1024, -200.0, 1500.0)
    if photometric == "MONOCHROME1":
        expected = 1 - expected
    assert_display(data, expected, tol=0)


@pytest.mark.parametrize("function", ["multi_valued", "SIGMOID", "LINEAR_EXACT"])
def test_window_variants(function: str) -> None:
    px = source(12).astype(np.float64)
    if function == "multi_valued":  # alternative windows: the first is the default one
        data = make_dicom(source(12), bits=12, window=([1500, 3000], [2000, 400]))
        expected = linear(px, 1500, 2000)
    elif function == "SIGMOID":  # PS3.3 C.11.2.1.3.1
        data = make_dicom(source(12), bits=12, window=(1500, 2000), voi_function="SIGMOID")
        expected = 1 / (1 + np.exp(-4 * (px - 1500) / 2000))
    else:  # PS3.3 C.11.2.1.3.2
        data = make_dicom(source(12), bits=12, window=(1500, 2000), voi_function=function)
        expected = np.clip((px - 1500) / 2000 + 0.5, 0, 1)
    assert_display(data, expected, tol=0)


# --- file layouts ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["no_preamble", "raw_explicit_le", "raw_explicit_be"])
def test_files_without_preamble_or_file_meta(layout: str) -> None:
    px = source(12)
    if layout == "no_preamble":  # file meta present, 128-byte preamble and DICM cut off
        data = make_dicom(px, bits=12)[132:]
    else:
        little = layout == "raw_explicit_le"
        syntax = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        ds = pydicom.dcmread(io.BytesIO(make_dicom(px, bits=12, transfer_syntax=syntax)))
        del ds.file_meta
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = little, False
        write_dataset(buf, ds)
        data = buf.getvalue()
    assert_display(data, percentile(px), tol=0)


# --- colour, frames and non-integer pixels: the documented policies ----------------------------


def test_ybr_full_422_jpeg_becomes_luma() -> None:
    """A colour secondary capture (Pillow writes 4:2:2 YCbCr JPEG) is stored as its BT.601 luma."""
    rgb = np.random.default_rng(2).integers(0, 256, (N, N, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=100, subsampling=2)

    def as_jpeg(ds):
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"

    data = edited(make_dicom(rgb, bits=8, photometric="RGB"), as_jpeg)
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), np.float64)
    assert_display(data, decoded @ [0.299, 0.587, 0.114] / 255, tol=2)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEGLosslessSV1])
def test_multi_frame_is_quarantined_and_one_frame_is_kept(syntax: str) -> None:
    px = source(12)
    assert quarantined(make_dicom(px, bits=12, frames=2, transfer_syntax=syntax)) == "multi_frame"
    single = make_dicom(px, bits=12, transfer_syntax=syntax, extra={"NumberOfFrames": 1})
    assert_display(single, percentile(px), tol=0)


@pytest.mark.parametrize("keyword", ["FloatPixelData", "DoubleFloatPixelData"])
def test_float_pixel_data_is_no_pixel_data(keyword: str) -> None:
    px = source(12)

    def as_float(ds):
        del ds.PixelData
        ds.BitsAllocated = 32 if keyword == "FloatPixelData" else 64
        setattr(ds, keyword, px.astype(f"<f{ds.BitsAllocated // 8}").tobytes())

    data = edited(make_dicom(px, bits=12), as_float)
    row = ingest(data)
    assert (row["status"], row["reason"]) == ("quarantined", "no_pixel_data")
    assert row["message"] == "float pixel data is not a radiograph"


# --- the size a compressed frame's own stream declares ----------------------------------------


def _first_frame(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    return next(generate_frames(ds.PixelData, number_of_frames=1))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(make_dicom(gradient(48, 80, 8), bits=8, transfer_syntax=ts), id=str(ts))
        for ts in (JPEG2000Lossless, JPEGBaseline8Bit, JPEGLossless, JPEGLosslessSV1)
    ]
    + [
        pytest.param(_bundled(name), id=name)
        for name in (
            "MR_small_jpeg_ls_lossless.dcm",
            "MR_small_jp2klossless.dcm",
            "JPGExtended.dcm",
        )
    ],
)
def test_a_compressed_frame_declares_the_rows_and_columns_of_its_header(data: bytes) -> None:
    ds = pydicom.dcmread(io.BytesIO(data))
    assert declared_size(_first_frame(data)) == (int(ds.Rows), int(ds.Columns))


def test_a_jp2_file_declares_the_size_of_its_codestream_and_rle_declares_none() -> None:
    codestream = _first_frame(
        make_dicom(gradient(48, 80, 8), bits=8, transfer_syntax=JPEG2000Lossless)
    )

    def box(kind: bytes, payload: bytes) -> bytes:
        return (8 + len(payload)).to_bytes(4, "big") + kind + payload

    signature = box(b"jP  ", b"\r\n\x87\n")
    jp2 = signature + box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ") + box(b"jp2c", codestream)
    assert declared_size(jp2) == (48, 80)
    rle = _first_frame(make_dicom(gradient(48, 80, 8), bits=8, transfer_syntax=RLELossless))
    assert declared_size(rle) is None  # RLE holds no size: its decoder allocates Rows x Columns
    assert declared_size(b"\xff\xd8\xff\xda" + bytes(8)) is None  # scan data before any frame
    # JPEG 2000 image offsets: the decoder allocates the whole reference grid, not the image
    # (offsets of 30000 under a 256x256 image made it allocate 1.8 GB)
    shifted = bytearray(codestream)
    shifted[8:24] = b"".join(v.to_bytes(4, "big") for v in (30080, 30048, 30000, 30000))
    assert declared_size(bytes(shifted)) == (30048, 30080)


def _declaring(data: bytes, rows: int, cols: int) -> bytes:
    """``data`` with its compressed frame's header rewritten to declare rows x cols."""
    frame = bytearray(_first_frame(data))
    if frame[:2] == b"\xff\x4f":  # JPEG 2000: SIZ's Xsiz, Ysiz (offsets zero here)
        frame[8:16] = cols.to_bytes(4, "big") + rows.to_bytes(4, "big")
    else:  # JPEG: the SOF segment's lines, samples per line
        at = next(
            i for i in range(2, len(frame)) if frame[i] == 0xFF and frame[i + 1] in (0xC0, 0xC3)
        )
        frame[at + 5 : at + 9] = rows.to_bytes(2, "big") + cols.to_bytes(2, "big")

    def swap(ds):
        ds.PixelData = encapsulate([bytes(frame)])

    return edited(data, swap)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1])
def test_a_frame_declaring_another_size_than_its_header_is_refused_before_its_codec(syntax) -> None:
    # a few KB whose header said 64x64 carried a 20000x20000 stream: the codec allocated it
    # (2 GB for JPEG 2000) in an ingest worker or an API replica, and only then failed
    data = make_dicom(gradient(64, 64, 8), bits=8, transfer_syntax=syntax)
    bomb = ingest(_declaring(data, 20000, 20000))
    assert (bomb["status"], bomb["reason"]) == ("quarantined", "too_large")
    assert bomb["message"] == (
        "the compressed frame declares 20000x20000 pixels (exceeds 67108864); "
        "Rows and Columns say 64x64"
    )
    other = ingest(_declaring(data, 32, 64))
    assert (other["status"], other["reason"]) == ("quarantined", "decode_error")
    assert "declares 32x64 pixels, Rows and Columns say 64x64" in other["message"]


def _with_dnl(data: bytes, lines: int) -> bytes:
    """``data`` (one JPEG frame, a single scan) with its SOF's lines set to 0 and the number of
    lines given in a DNL segment after the scan, as T.81 allows."""
    frame = bytearray(_first_frame(data))
    at = next(i for i in range(2, len(frame)) if frame[i] == 0xFF and frame[i + 1] in (0xC0, 0xC3))
    frame[at + 5 : at + 7] = bytes(2)
    eoi = frame.rindex(b"\xff\xd9")  # the frame may end in a padding byte
    dnl = b"\xff\xdc\x00\x04" + lines.to_bytes(2, "big")
    stream = bytes(frame[:eoi]) + dnl + b"\xff\xd9"

    def swap(ds):
        ds.PixelData = encapsulate([stream])

    return edited(data, swap)


@pytest.mark.parametrize("syntax", [JPEGBaseline8Bit, JPEGLosslessSV1])
def test_a_jpeg_giving_its_lines_in_a_dnl_segment_is_size_checked_too(syntax) -> None:
    # the SOF may say 0 lines and leave them to a DNL segment after the first scan: the size
    # check read no size there and let the codec find out (65535 lines of a wide image: a GB)
    data = make_dicom(gradient(64, 64, 8), bits=8, transfer_syntax=syntax)
    assert declared_size(_first_frame(_with_dnl(data, 64))) == (64, 64)
    bomb = ingest(_with_dnl(_declaring(data, 64, 8192), 65535))
    assert (bomb["status"], bomb["reason"]) == ("quarantined", "too_large")
    assert "declares 65535x8192 pixels" in bomb["message"]
    other = ingest(_with_dnl(data, 100))
    assert (other["status"], other["reason"]) == ("quarantined", "decode_error")
    assert "declares 100x64 pixels, Rows and Columns say 64x64" in other["message"]
    # 0 lines and no DNL ending the scan: libjpeg spun without end on such a frame (an ingest
    # worker or an API decode thread lost for good); a DNL's bytes inside a comment before the
    # scan, or after another marker ended it, are not a DNL
    frame = _first_frame(data)
    sof = next(i for i in range(2, len(frame)) if frame[i] == 0xFF and frame[i + 1] in (0xC0, 0xC3))
    zeroed = bytearray(frame)
    zeroed[sof + 5 : sof + 7] = bytes(2)
    eoi = zeroed.rindex(b"\xff\xd9")
    decoy = b"\xff\xfe\x00\x08\xff\xdc\x00\x04\x00\x40"  # COM holding DNL-like bytes
    dht = zeroed.index(b"\xff\xc4")
    streams = {
        "no DNL": bytes(zeroed),
        "before the scan": bytes(zeroed[:dht]) + decoy + bytes(zeroed[dht:]),
        "after the scan": bytes(zeroed[:eoi]) + decoy + b"\xff\xdc\x00\x04\x00\x40\xff\xd9",
    }
    for name, stream in streams.items():
        assert declared_size(stream) == (0, 64), name

        def swap(ds, stream=stream):
            ds.PixelData = encapsulate([stream])

        row = ingest(edited(data, swap))
        assert (row["status"], row["reason"]) == ("quarantined", "decode_error"), name
        assert row["message"] == (
            "the compressed frame declares 0 lines and no DNL segment gives them"
        ), name


def test_an_image_cut_off_before_its_pixels_is_truncated_not_a_non_image() -> None:
    # pydicom stops without a word where the bytes end: a DX cut inside its header read as
    # "the DICOM holds no Pixel Data element (SOP class Digital X-Ray Image Storage ...)", the
    # reason of a PACS export's reports and presentation states, which users learn to ignore
    data = make_dicom(gradient(64, 64, 12))
    at = pydicom.dcmread(io.BytesIO(data))["PixelData"].file_tell
    reasons = {cut: quarantined(data[:cut]) for cut in range(200, at, 7)}
    assert set(reasons.values()) <= {"truncated", "no_pixel_data"}
    # only a cut exactly between two elements is indistinguishable from a stripped image
    assert sum(r == "truncated" for r in reasons.values()) > 0.9 * len(reasons), reasons
    row = ingest(data[: at - 100])
    assert row["message"] == (
        "the data set ends inside an element, before any Pixel Data element: the file is cut "
        "off, or not in the transfer syntax it declares"
    )
    # little-endian bytes under a big-endian label (the UIDs have the same even length)
    mislabelled = bytearray(data)
    ts = bytes(ExplicitVRLittleEndian, "ascii")
    at_ts = mislabelled.index(ts)
    mislabelled[at_ts : at_ts + len(ts)] = bytes(ExplicitVRBigEndian, "ascii")
    assert quarantined(bytes(mislabelled)) == "truncated"
    assert quarantined(make_dicom(with_pixels=False)) == "no_pixel_data"  # complete, stripped
    # complete non-images: a report and an RT structure set end in a sequence of undefined
    # length (pydicom keeps no offset for it); a plan with zero padding after its last element
    for name, padding in (("reportsi.dcm", 0), ("rtstruct.dcm", 0), ("rtplan.dcm", 8)):
        assert quarantined(_bundled(name) + bytes(padding)) == "no_pixel_data", name

"""DICOM header and pixel values at the edges of what the decoder reads: compressed files cut
inside their pixels, windows that are not numbers, a VOI LUT's first-mapped value read as SS
for an unsigned domain, 32-bit stored values beyond float32's integers. Each file is built with
pydicom (``dicom_factory``) and checked against a numpy reference of the standard's formula."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_factory import ENCODABLE, gradient, make_dicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from radjepa.imaging.decode import decode_image
from radjepa.imaging.dicom import dicom_display, read_dataset
from radjepa.imaging.errors import ImageRejected

N = 64
PERCENTILES = (0.5, 99.5)


def display(data: bytes) -> np.ndarray:
    return dicom_display(read_dataset(data), PERCENTILES)


def percentile(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    lo, hi = np.percentile(v, PERCENTILES)
    return np.clip((v - lo) / (hi - lo), 0, 1)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
@pytest.mark.parametrize("cut", ["with_preamble", "without_preamble"])
@pytest.mark.parametrize("syntax", ["rle", "j2k_lossless"])
def test_compressed_file_cut_inside_its_pixels_is_truncated(syntax: str, cut: str) -> None:
    """pydicom hands back an empty data set for these, which read as junk (not_an_image)."""
    data = make_dicom(gradient(N, N), bits=12, transfer_syntax=ENCODABLE[syntax])
    short = data[:-10] if cut == "with_preamble" else data[132:-10]
    with pytest.raises(ImageRejected) as info:
        decode_image(short, secret=b"s" * 32)
    assert info.value.reason == "truncated"
    assert "encapsulated Pixel Data ends early" in str(info.value)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS:UserWarning")
@pytest.mark.parametrize("window", [("NaN", "400"), ("2000", "inf")])
def test_non_finite_window_falls_back_to_the_percentile_window(window: tuple[str, str]) -> None:
    """A window that is not a number says nothing usable, as an absent one: it was all NaN or
    one grey (quarantined as blank)."""
    px = gradient(N, N, bits=12)
    got = display(make_dicom(px, bits=12, window=window))
    np.testing.assert_allclose(got, percentile(px), atol=1e-6)


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_voi_lut_first_value_read_as_ss_for_an_unsigned_domain(syntax: str) -> None:
    """Signed stored values, intercept +32768: the modality output is 0..65535, and the VOI
    LUT starting at 40000 has that written (by Pixel Representation) or read as SS -25536."""
    stored = np.tile(np.linspace(-32768, 32767, N).round().astype(np.int16), (N, 1))
    table = np.arange(20000) * 3
    item = Dataset()
    item.LUTDescriptor = [len(table), 40000 - 65536, 16]
    item.LUTData = table.astype("<u2").tobytes()
    item["LUTData"].VR = "OW"
    if syntax == ExplicitVRLittleEndian:
        item["LUTDescriptor"].VR = "SS"
    data = make_dicom(
        stored,
        bits=16,
        signed=True,
        rescale=(1.0, 32768.0),
        transfer_syntax=syntax,
        extra={"VOILUTSequence": Sequence([item])},
    )
    modality = stored.astype(np.int64) + 32768
    mapped = table[np.clip(modality - 40000, 0, len(table) - 1)]
    expected = (mapped - table.min()) / (table.max() - table.min())
    np.testing.assert_allclose(display(data), expected, atol=1e-6)


def test_32_bit_values_keep_their_precision_under_a_narrow_window() -> None:
    """Values near 3e9 step by 4 under a 256-wide window: in float32 (24-bit mantissa, steps of
    256 there) the image was two greys."""
    stored = (3_000_000_000 + np.tile(np.arange(N, dtype=np.uint32) * 4, (N, 1))).astype(np.uint32)
    centre, width = 3_000_000_128, 256
    data = make_dicom(
        gradient(N, N, bits=16),
        bits=16,
        window=(str(centre), str(width)),
        extra={
            "BitsAllocated": 32,
            "BitsStored": 32,
            "HighBit": 31,
            "PixelData": stored.astype("<u4").tobytes(),
        },
    )
    expected = np.clip((stored.astype(np.float64) - (centre - 0.5)) / (width - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(display(data), expected, atol=1e-6)

"""Build real DICOM bytes with pydicom at test time (no fixtures on disk, nothing downloaded).

Every file carries identifying tags filled with marker strings; ingest tests grep all output
bytes for them. ``ENCODABLE`` lists the compressed transfer syntaxes this environment can write
(pydicom 3 + pylibjpeg): RLE Lossless, JPEG 2000 (lossless and lossy) through pydicom's
encoders, JPEG baseline by encapsulating a Pillow-encoded JPEG, JPEG Lossless (process 14, any
selection value; SV1) with the test encoder in ``jpeg_lossless``. JPEG-LS and 12-bit JPEG
Extended cannot be encoded here (no pyjpegls/GDCM encoder installed): tests use the real files
pydicom ships with its wheel (``pydicom.data``, never downloaded) for those.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from jpeg_lossless import encode_lossless
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

MARKERS = {
    "PatientName": "MARKER_NAME_7f3a^JANE",
    "PatientID": "MARKER_PID_51c2",
    "PatientBirthDate": "19450317",
    "OtherPatientIDs": "MARKER_OTHERID_9d0e",
    "AccessionNumber": "MARKER_ACC_44b1",
    "InstitutionName": "MARKER_INST_a8f0",
    "InstitutionAddress": "MARKER_ADDR_0c6d",
    "ReferringPhysicianName": "MARKER_DOC_e2e9",
    "StudyDescription": "MARKER_DESC_3b7c",
    "StudyDate": "20190402",
    "StudyTime": "101112",
    "StudyID": "MARKER_SID_6a1f",
    # the rest of PS3.15 Annex E's usual suspects: device, staff, contact, free text, dates
    "OtherPatientNames": "MARKER_OTHERNAME_5e21",
    "PatientAddress": "MARKER_PADDR_7c90",
    "PatientTelephoneNumbers": "MARKER_TEL_2b48",
    "PatientComments": "MARKER_PCOMMENT_93ad",
    "DeviceSerialNumber": "MARKER_SERIAL_0f6b",
    "StationName": "MARKER_STN_c35e",
    "InstitutionalDepartmentName": "MARKER_DEPT_81d4",
    "OperatorsName": "MARKER_OPER_4a7f",
    "PerformingPhysicianName": "MARKER_PERF_d912",
    "RequestingPhysician": "MARKER_REQ_6e03",
    "ProtocolName": "MARKER_PROTO_b5c8",
    "SeriesDescription": "MARKER_SERDESC_27fa",
    "ImageComments": "MARKER_COMMENT_e84b",
    "SeriesDate": "20180611",
    "ContentDate": "20170923",
    "AcquisitionDateTime": "20160704101112",
}
# strings that must never appear in any ingest output byte (dates included)
MARKER_STRINGS = [v.split("^")[0] for v in MARKERS.values()]

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
ENCODABLE = {
    "rle": RLELossless,
    "j2k_lossless": JPEG2000Lossless,
    "j2k": JPEG2000,
    "jpeg_baseline": JPEGBaseline8Bit,
    "jpeg_lossless": JPEGLossless,
    "jpeg_lossless_sv1": JPEGLosslessSV1,
}


def gradient(rows: int = 48, cols: int = 64, bits: int = 12, seed: int = 0) -> np.ndarray:
    """A deterministic test image using most of the ``bits`` range (diagonal ramp + noise)."""
    rng = np.random.default_rng(seed)
    vmax = 2**bits - 1
    ramp = np.add.outer(np.arange(rows), np.arange(cols)) / (rows + cols - 2)
    img = ramp * vmax * 0.9 + rng.integers(0, max(vmax // 20, 1), size=(rows, cols))
    return np.clip(img, 0, vmax).astype(np.uint8 if bits <= 8 else np.uint16)


def _base(sop_class: str, markers: bool) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientSex = "F"
    ds.PatientAge = "045Y"
    ds.ViewPosition = "PA"
    ds.Manufacturer = "ACME Imaging"
    ds.PixelSpacing = [0.143, 0.143]
    if markers:
        for key, value in MARKERS.items():
            setattr(ds, key, value)
    return ds


def make_dicom(
    pixels: np.ndarray | None = None,
    *,
    bits: int = 12,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = ExplicitVRLittleEndian,
    signed: bool = False,
    rescale: tuple[float, float] | None = None,
    modality_lut: np.ndarray | None = None,
    voi_lut: np.ndarray | None = None,
    window: tuple[float, float] | None = None,
    voi_function: str | None = None,
    padding: int | None = None,
    padding_limit: int | None = None,
    presentation_inverse: bool = False,
    frames: int = 1,
    with_pixels: bool = True,
    drop: tuple[str, ...] = (),
    raw: bool = False,
    markers: bool = True,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """One DICOM file's bytes. ``pixels`` [rows, cols] (or [rows, cols, 3] for RGB).

    ``raw=True`` writes a bare implicit-VR little-endian data set: no preamble, no file meta
    (as some old archives do). ``drop`` removes attributes after building (e.g. 'Rows').
    """
    if pixels is None:
        pixels = gradient(bits=bits)
    rgb = pixels.ndim == 3
    ds = _base(SC_SOP_CLASS if rgb else DX_SOP_CLASS, markers)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    rows, cols = pixels.shape[:2]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric
    if rgb:
        ds.PlanarConfiguration = 0
    alloc = 8 if bits <= 8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = alloc, bits, bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if modality_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(modality_lut) % 65536, 0, 16]
        item.ModalityLUTType = "US"
        _set_lut_data(item, modality_lut)
        ds.ModalityLUTSequence = Sequence([item])
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut) % 65536, 0, 16]
        _set_lut_data(item, voi_lut)
        ds.VOILUTSequence = Sequence([item])
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if padding is not None:
        ds.PixelPaddingValue = padding
        ds["PixelPaddingValue"].VR = "SS" if signed else "US"
        if padding_limit is not None:
            ds.PixelPaddingRangeLimit = padding_limit
            ds["PixelPaddingRangeLimit"].VR = "SS" if signed else "US"
    if presentation_inverse:
        ds.PresentationLUTShape = "INVERSE"
    if frames > 1:
        ds.NumberOfFrames = frames
    if with_pixels:
        _set_pixels(ds, pixels, frames, transfer_syntax)
    for key in drop:
        delattr(ds, key)
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    return _write(ds, raw)


def _set_lut_data(item: Dataset, lut: np.ndarray) -> None:
    # US values fit an explicit-VR element only below 64 KiB; long 16-bit LUTs are OW bytes
    if len(lut) < 32768:
        item.LUTData = [int(v) for v in lut]
        item["LUTData"].VR = "US"
    else:
        item.LUTData = np.asarray(lut, dtype="<u2").tobytes()
        item["LUTData"].VR = "OW"


def _set_pixels(ds: Dataset, pixels: np.ndarray, frames: int, ts: str) -> None:
    stack = np.concatenate([pixels] * frames) if frames > 1 else pixels
    if ts in (RLELossless, JPEG2000Lossless, JPEG2000):
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = np.ascontiguousarray(stack).tobytes()
        kwargs = {"j2k_cr": [20]} if ts == JPEG2000 else {}
        ds.compress(ts, np.ascontiguousarray(stack), **kwargs)
        return
    if ts in (JPEGLossless, JPEGLosslessSV1):
        precision = int(ds.BitsStored)
        frame_list = [pixels] * frames
        ds.PixelData = encapsulate([encode_lossless(f, precision) for f in frame_list])
        ds["PixelData"].VR = "OB"
        return
    if ts == JPEGBaseline8Bit:
        if pixels.dtype != np.uint8:
            raise ValueError("JPEG baseline needs 8-bit pixels")
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        return
    data = np.ascontiguousarray(stack)
    if ts == ExplicitVRBigEndian:
        data = data.astype(data.dtype.newbyteorder(">"))
    ds.PixelData = data.tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"


def _write(ds: Dataset, raw: bool) -> bytes:
    if raw:
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, True
        write_dataset(buf, ds)
        return buf.getvalue()
    ts = ds.file_meta.TransferSyntaxUID
    buf = io.BytesIO()
    ds.save_as(
        buf,
        enforce_file_format=True,
        little_endian=ts != ExplicitVRBigEndian,
        implicit_vr=ts == ImplicitVRLittleEndian,
    ) if ts in (ExplicitVRBigEndian, ImplicitVRLittleEndian) else ds.save_as(
        buf, enforce_file_format=True
    )
    return buf.getvalue()


def deflated(pixels: np.ndarray | None = None, **kw: Any) -> bytes:
    """A Deflated Explicit VR Little Endian file."""
    return make_dicom(pixels, transfer_syntax=DeflatedExplicitVRLittleEndian, **kw)


def issuer_tags(
    patient_id: str,
    namespace: str | None = None,
    universal_id: str | None = None,
    universal_id_type: str | None = None,
) -> dict[str, Any]:
    """``extra`` for :func:`make_dicom`: a PatientID and its assigning authority
    (IssuerOfPatientID, and a IssuerOfPatientIDQualifiersSequence item when a universal id is
    given), as two sites of a pooled archive write them."""
    tags: dict[str, Any] = {"PatientID": patient_id}
    if namespace is not None:
        tags["IssuerOfPatientID"] = namespace
    if universal_id is not None or universal_id_type is not None:
        item = Dataset()
        if universal_id is not None:
            item.UniversalEntityID = universal_id
        if universal_id_type is not None:
            item.UniversalEntityIDType = universal_id_type
        tags["IssuerOfPatientIDQualifiersSequence"] = Sequence([item])
    return tags

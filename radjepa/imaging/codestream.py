"""The frame size a compressed DICOM frame's own stream declares, read from its header.

A codec allocates what its stream declares, not what the DICOM header's Rows and Columns say.
The pixel limit checked against Rows/Columns before decoding (``dicom._check_single_image``)
would let a file of a few kilobytes whose header says 64x64 carry a JPEG 2000 stream of
20000x20000: the codec allocates gigabytes (an ingest worker or an API replica runs out of
memory) and only then is the frame found not to match. Reading the stream's size first costs a
few hundred bytes of parsing.

Covered: the JPEG family's frame headers (baseline, extended, lossless, JPEG-LS) and JPEG 2000
(a bare codestream, as DICOM stores it, or a JP2 file). RLE has no size of its own (its decoder
allocates Rows x Columns); anything not recognised here gets ``None`` and is left to its codec.
"""

from __future__ import annotations

import re
import struct

__all__ = ["declared_size"]

# Start Of Frame markers (ITU T.81 B.1.1.3) and JPEG-LS's SOF55 (ITU T.87): their segment holds
# precision (1 byte), then the number of lines and of samples per line (2 bytes each)
_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7}
_STANDALONE = {0x01, *range(0xD0, 0xD9)}  # TEM, RSTn, SOI: no length field
_SOS, _EOI = 0xDA, 0xD9
_DNL = b"\xff\xdc"
# the marker that ends a scan's entropy-coded data: 0xFF then anything but a stuffed 0x00, a
# restart marker (RST0-7) or another 0xFF (fill)
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def declared_size(stream: bytes) -> tuple[int, int] | None:
    """(rows, columns) the stream's frame header declares (a JPEG's DNL segment included; rows
    0 for a JPEG that leaves them to a DNL it does not have), or None when it is not a JPEG or
    JPEG 2000 stream this reads."""
    if stream[:2] == b"\xff\xd8":
        return _jpeg_size(stream)
    if stream[:4] == _J2K_SOC_SIZ:
        return _j2k_size(stream)
    if stream[:12] == _JP2_SIGNATURE:
        codestream = _jp2_codestream(stream)
        return _j2k_size(codestream) if codestream is not None else None
    return None


def _jpeg_size(stream: bytes) -> tuple[int, int] | None:
    at, end = 2, len(stream)
    while at + 4 <= end:
        if stream[at] != 0xFF:
            return None  # not at a marker: a damaged stream, left to the codec to refuse
        marker = stream[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        if marker in (_SOS, _EOI):
            return None  # entropy-coded data before any frame header
        (length,) = struct.unpack_from(">H", stream, at + 2)
        if marker in _SOF:
            if at + 9 > end:
                return None
            rows, cols = struct.unpack_from(">HH", stream, at + 5)
            if rows == 0:  # the lines come in a DNL segment after the first scan (T.81 B.2.5)
                rows = _dnl_lines(stream, at + 2 + length)
            return (rows, cols) if cols else None
        at += 2 + length
    return None


def _dnl_lines(stream: bytes, at: int) -> int:
    """The number of lines the DNL segment ending the first scan declares; 0 when that scan
    ends otherwise (or the stream ends first).

    The segments up to the scan are walked by their lengths; in the scan's entropy-coded data a
    0xFF byte is followed by 0x00 (a stuffed byte), a restart marker or fill, and the first
    other marker ends the scan: a DNL there, or none. A codec that reads DNL grows the image to
    that many lines (65535 of 8192 columns was a gigabyte from a header saying 64 rows), and a
    frame with 0 lines and no DNL made libjpeg spin without end. (T.81 also lets a DNL redefine
    a non-zero count; the installed codecs ignore that, so only the 0 case is read here.)"""
    end = len(stream)
    while at + 4 <= end and stream[at] == 0xFF:
        marker = stream[at + 1]
        if marker == 0xFF or marker in _STANDALONE:
            at += 1 if marker == 0xFF else 2
            continue
        (length,) = struct.unpack_from(">H", stream, at + 2)
        at += 2 + length
        if marker == _SOS:
            found = _SCAN_END.search(stream, at)
            if found is None or found.group() != _DNL or found.end() + 4 > end:
                return 0
            ld, lines = struct.unpack_from(">HH", stream, found.end())
            return int(lines) if ld == 4 else 0
    return 0


def _j2k_size(codestream: bytes) -> tuple[int, int] | None:
    """The reference grid (Ysiz, Xsiz) of SIZ, right after SOC (ITU T.800 A.5.1: Lsiz, Rsiz,
    Xsiz, Ysiz, XOsiz, YOsiz): what the decoder allocates. The image is the grid less its
    offsets, but a stream with offsets of 30000 declaring a 256x256 image made the codec
    allocate 1.8 GB; pydicom cannot decode a frame with offsets anyway."""
    if codestream[:4] != _J2K_SOC_SIZ or len(codestream) < 24:
        return None
    x, y = struct.unpack_from(">II", codestream, 8)
    return (y, x) if y and x else None


def _jp2_codestream(data: bytes) -> bytes | None:
    """The contiguous codestream box's payload of a JP2 file (ITU T.800 I.5.4)."""
    at = 0
    while at + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, at)
        header = 8
        if length == 1:  # a 64-bit length follows the type
            if at + 16 > len(data):
                return None
            (length,) = struct.unpack_from(">Q", data, at + 8)
            header = 16
        elif length == 0:  # the last box runs to the end of the file
            length = len(data) - at
        if length < header:
            return None
        if kind == b"jp2c":
            return data[at + header : at + length]
        at += length
    return None

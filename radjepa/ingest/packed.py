"""Containers ingest does not unpack, named so that their quarantine row says what they hold.

Ingest opens zip and tar archives (plain or gzip/bzip2/xz-compressed) found in folders or given
as sources. Two kinds of container stay closed: an archive inside an archive (a per-study zip
bundled into a transfer zip), and a single compressed file that is not a tar (``IM0001.dcm.gz``).
Both used to be quarantined as junk or as unreadable (``not_an_image`` "not DICOM, PNG or JPEG",
``read_error`` "ReadError"), which sent a platform engineer looking for a broken disk, or to
delete an archive full of radiographs, when the fix is to unpack it. Here they get a reason of
their own, :data:`NOT_UNPACKED`, and a message naming what they are.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable

__all__ = ["NOT_UNPACKED", "PEEK_INPUT", "packed_kind"]

NOT_UNPACKED = "not_unpacked"  # an ingest quarantine reason, beside read_error
PEEK = 1024  # decompressed bytes looked at: a tar header (magic at 257) or an image's signature
PEEK_INPUT = 64 << 10  # compressed bytes fed to reach PEEK; a few hundred suffice in practice


def _gzip() -> Callable[[bytes], bytes]:
    d = zlib.decompressobj(wbits=31)
    return lambda data: d.decompress(data, PEEK)


def _bzip2() -> Callable[[bytes], bytes]:
    d = bz2.BZ2Decompressor()
    return lambda data: d.decompress(data, max_length=PEEK)


def _xz() -> Callable[[bytes], bytes]:
    d = lzma.LZMADecompressor()
    return lambda data: d.decompress(data, max_length=PEEK)


_COMPRESSED = {
    b"\x1f\x8b": ("gzip", _gzip),
    b"BZh": ("bzip2", _bzip2),
    b"\xfd7zXZ\x00": ("xz", _xz),
}


def _what(head: bytes) -> str | None:
    """'zip archive', 'tar archive', 'DICOM', 'PNG', 'JPEG' or None for uncompressed bytes."""
    from radjepa.imaging.decode import sniff_format

    if head[128:132] != b"DICM":  # a DICOM preamble is free-form and may start like a zip
        if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            return "zip archive"
        if head[257:262] == b"ustar":
            return "tar archive"
    fmt = sniff_format(head)
    return {"dicom": "DICOM", "png": "PNG", "jpeg": "JPEG"}.get(fmt or "")


def packed_kind(data: bytes) -> str | None:
    """What a container that ingest does not open holds, from its first bytes, or None for
    anything else (an image, junk, bytes that only start like a compressed stream): 'zip
    archive', 'tar archive', 'gzip-compressed DICOM', 'xz-compressed tar archive',
    'bzip2-compressed file', ...

    Only the first :data:`PEEK` decompressed bytes are made, so a bomb costs nothing here.
    """
    for magic, (name, decompressor) in _COMPRESSED.items():
        if data.startswith(magic):
            try:
                inner = decompressor()(data[:PEEK_INPUT])
            except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError):
                return None  # the magic bytes by chance: junk, as before
            return f"{name}-compressed {_what(inner) or 'file'}" if inner else None
    what = _what(data[:PEEK])
    return what if what in ("zip archive", "tar archive") else None

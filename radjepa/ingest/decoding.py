"""Ingest's decode stage: one file's bytes -> a shard row, or the reason it is quarantined.

The ingest job runs a :class:`FileDecoder` per Ray Data actor; the class itself is plain Python,
so the outcome of any file can be reproduced without a cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import pyarrow as pa

from radjepa.imaging.decode import ImageRejected, decode_image
from radjepa.imaging.deid import ID_SCHEME_KEYED, content_id, keyed_hash
from radjepa.ingest.packed import NOT_UNPACKED, packed_kind
from radjepa.ingest.sources import ENCRYPTED, GONE, LINK, LINK_LOOP, UNREACHABLE, ZIP_METHOD
from radjepa.shards import SHARD_SCHEMA, pixels_to_bytes

__all__ = ["RESULT_SCHEMA", "FileDecoder"]

log = logging.getLogger(__name__)

# what a quarantine row says for each read_error detail the reader names (sources.read_error);
# any other detail is an exception type: "could not read the file (<type>)"
_READ_ERRORS = {
    LINK: "a link inside a tar archive; its target is read as its own member",
    ENCRYPTED: "an encrypted zip member: ingest cannot decrypt it; unpack it with the password "
    "and ingest the files",
    LINK_LOOP: "a symbolic link loop: the link leads back to itself, never to a file",
    GONE: "the file is gone: deleted since it was listed, or a link whose target does not exist",
}

# zip compression method numbers (APPNOTE 4.4.5) a member may carry that zipfile cannot read
_ZIP_METHODS = {
    1: "Shrink",
    6: "Implode",
    9: "Deflate64",
    10: "PKWARE DCL Implode",
    18: "IBM TERSE",
    19: "IBM LZ77",
    93: "Zstandard",
    95: "XZ",
    96: "JPEG",
    97: "WavPack",
    98: "PPMd",
}


def _zip_method_message(number: str) -> str:
    """What a member in an unreadable compression method says: the method (by name where it is
    a known one) and how to get the files in."""
    name = _ZIP_METHODS.get(int(number)) if number.isdigit() else None
    method = f"{name} (method {number})" if name else f"compression method {number}"
    return (
        f"a zip member compressed with {method}, which ingest cannot decompress (it reads "
        "stored, Deflate, BZIP2 and LZMA members): unpack the archive with 7-Zip (7z x) and "
        "ingest the files, or repack it with Deflate (zip -r)"
    )


# One decoder output row: a shard row (nullable) plus the outcome of that file.
RESULT_SCHEMA = pa.schema(
    [f.with_nullable(True) for f in SHARD_SCHEMA]
    + [
        pa.field("status", pa.string()),  # ok | quarantined | existing
        pa.field("reason", pa.string()),
        pa.field("message", pa.string()),
        pa.field("size_bytes", pa.int64()),
    ]
)


class FileDecoder:
    """One ``decode_image`` per file; every failure becomes a quarantine row, never an exception
    (a decoder bug or codec panic on one file must not end a run of millions). A container
    ingest does not open (an archive's member that is itself an archive, a compressed file
    that is no tar) is ``not_unpacked``, named, rather than junk or unreadable."""

    def __init__(
        self,
        settings: dict[str, Any],
        secret: bytes,
        known: Collection[str],
        keep_paths: bool,
    ) -> None:
        self.settings = settings
        self.secret = secret
        self.known = known  # ids (and ``path:<source hash>``) already in DST: not decoded again
        self.keep_paths = keep_paths

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self._one(r) for r in batch.to_pylist()], schema=RESULT_SCHEMA)

    def _one(self, r: dict[str, Any]) -> dict[str, Any]:
        name, data = r["name"], r["data"]
        out: dict[str, Any] = {
            "source_hash": keyed_hash(self.secret, "source", name),
            "source_path": name if self.keep_paths else None,
            "size_bytes": r["size_bytes"],
        }
        if data is None:
            if f"path:{out['source_hash']}" in self.known:
                return {**out, "status": "existing"}
            err = r["read_error"] or "read_error"
            kind, _, detail = err.partition(":")
            reason = kind if kind in ("too_large", NOT_UNPACKED) else "read_error"
            if reason == "too_large":
                msg = f"{r['size_bytes']} bytes exceeds ingest.max_file_mb"
            elif reason == NOT_UNPACKED:
                msg = (
                    f"a {detail}, not a tar archive: ingest decompresses only tar archives; "
                    "decompress it and ingest the file"
                )
            elif detail.startswith(f"{ZIP_METHOD} "):
                msg = _zip_method_message(detail[len(ZIP_METHOD) + 1 :])
            elif detail.startswith(UNREACHABLE):  # the file itself may well be fine
                msg = f"its storage did not answer this run: {detail[len(UNREACHABLE) :].strip()}"
            else:
                msg = _READ_ERRORS.get(
                    detail, f"could not read the file ({detail or 'unknown error'})"
                )
            return {**out, "status": "quarantined", "reason": reason, "message": msg}
        # the DST's scheme (settings["id_scheme"], from its key record): keyed for a new DST
        image_id = content_id(data, self.secret, self.settings.get("id_scheme", ID_SCHEME_KEYED))
        out["image_id"] = image_id
        if image_id in self.known:
            return {**out, "status": "existing"}
        packed = packed_kind(data)  # only an archive's member can still be one here
        if packed is not None:
            return {
                **out,
                "status": "quarantined",
                "reason": NOT_UNPACKED,
                "message": f"a {packed} inside an archive: archives inside archives are not "
                "opened; unpack it into a folder and ingest that",
            }
        try:
            img = decode_image(data, secret=self.secret, source_name=name, **self.settings)
        except ImageRejected as err:
            return {**out, "status": "quarantined", "reason": err.reason, "message": err.message}
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # a decoder bug (or codec panic) must not kill the run
            log.warning("unexpected decoder failure on one file: %s", type(err).__name__)
            return {
                **out,
                "status": "quarantined",
                "reason": "decode_error",
                "message": f"unexpected decoder failure ({type(err).__name__})",
            }
        h, w = img.pixels.shape
        return {
            **out,
            **img.meta,
            "status": "ok",
            "pixels": pixels_to_bytes(img.pixels),
            "height": h,
            "width": w,
            "dtype": img.pixels.dtype.name,
        }

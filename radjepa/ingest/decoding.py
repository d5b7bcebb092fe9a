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
from radjepa.ingest.decode_process import (
    DecodeCrashed,
    DecodeProcess,
    DecodeTimedOut,
)
from radjepa.ingest.packed import NOT_UNPACKED, packed_kind
from radjepa.ingest.sources import ENCRYPTED, GONE, LINK, LINK_LOOP, UNREACHABLE, ZIP_METHOD
from radjepa.shards import SHARD_SCHEMA, pixels_to_bytes

__all__ = ["DECODER_CRASHED", "DECODE_TIMEOUT", "RESULT_SCHEMA", "FileDecoder"]

log = logging.getLogger(__name__)

# quarantine reasons of a file that ended its decode process, or ran past ingest.decode_timeout_s
DECODER_CRASHED, DECODE_TIMEOUT = "decoder_crashed", "decode_timeout"

# what a quarantine row says for each read_error detail the reader names (sources.read_error);
# any other detail is an exception type: "could not read the file (<type>)"
_READ_ERRORS = {
    LINK: "a link inside an archive (a tar's hard or symbolic link, a zip's symbolic link); "
    "its target, when the archive holds it, is read as its own member",
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
        *,
        isolate: bool = False,
        timeout_s: float = 0.0,
    ) -> None:
        self.settings = settings
        self.secret = secret
        self.known = known  # ids (and ``path:<source hash>``) already in DST: not decoded again
        self.keep_paths = keep_paths
        self.timeout_s = timeout_s
        # a codec crashing or stuck on a file costs that file, not this process and its batch
        if timeout_s and not isolate:
            raise ValueError("a decode time limit needs isolate=True (a child process to end)")
        self._isolated = DecodeProcess(self._outcome, timeout_s) if isolate else None

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
            outcome = self._decoded(data, name)
        except DecodeCrashed as err:
            log.warning("a decode process died on one file (%s)", err.how)
            outcome = (
                DECODER_CRASHED,
                f"decoding it ended the decode process ({err.how}): a codec crashing on the "
                "file, or the decode killed for memory",
            )
        except DecodeTimedOut:
            log.warning("a decode ran past %g s (ingest.decode_timeout_s)", self.timeout_s)
            outcome = (
                DECODE_TIMEOUT,
                f"decoding it ran past {self.timeout_s:g} s (ingest.decode_timeout_s): a codec "
                "stuck on the file; the decode was ended",
            )
        if isinstance(outcome, tuple):  # (reason, message)
            return {**out, "status": "quarantined", "reason": outcome[0], "message": outcome[1]}
        pixels, meta = outcome["pixels"], outcome["meta"]
        h, w = pixels.shape
        return {
            **out,
            **meta,
            "status": "ok",
            "pixels": pixels_to_bytes(pixels),
            "height": h,
            "width": w,
            "dtype": pixels.dtype.name,
        }

    def _decoded(self, data: bytes, name: str) -> dict[str, Any] | tuple[str, str]:
        """:meth:`_outcome` in the decode process, or here when there is none or none can be
        started (a pod at its process limit, no memory for the fork): the node's state, not
        the file's, so the file is decoded rather than quarantined or the run stopped."""
        if self._isolated is None:
            return self._outcome(data, name)
        try:
            return self._isolated(data, name)
        except (DecodeCrashed, DecodeTimedOut):
            raise
        except OSError as err:
            log.warning("cannot start a decode process (%s): decoding this file in-process", err)
            return self._outcome(data, name)

    def _outcome(self, data: bytes, name: str) -> dict[str, Any] | tuple[str, str]:
        """The decode of one file's bytes, run in the decode process when isolated (so it
        returns plain values that pickle): ``{"pixels", "meta"}``, or the quarantine
        ``(reason, message)``."""
        try:
            img = self._decode(data, name)
        except ImageRejected as err:
            return err.reason, err.message
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # a decoder bug (or codec panic) must not kill the run
            log.warning("unexpected decoder failure on one file: %s", type(err).__name__)
            return "decode_error", f"unexpected decoder failure ({type(err).__name__})"
        return {"pixels": img.pixels, "meta": img.meta}

    def _decode(self, data: bytes, name: str) -> Any:
        """``decode_image`` with this run's settings: the call a crash or a hang happens in."""
        return decode_image(data, secret=self.secret, source_name=name, **self.settings)

    def close(self) -> None:
        """End the decode process, if any (the next file starts another)."""
        if self._isolated is not None:
            self._isolated.close()

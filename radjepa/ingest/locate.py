"""Which of an operator's files DST's quarantine and duplicate rows are.

A row names its file only by ``source_hash``, a keyed hash of the path as ingest read it: raw
paths are stored only with ``ingest.keep_source_paths``, since export folders are often named
by patient. So "37 quarantined (decode_error)" could not be acted on. Whoever holds the key
and the sources can still find the files: list the sources as ingest does, hash every name
ingest would have hashed (archive members as ``archive!member``), and match. Nothing is
written: the paths are for the operator's console only.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from radjepa.imaging.deid import key_fingerprint, keyed_hash
from radjepa.ingest.destination import _read_json, recorded_pseudonyms, resolved_rows
from radjepa.ingest.errors import IngestError
from radjepa.ingest.sources import iter_source, list_inputs, tar_row_members, utf8_name
from radjepa.locations import filesystem
from radjepa.shards import (
    INGEST_RECORDS,
    KEY_RECORD,
    MANIFEST,
    QUARANTINE_DIR,
    output_files,
    read_duplicates,
)

log = logging.getLogger(__name__)

__all__ = ["Located", "LocatedRow", "locate_rows"]


@dataclass(frozen=True)
class LocatedRow:
    """One quarantine or duplicate row, with the path it was read from when found."""

    table: str  # "quarantine" or "duplicates"
    reason: str  # the quarantine reason, or the duplicate's kind
    message: str | None  # quarantine only: why, in the words ingest stored
    image_id: str | None
    run_id: str
    source_hash: str
    path: str | None = None  # None: not among the sources given


@dataclass
class Located:
    rows: list[LocatedRow] = field(default_factory=list)
    names_hashed: int = 0  # files and archive members listed under the sources
    # quarantine rows left out: a later run stored an image from their path, so DST holds the
    # file (its totals count them as resolved, not quarantined)
    resolved: int = 0

    @property
    def found(self) -> int:
        return sum(r.path is not None for r in self.rows)


def _quarantine(dst: str) -> pa.Table | None:
    fs, root = filesystem(dst)
    tables = [pq.read_table(p, filesystem=fs) for p in output_files(fs, root, QUARANTINE_DIR)]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def _rows(dst: str, duplicates: bool) -> tuple[list[LocatedRow], int]:
    """The rows to list, and how many quarantine rows were left out as resolved."""
    rows: list[LocatedRow] = []
    quarantine = _quarantine(dst)
    found = quarantine.to_pylist() if quarantine is not None else []
    resolved = resolved_rows(dst, found)
    for r in (r for r, done in zip(found, resolved, strict=True) if not done):
        rows.append(
            LocatedRow(
                "quarantine", r["reason"], r["message"], r["sha256"], r["run_id"], r["source_hash"]
            )
        )
    if duplicates:
        for r in read_duplicates(dst).to_pylist():
            rows.append(
                LocatedRow(
                    "duplicates", r["kind"], None, r["image_id"], r["run_id"], r["source_hash"]
                )
            )
    return rows, sum(resolved)


def _check_ingested(dst: str) -> None:
    fs, root = filesystem(dst)
    root = root.rstrip("/")
    if not any(
        fs.get_file_info(f"{root}/{name}").type == pafs.FileType.File for name in INGEST_RECORDS
    ):
        raise IngestError(f"{dst} is no ingest output (no {' or '.join(INGEST_RECORDS)} in it)")


def _recorded_fingerprint(dst: str) -> tuple[str | None, bool]:
    """The key fingerprint DST records, and whether it was recorded only after some shards were
    written (``unchecked_shards``). :func:`recorded_pseudonyms` vouches for no key there, as a
    server must not; but the runs since then did hash their paths under the recorded key, so
    their rows can still be located with it."""
    recorded = recorded_pseudonyms(dst)
    if recorded is None or recorded["key_fingerprint"] is not None:
        return (recorded or {}).get("key_fingerprint"), False
    fs, root = filesystem(dst)
    root = root.rstrip("/")
    record = _read_json(fs, root, dst, KEY_RECORD)
    if record is None:
        record = (_read_json(fs, root, dst, MANIFEST) or {}).get("pseudonyms") or {}
    return str(record.get("key_fingerprint")), True


def _check_key(dst: str, secret: bytes) -> None:
    """Hashes under another key match nothing: say so, rather than "found 0 of 37"."""
    fingerprint, unchecked = _recorded_fingerprint(dst)
    if fingerprint is None:
        raise IngestError(
            f"{dst} records no pseudonymisation key: its path hashes cannot be checked against "
            "a key, so its files cannot be located"
        )
    if fingerprint != key_fingerprint(secret):
        raise IngestError(
            f"the pseudonymisation key differs from the one {dst} was ingested with (key "
            f"fingerprint {key_fingerprint(secret)}, DST records {fingerprint}): set the "
            "variable ingest.secret_env names to the key used for it"
        )
    if unchecked:
        log.warning(
            "%s held images before its pseudonymisation key was recorded: rows of the runs "
            "before that may have been hashed under another key and not be found",
            dst,
        )


def _names(ref: dict[str, str]) -> Iterator[str]:
    """The names ingest hashed for ``ref``: its own path (its row when it could not be opened),
    then each member's as ingest spelled it. An uncompressed tar is listed from its headers, its
    members' data seeked over as ``count_members`` does: streamed, as reading does, every byte
    of it was read (a second download of a large tar on object storage) for names alone."""
    yield ref["path"]
    if ref["kind"] == "tar":
        try:
            fs, _ = filesystem(ref["source"])
            with fs.open_input_file(ref["path"]) as f, tarfile.open(fileobj=f, mode="r:") as t:
                # the members reading makes a row of: files and links
                read = [m.name for m in tar_row_members(t)]
            yield from (utf8_name(f"{ref['path']}!{name}") for name in read)
            return
        except Exception:  # compressed, unreadable, or no tar after all: read as ingest does
            pass
    # max_bytes=0 reports every non-empty member too large, unread
    yield from (row["name"] for row in iter_source(ref, max_bytes=0))


def locate_rows(
    dst: str,
    sources: list[str],
    secret: bytes,
    *,
    duplicates: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Located:
    """DST's quarantine rows (and duplicate rows with ``duplicates``), each with the path under
    ``sources`` whose keyed hash it carries, if any (no sources: the rows alone, no key used).

    Archives are opened to hash their members' names without reading member data (a
    compressed tar is still decompressed once to reach its headers). ``progress`` is called
    with the number of names hashed per input listed."""
    _check_ingested(dst)
    if sources:
        _check_key(dst, secret)
    rows, resolved = _rows(dst, duplicates)
    out = Located(rows=rows, resolved=resolved)
    wanted = {r.source_hash for r in out.rows}
    paths: dict[str, str] = {}
    for ref in list_inputs(sources) if wanted else []:
        names = set(_names(ref))
        for name in names:
            h = keyed_hash(secret, "source", name)
            if h in wanted:
                paths.setdefault(h, name)
        out.names_hashed += len(names)
        if progress is not None:
            progress(len(names))
        if len(paths) == len(wanted):
            break
    out.rows = [LocatedRow(**{**r.__dict__, "path": paths.get(r.source_hash)}) for r in out.rows]
    log.info("hashed %d names: %d of %d rows found", out.names_hashed, out.found, len(out.rows))
    return out

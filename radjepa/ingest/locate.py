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
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from radjepa.imaging.deid import key_fingerprint, keyed_hash
from radjepa.ingest.destination import recorded_pseudonyms
from radjepa.ingest.errors import IngestError
from radjepa.ingest.sources import iter_source, list_inputs
from radjepa.locations import filesystem
from radjepa.shards import INGEST_RECORDS, QUARANTINE_DIR, output_files, read_duplicates

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

    @property
    def found(self) -> int:
        return sum(r.path is not None for r in self.rows)


def _quarantine(dst: str) -> pa.Table | None:
    fs, root = filesystem(dst)
    tables = [pq.read_table(p, filesystem=fs) for p in output_files(fs, root, QUARANTINE_DIR)]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def _rows(dst: str, duplicates: bool) -> list[LocatedRow]:
    rows: list[LocatedRow] = []
    quarantine = _quarantine(dst)
    for r in quarantine.to_pylist() if quarantine is not None else []:
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
    return rows


def _check_ingested(dst: str) -> None:
    fs, root = filesystem(dst)
    root = root.rstrip("/")
    if not any(
        fs.get_file_info(f"{root}/{name}").type == pafs.FileType.File for name in INGEST_RECORDS
    ):
        raise IngestError(f"{dst} is no ingest output (no {' or '.join(INGEST_RECORDS)} in it)")


def _check_key(dst: str, secret: bytes) -> None:
    """Hashes under another key match nothing: say so, rather than "found 0 of 37"."""
    recorded = recorded_pseudonyms(dst)
    fingerprint = (recorded or {}).get("key_fingerprint")
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
    out = Located(rows=_rows(dst, duplicates))
    wanted = {r.source_hash for r in out.rows}
    paths: dict[str, str] = {}
    for ref in list_inputs(sources) if wanted else []:
        # the archive's own name (a row when it could not be opened), then each member's as
        # ingest spelled it; max_bytes=0 reports every non-empty member too large, unread
        names = {ref["path"]} | {row["name"] for row in iter_source(ref, max_bytes=0)}
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

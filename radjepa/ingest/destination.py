"""An ingest destination (DST): what it holds, and how it is written so that it stays whole.

``DST/images``, ``DST/quarantine`` and ``DST/duplicates`` hold Parquet files written under a
temporary name and renamed, ``DST/manifest.json`` reconciles every run's counts, and
``DST/pseudonyms.json`` records which key made the pseudonyms and ``DST/decode.json`` how its
images are decoded (size, dtype, window), both before the first shard is written, and
``DST/.ingest.lock`` says which run writes it now (:mod:`radjepa.ingest.dst_lock`). Any pyarrow
filesystem: a local folder or a bucket URI.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from itertools import chain
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from radjepa.imaging.deid import ID_SCHEME_KEYED, ID_SCHEME_UNKEYED, ID_SCHEMES, PATIENT_ID
from radjepa.ingest.dst_lock import LOCK, is_lock_temporary
from radjepa.ingest.errors import IngestError
from radjepa.ingest.id_sets import InputKeys, KnownIds
from radjepa.ingest.input_keys import input_key, input_keys
from radjepa.locations import filesystem
from radjepa.shards import (
    DUPLICATE_SAME_BYTES,
    DUPLICATES_DIR,
    IMAGES_DIR,
    KEY_RECORD,
    MANIFEST,
    QUARANTINE_DIR,
    foreign_files,
    is_damage_error,
    is_output_name,
    output_files,
)

__all__ = [
    "DECODE_RECORD",
    "KEY_RECORD",
    "MANIFEST",
    "MANIFEST_VERSION",
    "RUN_FINISHED",
    "RUN_INTERRUPTED",
    "Destination",
    "Totals",
    "check_compatible",
    "check_key",
    "damaged_file",
    "dst_file_rows",
    "footer_error",
    "id_scheme_of",
    "input_key",
    "is_output",
    "read_dst_table",
    "recorded_pseudonyms",
    "resolved_rows",
    "run_status",
]

log = logging.getLogger(__name__)

# how DST's images are decoded (size, dtype, ingest.window_percentiles): written, like KEY_RECORD,
# before the first shard, so that a run killed before its manifest still fixes the window the next
# run must use (check_compatible); the manifest's ``image`` says the same once a run finishes
DECODE_RECORD = "decode.json"
# in KEY_RECORD: the key was first recorded on a DST that already held shards (see check_key)
UNCHECKED = "unchecked_shards"
# 2: every run record has a ``status`` (RUN_FINISHED or RUN_INTERRUPTED). Version 1 recorded
# only runs that finished, without a status: read one with :func:`run_status`.
MANIFEST_VERSION = 2
RUN_FINISHED = "finished"
RUN_INTERRUPTED = "interrupted"


def run_status(run: dict[str, Any]) -> str:
    """A manifest run record's status: a record without one (manifest version 1, which
    recorded only runs that finished) is :data:`RUN_FINISHED`."""
    return str(run.get("status") or RUN_FINISHED)


class Totals(NamedTuple):
    """What DST holds. ``quarantined`` (and ``reasons``) count the quarantine rows of inputs
    not stored; ``resolved`` the rows of inputs quarantined unread (no image id: ``read_error``,
    ``too_large``) that a later run read and stored from the same path (a dangling link since
    given its target, a file over ``ingest.max_file_mb`` since raised). Those rows stay in the
    quarantine table as history: ``images + quarantined + resolved + duplicates of every run
    == inputs of every run``."""

    images: int
    quarantined: int
    reasons: dict[str, int]
    resolved: int


def temporary_name(name: str) -> str:
    """Where a file of DST is written before the rename that publishes it: a hidden name that
    readers (which list ``*.parquet`` and read JSON records by name) never pick up."""
    return f".{name}.tmp"


def published_name(name: str) -> str | None:
    """The file a temporary name was writing (None for any other name): how a later run knows a
    leftover of a killed write from a file someone else put there."""
    if name.startswith(".") and name.endswith(".tmp") and len(name) > 5:
        return name[1:-4]
    return None


def is_output(root: str, path: str) -> bool:
    """Whether ``path`` is a file ingest writes into the DST at ``root`` (its shards, quarantine,
    JSON records and their temporary names, the run lock and its heartbeat's temporary), which
    a source that holds the DST must not read back. Only those: any other file under DST is
    input. Skipping all of DST dropped every file of a source inside it (``radjepa ingest
    /data/raw /data``) with only "no files found"."""
    root = root.rstrip("/")
    if not path.startswith(f"{root}/"):
        return False
    rel = path[len(root) + 1 :]
    if rel.startswith((f"{IMAGES_DIR}/", f"{QUARANTINE_DIR}/", f"{DUPLICATES_DIR}/")):
        return True
    if rel == LOCK or is_lock_temporary(rel):
        return True
    records = (MANIFEST, KEY_RECORD, DECODE_RECORD)
    return rel in {name for n in records for name in (n, temporary_name(n))}


# what a re-run of the same sources does for the inputs a damaged file of each folder recorded
_REDONE = {
    IMAGES_DIR: "stores its images again",
    QUARANTINE_DIR: "quarantines its files again",
    DUPLICATES_DIR: "lists its duplicates again",
}


def damaged_file(shown: str, reason: str) -> str:
    """The message for a Parquet file of DST that is no whole Parquet file (zero bytes, or cut
    short: the rename of a write reached the disk and its data did not, as after a crash or a
    lost node): which file, and how to go on. Every later ingest and training run read it and
    stopped on a pyarrow traceback that named neither."""
    parts = shown.rsplit("/", 2)
    redone = _REDONE.get(parts[-2] if len(parts) > 1 else "", "reads its inputs again")
    return (
        f"{shown} is damaged, no whole Parquet file ({reason}): a write cut short by a crash "
        f"or a lost node leaves one. Move it out of the DST; a re-run of `radjepa ingest` over "
        f"the same sources {redone}"
    )


def footer_error(fs: pafs.FileSystem, path: str) -> str | None:
    """Why ``path`` is no whole Parquet file (its footer cannot be read), None when it is one.
    Told apart from other ``ArrowInvalid`` errors of a read (a column the file lacks), which
    are no damage to report. A footer of zeroed blocks (a crash's partial writeback) fails as
    an OSError without an errno (``Couldn't deserialize thrift``), on a local disk damage too;
    one with an errno, or from an object store, is the storage's own error."""
    try:
        pq.read_metadata(path, filesystem=fs)
    except pa.ArrowInvalid as err:
        return str(err)
    except OSError as err:
        if is_damage_error(fs, err):
            return str(err)
        raise
    return None


def read_dst_table(
    fs: pafs.FileSystem, path: str, columns: list[str] | None, shown: str
) -> pa.Table:
    """``columns`` (None: all) of the Parquet file ``path`` of a DST (``shown`` as the user
    spells it); :class:`IngestError` (:func:`damaged_file`) when the file is damaged."""
    try:
        return pq.read_table(path, columns=columns, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as err:
        if not is_damage_error(fs, err):
            raise
        reason = footer_error(fs, path)
        if reason is None:
            raise
        raise IngestError(damaged_file(shown, reason)) from None


def dst_file_rows(fs: pafs.FileSystem, path: str, shown: str) -> int:
    """Rows of the Parquet file ``path`` of a DST, from its footer; :class:`IngestError`
    (:func:`damaged_file`) when it has none to read."""
    try:
        with fs.open_input_file(path) as f:
            return int(pq.ParquetFile(f).metadata.num_rows)
    except (pa.ArrowInvalid, OSError) as err:
        if not is_damage_error(fs, err):
            raise
        raise IngestError(damaged_file(shown, str(err))) from None


class Destination:
    """DST on any pyarrow filesystem: existing ids, atomic shard writes, the manifest."""

    def __init__(self, dst: str) -> None:
        self.uri = dst
        try:
            self.fs, self.root = filesystem(dst)
            self.fs.create_dir(f"{self.root}/{IMAGES_DIR}", recursive=True)
            self.fs.create_dir(f"{self.root}/{QUARANTINE_DIR}", recursive=True)
            self.fs.create_dir(f"{self.root}/{DUPLICATES_DIR}", recursive=True)
        except (OSError, pa.ArrowException) as err:
            raise IngestError(f"cannot use destination {dst}: {err}") from None
        self._known: KnownIds | None = None  # known_ids, until this object writes a file
        # called before every write: the run's lock check (DstLock.check_held), so a run that
        # lost DST to another stops instead of writing beside it
        self.before_write: Callable[[], None] = lambda: None

    def _parquet(self, sub: str) -> list[str]:
        """The Parquet files ingest wrote into DST/``sub``: the listing ``read_duplicates``
        uses too (:func:`radjepa.shards.output_files`: no hidden, temporary or foreign file)."""
        return output_files(self.fs, self.root, sub)

    def warn_foreign_files(self) -> list[str]:
        """Log a warning naming the Parquet files in DST's folders that ingest did not write
        (``images/x.parquet``, a file manager's ``images/part-... (1).parquet``), and return
        them. They are not part of what DST holds, and training refuses the DST while
        ``images/`` holds any (:func:`radjepa.shards.list_shards`): the run that can say so
        first is the ingest run, not the training run after it. Files in ``quarantine/`` or
        ``duplicates/`` are only ignored, so the warning says the refusal only for
        ``images/``."""
        found = [
            f"{sub}/{name}"
            for sub in (IMAGES_DIR, QUARANTINE_DIR, DUPLICATES_DIR)
            for name in foreign_files(self.fs, self.root, sub)
        ]
        if found:
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            refused = any(name.startswith(f"{IMAGES_DIR}/") for name in found)
            log.warning(
                "%s holds %d Parquet file(s) that ingest did not write: %s. They are not part "
                "of DST (ingest does not count their images, and stores any it meets again)%s",
                self.uri,
                len(found),
                shown,
                "; `radjepa pretrain` refuses DST while images/ holds any: move them out of it"
                if refused
                else "",
            )
        return found

    def remove_leftovers(self) -> int:
        """Delete the temporary files of runs killed mid-write (``kill -9``, an evicted pod):
        ``.NAME.tmp`` of a shard, a quarantine file or a JSON record, which no reader looks at
        and nothing else removes. Only those names; only while holding the run lock (a live
        run's temporary file would go too). Returns how many were removed."""
        places: dict[str, Callable[[str], bool]] = {
            sub: partial(is_output_name, sub)
            for sub in (IMAGES_DIR, QUARANTINE_DIR, DUPLICATES_DIR)
        }
        places[""] = lambda n: n in {MANIFEST, KEY_RECORD, DECODE_RECORD}
        removed = 0
        for sub, ours in places.items():
            folder = f"{self.root}/{sub}".rstrip("/")
            for info in self.fs.get_file_info(pafs.FileSelector(folder)):
                final = published_name(info.base_name)
                if info.type == pafs.FileType.File and final is not None and ours(final):
                    self.fs.delete_file(info.path)
                    removed += 1
        if removed:
            log.info("removed %d temporary files left in %s by interrupted runs", removed, self.uri)
        return removed

    def _arrow_columns(self, sub: str, column: str) -> Iterator[pa.ChunkedArray]:
        for path in self._parquet(sub):
            yield self.read_columns(path, [column]).column(column)

    def known_ids(self) -> KnownIds:
        """Ids of the bytes DST has seen: stored, quarantined, or a duplicate of an instance
        stored from other bytes (skipped unread on re-runs, like the stored bytes). Files never
        read (too large, unreadable) have no sha256: they are known as ``path:<source hash>``.

        Read one file's column at a time into compact arrays (:class:`KnownIds`, 32 bytes an
        id): a set of ``str`` took about 170 bytes an id on the driver and in every decoder.

        Built once and kept until this object writes a Parquet file (the run lock keeps other
        writers out): each build reads every file's id column and sorts the ids, at 10 million
        stored images about 20 s and a peak near 1 GiB, and on a DST without a key record
        :func:`check_key` asks for them before the run hands them to its decoders (a run built
        them twice)."""
        if self._known is None:
            self._known = self._read_known_ids()
        return self._known

    def _read_known_ids(self) -> KnownIds:
        ids = chain(
            self._arrow_columns(IMAGES_DIR, "image_id"),
            self._arrow_columns(QUARANTINE_DIR, "sha256"),
            self._other_instance_ids(),
        )
        return KnownIds.from_arrow(ids, self._unread_path_hashes())

    def _other_instance_ids(self) -> Iterator[pa.ChunkedArray]:
        """The ids of the duplicate rows of an instance stored from other bytes. A row of the
        same bytes stored from another path has the stored image's own id, known while its
        shard is there: counted too, it kept that id known after the shard was moved out (a
        damaged one, as :func:`damaged_file` advises), and a re-run skipped the image for
        good."""
        for path in self._parquet(DUPLICATES_DIR):
            try:
                table = self.read_columns(path, ["image_id", "kind"])
            except pa.ArrowInvalid:  # a file written before ``kind``: instances only
                yield self.read_columns(path, ["image_id"]).column("image_id")
                continue
            yield table.filter(pc.not_equal(table["kind"], DUPLICATE_SAME_BYTES))["image_id"]

    def _unread_path_hashes(self) -> Iterator[pa.ChunkedArray]:
        """The path hashes of the quarantine rows of files never read (no ``sha256``): a file
        quarantined for its content is known by its id, and its path too made a changed file
        there that cannot be read now (over ``ingest.max_file_mb``) count as already in DST,
        which never held it, on every run."""
        for path in self._parquet(QUARANTINE_DIR):
            table = self.read_columns(path, ["sha256", "source_hash"])
            yield table.filter(pc.is_null(table.column("sha256"))).column("source_hash")

    def recorded_inputs(self) -> tuple[InputKeys, dict[str, str]]:
        """The inputs DST holds a row of, as :func:`input_key` of (image id, path hash): its
        stored images, quarantine rows and duplicate rows; and for each id listed as a
        duplicate, the stored image it names (``kept_image_id``). Keyed a file's columns at a
        time from their Arrow buffers (:func:`radjepa.ingest.input_keys.input_keys`, the same
        key the run gives each input it meets): 2.1x quicker at 3M rows than a Python digest per
        row (docs/PERFORMANCE.md).

        Keys, not the pairs, in one sorted array (:class:`InputKeys`, 8 bytes an input): read
        by every re-run that meets an input DST already holds (a run resumed after an
        interruption), at 10 million stored images a set of Python ints would hold ~600 MiB
        on the driver (a clash of two 64-bit keys leaves one duplicate unlisted)."""
        kept: dict[str, str] = {}
        return InputKeys([*self._held_keys(), *self._listed_keys(kept)]), kept

    def recorded_held(self) -> InputKeys:
        """:meth:`recorded_inputs` of the stored images and quarantine rows only."""
        return InputKeys(self._held_keys())

    def recorded_copies(self) -> tuple[InputKeys, dict[str, str]]:
        """:meth:`recorded_inputs` of the duplicate rows only: a copy of an image stored in
        the same run can be listed in DST only there (an image DST stores or quarantined is
        no new image), and an incremental run into a large DST need not read every stored
        image's columns to list it."""
        kept: dict[str, str] = {}
        return InputKeys(self._listed_keys(kept)), kept

    def _listed_keys(self, kept: dict[str, str]) -> list[np.ndarray]:
        """The keys of the duplicate rows; each listed id's ``kept_image_id`` put in ``kept``."""
        keys = []
        for path in self._parquet(DUPLICATES_DIR):
            table = self.read_columns(path, ["image_id", "source_hash", "kept_image_id"])
            keys.append(input_keys(table["image_id"], table["source_hash"]))
            ids = table["image_id"].to_pylist()
            kept.update(zip(ids, table["kept_image_id"].to_pylist(), strict=True))
        return keys

    def _held_keys(self) -> Iterator[np.ndarray]:
        """The keys of the stored images' rows and of the quarantine rows."""
        for sub, id_column in ((IMAGES_DIR, "image_id"), (QUARANTINE_DIR, "sha256")):
            for path in self._parquet(sub):
                table = self.read_columns(path, [id_column, "source_hash"])
                yield input_keys(table[id_column], table["source_hash"])

    def quarantined_ids(self) -> dict[str, tuple[str, str]]:
        """Image id -> (reason, message) of each quarantine row that has one (a file read and
        found unusable): a copy of those bytes from another path is quarantined as they were,
        not dropped as a duplicate of a file DST does not hold. Read by a run only once it
        meets an input DST already knows; a reason and a message are held once however many
        rows share them."""
        found: dict[str, tuple[str, str]] = {}
        said: dict[tuple[str, str], tuple[str, str]] = {}
        for path in self._parquet(QUARANTINE_DIR):
            table = self.read_columns(path, ["sha256", "reason", "message"])
            table = table.filter(pc.is_valid(table.column("sha256")))
            for image_id, reason, message in zip(
                table["sha256"].to_pylist(),
                table["reason"].to_pylist(),
                table["message"].to_pylist(),
                strict=True,
            ):
                found.setdefault(image_id, said.setdefault((reason, message), (reason, message)))
        return found

    def stored_path_hashes(self) -> KnownIds:
        """The path hashes of the stored images, as ``path:<hash>`` in a compact set (16 bytes
        a stored image): a file over ``ingest.max_file_mb`` at a path DST stored from is not
        quarantined as ``too_large`` when the limit is lowered. Read only once a run meets
        such a file."""
        columns = self._arrow_columns(IMAGES_DIR, "source_hash")
        return KnownIds.from_arrow([], columns)

    def shards(self) -> list[str]:
        """The image shards' paths, sorted (so by run, then by number)."""
        return self._parquet(IMAGES_DIR)

    def read_columns(self, path: str, columns: list[str] | None) -> pa.Table:
        """``columns`` (None: all) of one Parquet file of DST (a path from :meth:`shards`); an
        :class:`IngestError` naming the file when it is no whole Parquet file
        (:func:`read_dst_table`)."""
        return read_dst_table(self.fs, path, columns, self._shown(path))

    def _shown(self, path: str) -> str:
        """``path`` (on :attr:`fs`) as the user spelled DST."""
        return self.uri.rstrip("/") + path[len(self.root.rstrip("/")) :]

    def num_rows(self, name: str) -> int:
        """Rows of the Parquet file ``name`` (``images/part-...``, as :meth:`write` returns it),
        from its footer; 0 when there is no such file."""
        path = f"{self.root}/{name}"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return 0
        return dst_file_rows(self.fs, path, self._shown(path))

    def write(self, sub: str, name: str, table: pa.Table) -> str:
        self.before_write()
        self._known = None  # DST holds more ids now: a later known_ids reads them again
        final = f"{self.root}/{sub}/{name}"
        tmp = f"{self.root}/{sub}/{temporary_name(name)}"
        with self.fs.open_output_stream(tmp) as f:
            # page checksums: readers see bytes changed in a page (shards.shard_scan_options)
            pq.write_table(table, f, compression="zstd", write_page_checksum=True)
        self._publish(tmp, final)
        return f"{sub}/{name}"

    def _publish(self, tmp: str, final: str) -> None:
        """Rename the written ``tmp`` to ``final``. On a local or mounted filesystem the file's
        data reaches the disk first and the rename after it: a rename alone could reach the
        disk before the data, and a node lost then left a zero-byte or cut-short
        ``part-*.parquet`` that every later run read and stopped on. An object store publishes
        a whole object or none, so there is nothing to flush."""
        local = isinstance(self.fs, pafs.LocalFileSystem)
        if local:
            try:
                _fsync(tmp)
            except OSError as err:  # a share refusing a flush (SMB, Windows): as it was
                log.debug("cannot flush %s: %s", tmp, err)
        self.fs.move(tmp, final)
        if local:
            _fsync_folder(os.path.dirname(final))

    def read_json(self, name: str) -> dict[str, Any] | None:
        return _read_json(self.fs, self.root, self.uri, name)

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        self.before_write()
        tmp, final = f"{self.root}/{temporary_name(name)}", f"{self.root}/{name}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(data, indent=2, sort_keys=True).encode("utf-8"))
        self._publish(tmp, final)

    def stored_image(self) -> dict[str, Any] | None:
        """Size and dtype of the images already in DST, read from a shard (None when empty):
        a run that died before its manifest leaves shards that still fix both."""
        for path in self._parquet(IMAGES_DIR):
            first = self.read_columns(path, ["height", "dtype"]).slice(0, 1)
            if first.num_rows:
                return {"size": first["height"][0].as_py(), "dtype": first["dtype"][0].as_py()}
        return None

    def read_manifest(self) -> dict[str, Any] | None:
        return self.read_json(MANIFEST)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.write_json(MANIFEST, manifest)

    def _quarantine_rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for path in self._parquet(QUARANTINE_DIR):
            table = self.read_columns(path, None)
            columns = [
                c for c in ("sha256", "source_hash", "reason", "run_id") if c in table.column_names
            ]
            rows.extend(table.select(columns).to_pylist())
        return rows

    @staticmethod
    def _resolved(row: dict[str, Any], stored: dict[str, str]) -> bool:
        """A row quarantined unread whose path a LATER run stored: a path stored first and
        quarantined unread after (replaced by a file over the size limit, a link gone dangling)
        is still missing from what DST holds."""
        if row.get("sha256") is not None or not row.get("source_hash"):
            return False
        return stored.get(row["source_hash"], "") > str(row.get("run_id") or "")

    def unread_quarantined(self) -> set[str]:
        """Path hashes of inputs quarantined without being read and not stored since: this
        run stores one that it can read now (``IngestSummary.resolved``)."""
        rows = self._quarantine_rows()
        stored = _stored_paths(self.fs, self.root, rows)
        return {
            r["source_hash"]
            for r in rows
            if r.get("sha256") is None and r.get("source_hash") and not self._resolved(r, stored)
        }

    def totals(self) -> Totals:
        """Counted from the files themselves, so a run that died before its manifest still
        counts (see :class:`Totals`). A row quarantined unread is resolved once a later run
        stores an image from the same path: counting it as quarantined said a file was missing
        that DST holds."""
        images = sum(dst_file_rows(self.fs, p, self._shown(p)) for p in self._parquet(IMAGES_DIR))
        rows = self._quarantine_rows()
        stored = _stored_paths(self.fs, self.root, rows)
        reasons: Counter[str] = Counter()
        resolved = 0
        for r in rows:
            if self._resolved(r, stored):
                resolved += 1
            else:
                reasons[r["reason"]] += 1
        return Totals(images, sum(reasons.values()), dict(sorted(reasons.items())), resolved)


def _fsync(path: str) -> None:
    """Flush the file ``path``'s data to the disk (any descriptor of it will do)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: str) -> None:
    """Flush ``folder``'s entries (a rename just made in it) where the system can: not every
    platform opens a folder (Windows) or flushes one (some network filesystems), and there
    the rename stands as it always did."""
    try:
        _fsync(folder)
    except OSError as err:
        log.debug("cannot flush folder %s: %s", folder, err)


def _stored_paths(fs: pafs.FileSystem, root: str, rows: list[dict[str, Any]]) -> dict[str, str]:
    """Path hash -> the latest run that stored an image from it (run ids sort by start
    time; a shard is ``part-<run_id>-<n>.parquet``). Read only when a row was quarantined
    unread."""
    if not any(r.get("sha256") is None for r in rows):
        return {}
    latest: dict[str, str] = {}
    for path in output_files(fs, root, IMAGES_DIR):
        run = path.rsplit("/", 1)[-1].removeprefix("part-").rsplit("-", 1)[0]
        table = read_dst_table(fs, path, ["source_hash"], path)
        for h in table.column("source_hash").to_pylist():
            if h and run > latest.get(h, ""):
                latest[h] = run
    return latest


def resolved_rows(dst: str, rows: list[dict[str, Any]]) -> list[bool]:
    """Which of DST's quarantine ``rows`` (with ``sha256``, ``source_hash`` and ``run_id``) a
    later run resolved, as :meth:`Destination.totals` counts them: for a reader that must
    leave DST untouched (``radjepa quarantine``), where a :class:`Destination` would create
    its folders. A lister that showed resolved rows named stored files as quarantined."""
    fs, root = filesystem(dst)
    stored = _stored_paths(fs, root, rows)
    return [Destination._resolved(r, stored) for r in rows]


def _read_json(fs: pafs.FileSystem, root: str, uri: str, name: str) -> dict[str, Any] | None:
    path = f"{root}/{name}"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path, compression=None) as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IngestError(
            f"{uri}/{name} is not valid JSON ({err}); restore it or ingest into a new DST"
        ) from None
    if not isinstance(data, dict):
        raise IngestError(f"{uri}/{name} is not a JSON object; restore it")
    return data


def _scheme(record: dict[str, Any]) -> str:
    # a record written before the scheme was a setting: PatientID alone was the only scheme
    return str(record.get("patient_identity") or PATIENT_ID)


def _id_scheme(dest: Destination, recorded: dict[str, Any] | None) -> str:
    """The image id scheme of DST: the recorded one; else (a DST made before ids were keyed)
    the unkeyed SHA-256 when it holds any id, since re-runs must recognise its files by the ids
    they have; a DST without any is started with keyed ids."""
    scheme = (recorded or {}).get("id_scheme")
    if scheme:
        if scheme not in ID_SCHEMES:
            raise IngestError(
                f"{dest.uri} records image id scheme {scheme!r}, which this version does not "
                f"know ({', '.join(ID_SCHEMES)}): ingest into it with the version that made it"
            )
        return str(scheme)
    return ID_SCHEME_UNKEYED if dest.known_ids() else ID_SCHEME_KEYED


def _warn_unkeyed(dest: Destination) -> None:
    log.warning(
        "%s identifies images by the unkeyed SHA-256 of their file bytes (made before ids were "
        "keyed): anyone holding an original file can find its row. This run keeps that scheme "
        "so that re-runs still recognise the files already in it; ingest into a new DST to have "
        "keyed ids (HMAC-SHA256 under the pseudonymisation key)",
        dest.uri,
    )


def check_key(
    dest: Destination, previous: dict[str, Any] | None, key: dict[str, Any], env: str
) -> dict[str, Any]:
    """One pseudonymisation key and one patient identity scheme per DST, recorded before the
    first shard is written (a run that dies before its manifest must not let the next run
    switch either unnoticed): both change every patient's pseudonym. Returns the record the
    DST keeps, for the manifest, with the DST's image id scheme (``id_scheme``): keyed for a
    new DST, the unkeyed SHA-256 kept (with a warning) for one made before ids were keyed.

    A DST that already held shards when its key was first recorded (made by a version that
    kept no record) is marked ``unchecked_shards``: its older pseudonyms may come from another
    key, so :func:`recorded_pseudonyms` vouches for no key there, and a server says
    ``used_unverified`` rather than ``used``.
    """
    stored = dest.read_json(KEY_RECORD)
    recorded = stored or (previous or {}).get("pseudonyms")
    if recorded:
        if recorded.get("key_fingerprint") != key["key_fingerprint"]:
            raise IngestError(
                f"destination was ingested with another pseudonymisation key (${env}): the "
                "same patient would get a second pseudonym and patient-grouped splits would "
                f"break. Set {env} to the key used before, or ingest into a new DST."
            )
        old, new = _scheme(recorded), _scheme(key)
        if old != new:
            raise IngestError(
                f"destination was ingested with ingest.patient_identity={old} but this run "
                f"asks for {new}: the same patient would get a second pseudonym and "
                f"patient-grouped splits would break. Set ingest.patient_identity={old}, or "
                "ingest into a new DST."
            )
        kept = {
            **key,
            "id_scheme": _id_scheme(dest, recorded),
            **({UNCHECKED: True} if recorded.get(UNCHECKED) else {}),
        }
        if kept["id_scheme"] == ID_SCHEME_UNKEYED:
            _warn_unkeyed(dest)
        if stored != kept:
            dest.write_json(KEY_RECORD, kept)  # made explicit for `radjepa embed` to read
        return kept
    if dest.known_ids():
        if dest.stored_image() is not None and _scheme(key) != PATIENT_ID:
            # versions that kept no record knew one scheme: its shards are PatientID alone
            raise IngestError(
                f"destination holds images from a version without ingest.patient_identity, "
                f"i.e. patient_id, but this run asks for {_scheme(key)}: the same patient "
                "would get a second pseudonym and patient-grouped splits would break. Set "
                "ingest.patient_identity=patient_id, or ingest into a new DST."
            )
        log.warning(
            "%s holds images but no record of its pseudonymisation key (made by an older "
            "version): the key cannot be checked; recording the current one",
            dest.uri,
        )
        key = {**key, "id_scheme": ID_SCHEME_UNKEYED, UNCHECKED: True}
        _warn_unkeyed(dest)
    else:
        key = {**key, "id_scheme": ID_SCHEME_KEYED}
    dest.write_json(KEY_RECORD, key)
    return key


def check_compatible(
    dest: Destination, previous: dict[str, Any] | None, settings: dict[str, Any]
) -> None:
    """Shards in one DST must share image size and dtype (training and the index read them as
    one array); the manifest says which, else a stored shard does (a run that died first).
    And one window (:func:`check_window`): checked against the manifest and against
    :data:`DECODE_RECORD`, which a DST without images takes from this run before its first
    shard."""
    stored = dest.stored_image()
    old = (previous or {}).get("image") or stored
    new = {"size": settings["size"], "dtype": settings["dtype"]}
    if old and {k: old.get(k) for k in new} != new:
        raise IngestError(
            f"destination already holds images ingested with {old}; this run asks for {new}. "
            "Use a new DST (shards in one folder must share size and dtype)."
        )
    check_window(previous, settings)
    _check_decode_record(dest, previous, settings, holds_images=stored is not None)


def check_window(previous: dict[str, Any] | None, settings: dict[str, Any]) -> None:
    """The manifest records one ``ingest.window_percentiles`` for all of DST's images and a run
    rewrites it with its own: another window left the stored images described by a window that
    did not make them, and windowed new DICOMs differently from the old ones in one training
    set. Refused like another size; a DST without images (or without a record) takes any."""
    recorded = ((previous or {}).get("image") or {}).get("window_percentiles")
    if not recorded or not (previous or {}).get("images"):
        return
    _same_window([float(v) for v in recorded], settings)


def _same_window(old: list[float], settings: dict[str, Any]) -> None:
    new = [float(v) for v in settings["window_percentiles"]]
    if old != new:
        raise IngestError(
            f"destination holds images windowed with ingest.window_percentiles={old}; this run "
            f"asks for {new}. Set ingest.window_percentiles={old}, or ingest into a new DST "
            "(it records one window for all of its images)."
        )


def _check_decode_record(
    dest: Destination,
    previous: dict[str, Any] | None,
    settings: dict[str, Any],
    *,
    holds_images: bool,
) -> None:
    """The window DST's images were made with, recorded before its first shard: the manifest
    alone came too late. A first run killed after some shards, before its manifest, left
    nothing that named its window; the next run with another one was let through, the manifest
    then gave its window to every image (training recorded it in the checkpoint, serving
    windowed uploads with it) and a run with the true window was refused.

    A DST that holds images fixes its record; one without takes this run's, written before
    anything else. Images without a record were made by an older version: the manifest's
    window (:func:`check_window`) is checked where there is one; a run of that version killed
    before its first manifest left none, and the window its images were made with cannot be
    known."""
    recorded = dest.read_json(DECODE_RECORD)
    images = holds_images or bool((previous or {}).get("images"))
    if recorded is not None and images:
        window = recorded.get("window_percentiles")
        if not _is_window(window):
            raise IngestError(
                f"{dest.uri}/{DECODE_RECORD}: window_percentiles {window!r} is not a window "
                "(two percentiles, low below high, within [0, 100]); restore it"
            )
        _same_window([float(v) for v in window], settings)
        return
    if images:
        if not ((previous or {}).get("image") or {}).get("window_percentiles"):
            log.warning(
                "%s holds images but no record of the ingest.window_percentiles they were "
                "made with (a run of an older version was interrupted before its manifest): "
                "the window cannot be checked; the manifest will record this run's %s",
                dest.uri,
                list(settings["window_percentiles"]),
            )
        return
    decode = {
        "size": int(settings["size"]),
        "dtype": str(settings["dtype"]),
        "window_percentiles": [float(v) for v in settings["window_percentiles"]],
    }
    if recorded != decode:
        dest.write_json(DECODE_RECORD, decode)


def recorded_window(dst: str) -> tuple[float, float] | None:
    """The ``ingest.window_percentiles`` the ingest output ``dst`` (or its ``images`` folder)
    windowed its DICOMs with, from :data:`DECODE_RECORD`, else from its manifest (a DST of an
    older version); None where neither records one, or where the one found is
    no window (damaged by hand: said in a warning). The stored size and dtype are in every
    shard row; the window is only here."""
    fs, places = _record_places(dst)
    for folder, spelled in places:
        # the decode record first: it is written before the first image and never changed
        # while DST holds one, and a manifest of runs that stored no image (all quarantined,
        # an empty source) names the window of none
        for name in (DECODE_RECORD, MANIFEST):
            record = _read_json(fs, folder, spelled, name) or {}
            image = record.get("image") if name == MANIFEST else record
            window = image.get("window_percentiles") if isinstance(image, dict) else None
            if _is_window(window):
                return float(window[0]), float(window[1])
            if window is not None:  # damaged by hand: the shards themselves still stand
                log.warning("%s/%s: window_percentiles %r is not a window", spelled, name, window)
                if name == MANIFEST:
                    break
    return None


def _is_window(value: Any) -> bool:
    """Two percentiles, low below high, within [0, 100]."""
    if not isinstance(value, list) or len(value) != 2:
        return False
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return False
    low, high = (float(v) for v in value)
    return 0.0 <= low < high <= 100.0


def _record_places(dst: str) -> tuple[pafs.FileSystem, list[tuple[str, str]]]:
    """Where ingest's records of ``dst`` may lie (the folder, and the DST above a shard folder
    given itself), each as a path on the filesystem and as the user spelled it."""
    fs, root = filesystem(dst)
    root = root.rstrip("/")
    places = [(root, dst)]
    if root.rsplit("/", 1)[-1] == IMAGES_DIR and "/" in root:  # given the shard folder itself
        places.append((root.rsplit("/", 1)[0], dst.rstrip("/").rsplit("/", 1)[0]))
    return fs, places


def id_scheme_of(record: dict[str, Any] | None) -> str:
    """The image id scheme of shards whose :func:`recorded_pseudonyms` is ``record``: shards
    that record none were made before ids were keyed, so theirs are the unkeyed SHA-256."""
    return str((record or {}).get("id_scheme") or ID_SCHEME_UNKEYED)


def recorded_pseudonyms(dst: str) -> dict[str, str | None] | None:
    """Which key (``key_fingerprint``) and patient identity scheme (``patient_identity``) made
    the pseudonyms of the ingest output ``dst`` (or its ``images`` folder), and how its image
    ids are made (``id_scheme``: the unkeyed ``sha256`` when the record predates keyed ids);
    None when it records neither key nor scheme (ingested before the key was recorded, so
    with unkeyed ids); ``key_fingerprint`` None when the key was recorded only after some
    shards were written (``check_key``).

    ``radjepa embed`` copies this into the index: a server can only pseudonymise an upload's
    own PatientID to match archive rows with the same key and scheme, and checks them there.
    """
    fs, places = _record_places(dst)
    for folder, spelled in places:
        record = _read_json(fs, folder, spelled, KEY_RECORD)
        if record is None:
            record = (_read_json(fs, folder, spelled, MANIFEST) or {}).get("pseudonyms")
        if isinstance(record, dict) and record.get("key_fingerprint"):
            return {
                "key_fingerprint": None
                if record.get(UNCHECKED)
                else str(record["key_fingerprint"]),
                "patient_identity": _scheme(record),
                "id_scheme": id_scheme_of(record),
            }
    return None

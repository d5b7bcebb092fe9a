"""Ray Data ingest: DICOM/PNG/JPEG archives -> de-identified, normalised Parquet shards.

Flow: the driver lists every source (directories, .zip, .tar/.tar.gz, local or any pyarrow
filesystem URI) into file references; Ray tasks read the bytes (archive members included);
an actor pool runs :func:`radjepa.imaging.decode.decode_image` with errors caught per file;
the driver streams the results in input order, drops duplicate bytes and duplicate DICOM
instances (:mod:`radjepa.ingest.instances`), and writes fixed-size zstd Parquet shards to
``DST/images/``, rejects to ``DST/quarantine/``, inputs dropped as duplicates (same instance in
other bytes, or same bytes from another path) to ``DST/duplicates/`` and a reconciling
``DST/manifest.json`` (input = ok + quarantined + duplicates), which records every run, also
one Ctrl-C, SIGTERM or a storage error (a full disk, expired credentials) stopped.

Idempotence: image ids (HMAC-SHA256 of the bytes under the pseudonymisation key; the unkeyed
SHA-256 in a DST made before ids were keyed) already in ``DST`` (images or quarantine) are
skipped by the decoders and counted as duplicates, so a re-run writes nothing twice. Shards are
written under a temporary name and renamed, so an interrupted run leaves no partial shard.
The driver is the single writer: simple and exact, and fast enough for ~1k images/s of 256 px.
One run per DST at a time: a run holds ``DST/.ingest.lock`` (:mod:`radjepa.ingest.dst_lock`)
from before its first write to its end, and removes what killed runs left mid-write.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import logging
import os
import re
import sys
import time
import uuid
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import pyarrow as pa

from radjepa.ingest.decoding import RESULT_SCHEMA, FileDecoder
from radjepa.ingest.destination import (
    MANIFEST_VERSION,
    RUN_FINISHED,
    RUN_INTERRUPTED,
    Destination,
    check_compatible,
    check_key,
    input_key,
    is_output,
    run_status,
)
from radjepa.ingest.dst_lock import DstLock
from radjepa.ingest.errors import IngestError
from radjepa.ingest.id_sets import PATH_PREFIX, InputKeys, KnownIds
from radjepa.ingest.instances import CONFLICT, InstanceIndex
from radjepa.ingest.sources import (
    IMAGE_SUFFIXES,
    SNIFF_LIMIT,
    count_inputs,
    list_inputs,
    read_blocks,
)
from radjepa.locations import filesystem, local_path
from radjepa.shards import (
    DUPLICATE_SAME_BYTES,
    DUPLICATE_SAME_INSTANCE,
    DUPLICATE_SCHEMA,
    DUPLICATES_DIR,
    IMAGES_DIR,
    QUARANTINE_DIR,
    QUARANTINE_SCHEMA,
    SHARD_SCHEMA,
    rows_sorted_by,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from radjepa.config import Config, IngestConfig

__all__ = [
    "IngestError",
    "IngestInterrupted",
    "IngestSummary",
    "StorageFailed",
    "list_inputs",
    "main",
    "run_ingest",
    "run_ingest_until_stopped",
    "summary_table",
]

log = logging.getLogger(__name__)

_DECODER_RETRIES = 2


class _RunStopped(IngestError):
    """A run stopped mid-way, keeping what it wrote; ``recordable``: whether its counts are
    what DST holds, so that it can be recorded as interrupted."""

    def __init__(self, message: str, *, recordable: bool = True) -> None:
        super().__init__(message)
        self.recordable = recordable


class DecoderDied(_RunStopped):
    """A decoder process died on the same batch at every retry: the run stops, recorded
    unless DST failed as it wrote what the run kept."""


class _StoppedUnrecorded(KeyboardInterrupt):
    """A Ctrl-C (or SIGTERM) after which DST failed as the run wrote what it kept: stopped as
    interrupted, not recorded (what its writes kept is not known)."""

    recordable = False


_DECODE_BATCH = 16  # files per decoder call


class StorageFailed(_RunStopped):
    """DST refused a read or write (a full disk, expired object-store credentials, an NFS
    error): the run stops in one line, keeping what DST still takes. It printed a traceback,
    and the run's quarantine and duplicate rows, written at its end, were lost."""


# what to do about the commonest storage errors; any other: the generic advice
_STORAGE_REMEDIES = {
    errno.ENOSPC: "free space there",
    errno.EDQUOT: "free space there or raise the quota",
    errno.EACCES: "let this user write there",
    errno.EPERM: "let this user write there",
    errno.EROFS: "make it writable",
}


def _is_storage_error(err: BaseException) -> bool:
    """An error of DST's storage, not of the program: an OSError (pyarrow raises its I/O
    errors as ones). Not a Ray task's error, re-raised as an instance of its cause's type;
    not Ray Client's ConnectionError for a dropped connection to the cluster, nor a broken
    pipe of the console; not pyarrow's other errors (a column missing, memory exhausted)."""
    from ray.exceptions import RayError

    if type(err) in (ConnectionError, BrokenPipeError):
        return False
    return isinstance(err, OSError) and not isinstance(err, RayError)


def _errno(err: BaseException) -> int | None:
    """The errno of an OSError, also where pyarrow gives it only in its text (``Error writing
    bytes to file. Detail: [errno 28] No space left on device``)."""
    code = getattr(err, "errno", None)
    if code:
        return int(code)
    found = re.search(r"\[errno (\d+)\]", str(err))
    return int(found[1]) if found else None


def _cause(err: BaseException) -> str:
    """A storage error's reason without its file name: the errno's text, else the first line
    of pyarrow's message (which names DST's own object at most)."""
    code = _errno(err)
    reason = os.strerror(code) if code else getattr(err, "strerror", None) or ""
    lines = str(err).strip().splitlines()
    return reason or (lines[0][:300] if lines else type(err).__name__)


def _storage_failed(
    err: BaseException, dst: str, lost: str = "", *, recordable: bool = True
) -> StorageFailed:
    """One line: the cause (an OSError's reason without its file name, else the first line of
    pyarrow's message, which names DST's own object at most), what was kept and the remedy.
    ``lost``: what the run could not write after the error, said after what it kept."""
    cause = _cause(err)
    remedy = _STORAGE_REMEDIES.get(_errno(err) or 0, "fix the storage")
    return StorageFailed(
        f"ingest stopped: {dst} failed: {cause}; the images stored so far are kept{lost}. "
        f"{remedy.capitalize()} and re-run the same command: stored images are skipped",
        recordable=recordable,
    )


def _raise_storage_failed(
    err: OSError,
    dst: str,
    *,
    recordable: bool = True,
    salvage: Callable[[], tuple[str, bool]] | None = None,
) -> NoReturn:
    """Raise DST's storage error ``err`` as :class:`StorageFailed` (one line), after
    ``salvage`` wrote what DST still takes (it returns what was lost and whether the run is
    recordable; a Ctrl-C as it writes leaves both unknown); any other error as it is."""
    if not _is_storage_error(err):
        raise err
    lost = ""
    if salvage is not None:
        try:
            lost, recordable = salvage()
        except KeyboardInterrupt:  # stopped while it wrote what it could: counts unknown
            lost, recordable = _STOPPED_WRITING, False
    raise _storage_failed(err, dst, lost, recordable=recordable) from err


@contextlib.contextmanager
def _dst_errors(dst: str, *, recordable: bool) -> Iterator[None]:
    """DST's storage errors in the block raised as :class:`StorageFailed` (one line)."""
    try:
        yield
    except OSError as err:
        _raise_storage_failed(err, dst, recordable=recordable)


@dataclass
class IngestSummary:
    """What one run did; ``input == ok + quarantined + duplicates`` always holds. ``resolved``:
    inputs stored (among ``ok``) that earlier runs had quarantined unread; ``total_quarantined``
    counts DST's quarantine rows of inputs not stored, ``total_resolved`` the rows of inputs a
    later run stored (:class:`radjepa.ingest.destination.Totals`). ``duplicate_instances``:
    the duplicates (among ``duplicates``) whose bytes were new but whose DICOM instance was
    already stored. ``status``: ``finished``, or ``interrupted`` (Ctrl-C, SIGTERM), whose
    counts are those of the inputs it kept a record of (stored, quarantined, duplicates)."""

    dst: str
    run_id: str
    input: int = 0
    ok: int = 0
    quarantined: int = 0
    duplicates: int = 0
    duplicates_in_run: int = 0
    already_ingested: int = 0
    duplicate_instances: int = 0
    resolved: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    total_images: int = 0
    total_quarantined: int = 0
    total_resolved: int = 0
    status: str = RUN_FINISHED


# ---------------------------------------------------------------------------------------------
# The job


class _Decoder(FileDecoder):
    """Ray Data actor: a :class:`FileDecoder` that decodes each file in a child process (a codec
    crashing or stuck past ``ingest.decode_timeout_s`` on one file quarantines that file; it
    ended the actor, and its batch was retried until the run stopped), and whose set of known
    ids comes once per actor from the object store: its arrays (:class:`KnownIds`) are mapped
    read-only from the node's one copy, not unpickled into each actor.

    They are fetched with the actor's first batch, not in its constructor: an autoscaling pool
    still starting an actor when a short run ends drops it, and the run's reference to the ids
    with it, while the constructor runs; a ``ray.get`` there then failed, and the actor died
    printing a traceback ("This should not happen") and Ray's object store report in the
    middle of the next stage's output. An actor that gets no batch never asks."""

    def __init__(
        self,
        settings: dict[str, Any],
        secret: bytes,
        known: Any,
        keep_paths: bool,
        timeout_s: float = 0.0,
    ) -> None:
        import ray

        self._known_ref = known if isinstance(known, ray.ObjectRef) else None
        fetched_later = self._known_ref is not None
        super().__init__(
            settings,
            secret,
            frozenset() if fetched_later else known,
            keep_paths,
            isolate=True,
            timeout_s=timeout_s,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self._known_ref is not None:
            import ray

            self.known, self._known_ref = ray.get(self._known_ref), None
        return super().__call__(batch)


def _outputs_filter(dst: str, dst_root: str) -> Callable[[str], bool]:
    """Whether a listed input is one of DST's own outputs (``is_output``). On a local disk the
    paths are compared as the links resolve: a source named through a symlink listed DST's
    shards, manifest and quarantine under the link's name, and every run read them back as
    inputs (quarantined ``not_an_image``, duplicates). Each folder is resolved once per run
    (a listing holds many files per folder), not across runs: a link may since point
    elsewhere."""
    resolved = functools.lru_cache(maxsize=4096)(os.path.realpath)
    root = resolved(dst_root) if "://" not in dst else dst_root

    def written_here(path: str) -> bool:
        if "://" in dst or "://" in path:
            return is_output(dst_root, path)
        folder, name = os.path.split(path)
        return is_output(root, os.path.join(resolved(folder), name))

    return written_here


def run_ingest(
    sources: list[str], dst: str, cfg: Config, *, progress: bool = True
) -> IngestSummary:
    """Ingest ``sources`` into ``dst`` (see module docstring); returns the run's summary."""
    import ray

    from radjepa.imaging.deid import (
        DEV_SECRET,
        SecretRefused,
        key_fingerprint,
        resolve_secret,
    )

    if not sources:
        raise IngestError("no sources given")
    ing = cfg.ingest
    try:  # before anything is listed, locked or written, and before Ray starts
        secret = resolve_secret(ing.secret_env, allow_development_key=ing.allow_development_key)
    except SecretRefused as err:
        raise IngestError(str(err)) from None
    started = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    settings = {
        "size": ing.image_size,
        "dtype": ing.dtype,
        "window_percentiles": tuple(ing.window_percentiles),
        "max_bytes": int(ing.max_file_mb * 1024 * 1024),
        "reject_burned_in": ing.burned_in_annotation == "quarantine",
        "reject_for_processing": ing.for_processing == "quarantine",
        "patient_identity": ing.patient_identity,
    }
    # list first (a missing source fails before DST is touched); a DST inside a source folder
    # must not ingest its own shards on the next run
    try:
        dst_root = filesystem(dst)[1]
    except (OSError, pa.ArrowException) as err:
        raise IngestError(f"cannot use destination {dst}: {err}") from None
    written_here = _outputs_filter(dst, dst_root)
    refs = [r for r in list_inputs(sources) if not written_here(r["path"])]
    # one run per DST: two at once stored the same new files twice and the later manifest
    # dropped the other's run (dst_lock); taken before the first write, released however it ends
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    with DstLock(dst, run_id) as lock:
        # DST's storage errors (here, and in the reads before the run and its record after it,
        # which are not recorded; those mid-run are): one line, not a traceback; Ray's and the
        # program's own errors stay as they are
        with _dst_errors(dst, recordable=False):
            dest = Destination(dst)
            dest.before_write = lock.check_held
            dest.remove_leftovers()  # of runs killed mid-write: ours now that we hold the lock
            dest.warn_foreign_files()  # which training refuses: said before the run, not after
            previous = dest.read_manifest()
            key = {
                "key": "development" if secret == DEV_SECRET else "secret",
                "key_fingerprint": key_fingerprint(secret),
                "patient_identity": ing.patient_identity,
            }
            check_compatible(dest, previous, settings)
            key = check_key(dest, previous, key, ing.secret_env)
        settings["id_scheme"] = key["id_scheme"]  # the DST's: re-runs recognise its files
        summary = IngestSummary(dst=dst, run_id=run_id)
        expected: int | None = None
        try:
            sniff = len(refs) <= SNIFF_LIMIT  # see SNIFF_LIMIT
            counts = [count_inputs(r, sniff) for r in refs]
            # None: a large compressed tar is not counted ahead (see count_members), so neither
            # is the run
            expected = None if None in counts else sum(c for c in counts if c is not None)

            if not ray.is_initialized():
                from pipelines.runtime import ensure_ray

                ensure_ray()
            with _dst_errors(dst, recordable=False):
                known = dest.known_ids()
                unread = dest.unread_quarantined()  # quarantined unread before: stored if readable
                instances = InstanceIndex(dest.shards(), dest.read_columns)  # once per run
            first, actors = _decoder_pool(
                ing.decode_actors,
                ray.cluster_resources().get("CPU", 1),
                expected,
                len(refs),
                undercounted=any(_may_hold_more(r, sniff) for r in refs),
            )
            pool = ray.data.ActorPoolStrategy(min_size=first, max_size=actors)
            log.info(
                "ingest %s inputs (%d refs) into %s with up to %d decoders; %d ids and %d DICOM "
                "instances already present",
                "uncounted" if expected is None else expected,
                len(refs),
                dst,
                actors,
                len(known),
                len(instances),
            )

            if refs:
                ds = _build_dataset(
                    refs,
                    actors,
                    pool,
                    settings,
                    secret,
                    known,
                    ing.keep_source_paths,
                    ing.decode_timeout_s,
                )
                outputs = _Outputs(dest, summary, ing.shard_rows, run_id, instances)
                _consume(ds, outputs, expected, progress, unread)
            else:
                log.warning("no files found under the given sources; writing an empty run")
            summary.seconds = round(time.perf_counter() - started, 3)
            with _dst_errors(dst, recordable=False):
                _record_run(
                    dest, previous, summary, settings, key, sources, expected, ing, started_at
                )
        except (KeyboardInterrupt, DecoderDied, StorageFailed) as stopped:  # Ctrl-C, SIGTERM
            # routed as one, a decoder that kept dying, DST failing: record what it kept
            summary.status = RUN_INTERRUPTED
            summary.seconds = round(time.perf_counter() - started, 3)
            try:
                if getattr(stopped, "recordable", True):
                    _record_run(
                        dest, previous, summary, settings, key, sources, expected, ing, started_at
                    )
            except (OSError, IngestError, pa.ArrowException) as err:
                log.warning("could not record the interrupted run in manifest.json: %s", err)
            raise
    if progress:
        from rich.console import Console

        Console(stderr=True).print(summary_table(summary))
    return summary


def _may_hold_more(ref: dict[str, str], sniff: bool) -> bool:
    """Whether ``ref`` may hold more inputs than :func:`count_inputs` counted it as: a file not
    named as an image that it did not open (an object-store key, or any file of a run of more
    than :data:`SNIFF_LIMIT` refs) counts one, and may be a zip of thousands."""
    if ref["kind"] != "file" or ref["path"].lower().endswith(IMAGE_SUFFIXES):
        return False
    return not sniff or local_path(ref["source"]) is None


def _decoder_pool(
    asked: int, cpus: float, expected: int | None, refs: int, undercounted: bool = False
) -> tuple[int, int]:
    """The decoder pool's (first, most) sizes: it starts with ``first`` and grows on demand.
    ``most`` is ``ingest.decode_actors`` as asked, or for 0 one per cluster CPU but no more
    than batches of the inputs counted, or than the ``refs`` where a ref may hold more than
    it was counted as (``undercounted``: 4 suffix-less zips on object storage counted 4
    inputs, so 1 decoder); ``first`` is one for 0, else as many as those batches
    (a small job starts few), the asked size when the inputs are uncounted, and never more
    than the ``refs`` listed: each is read by the decoder that decodes it (reading is fused
    into the pool), so more would sit idle (and Ray Data warns of it).

    An asked size was capped by the count, and the count can fall short (an archive on object
    storage without a suffix counts as one input): 4 such zips of 40 members each got 1 decoder
    of the 16 asked for. The count now only says how many to start with."""
    batches = None if expected is None else max(1, -(-expected // _DECODE_BATCH))
    if asked:
        return min(asked, batches or asked, max(1, refs)), asked
    most = max(1, int(cpus))
    if undercounted:
        return 1, min(most, max(1, refs))
    return 1, (most if batches is None else min(most, batches))


def _record_run(
    dest: Destination,
    previous: dict[str, Any] | None,
    summary: IngestSummary,
    settings: dict[str, Any],
    key: dict[str, Any],
    sources: list[str],
    expected: int | None,
    ing: IngestConfig,
    started_at: str,
) -> None:
    """Totals from the shards themselves, this run appended to the runs the manifest held,
    with its status (an interrupted run is recorded too: it kept shards)."""
    totals = dest.totals()
    summary.total_images, summary.total_quarantined = totals.images, totals.quarantined
    summary.total_resolved = totals.resolved
    if summary.input != summary.ok + summary.quarantined + summary.duplicates:
        raise IngestError(f"internal error: counts do not reconcile: {asdict(summary)}")
    run = {
        k: v
        for k, v in asdict(summary).items()
        if k not in ("dst", "total_images", "total_quarantined", "total_resolved")
    }
    run.update(
        status=summary.status,
        started_at=started_at,
        sources=len(sources),
        expected_inputs=expected,
        burned_in_annotation=ing.burned_in_annotation,
        for_processing=ing.for_processing,
    )
    # a version 1 manifest recorded only finished runs, without a status: said now
    earlier = [{**r, "status": run_status(r)} for r in (previous or {}).get("runs", [])]
    runs = [*earlier, run]
    dest.write_manifest(
        {
            "manifest_version": MANIFEST_VERSION,
            "image": {
                "size": settings["size"],
                "dtype": settings["dtype"],
                "window_percentiles": list(settings["window_percentiles"]),
            },
            "pseudonyms": key,
            "images": summary.total_images,
            "quarantined": summary.total_quarantined,
            "quarantine_reasons": totals.reasons,
            "quarantine_resolved": totals.resolved,
            "duplicates": sum(r["duplicates"] for r in runs),
            "duplicate_instances": sum(r.get("duplicate_instances", 0) for r in runs),
            "inputs_seen": sum(r["input"] for r in runs),
            "runs": runs,
            "last_run": run,
        }
    )


def _build_dataset(
    refs: list[dict[str, str]],
    actors: int,
    pool: Any,
    settings: dict[str, Any],
    secret: bytes,
    known: KnownIds,
    keep_paths: bool,
    timeout_s: float = 0.0,
    decoder: type[_Decoder] | None = None,
) -> Any:
    """The Ray Data pipeline: file refs -> read tasks -> decoder actor pool (``decoder``:
    :class:`_Decoder` or a subclass, e.g. a test's that fails as a codec can). Its output comes
    in input order (sorted paths, archive members in archive order), so that of two files of
    one DICOM instance the same one is stored on every run, whichever decoder ends first."""
    import ray

    ds = ray.data.from_items(refs, override_num_blocks=max(1, min(len(refs), 8 * actors)))
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(
        read_blocks,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"max_bytes": settings["max_bytes"]},
    )
    with warnings.catch_warnings():
        # the retry bounds below have no named parameter in Ray 2.60, and every ingest said
        # that passing them is deprecated (nothing a user running it can act on); Ray Data
        # reads them as before
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
        return ds.map_batches(
            decoder or _Decoder,
            batch_size=_DECODE_BATCH,
            batch_format="pyarrow",
            compute=pool,
            num_cpus=1,
            # Ray Data retries a batch whose decoder process died without end (and restarts the
            # actor without end): a file that crashes its codec, or an image too large for the
            # node's memory, kept the run retrying it for ever with DST locked. A batch whose
            # process dies this many more times stops the run (DecoderDied)
            max_restarts=-1,
            max_task_retries=_DECODER_RETRIES,
            fn_constructor_kwargs={
                "settings": dict(settings),
                "secret": secret,
                "known": ray.put(known),  # numpy buffers: mapped, not copied, per node
                "keep_paths": keep_paths,
                "timeout_s": timeout_s,
            },
        )


# the most seconds of a run's quarantine rows a killed driver loses (but for the last ones)
REJECTS_EVERY_S = 60.0


class _Outputs:
    """What a run keeps as it streams: shards written as they fill; quarantine rows with a
    shard at most every :data:`REJECTS_EVERY_S` (and every ``shard_rows`` of them), so that a
    driver killed at 99% (``kill -9``, an OOM, a lost head) keeps them and its re-run does not
    decode every broken file again (a stuck codec costs ``decode_timeout`` each time);
    duplicate rows (same instance, same bytes) at the end, also of a run that is interrupted:
    one may name as the copy kept an image of a shard not written yet, and a re-run would then
    skip that image for good."""

    def __init__(
        self,
        dest: Destination,
        summary: IngestSummary,
        shard_rows: int,
        run_id: str,
        instances: InstanceIndex,
    ) -> None:
        self.dest, self.summary, self.shard_rows, self.run_id = dest, summary, shard_rows, run_id
        self.instances = instances
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rejects: list[pa.Table] = []  # not written yet
        self.quarantine_parts = 0  # quarantine files written
        self.reasons_written: Counter[str] = Counter()  # of the rows in them
        # with a shard at most this often: a file per shard was ~5,000 small files for 10M
        # images with 1% broken, each read by every later run
        self.rejects_every_s = REJECTS_EVERY_S
        self.rejects_written_at = time.monotonic()
        self.duplicates: list[dict[str, Any]] = []  # same_instance rows
        self.instance_kept: dict[str, str] = {}  # same_instance rows: image id -> kept id
        self.copies: list[dict[str, Any]] = []  # same_bytes rows
        # the keys of DST's duplicate rows, with the inputs this run lists, and each listed
        # id's kept image: read at the run's first duplicate (none on most incremental runs)
        self.listed: tuple[InputKeys, dict[str, str]] | None = None
        # the keys of DST's stored and quarantine rows: read at the first input DST knows
        self.held: InputKeys | None = None
        # image id -> (reason, message) of bytes quarantined: by this run, and by DST (read at
        # the first input DST already knows)
        self.quarantined_here: dict[str, tuple[str, str]] = {}
        self._said: dict[tuple[str, str], tuple[str, str]] = {}  # each (reason, message) once
        self.quarantined_before: dict[str, tuple[str, str]] | None = None
        self.stored_paths: KnownIds | None = None  # read at the first file over the size limit

    def store(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.flush(final=False)

    def flush(self, final: bool) -> None:
        while self.pending_rows >= self.shard_rows or (final and self.pending_rows):
            table = pa.concat_tables(self.pending)
            head, rest = table.slice(0, self.shard_rows), table.slice(self.shard_rows)
            # rows by image id (a keyed hash), not in input order: sorted paths are often
            # patient names or IDs, and a shard's row order gave their order away (quarantine
            # and duplicate rows go by path hash, in finish)
            head = rows_sorted_by(head, "image_id")
            name = f"part-{self.run_id}-{len(self.summary.shards):05d}.parquet"
            path = self.dest.write(
                IMAGES_DIR, name, head.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
            )
            # one statement: a Ctrl-C between two would let the final flush of an interrupted
            # run write other rows under this name (a shard lost) or these rows twice
            self.pending, self.pending_rows, self.summary.shards = (
                [rest] if rest.num_rows else [],
                rest.num_rows,
                [*self.summary.shards, path],
            )
            self.instances.written(f"{self.dest.root}/{path}", head)
            # progress where the bar does not show (a Ray Job's log is no terminal)
            log.info("wrote %s (%d images)", path, head.num_rows)
            if time.monotonic() - self.rejects_written_at >= self.rejects_every_s:
                self.write_rejects()

    def write_rejects(self) -> None:
        """Write the quarantine rows held so far as the run's next quarantine file. A Ctrl-C
        after the write and before the rows are let go writes them again under the same name
        (the count moves in the same statement), not twice."""
        if not self.rejects:
            return
        # by path hash, as shards by image id: not in the order of the inputs' paths
        q = pa.concat_tables(self.rejects).sort_by("source_hash")
        name = f"quarantine-{self.run_id}-{self.quarantine_parts:05d}.parquet"
        self.dest.write(QUARANTINE_DIR, name, q)
        self.rejects, self.quarantine_parts, self.reasons_written = (
            [],
            self.quarantine_parts + 1,
            self.reasons_written + Counter(q["reason"].to_pylist()),
        )
        self.rejects_written_at = time.monotonic()

    def pixels(self, image_id: str, batch: pa.Table) -> tuple[bytes, int, int, str] | None:
        """A row this run stored but has not written yet (in a pending shard or in ``batch``)."""
        import pyarrow.compute as pc

        for table in [*self.pending, batch]:
            i = pc.index(table["image_id"], image_id).as_py()
            if i >= 0:
                row = table.slice(i, 1).select(["pixels", "height", "width", "dtype"])
                r = row.to_pylist()[0]
                return r["pixels"], r["height"], r["width"], r["dtype"]
        return None

    def quarantined_copy(self, image_id: str, source_hash: str) -> tuple[str, str] | None:
        """The (reason, message) DST quarantined these bytes with, when this input is another
        file than any DST holds a row of (same bytes, another path): it is quarantined as they
        were. Five broken files (zero bytes, say) under five paths were one quarantined and
        four duplicates of it, and DST said one file was broken. None for bytes DST did not
        quarantine, or for an input DST holds a row of (a re-run of it: skipped as before)."""
        if self.quarantined_before is None:
            self.quarantined_before = self.dest.quarantined_ids()
        found = self.quarantined_before.get(image_id)
        if found is None:
            return None
        key = input_key(image_id, source_hash)
        if self.listed_before(key, held_too=True):
            return None
        return found

    def listed_before(self, key: int, held_too: bool) -> bool:
        """Whether DST holds a row of the input keyed ``key`` (``held_too``: also a stored or
        quarantine row, else only a duplicate row) or this run listed it; if not, this run
        lists it now (the same input twice is listed once)."""
        keys = self._listed()[0]
        if key in keys:
            return True
        if held_too:
            if self.held is None:
                self.held = self.dest.recorded_held()
            if key in self.held:
                return True
        keys.add(key)
        return False

    def _listed(self) -> tuple[InputKeys, dict[str, str]]:
        if self.listed is None:
            self.listed = self.dest.recorded_copies()
        return self.listed

    def quarantine_here(self, image_id: str, reason: str, message: str) -> None:
        """Remember bytes this run quarantined, for a copy of them met later in the run. Each
        (reason, message) is held once however many files share it: a run over a folder of
        a million broken files held one tuple and two strings per file (about 540 bytes)."""
        said = (reason, message)
        if reason != CONFLICT:  # a conflict's message names the image kept: one per file
            said = self._said.setdefault(said, said)
        self.quarantined_here[image_id] = said

    def stored_from(self, source_hash: str) -> bool:
        """Whether DST stored an image from this path: lowering ``ingest.max_file_mb`` on a
        re-run quarantined the files it had stored as ``too_large``, and DST counted them as
        missing while it held them. Such a file is taken as already ingested (a file replaced
        there by one over the limit is then not seen: raise the limit to read it)."""
        if self.stored_paths is None:
            self.stored_paths = self.dest.stored_path_hashes()
        return f"{PATH_PREFIX}{source_hash}" in self.stored_paths

    def same_bytes(self, row: dict[str, Any], in_run: bool) -> dict[str, Any] | None:
        """The duplicates row of an input dropped because its bytes are already held
        (``in_run``: by an input earlier in this run, else by DST); None for an input DST
        already holds a row of (same bytes, same path): a re-run adds none, as it adds no
        same-instance row. Without these rows such drops were only counted, and an audit of
        which files were not stored and why could not find them."""
        image_id, source_hash = row["image_id"], row["source_hash"]
        key = input_key(image_id, source_hash)
        # an input DST holds a row of: a re-run adds none; also when the bytes were stored in
        # this run (a damaged shard moved out: its images stored again, their copies listed).
        # Bytes first met in this run are in no stored or quarantine row of DST (the decoders
        # would have called them existing): only its duplicate rows are read for them
        if self.listed_before(key, held_too=not in_run):
            return None
        if in_run:  # bytes of an input stored or an instance dropped in this run
            kept = self.instance_kept.get(image_id, image_id)
        else:
            kept = self._listed()[1].get(image_id, image_id)
        return {
            "image_id": image_id,
            "kept_image_id": kept,
            "kind": DUPLICATE_SAME_BYTES,
            "instance_pid": None,
            "transfer_syntax": None,
            "source_hash": source_hash,
            "source_path": row["source_path"],
            "size_bytes": row["size_bytes"],
            "run_id": self.run_id,
        }

    def reject(self, table: pa.Table, reasons: list[str], messages: list[str]) -> None:
        self.rejects.append(
            pa.table(
                {
                    "sha256": table["image_id"],  # the image id, under the DST's id_scheme
                    "source_hash": table["source_hash"],
                    "source_path": table["source_path"],
                    "reason": pa.array(reasons, pa.string()),
                    "message": pa.array(messages, pa.string()),
                    "size_bytes": table["size_bytes"],
                    "run_id": pa.array([self.run_id] * table.num_rows, pa.string()),
                }
            ).cast(QUARANTINE_SCHEMA)
        )
        # a run of mostly broken files fills no shard
        if sum(t.num_rows for t in self.rejects) >= self.shard_rows:
            self.write_rejects()

    def finish(self, interrupted: bool) -> None:
        """Write what is left: the last shard, the quarantine and duplicate rows. After an
        interrupt the summary is then recounted from what was written, so that the run's
        record says exactly what it kept (a Ctrl-C may land between counting a row and
        keeping it)."""
        self.flush(final=True)
        self.write_rejects()
        s = self.summary
        if self.duplicates or self.copies:
            d = pa.Table.from_pylist([*self.duplicates, *self.copies], schema=DUPLICATE_SCHEMA)
            d = d.sort_by("source_hash")
            self.dest.write(DUPLICATES_DIR, f"duplicates-{self.run_id}.parquet", d)
        reasons = self.reasons_written
        s.reasons = dict(sorted(reasons.items()))
        if interrupted:
            s.ok = sum(self.dest.num_rows(name) for name in s.shards)
            s.quarantined = sum(reasons.values())
            s.duplicate_instances = len(self.duplicates)
            s.duplicates = max(s.duplicates, s.duplicate_instances)
            s.already_ingested = s.duplicates - s.duplicates_in_run
            s.resolved = min(s.resolved, s.ok)
            s.input = s.ok + s.quarantined + s.duplicates

    def salvage(self) -> tuple[str, bool]:
        """:meth:`finish` as an interrupted run's, after DST refused a write: returns what it
        could not write, said after what the run kept (empty when nothing), and whether the
        run's counts are then those of what DST holds (a record of it says what it kept).

        A full disk refuses the last shard again, and the quarantine rows, written after it,
        were lost with it: they are then written without it. The duplicate rows are not: one
        may name an image of that shard as the copy kept, and a re-run would skip that image
        for good; a re-run lists them again."""
        try:
            self.finish(interrupted=True)
            return "", True
        except (OSError, pa.ArrowException, IngestError) as err:
            if not self.pending_rows:  # the last shard went: a later write failed
                log.warning("could not write the run's quarantine or duplicate rows: %s", err)
                return "; the run's quarantine and duplicate rows may be missing", False
            unwritten = self.pending_rows
        self.pending, self.pending_rows = [], 0
        self.duplicates, self.copies = [], []
        try:
            self.finish(interrupted=True)
        except (OSError, pa.ArrowException, IngestError) as err:
            log.warning("could not write the run's quarantine rows: %s", err)
            return f"; {_images(unwritten)} decoded last and the quarantine rows were not", False
        return f"; {_images(unwritten)} decoded last were not", True


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def _conflict_message(kept_image_id: str, apart: float | None) -> str:
    by = f" (by {apart:.0%} of full scale)" if apart is not None else ""
    return (
        f"another file of this DICOM instance (same SOP Instance UID) is stored as image "
        f"{kept_image_id}, with other pixels{by}: two images under one UID; the stored one is "
        "kept, check which is right in the archive"
    )


def _consume(
    ds: Any,
    out: _Outputs,
    expected: int | None,
    progress: bool,
    unread: set[str],
) -> None:
    """Stream decoder output on the driver: drop duplicate bytes and duplicate DICOM instances,
    fill shards, collect quarantine rows; count the stored inputs that ``unread`` names
    (quarantined unread by an earlier run). On Ctrl-C (or SIGTERM routed as one) what was
    decoded so far is written before the interrupt goes on, and so is what DST still takes
    after it failed (:class:`StorageFailed`)."""
    from ray.exceptions import RayActorError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    summary = out.summary
    seen: set[str] = set()
    conflicts = 0
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not progress,
        transient=False,
    )
    try:
        with bar:
            task = bar.add_task("ingest", total=expected or None)
            # no block prefetching: its thread calls ray.wait whenever it catches up, which
            # after an interruption could be during ray.shutdown (ending the process at once);
            # the iteration's own pipeline thread still fetches the next block while this one
            # writes shards, and on one node the decoders' blocks are local already
            for batch in ds.iter_batches(
                batch_format="pyarrow", batch_size=None, prefetch_batches=0
            ):
                conflicts += _take_batch(batch, out, seen, unread)
                bar.update(
                    task,
                    completed=summary.input,
                    description=f"ingest ok={summary.ok} quarantined={summary.quarantined}",
                )
        out.finish(interrupted=False)
    except KeyboardInterrupt:  # again if it came while finishing: each write is idempotent
        if _finish_stopped(out):
            raise _StoppedUnrecorded from None
        raise
    except RayActorError as err:  # a decoder process died on one batch, and on each retry
        lost = _finish_stopped(out)
        if getattr(err, "actor_init_failed", False):  # one that could not start: no file's doing
            from pipelines.runtime import remote_error_message

            reason = remote_error_message(err) or "see the worker log above"
            message = f"the decoders could not start: {reason}"
        else:
            message = (
                f"a decoder process died on one batch of up to {_DECODE_BATCH} files "
                f"{_DECODER_RETRIES + 1} times (killed for memory, most often: the node's `ray "
                "logs` say which); the run stopped, and what it stored is kept and recorded. A "
                "re-run meets the same batch again: give the decoders more memory, or lower "
                "ingest.max_file_mb"
            )
        raise DecoderDied(message + lost, recordable=not lost) from None
    except OSError as err:  # DST failed: a full disk, expired credentials
        _raise_storage_failed(err, out.dest.uri, salvage=out.salvage)
    if conflicts:
        log.warning(
            "%d files hold a DICOM instance already stored with other pixels: quarantined as %s",
            conflicts,
            CONFLICT,
        )


# what an error said while the run's last writes were made adds to its message
_STOPPED_WRITING = "; stopped while its last writes were made, which may be missing"


def _finish_stopped(out: _Outputs) -> str:
    """Write what a run stopped by an interrupt or its decoders keeps; returns what could not
    be written, said after the stop's own message ("" when all was). DST failing then went
    past the run's handlers as a traceback, in place of the stop (exit 130 after a Ctrl-C, the
    decoders' message): it is said in a warning, and the run is not recorded, as what its
    writes kept is not known."""
    try:
        out.finish(interrupted=True)
    except OSError as err:
        if not _is_storage_error(err):
            raise
        said = str(_storage_failed(err, out.dest.uri, _STOPPED_WRITING, recordable=False))
        log.warning("%s", said)
        return f"; DST failed as it wrote what it kept ({_cause(err)}), and it is not recorded"
    return ""


def _take_batch(batch: pa.Table, out: _Outputs, seen: set[str], unread: set[str]) -> int:
    """Sort one batch of decoder output into stored, quarantined and duplicate rows; returns
    how many were instance conflicts.

    The batch's duplicate rows are handed over after its stored and quarantined rows: a
    duplicate row makes re-runs skip its image id undecoded, and one naming a copy kept in this
    batch, written by a run interrupted before that copy was stored, made every re-run skip
    the image for good. Interrupted anywhere here, a row is at worst left unlisted (a re-run
    lists it)."""
    summary = out.summary
    copy_rows: list[dict[str, Any]] = []  # same bytes
    instance_rows: list[dict[str, Any]] = []  # same instance, other bytes
    table = batch.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA)
    keep_ok: list[int] = []
    keep_q: list[int] = []
    reasons = table["reason"].to_pylist()
    messages = table["message"].to_pylist()
    conflicts = 0
    for i, (status, image_id, source_hash, pid) in enumerate(
        zip(
            table["status"].to_pylist(),
            table["image_id"].to_pylist(),
            table["source_hash"].to_pylist(),
            table["instance_pid"].to_pylist(),
            strict=True,
        )
    ):
        summary.input += 1
        # bytes quarantined before (by DST, or earlier in this run) from another path: this
        # file is as broken as that one, and quarantined with its reason in a row of its own
        copy_of = None
        if status == "existing" and image_id is not None:
            copy_of = out.quarantined_copy(image_id, source_hash)
        elif image_id is not None and image_id in seen:
            copy_of = out.quarantined_here.get(image_id)
        if copy_of is not None:
            summary.quarantined += 1
            reasons[i], messages[i] = copy_of
            keep_q.append(i)
            continue
        if status == "quarantined" and reasons[i] == "too_large" and out.stored_from(source_hash):
            status = "existing"  # stored before from this path, under a higher size limit
        if status == "existing":
            summary.duplicates += 1
            summary.already_ingested += 1
            if image_id is not None:  # None: a path DST quarantined unread, read again
                copy_rows.append(out.same_bytes(_row_fields(table, i), in_run=False))
            continue
        if image_id is not None and image_id in seen:
            summary.duplicates += 1
            summary.duplicates_in_run += 1
            copy_rows.append(out.same_bytes(_row_fields(table, i), in_run=True))
            continue
        if image_id is not None:
            seen.add(image_id)
        if status != "ok":
            summary.quarantined += 1
            keep_q.append(i)
            if image_id is not None:
                out.quarantine_here(image_id, reasons[i], messages[i])
            continue
        verdict = out.instances.check(
            pid, image_id, lambda i=i: _row_pixels(table, i), lambda k: out.pixels(k, table)
        )
        if verdict.kind == "new":
            summary.ok += 1
            summary.resolved += source_hash in unread
            keep_ok.append(i)
        elif verdict.kind == "duplicate":
            summary.duplicates += 1
            summary.duplicate_instances += 1
            if verdict.in_run:
                summary.duplicates_in_run += 1
            else:
                summary.already_ingested += 1
            row = table.slice(i, 1).to_pylist()[0]
            instance_rows.append(
                {
                    **{k: row.get(k) for k in DUPLICATE_SCHEMA.names},
                    "kept_image_id": verdict.kept_image_id,
                    "kind": DUPLICATE_SAME_INSTANCE,
                    "run_id": out.run_id,
                }
            )
            out.instance_kept[image_id] = str(verdict.kept_image_id)
        else:
            summary.quarantined += 1
            conflicts += 1
            reasons[i] = CONFLICT
            messages[i] = _conflict_message(str(verdict.kept_image_id), verdict.difference)
            keep_q.append(i)
            out.quarantine_here(image_id, reasons[i], messages[i])
    # quarantine rows first: a shard write that fails in store loses none of them
    if keep_q:
        out.reject(table.take(keep_q), [reasons[i] for i in keep_q], [messages[i] for i in keep_q])
    if keep_ok:
        out.store(table.take(keep_ok))
    out.duplicates.extend(instance_rows)
    out.copies.extend(r for r in copy_rows if r is not None)
    return conflicts


_LISTED_FIELDS = ["image_id", "source_hash", "source_path", "size_bytes"]


def _row_fields(table: pa.Table, i: int) -> dict[str, Any]:
    """What a same-bytes duplicate row records of row ``i`` (not its pixels)."""
    return table.slice(i, 1).select(_LISTED_FIELDS).to_pylist()[0]


def _row_pixels(table: pa.Table, i: int) -> tuple[bytes, int, int, str]:
    r = table.slice(i, 1).select(["pixels", "height", "width", "dtype"]).to_pylist()[0]
    return r["pixels"], r["height"], r["width"], r["dtype"]


def summary_table(summary: IngestSummary) -> Any:
    """A rich table of one run's counts (printed at the end of the job)."""
    from rich.table import Table

    table = Table(title=f"ingest {summary.run_id} -> {summary.dst}")
    table.add_column("count")
    table.add_column("value", justify="right")
    rows = [
        ("input files", summary.input),
        ("stored (ok)", summary.ok),
        ("quarantined", summary.quarantined),
        ("duplicates", summary.duplicates),
        ("  within this run", summary.duplicates_in_run),
        ("  already in DST", summary.already_ingested),
        ("  DICOM instance stored from other bytes", summary.duplicate_instances),
        ("stored, quarantined before", summary.resolved),
        *[(f"  reason: {k}", v) for k, v in summary.reasons.items()],
        ("shards written", len(summary.shards)),
        ("images in DST", summary.total_images),
        ("quarantined in DST", summary.total_quarantined),
        ("seconds", f"{summary.seconds:.1f}"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


# what an interrupted run leaves: whole shards only (each written to a temporary name, then
# renamed), and a re-run skips every image they hold
INTERRUPTED = (
    "interrupted: the shards written so far are kept; re-run the same command to ingest the rest"
)


class IngestInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run: Ray is shut down and DST's lock released; the entry
    points say :data:`INTERRUPTED` as their last line and exit 130."""


def run_ingest_until_stopped(sources: list[str], dst: str, cfg: Config) -> IngestSummary:
    """:func:`run_ingest` for the two entry points (``radjepa ingest``, ``python -m
    pipelines.ingest``): SIGTERM (``radjepa jobs stop``, a pod or systemd unit stopping) ends
    it as Ctrl-C does. Left to ray.init's handler, a SIGTERM printed Ray's C++ stack dump and
    exited 15 without a word. Either way DST's lock is released and Ray shut down before
    :class:`IngestInterrupted` is raised; from the first SIGTERM on, others are ignored until
    then, so that a supervisor repeating itself cannot cut that short (a second Ctrl-C still
    can, as a user who insists expects). The caller's SIGINT and SIGTERM handlers are put back
    however it ends: an in-process caller (a notebook, a service) keeps its Ctrl-C, and a
    command that exits after the interruption ignores SIGTERM itself."""
    from pipelines.runtime import (
        sigterm_as_ctrl_c,
        stop_ray_ignoring_sigterm,
    )

    # Ray is stopped inside the block with SIGTERM ignored, after a Ctrl-C too (a supervisor's
    # SIGTERM after the user's Ctrl-C met the default action ray.shutdown puts back: exit -15,
    # no last line), and the caller's handlers are put back after it
    with sigterm_as_ctrl_c(once=True):
        try:
            return run_ingest(sources, dst, cfg)
        except KeyboardInterrupt:
            stop_ray_ignoring_sigterm()
    raise IngestInterrupted(INTERRUPTED)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.ingest SRC... DST [--config] [--set k=v]`` (e.g. in a Ray Job)."""
    from pipelines.runtime import ClusterError, RayStartTimeout, ignore_sigterm_after_the_job
    from radjepa.config import ConfigError, load_config
    from radjepa.log_filters import redact_console, redact_log_records

    p = argparse.ArgumentParser(prog="python -m pipelines.ingest", description=__doc__)
    p.add_argument("paths", nargs="+", help="sources..., then the destination folder")
    p.add_argument("--config", "-c", default=None)
    p.add_argument("--set", "-s", dest="sets", action="append", default=[])
    args = p.parse_args(argv)
    if len(args.paths) < 2:
        p.error("need at least one source and a destination")
    redact_log_records()
    redact_console()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.sets)
        # run as `python -m pipelines.ingest`, a second SIGTERM cannot cut the last line short
        ignore_sigterm_after_the_job()
        s = run_ingest_until_stopped(args.paths[:-1], args.paths[-1], cfg)
    except (ConfigError, IngestError, ClusterError) as err:  # the user's: one line, like the CLI
        print(f"error: {err}", file=sys.stderr)  # noqa: T201 - entry point output
        return 2
    except RayStartTimeout as err:  # a loaded machine, not the user's mistake: as `radjepa`
        print(f"error: {err}", file=sys.stderr)  # noqa: T201 - entry point output
        return 1
    except IngestInterrupted as err:  # Ctrl-C, or SIGTERM: `ray job stop`, a pod stopping
        # returned, not os._exit as cli._exit_now does after a SIGTERM in ray.get: main() is
        # also called in-process, and an interrupted ingest exits through teardown cleanly
        print(err, file=sys.stderr)  # noqa: T201 - entry point output
        return 130
    print(json.dumps(asdict(s), sort_keys=True))  # noqa: T201 - entry point output
    return 0


if __name__ == "__main__":
    from pipelines.runtime import declare_process_ends_with_job

    declare_process_ends_with_job()  # an in-process caller of main() keeps its SIGTERM handler
    raise SystemExit(main())

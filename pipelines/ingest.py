"""Ray Data ingest: DICOM/PNG/JPEG archives -> de-identified, normalised Parquet shards.

Flow: the driver lists every source (directories, .zip, .tar/.tar.gz, local or any pyarrow
filesystem URI) into file references; Ray tasks read the bytes (archive members included);
an actor pool runs :func:`radjepa.imaging.decode.decode_image` with errors caught per file;
the driver streams the results, drops duplicate bytes, and writes fixed-size zstd Parquet
shards to ``DST/images/``, rejects to ``DST/quarantine/`` and a reconciling
``DST/manifest.json`` (input = ok + quarantined + duplicates).

Idempotence: image ids (sha256 of the bytes) already in ``DST`` (images or quarantine) are
skipped by the decoders and counted as duplicates, so a re-run writes nothing twice. Shards are
written under a temporary name and renamed, so an interrupted run leaves no partial shard.
The driver is the single writer: simple and exact, and fast enough for ~1k images/s of 256 px.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tarfile
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from radjepa.locations import filesystem
from radjepa.shards import (
    IMAGES_DIR,
    QUARANTINE_DIR,
    QUARANTINE_SCHEMA,
    SHARD_SCHEMA,
)

if TYPE_CHECKING:
    from radjepa.config import Config

__all__ = ["IngestError", "IngestSummary", "list_inputs", "main", "run_ingest", "summary_table"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
KEY_RECORD = "pseudonyms.json"  # which key made the pseudonyms; written before any shard
MANIFEST_VERSION = 1
_READ_CHUNK = 32  # rows per block emitted by the read tasks
_DECODE_BATCH = 16  # files per decoder call
_LINK = "archive link"  # read_error detail of a tar member that is a hard or symbolic link
_HEAD = 512  # bytes read to tell an archive from an image (tar's magic sits at 257)
_ARCHIVE_SUFFIXES = {  # only to size the progress bar up front; the content decides
    ".zip": "zip",
    ".tar": "tar",
    ".tgz": "tar",
    ".tar.gz": "tar",
    ".tar.bz2": "tar",
    ".tar.xz": "tar",
}

_READ_SCHEMA = pa.schema(
    [
        pa.field("name", pa.string()),
        pa.field("data", pa.binary()),
        pa.field("size_bytes", pa.int64()),
        pa.field("read_error", pa.string()),
    ]
)
# One decoder output row: a shard row (nullable) plus the outcome of that file.
_RESULT_SCHEMA = pa.schema(
    [f.with_nullable(True) for f in SHARD_SCHEMA]
    + [
        pa.field("status", pa.string()),  # ok | quarantined | existing
        pa.field("reason", pa.string()),
        pa.field("message", pa.string()),
        pa.field("size_bytes", pa.int64()),
    ]
)


class IngestError(RuntimeError):
    """A problem with the sources or destination the user can fix."""


@dataclass
class IngestSummary:
    """What one run did; ``input == ok + quarantined + duplicates`` always holds."""

    dst: str
    run_id: str
    input: int = 0
    ok: int = 0
    quarantined: int = 0
    duplicates: int = 0
    duplicates_in_run: int = 0
    already_ingested: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    total_images: int = 0
    total_quarantined: int = 0


# ---------------------------------------------------------------------------------------------
# Listing and reading


def _archive_kind(path: str) -> str | None:
    """The archive kind a name suggests (a hint for counting members, never for reading)."""
    low = path.lower()
    for suffix, kind in _ARCHIVE_SUFFIXES.items():
        if low.endswith(suffix):
            return kind
    return None


def _archive_kind_of(head: bytes) -> str | None:
    """'zip' or 'tar' from a file's first bytes, None for anything else (an image or junk).

    Object-store keys often lack a suffix and names can lie (a DICOM called ``study.zip``), so
    the bytes decide. A DICOM preamble is free-form and may start like a zip, hence DICM first.
    Compressed streams (gzip, bzip2, xz) are taken as tars; one that is not is quarantined.
    """
    if head[128:132] == b"DICM":
        return None
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head[257:262] == b"ustar" or head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")):
        return "tar"
    return None


def list_inputs(sources: list[str]) -> list[dict[str, str]]:
    """File references for every source: ``{"source", "path", "kind"}`` (kind file/zip/tar)."""
    refs: list[dict[str, str]] = []
    for src in sources:
        try:
            fs, root = filesystem(src)
            info = fs.get_file_info(root)
            if info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
                paths = sorted(i.path for i in infos if i.type == pafs.FileType.File)
            else:
                paths = [root]
        except (OSError, pa.ArrowException) as err:
            raise IngestError(f"cannot list source {src}: {err}") from None
        except UnicodeDecodeError:  # pyarrow can neither name nor open such a file
            raise IngestError(
                f"cannot list source {src}: a file name under it is not UTF-8 (e.g. Latin-1 "
                "from an older system); rename it (convmv -r -f latin1 -t utf8 --notest DIR) "
                "or pack the folder into a tar archive"
            ) from None
        if info.type == pafs.FileType.NotFound:
            raise IngestError(f"source not found: {src}")
        refs.extend({"source": src, "path": p, "kind": _archive_kind(p) or "file"} for p in paths)
    return refs


def _count_members(ref: dict[str, str]) -> int:
    """Members of an archive (for the progress total only; unreadable archives count 1)."""
    fs, _ = filesystem(ref["source"])
    try:
        with fs.open_input_file(ref["path"]) as f:
            if ref["kind"] == "zip":
                with zipfile.ZipFile(f) as z:
                    return sum(1 for i in z.infolist() if not i.is_dir())
            with tarfile.open(fileobj=f, mode="r:*") as t:
                return sum(1 for m in t if m.isfile())
    except Exception:
        return 1


def _utf8_name(name: str) -> str:
    """``name`` as text Arrow can store. tarfile decodes a member name that is not UTF-8 (a
    Latin-1 ``Müller/1.dcm`` from an older system) with surrogate escapes, which Arrow refuses:
    one such member failed its read task and with it the whole run. Such bytes become
    ``\\xNN``, so the name (hashed into source_hash) stays unique and stable across runs."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def _iter_ref(ref: dict[str, str], max_bytes: int) -> Iterator[dict[str, Any]]:
    fs, _ = filesystem(ref["source"])
    path = ref["path"]

    def row(name: str, data: bytes | None, size: int | None, err: str | None) -> dict[str, Any]:
        return {"name": _utf8_name(name), "data": data, "size_bytes": size, "read_error": err}

    try:
        with fs.open_input_file(path) as f:
            kind = _archive_kind_of(f.read(_HEAD))
            f.seek(0)
            if kind is None:
                size = f.size()
                if size > max_bytes:
                    yield row(path, None, size, "too_large")
                    return
                data = f.read()
                yield row(path, data, len(data), None)
            elif kind == "zip":
                yield from _iter_zip(f, path, max_bytes, row)
            else:
                yield from _iter_tar(f, path, max_bytes, row)
    except Exception as err:  # an unreadable file or corrupt archive is one quarantined input
        yield row(path, None, None, f"read_error:{type(err).__name__}")


def _iter_zip(f: Any, path: str, max_bytes: int, row: Any) -> Iterator[dict[str, Any]]:
    with zipfile.ZipFile(f) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            name = f"{path}!{info.filename}"
            if info.file_size > max_bytes:
                yield row(name, None, info.file_size, "too_large")
                continue
            try:
                data = z.read(info)
            except Exception as err:
                yield row(name, None, info.file_size, f"read_error:{type(err).__name__}")
                continue
            yield row(name, data, len(data), None)


def _iter_tar(f: Any, path: str, max_bytes: int, row: Any) -> Iterator[dict[str, Any]]:
    # streaming mode: one sequential pass, so a link's target (read earlier or later) cannot
    # be re-read; a link is reported as one quarantined input, never skipped unseen
    with tarfile.open(fileobj=f, mode="r|*") as t:
        for member in t:
            name = f"{path}!{member.name}"
            if member.islnk() or member.issym():
                yield row(name, None, None, f"read_error:{_LINK}")
                continue
            if not member.isfile():  # directories, devices, fifos hold no file data
                continue
            if member.size > max_bytes:
                yield row(name, None, member.size, "too_large")
                continue
            fh = t.extractfile(member)
            data = fh.read() if fh is not None else b""
            yield row(name, data, len(data), None)


def _read_refs(batch: pa.Table, max_bytes: int) -> Iterator[pa.Table]:
    """Ray Data UDF (tasks): file refs -> rows of raw bytes, in modest blocks."""
    rows: list[dict[str, Any]] = []
    for ref in batch.to_pylist():
        for r in _iter_ref(ref, max_bytes):
            rows.append(r)
            if len(rows) >= _READ_CHUNK:
                yield pa.Table.from_pylist(rows, schema=_READ_SCHEMA)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=_READ_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Decoding (actor pool)


class _Decoder:
    """Ray Data actor: one ``decode_image`` per file; every failure becomes a quarantine row."""

    def __init__(
        self, settings: dict[str, Any], secret: bytes, known: Any, keep_paths: bool
    ) -> None:
        import ray

        self.settings = settings
        self.secret = secret
        self.known = ray.get(known) if isinstance(known, ray.ObjectRef) else known
        self.keep_paths = keep_paths

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(
            [self._one(r) for r in batch.to_pylist()], schema=_RESULT_SCHEMA
        )

    def _one(self, r: dict[str, Any]) -> dict[str, Any]:
        from radjepa.imaging.decode import ImageRejected, decode_image
        from radjepa.imaging.deid import keyed_hash
        from radjepa.shards import pixels_to_bytes

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
            reason = "too_large" if err == "too_large" else "read_error"
            detail = err.partition(":")[2]
            if reason == "too_large":
                msg = f"{r['size_bytes']} bytes exceeds ingest.max_file_mb"
            elif detail == _LINK:
                msg = "a link inside a tar archive; its target is read as its own member"
            else:
                msg = f"could not read the file ({detail or 'unknown error'})"
            return {**out, "status": "quarantined", "reason": reason, "message": msg}
        sha = hashlib.sha256(data).hexdigest()
        out["image_id"] = sha
        if sha in self.known:
            return {**out, "status": "existing"}
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


# ---------------------------------------------------------------------------------------------
# Output folder


class _Dest:
    """DST on any pyarrow filesystem: existing ids, atomic shard writes, the manifest."""

    def __init__(self, dst: str) -> None:
        self.uri = dst
        try:
            self.fs, self.root = filesystem(dst)
            self.fs.create_dir(f"{self.root}/{IMAGES_DIR}", recursive=True)
            self.fs.create_dir(f"{self.root}/{QUARANTINE_DIR}", recursive=True)
        except (OSError, pa.ArrowException) as err:
            raise IngestError(f"cannot use destination {dst}: {err}") from None

    def _parquet(self, sub: str) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/{sub}"))
        return sorted(i.path for i in infos if i.path.endswith(".parquet"))

    def _column(self, sub: str, column: str) -> list[Any]:
        values: list[Any] = []
        for path in self._parquet(sub):
            values.extend(
                pq.read_table(path, columns=[column], filesystem=self.fs).column(column).to_pylist()
            )
        return values

    def known_ids(self) -> set[str]:
        ids = set(self._column(IMAGES_DIR, "image_id"))
        ids.update(x for x in self._column(QUARANTINE_DIR, "sha256") if x)
        # files never read (too large, unreadable) have no sha256: remember them by path hash
        ids.update(f"path:{h}" for h in self._column(QUARANTINE_DIR, "source_hash") if h)
        return ids

    def write(self, sub: str, name: str, table: pa.Table) -> str:
        final = f"{self.root}/{sub}/{name}"
        tmp = f"{self.root}/{sub}/.{name}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            pq.write_table(table, f, compression="zstd")
        self.fs.move(tmp, final)
        return f"{sub}/{name}"

    def read_json(self, name: str) -> dict[str, Any] | None:
        path = f"{self.root}/{name}"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(path, compression=None) as f:
            raw = f.read()
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise IngestError(
                f"{self.uri}/{name} is not valid JSON ({err}); restore it or ingest into a new DST"
            ) from None
        if not isinstance(data, dict):
            raise IngestError(f"{self.uri}/{name} is not a JSON object; restore it")
        return data

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        tmp, final = f"{self.root}/.{name}.tmp", f"{self.root}/{name}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(data, indent=2, sort_keys=True).encode("utf-8"))
        self.fs.move(tmp, final)

    def stored_image(self) -> dict[str, Any] | None:
        """Size and dtype of the images already in DST, read from a shard (None when empty):
        a run that died before its manifest leaves shards that still fix both."""
        for path in self._parquet(IMAGES_DIR):
            first = pq.read_table(path, columns=["height", "dtype"], filesystem=self.fs).slice(0, 1)
            if first.num_rows:
                return {"size": first["height"][0].as_py(), "dtype": first["dtype"][0].as_py()}
        return None

    def read_manifest(self) -> dict[str, Any] | None:
        return self.read_json(MANIFEST)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.write_json(MANIFEST, manifest)

    def totals(self) -> tuple[int, int, dict[str, int]]:
        images = sum(
            pq.ParquetFile(self.fs.open_input_file(p)).metadata.num_rows
            for p in self._parquet(IMAGES_DIR)
        )
        reasons = Counter(self._column(QUARANTINE_DIR, "reason"))
        return images, sum(reasons.values()), dict(sorted(reasons.items()))


# ---------------------------------------------------------------------------------------------
# The job


def _check_key(dest: _Dest, previous: dict[str, Any] | None, key: dict[str, str], env: str) -> None:
    """One pseudonymisation key per DST, recorded before the first shard is written (a run
    that dies before its manifest must not let the next run switch keys unnoticed)."""
    stored = dest.read_json(KEY_RECORD)
    recorded = stored or (previous or {}).get("pseudonyms")
    if recorded:
        if recorded.get("key_fingerprint") != key["key_fingerprint"]:
            raise IngestError(
                f"destination was ingested with another pseudonymisation key (${env}): the "
                "same patient would get a second pseudonym and patient-grouped splits would "
                f"break. Set {env} to the key used before, or ingest into a new DST."
            )
        if stored is None:
            dest.write_json(KEY_RECORD, key)
        return
    if dest.known_ids():
        log.warning(
            "%s holds images but no record of its pseudonymisation key (made by an older "
            "version): the key cannot be checked; recording the current one",
            dest.uri,
        )
    dest.write_json(KEY_RECORD, key)


def _check_compatible(
    dest: _Dest, previous: dict[str, Any] | None, settings: dict[str, Any]
) -> None:
    old = (previous or {}).get("image") or dest.stored_image()
    new = {"size": settings["size"], "dtype": settings["dtype"]}
    if old and {k: old.get(k) for k in new} != new:
        raise IngestError(
            f"destination already holds images ingested with {old}; this run asks for {new}. "
            "Use a new DST (shards in one folder must share size and dtype)."
        )


def run_ingest(
    sources: list[str], dst: str, cfg: Config, *, progress: bool = True
) -> IngestSummary:
    """Ingest ``sources`` into ``dst`` (see module docstring); returns the run's summary."""
    import ray

    from radjepa.imaging.deid import DEV_SECRET, key_fingerprint, resolve_secret

    if not sources:
        raise IngestError("no sources given")
    started = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    ing = cfg.ingest
    settings = {
        "size": ing.image_size,
        "dtype": ing.dtype,
        "window_percentiles": tuple(ing.window_percentiles),
        "max_bytes": int(ing.max_file_mb * 1024 * 1024),
        "reject_burned_in": ing.burned_in_annotation == "quarantine",
    }
    # list first (a missing source fails before DST is touched); a DST inside a source folder
    # must not ingest its own shards on the next run
    try:
        dst_root = filesystem(dst)[1].rstrip("/") + "/"
    except (OSError, pa.ArrowException) as err:
        raise IngestError(f"cannot use destination {dst}: {err}") from None
    refs = [r for r in list_inputs(sources) if not r["path"].startswith(dst_root)]
    dest = _Dest(dst)
    previous = dest.read_manifest()
    secret = resolve_secret(ing.secret_env)
    key = {
        "key": "development" if secret == DEV_SECRET else "secret",
        "key_fingerprint": key_fingerprint(secret),
    }
    _check_compatible(dest, previous, settings)
    _check_key(dest, previous, key, ing.secret_env)
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    summary = IngestSummary(dst=dst, run_id=run_id)
    expected = sum(1 if r["kind"] == "file" else _count_members(r) for r in refs)

    if not ray.is_initialized():
        from pipelines.runtime import ensure_ray

        ensure_ray()
    known = dest.known_ids()
    # decode_actors=0: one per cluster CPU, grown on demand (a small job starts few actors)
    actors = ing.decode_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    actors = max(1, min(actors, -(-max(expected, 1) // _DECODE_BATCH)))
    pool = (
        ray.data.ActorPoolStrategy(size=actors)
        if ing.decode_actors
        else ray.data.ActorPoolStrategy(min_size=1, max_size=actors)
    )
    log.info(
        "ingest %d inputs (%d refs) into %s with %d decoders; %d ids already present",
        expected,
        len(refs),
        dst,
        actors,
        len(known),
    )

    if refs:
        ds = _build_dataset(refs, actors, pool, settings, secret, known, ing.keep_source_paths)
        _consume(ds, dest, summary, ing.shard_rows, expected, progress, run_id)
    else:
        log.warning("no files found under the given sources; writing an empty run")

    summary.seconds = round(time.perf_counter() - started, 3)
    summary.total_images, summary.total_quarantined, reasons_total = dest.totals()
    if summary.input != summary.ok + summary.quarantined + summary.duplicates:
        raise IngestError(f"internal error: counts do not reconcile: {asdict(summary)}")
    run = {
        k: v
        for k, v in asdict(summary).items()
        if k not in ("dst", "total_images", "total_quarantined")
    }
    run.update(
        started_at=started_at,
        sources=len(sources),
        expected_inputs=expected,
        burned_in_annotation=ing.burned_in_annotation,
    )
    runs = list((previous or {}).get("runs", [])) + [run]
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
            "quarantine_reasons": reasons_total,
            "inputs_seen": sum(r["input"] for r in runs),
            "runs": runs,
            "last_run": run,
        }
    )
    if progress:
        from rich.console import Console

        Console(stderr=True).print(summary_table(summary))
    return summary


def _build_dataset(
    refs: list[dict[str, str]],
    actors: int,
    pool: Any,
    settings: dict[str, Any],
    secret: bytes,
    known: set[str],
    keep_paths: bool,
) -> Any:
    """The Ray Data pipeline: file refs -> read tasks -> decoder actor pool."""
    import ray

    return (
        ray.data.from_items(refs, override_num_blocks=max(1, min(len(refs), 8 * actors)))
        .map_batches(
            _read_refs,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"max_bytes": settings["max_bytes"]},
        )
        .map_batches(
            _Decoder,
            batch_size=_DECODE_BATCH,
            batch_format="pyarrow",
            compute=pool,
            num_cpus=1,
            fn_constructor_kwargs={
                "settings": dict(settings),
                "secret": secret,
                "known": ray.put(frozenset(known)),
                "keep_paths": keep_paths,
            },
        )
    )


def _consume(
    ds: Any,
    dest: _Dest,
    summary: IngestSummary,
    shard_rows: int,
    expected: int,
    progress: bool,
    run_id: str,
) -> None:
    """Stream decoder output on the driver: dedup, fill shards, collect quarantine rows."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    seen: set[str] = set()
    pending: list[pa.Table] = []
    pending_rows = 0
    rejects: list[pa.Table] = []
    reasons: Counter[str] = Counter()
    shard_cols = SHARD_SCHEMA.names

    def flush(final: bool) -> None:
        nonlocal pending, pending_rows
        while pending_rows >= shard_rows or (final and pending_rows):
            table = pa.concat_tables(pending)
            head, rest = table.slice(0, shard_rows), table.slice(shard_rows)
            name = f"part-{run_id}-{len(summary.shards):05d}.parquet"
            summary.shards.append(
                dest.write(IMAGES_DIR, name, head.select(shard_cols).cast(SHARD_SCHEMA))
            )
            pending, pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not progress,
        transient=False,
    )
    with bar:
        task = bar.add_task("ingest", total=expected or None)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            table = batch.select(_RESULT_SCHEMA.names).cast(_RESULT_SCHEMA)
            keep_ok, keep_q = [], []
            for i, (status, sha, reason) in enumerate(
                zip(
                    table["status"].to_pylist(),
                    table["image_id"].to_pylist(),
                    table["reason"].to_pylist(),
                    strict=True,
                )
            ):
                summary.input += 1
                if status == "existing":
                    summary.duplicates += 1
                    summary.already_ingested += 1
                    continue
                if sha is not None and sha in seen:
                    summary.duplicates += 1
                    summary.duplicates_in_run += 1
                    continue
                if sha is not None:
                    seen.add(sha)
                if status == "ok":
                    summary.ok += 1
                    keep_ok.append(i)
                else:
                    summary.quarantined += 1
                    reasons[reason] += 1
                    keep_q.append(i)
            if keep_ok:
                pending.append(table.take(keep_ok))
                pending_rows += len(keep_ok)
                flush(final=False)
            if keep_q:
                rejects.append(table.take(keep_q))
            bar.update(
                task,
                completed=summary.input,
                description=f"ingest ok={summary.ok} quarantined={summary.quarantined}",
            )
        flush(final=True)
    if rejects:
        q = pa.concat_tables(rejects)
        q = pa.table(
            {
                "sha256": q["image_id"],
                "source_hash": q["source_hash"],
                "source_path": q["source_path"],
                "reason": q["reason"],
                "message": q["message"],
                "size_bytes": q["size_bytes"],
                "run_id": pa.array([run_id] * q.num_rows, pa.string()),
            }
        ).cast(QUARANTINE_SCHEMA)
        dest.write(QUARANTINE_DIR, f"quarantine-{run_id}.parquet", q)
    summary.reasons = dict(sorted(reasons.items()))


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
        *[(f"  reason: {k}", v) for k, v in summary.reasons.items()],
        ("shards written", len(summary.shards)),
        ("images in DST", summary.total_images),
        ("seconds", f"{summary.seconds:.1f}"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.ingest SRC... DST [--config] [--set k=v]`` (e.g. in a Ray Job)."""
    from radjepa.config import ConfigError, load_config

    p = argparse.ArgumentParser(prog="python -m pipelines.ingest", description=__doc__)
    p.add_argument("paths", nargs="+", help="sources..., then the destination folder")
    p.add_argument("--config", "-c", default=None)
    p.add_argument("--set", "-s", dest="sets", action="append", default=[])
    args = p.parse_args(argv)
    if len(args.paths) < 2:
        p.error("need at least one source and a destination")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        s = run_ingest(args.paths[:-1], args.paths[-1], load_config(args.config, args.sets))
    except (ConfigError, IngestError) as err:  # the user's to fix: one line, like the CLI
        print(f"error: {err}", file=sys.stderr)  # noqa: T201 - entry point output
        return 2
    print(json.dumps(asdict(s), sort_keys=True))  # noqa: T201 - entry point output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

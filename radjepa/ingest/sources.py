"""Where ingest's input files come from: sources listed into file references, and each file or
archive member read with a size bound.

Plain pyarrow filesystems, zipfile and tarfile: the ingest job runs :func:`read_blocks` in Ray
Data tasks, and nothing here needs Ray. A file that cannot be read, a member over the size
limit or a link inside a tar becomes a row with ``read_error`` set (one quarantined input),
never an exception that would end a run.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from radjepa.ingest.errors import IngestError
from radjepa.ingest.packed import NOT_UNPACKED, PEEK_INPUT, packed_kind
from radjepa.locations import StorageUnreachable, filesystem, redact

__all__ = [
    "ENCRYPTED",
    "GONE",
    "LINK",
    "LINK_LOOP",
    "READ_SCHEMA",
    "UNREACHABLE",
    "archive_kind",
    "archive_kind_of",
    "count_inputs",
    "count_members",
    "iter_source",
    "list_inputs",
    "read_blocks",
    "read_error",
    "tar_row_members",
    "utf8_name",
]

log = logging.getLogger(__name__)

READ_CHUNK = 32  # rows per block emitted by read_blocks
# read_error details (``read_error:<detail>``) that say what happened; any other read failure
# is named by its exception type (its text may carry a path, i.e. a patient's name)
LINK = "archive link"  # a tar member that is a hard or symbolic link, a zip symbolic link
ENCRYPTED = "encrypted zip member"  # password-protected: zipfile raises a bare RuntimeError
LINK_LOOP = "symbolic link loop"  # a link that leads back to itself (ELOOP)
GONE = "file gone"  # deleted since it was listed, or a link whose target does not exist
# its storage did not answer this worker's first request (radjepa.locations), then the reason
UNREACHABLE = "storage unreachable:"
# a zip member compressed with a method zipfile cannot read (``zip method <number>``): its bare
# NotImplementedError said nothing of which method or what to do
ZIP_METHOD = "zip method"
_ERRNO_DETAILS = {errno.ELOOP: LINK_LOOP, errno.ENOENT: GONE}
HEAD = 512  # bytes read to tell an archive from an image (tar's magic sits at 257)
# tarfile reads 10 KiB at a time (a stream) or a 512-byte header per member (counting), and on
# s3:// or gs:// every read of the file is a ranged GET: about a million of them for a 10 GiB
# tar. Through these buffers a stream is fetched 8 MiB a request, and counting takes the
# headers of small members from one 1 MiB read (a large member is skipped by a seek).
STREAM_BUFFER = 8 << 20
COUNT_BUFFER = 1 << 20
ARCHIVE_SUFFIXES = {  # only to size the progress bar up front; the content decides
    ".zip": "zip",
    ".tar": "tar",
    ".tgz": "tar",
    ".tar.gz": "tar",
    ".tar.bz2": "tar",
    ".tar.xz": "tar",
}

READ_SCHEMA = pa.schema(
    [
        pa.field("name", pa.string()),
        pa.field("data", pa.binary()),
        pa.field("size_bytes", pa.int64()),
        pa.field("read_error", pa.string()),
    ]
)


def archive_kind(path: str) -> str | None:
    """The archive kind a name suggests (a hint for counting members, never for reading)."""
    low = path.lower()
    for suffix, kind in ARCHIVE_SUFFIXES.items():
        if low.endswith(suffix):
            return kind
    return None


def archive_kind_of(head: bytes) -> str | None:
    """'zip' or 'tar' from a file's first bytes, None for anything else (an image or junk).

    Object-store keys often lack a suffix and names can lie (a DICOM called ``study.zip``), so
    the bytes decide. A DICOM preamble is free-form and may start like a zip, hence DICM first.
    Compressed streams (gzip, bzip2, xz) are taken as tars; one that is not is quarantined
    (``not_unpacked``, :mod:`radjepa.ingest.packed`).
    """
    if head[128:132] == b"DICM":
        return None
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head[257:262] == b"ustar" or head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")):
        return "tar"
    return None


def list_inputs(sources: list[str]) -> list[dict[str, str]]:
    """File references for every source: ``{"source", "path", "kind"}`` (kind file/zip/tar).

    A file is one input however many sources name it (a source given twice, a folder and a
    subfolder of it): read twice it was counted twice, and one that cannot be read (too large,
    unreadable) got a quarantine row per listing, so the DST's totals overstated what it saw."""
    refs: list[dict[str, str]] = []
    listed: set[tuple[str, str]] = set()
    for number, src in enumerate(sources, 1):
        try:
            fs, root = filesystem(src)
            info = fs.get_file_info(root)
            if info.type != pafs.FileType.Directory:
                paths = [root]
            elif isinstance(fs, pafs.LocalFileSystem):
                paths = _local_files(root)
            else:
                infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
                paths = sorted(i.path for i in infos if i.type == pafs.FileType.File)
        except (OSError, pa.ArrowException) as err:
            # the reason without its path: the OS names the subfolder it failed on, and folder
            # names in an export may be patient names (the source is as the user gave it)
            raise IngestError(f"cannot list source {src}: {_reason(err)}") from None
        except UnicodeError:  # pyarrow can neither name nor open such a file
            raise IngestError(
                f"cannot list source {src}: a file name under it is not UTF-8 (e.g. Latin-1 "
                "from an older system); rename it (convmv -r -f latin1 -t utf8 --notest DIR) "
                "or pack the folder into a tar archive"
            ) from None
        if info.type == pafs.FileType.NotFound:
            raise IngestError(f"source not found: {src}")
        fresh = [p for p in paths if (fs.type_name, p) not in listed]
        if len(fresh) < len(paths):
            skipped = len(paths) - len(fresh)
            log.info("%d files of source %d were listed by an earlier source", skipped, number)
        listed.update((fs.type_name, p) for p in fresh)
        refs.extend({"source": src, "path": p, "kind": archive_kind(p) or "file"} for p in fresh)
    return refs


def _local_files(root: str) -> list[str]:
    """Files under a local folder, each folder listed once whatever the links to it.

    pyarrow's recursive listing follows every folder link again and again: one link to a parent
    (``up -> ..``) listed each file 41 times, two such links never finished. Here a linked
    folder is entered only the first time its real path is met (names sorted, so the choice is
    stable across runs). A link whose target is missing is listed, so it is quarantined as
    unreadable rather than dropped unseen; sockets, fifos and devices hold no image and are left
    out, as pyarrow did (reading a fifo would block). A name that is not UTF-8 raises
    UnicodeEncodeError: pyarrow could not open it.
    """

    def fail(err: OSError) -> None:  # os.walk would skip an unreadable folder silently
        raise err

    files: list[str] = []
    entered: set[str] = set()
    skipped = 0
    for folder, subfolders, names in os.walk(root, onerror=fail, followlinks=True):
        real = os.path.realpath(folder)
        if real in entered:
            subfolders.clear()
            skipped += 1
            continue
        entered.add(real)
        subfolders.sort()
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path) or (os.path.islink(path) and not os.path.exists(path)):
                path.encode("utf-8")  # UnicodeEncodeError for a name pyarrow cannot open
                files.append(path)
    if skipped:
        # no path in the log: folder names in an export may carry patient names
        log.info("%d linked folders were already listed under another name: skipped", skipped)
    return sorted(files)


# Above this size a compressed tar is not counted ahead of the run: counting decompresses it
# whole on the driver (on one core; from object storage, a second download),
# a second full read before any work starts. Its members are then counted as they stream.
COUNT_LIMIT_BYTES = 256 << 20
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


# a local file so named is taken for the one image it says it is, without opening it
IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")


# past this many refs a plain file is not opened to count it: opening each costs 0.5-2 ms on
# network storage (NFS) and the count no longer changes the decoder pool (refs / 16 batches
# already exceed a cluster's CPUs); an archive among them is then counted as it is read
SNIFF_LIMIT = 4096


def count_inputs(ref: dict[str, str], sniff: bool = True) -> int | None:
    """The inputs one :func:`list_inputs` ref holds (see :func:`count_members`), for the
    progress total and the decoder pool's size.

    A ref listed as a plain file may be an archive all the same: a zip without a suffix (an
    object-store key, a PACS export's ``study1``) was counted as one input, and the pool was
    sized for that one. A local file is told by its first bytes, as reading tells it, unless
    its name says an image (a local folder of a million ``.dcm`` files is not also opened on
    the driver). On object storage it stays one: telling it would cost a request per key."""
    kind: str | None = ref["kind"]
    if kind == "file":
        kind = _local_archive_kind(ref) if sniff else None
        if kind is None:
            return 1
    return count_members({**ref, "kind": kind})


def _local_archive_kind(ref: dict[str, str]) -> str | None:
    """:func:`archive_kind_of` a local file's first bytes; None for an object-store key, a
    name that says an image, or a file that cannot be opened (reading quarantines it)."""
    source = ref["source"]
    if "://" in source and not source.startswith("file://"):
        return None
    if ref["path"].lower().endswith(IMAGE_SUFFIXES):
        return None
    try:
        fs, _ = filesystem(source)
        with fs.open_input_file(ref["path"]) as f:
            return archive_kind_of(f.read(HEAD))
    except Exception:
        return None


def tar_row_members(t: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members of ``t`` that reading makes a row of: files, and links (each quarantined as
    one input, :func:`_iter_tar`); directories, devices and fifos hold no file data."""
    return (m for m in t if m.isfile() or m.islnk() or m.issym())


def count_members(ref: dict[str, str]) -> int | None:
    """Members of an archive that reading makes a row of (files and links), for the progress
    total and the decoder pool's size (unreadable archives count 1); None for a compressed tar
    over :data:`COUNT_LIMIT_BYTES`, which only a full decompression could count."""
    try:
        fs, _ = filesystem(ref["source"])
        with fs.open_input_file(ref["path"]) as f:
            if ref["kind"] == "zip":
                with zipfile.ZipFile(_ZipInput(f)) as z:
                    return sum(1 for i in z.infolist() if not i.is_dir())
            compressed = f.read(6).startswith(_COMPRESSED)
            if compressed and f.size() > COUNT_LIMIT_BYTES:
                return None
            f.seek(0)
            if not compressed:  # a 512-byte header per member, the data seeked over: a
                # buffer would read a whole refill past each member (1 MiB of every DICOM)
                with tarfile.open(fileobj=f, mode="r:") as t:
                    return sum(1 for _ in tar_row_members(t))
            # decompressed whole anyway: in large reads (one request each on object storage);
            # closes f as it ends, as the with above does again (a second close does nothing)
            with (
                io.BufferedReader(f, COUNT_BUFFER) as buffered,
                tarfile.open(fileobj=buffered, mode="r:*") as t,
            ):
                return sum(1 for _ in tar_row_members(t))
    except Exception:
        return 1


def utf8_name(name: str) -> str:
    """``name`` as text Arrow can store. tarfile decodes a member name that is not UTF-8 (a
    Latin-1 ``Müller/1.dcm`` from an older system) with surrogate escapes, which Arrow refuses:
    one such member failed its read task and with it the whole run. Such bytes become
    ``\\xNN``, so the name (hashed into source_hash) stays unique and stable across runs."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def iter_source(ref: dict[str, str], max_bytes: int) -> Iterator[dict[str, Any]]:
    """One :data:`READ_SCHEMA` row per image file in ``ref`` (a file, or each archive member).

    Members stream one at a time, so an archive of any size costs one member's bytes; the
    bound is checked on the size a header declares before anything is read."""
    path = ref["path"]

    def row(name: str, data: bytes | None, size: int | None, err: str | None) -> dict[str, Any]:
        return {"name": utf8_name(name), "data": data, "size_bytes": size, "read_error": err}

    try:  # a storage this worker cannot reach (its first touch: OSError) quarantines too
        fs, _ = filesystem(ref["source"])
        with fs.open_input_file(path) as f:
            kind = archive_kind_of(f.read(HEAD))
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
                members = 0
                # held here until the file closes: a buffer collected early would close f
                buffered = io.BufferedReader(f, STREAM_BUFFER)
                try:
                    for member in _iter_tar(buffered, path, max_bytes, row):
                        members += 1
                        yield member
                except Exception:
                    packed = None if members else _not_a_tar(f)
                    if packed is None:
                        raise
                    yield row(path, None, f.size(), f"{NOT_UNPACKED}:{packed}")
    except Exception as err:  # an unreadable file or corrupt archive is one quarantined input
        yield row(path, None, None, read_error(err))


def read_error(err: Exception) -> str:
    """The ``read_error`` of a file that could not be read: what happened where it is known
    (a quarantine row said "could not read the file (OSError)" for a symbolic link loop, which
    left the operator guessing), else the exception's type."""
    if isinstance(err, StorageUnreachable):  # why and what to do, without the service's text
        return f"read_error:{UNREACHABLE} {err.summary}"
    detail = _ERRNO_DETAILS.get(getattr(err, "errno", None) or -1, type(err).__name__)
    return f"read_error:{detail}"


def _not_a_tar(f: Any) -> str | None:
    """What a compressed stream that tarfile could not read holds ('gzip-compressed DICOM'),
    when that is not a tar: a single compressed file, which ingest does not decompress. None
    for a compressed tar (corrupt or cut off: a read error)."""
    f.seek(0)
    packed = packed_kind(f.read(PEEK_INPUT))
    return None if packed is None or packed.endswith("tar archive") else packed


class _ZipInput:
    """A pyarrow input file as zipfile expects one. pyarrow refuses a seek before the start with
    ArrowInvalid where a Python file raises OSError, the error zipfile catches when it looks for
    a Zip64 record in an archive smaller than that record: an empty zip (22 bytes, an empty
    study folder zipped) was one unreadable input, "could not read the file (ArrowInvalid)",
    instead of an archive with no files."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def seek(self, offset: int, whence: int = 0) -> int:
        try:
            return self._f.seek(offset, whence)
        except pa.ArrowInvalid as err:
            raise OSError(str(err)) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


# the compression methods this Python's zipfile decompresses (3.14 adds Zstandard)
_READABLE_ZIP_METHODS = frozenset(
    m
    for m in (
        zipfile.ZIP_STORED,
        zipfile.ZIP_DEFLATED,
        zipfile.ZIP_BZIP2,
        zipfile.ZIP_LZMA,
        getattr(zipfile, "ZIP_ZSTANDARD", None),
    )
    if m is not None
)


def _iter_zip(f: Any, path: str, max_bytes: int, row: Any) -> Iterator[dict[str, Any]]:
    with zipfile.ZipFile(_ZipInput(f)) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            name = f"{path}!{info.filename}"
            # a symbolic link (Unix mode in the high bits): its data is the target's name, which
            # was decoded and quarantined as not_an_image; as a tar's link, one read_error
            if stat.S_ISLNK(info.external_attr >> 16):
                yield row(name, None, None, f"read_error:{LINK}")
                continue
            if info.file_size > max_bytes:
                yield row(name, None, info.file_size, "too_large")
                continue
            if info.flag_bits & 0x1:  # encrypted (ZipCrypto or AES): zipfile's bare RuntimeError
                yield row(name, None, info.file_size, f"read_error:{ENCRYPTED}")
                continue
            try:
                data = z.read(info)
            except NotImplementedError as err:  # Deflate64 (Windows' "Send to zip"), PPMd ...
                # zipfile raises it for other features too (compressed patched data, flag bit
                # 5): the method is named only when it is one zipfile cannot read
                unreadable = info.compress_type not in _READABLE_ZIP_METHODS
                reason = (
                    f"read_error:{ZIP_METHOD} {info.compress_type}"
                    if unreadable
                    else read_error(err)
                )
                yield row(name, None, info.file_size, reason)
                continue
            except Exception as err:
                yield row(name, None, info.file_size, read_error(err))
                continue
            yield row(name, data, len(data), None)


def _iter_tar(f: Any, path: str, max_bytes: int, row: Any) -> Iterator[dict[str, Any]]:
    # streaming mode: one sequential pass, so a link's target (read earlier or later) cannot
    # be re-read; a link is reported as one quarantined input, never skipped unseen
    with tarfile.open(fileobj=f, mode="r|*") as t:
        for member in t:
            name = f"{path}!{member.name}"
            if member.islnk() or member.issym():
                yield row(name, None, None, f"read_error:{LINK}")
                continue
            if not member.isfile():  # directories, devices, fifos hold no file data
                continue
            if member.size > max_bytes:
                yield row(name, None, member.size, "too_large")
                continue
            fh = t.extractfile(member)
            data = fh.read() if fh is not None else b""
            yield row(name, data, len(data), None)


def read_blocks(batch: pa.Table, max_bytes: int) -> Iterator[pa.Table]:
    """File refs (an Arrow table of :func:`list_inputs` rows) -> tables of raw bytes, in blocks of
    :data:`READ_CHUNK` rows: archives expand here, so one ref may become thousands of rows."""
    rows: list[dict[str, Any]] = []
    for ref in batch.to_pylist():
        for r in iter_source(ref, max_bytes):
            rows.append(r)
            if len(rows) >= READ_CHUNK:
                yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)


def _reason(err: BaseException) -> str:
    """Why a listing failed, without the local path the OS names (``[Errno 13] Permission
    denied: '/exports/DOE_JOHN_12345'``: folder names in an export may be patient names). An
    object store's or pyarrow's own message (access denied, no route, no credentials) names the
    bucket and key it was given, and says what to fix: kept, credentials redacted."""
    code = getattr(err, "errno", None)
    if isinstance(err, OSError) and getattr(err, "filename", None) is not None:
        if isinstance(code, int) and code > 0:
            return f"{os.strerror(code)} (in it or a folder below it)"
        return type(err).__name__
    lines = str(err).strip().splitlines()
    return redact(lines[0]) if lines else type(err).__name__

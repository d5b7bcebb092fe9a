"""The Parquet shard schema written by ingest, and plain (Ray-free) readers for it.

One row per unique image (``image_id``: an HMAC-SHA256 of the source bytes under the
pseudonymisation key, or their plain SHA-256 in a destination made before ids were keyed; its
key record's ``id_scheme`` says which, see ``radjepa.imaging.deid.content_id``). ``pixels`` holds
the raw row-major array bytes of the value contract in ``radjepa.imaging.contract`` (little-endian
for uint16), so readers need only numpy to rebuild an image.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from radjepa.imaging.contract import DTYPES, META_FIELDS
from radjepa.locations import filesystem, spell_like

if TYPE_CHECKING:
    import pyarrow.dataset as pads

__all__ = [
    "DUPLICATES_DIR",
    "DUPLICATE_SAME_BYTES",
    "DUPLICATE_SAME_INSTANCE",
    "DUPLICATE_SCHEMA",
    "ForeignFilesError",
    "IMAGES_DIR",
    "INGEST_RECORDS",
    "KEY_RECORD",
    "MANIFEST",
    "QUARANTINE_DIR",
    "QUARANTINE_SCHEMA",
    "SHARD_SCHEMA",
    "ShardError",
    "ShardsGoneError",
    "DamagedShardError",
    "list_shards",
    "pixel_batch",
    "pixels_from_bytes",
    "pixels_to_bytes",
    "duplicate_rows",
    "corrupted_shard",
    "foreign_files",
    "ingest_root",
    "is_checksum_error",
    "is_damage_error",
    "is_output_name",
    "output_files",
    "read_duplicates",
    "read_images",
    "require_columns",
    "rows_sorted_by",
    "shard_files",
    "shard_folder",
    "shard_scan_options",
]

IMAGES_DIR = "images"
QUARANTINE_DIR = "quarantine"
DUPLICATES_DIR = "duplicates"
# how ingest names the Parquet files it writes into each folder: <prefix><run id>...parquet
OUTPUT_PREFIXES = {
    IMAGES_DIR: "part-",
    QUARANTINE_DIR: "quarantine-",
    DUPLICATES_DIR: "duplicates-",
}
# what follows the prefix: the run id (``20261205T132317-e6250c``) and a shard's number, only
# letters, digits, "-" and "_". A copy a file manager or browser makes adds a space
# (``part-... (1).parquet``, ``part-... copy.parquet``, ``part-... - Copy.parquet``)
_OUTPUT_BODY = re.compile(r"[0-9A-Za-z_-]+")
# the JSON records ingest keeps at the top of its DST (radjepa.ingest.destination writes them):
# a folder holding either is an ingest DST, whose images/ folder holds only what ingest wrote
MANIFEST = "manifest.json"
KEY_RECORD = "pseudonyms.json"  # which key made the pseudonyms; written before any shard
INGEST_RECORDS = (MANIFEST, KEY_RECORD)

_META_TYPES: dict[str, pa.DataType] = {
    "age_years": pa.int16(),
    "orig_height": pa.int32(),
    "orig_width": pa.int32(),
    "pixel_spacing_mm": pa.float32(),
}

SHARD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("pixels", pa.binary(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        *[
            pa.field(name, _META_TYPES.get(name, pa.string()))
            for name in META_FIELDS
            if name != "image_id"
        ],
        # raw source path: null unless ingest.keep_source_paths (a PHI risk) is switched on
        pa.field("source_path", pa.string()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        # the file's image id (as ``image_id`` above, under the DST's id_scheme: the name is from
        # when ids were unkeyed SHA-256); null when the bytes could not be read at all
        pa.field("sha256", pa.string()),
        pa.field("source_hash", pa.string()),
        pa.field("source_path", pa.string()),  # null unless keep_source_paths
        pa.field("reason", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("size_bytes", pa.int64()),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

# One row per input not stored because DST already holds it: ``kind`` says how.
# ``same_instance``: its DICOM instance (SOP Instance UID, by its keyed pseudonym
# ``instance_pid``) is already stored from other bytes: the same instance re-exported in another
# transfer syntax, or with another header. ``same_bytes``: its bytes are those of an input
# stored (or quarantined) earlier in the run or by an earlier run, from another path. Its own
# image id is recorded so that re-runs skip it unread, as they skip the stored bytes themselves;
# a re-run of the same input (same bytes, same path) adds no row. Tables written before ``kind``
# existed hold only ``same_instance`` rows: read them with :func:`read_duplicates`.
DUPLICATE_SAME_INSTANCE = "same_instance"
DUPLICATE_SAME_BYTES = "same_bytes"
DUPLICATE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # this file's id (its bytes)
        # the stored copy's id (for same_bytes, image_id itself but for bytes that were
        # themselves a duplicate instance; for bytes DST quarantined, the quarantine row's id)
        pa.field("kept_image_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # same_instance | same_bytes
        pa.field("instance_pid", pa.string()),  # same_instance rows only
        pa.field("transfer_syntax", pa.string()),  # this copy's; same_instance rows only
        pa.field("source_hash", pa.string()),
        pa.field("source_path", pa.string()),  # null unless keep_source_paths
        pa.field("size_bytes", pa.int64()),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)


def duplicate_rows(table: pa.Table) -> pa.Table:
    """One ``DST/duplicates`` file's table under :data:`DUPLICATE_SCHEMA`: a file written
    before the ``kind`` column (only same-instance rows then) gets it filled in.

    Read as one dataset (``pq.read_table(DST/duplicates)``), a folder whose first file is such
    an older one loses the column from every file's rows."""
    if "kind" not in table.column_names:
        kind = pa.array([DUPLICATE_SAME_INSTANCE] * table.num_rows, pa.string())
        table = table.append_column("kind", kind)
    return table.select(DUPLICATE_SCHEMA.names).cast(DUPLICATE_SCHEMA)


def is_output_name(sub: str, name: str) -> bool:
    """Whether ``name`` is how ingest names a Parquet file of the DST folder ``sub``
    (``images``, ``quarantine``, ``duplicates``): ``<prefix><run id>[-NNNNN].parquet``.

    Not a copy of one named by a file manager or a browser (``part-...-00000 (1).parquet``):
    taking any ``part-*.parquet`` counted such a copy's images as stored a second time, and
    training read them twice."""
    prefix, suffix = OUTPUT_PREFIXES[sub], ".parquet"
    if not (name.startswith(prefix) and name.endswith(suffix)):
        return False
    return _OUTPUT_BODY.fullmatch(name[len(prefix) : -len(suffix)]) is not None


def _is_read_as_parquet(name: str) -> bool:
    """Whether a folder reader (Ray Data, pyarrow datasets, :func:`list_shards` of a folder
    that is not an ingest DST) takes a file of this name as Parquet: ``*.parquet`` not starting
    with ``.`` or ``_``."""
    return name.endswith(".parquet") and not name.startswith((".", "_"))


def foreign_files(fs: pafs.FileSystem, root: str, sub: str) -> list[str]:
    """Names of the Parquet files in ``root/sub`` of a DST that ingest did not write but a
    folder reader would take as Parquet (a hand-made shard, a file manager's copy of one):
    ingest leaves them out of what DST holds, so training must not read them either (see
    :func:`list_shards`). Sorted; empty when the folder is missing."""
    return sorted(
        e.base_name
        for e in _regular_files(fs, root, sub)
        if _is_read_as_parquet(e.base_name) and not is_output_name(sub, e.base_name)
    )


def ingest_root(fs: pafs.FileSystem, folder: str) -> str | None:
    """The DST whose ``images`` folder ``folder`` is (a path on ``fs``), when ingest wrote that
    DST (its manifest or key record is there); None for any other folder of Parquet files."""
    parent, _, base = folder.rstrip("/").rpartition("/")
    if base != IMAGES_DIR or not parent:
        return None
    for name in INGEST_RECORDS:
        if fs.get_file_info(f"{parent}/{name}").type == pafs.FileType.File:
            return parent
    return None


def output_files(fs: pafs.FileSystem, root: str, sub: str) -> list[str]:
    """The Parquet files ingest wrote into ``root/sub`` of a DST, sorted (by run, then
    number): the one listing that ingest's reads of DST and :func:`read_duplicates` share.

    Only regular files named as ingest names them. Not a temporary file (``.NAME.tmp``) of a
    write in progress or killed, not a hidden file (a Mac that copies DST onto a network share
    or a USB disk leaves an AppleDouble ``._part-....parquet`` beside each file: 4 KiB of
    Finder data, not Parquet, which stopped the next ingest with an ArrowInvalid traceback),
    not a folder, and not another tool's file. Ingest listed every ``*.parquet`` while
    :func:`read_duplicates` took only ``duplicates-*``: the two could disagree on what DST
    holds. An empty list when the folder is missing."""
    return sorted(e.path for e in _regular_files(fs, root, sub) if is_output_name(sub, e.base_name))


def _regular_files(fs: pafs.FileSystem, root: str, sub: str) -> list[pafs.FileInfo]:
    """The regular files (not folders) in ``root/sub`` of a DST; none when it is missing."""
    folder = f"{root.rstrip('/')}/{sub}"
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        return []
    return [e for e in fs.get_file_info(pafs.FileSelector(folder)) if e.type == pafs.FileType.File]


def read_duplicates(dst: str | Path) -> pa.Table:
    """Every ``DST/duplicates`` row of an ingest output (older files included, see
    :func:`duplicate_rows`); an empty table when there are none."""
    fs, root = filesystem(dst)
    paths = output_files(fs, root, DUPLICATES_DIR)
    tables = [duplicate_rows(pq.read_table(p, filesystem=fs)) for p in paths]
    return pa.concat_tables(tables) if tables else DUPLICATE_SCHEMA.empty_table()


class ShardError(FileNotFoundError):
    """No usable shards where some were expected."""


class DamagedShardError(ShardError):
    """A shard whose bytes cannot be read as the shard ingest wrote (cut short, pages changed,
    another schema): every read of it fails the same way, so a run does not retry it."""


class ShardsGoneError(ShardError):
    """Shard files listed when a run (or a sweep) started are no longer in their folder:
    moved or removed since. ``gone``: their names."""

    def __init__(self, message: str, gone: Sequence[str]) -> None:
        super().__init__(message)
        self.gone = list(gone)


class ForeignFilesError(ShardError):
    """An ingest DST's ``images/`` holds Parquet files ingest did not write (the message
    names them)."""


def shard_folder(dst: str | Path) -> str:
    """The folder of shard files of an ingest output: ``dst/images`` if it exists, else ``dst``
    (spelled as ``dst`` is: path or URI)."""
    fs, root = filesystem(dst)
    root = root.rstrip("/")
    sub = f"{root}/{IMAGES_DIR}"
    if fs.get_file_info(sub).type == pafs.FileType.Directory:
        return spell_like(dst, sub)
    return spell_like(dst, root)


def list_shards(dst: str | Path) -> list[str]:
    """Sorted shard files (paths, or URIs when ``dst`` is one) of an ingest output folder: the
    one listing that pretraining, sweeps, ``embed`` and ``probe`` read (they are given these
    files, never the folder; :func:`shard_files` gives them with their filesystem).

    Names starting with ``.`` or ``_`` are not shards, the rule Ray Data's and pyarrow's
    folder readers apply: a Mac that copies the folder onto a share leaves an AppleDouble
    ``._part-....parquet`` beside each shard, 4 KiB of Finder data that ``read_images`` and
    ``radjepa embed`` read as Parquet (ArrowInvalid, "Parquet magic bytes not found"), and
    Spark-style ``_SUCCESS``/``_metadata`` files are not images either.

    In an ingest DST (:func:`ingest_root`) the shards are the files ingest wrote, the ones its
    re-runs know (:func:`output_files`), and any other Parquet file in ``images/`` is refused
    here, by name, before any cluster work: training read every ``*.parquet`` there, so a
    file manager's copy of a shard was trained on twice, a shard from another DST was stored
    again by the next ingest (which does not know its ids), and a file of another schema
    stopped the run with a traceback. A folder of Parquet shards that is not an ingest DST
    (no manifest or key record beside its ``images/``) is read whole, as before."""
    _, paths = shard_files(dst)
    return [spell_like(dst, p) for p in paths]


def shard_files(dst: str | Path, listed: Sequence[str] = ()) -> tuple[pafs.FileSystem, list[str]]:
    """:func:`list_shards`' files as paths on their filesystem, for readers that take a
    ``filesystem`` (pyarrow datasets, Ray Data). ``listed``: the files an earlier call gave,
    taken as they are in the folder as ``dst`` spells it now (a sweep trial's ``dst`` has its
    links resolved: another node may lack the link its driver read through; the shards lie
    straight in the folder); the folder is listed only to check that they are all still
    there, and files added since are not taken."""
    folder = shard_folder(dst)
    fs, path = filesystem(folder)
    if listed:
        files = [f"{path.rstrip('/')}/{f.rsplit('/', 1)[-1]}" for f in listed]
        there = {e.path for e in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))}
        gone = [f for f in files if f not in there]
        if gone:  # one listing: pyarrow's FileNotFoundError named a path, not the cause
            names = [f.rsplit("/", 1)[-1] for f in gone]
            raise ShardsGoneError(
                f"{len(gone)} shard(s) listed when the run started are gone from {folder} "
                f"(first: {names[0]}): moved or removed meanwhile; put them back, or start "
                "the run again to list the shards anew",
                names,
            )
        return fs, files
    files: list[str] = []
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        root = ingest_root(fs, path)
        if root is not None:
            _refuse_foreign(fs, root, folder)
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
        files = sorted(
            e.path
            for e in entries
            if e.type == pafs.FileType.File and _is_read_as_parquet(e.base_name)
        )
    if not files:
        raise ShardError(f"no Parquet shards in {folder}: {_why_no_shards(dst)}")
    return fs, files


def _refuse_foreign(fs: pafs.FileSystem, root: str, folder: str) -> None:
    foreign = foreign_files(fs, root, IMAGES_DIR)
    if not foreign:
        return
    shown = ", ".join(repr(n) for n in foreign[:5])
    more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
    raise ForeignFilesError(
        f"{folder} holds {len(foreign)} Parquet file(s) that `radjepa ingest` did not write: "
        f"{shown}{more}. Ingest does not count their images (a re-run stores them again) and "
        "a copy of a shard would be trained on twice: move them out of the DST (to add images, "
        "`radjepa ingest` their source files into it)"
    )


def _why_no_shards(dst: str | Path) -> str:
    """What to do about a folder without shards. A DST that ingest ran into but stored nothing
    in (every input quarantined, or an empty source) was told to run ingest "first", as if it
    had never run; its manifest says what happened to the inputs."""
    fs, root = filesystem(dst)
    root = root.rstrip("/")
    if fs.get_file_info(f"{root}/{MANIFEST}").type == pafs.FileType.File:
        return (
            f"`radjepa ingest` ran into {dst} but stored no image (every input quarantined, or "
            f"none found): see {spell_like(dst, root)}/{MANIFEST} and its quarantine/ folder"
        )
    return f"run `radjepa ingest SRC... {dst}` first"


def require_columns(names: list[str], where: str | Path, needed: list[str]) -> None:
    """Refuse Parquet that is not ingest shards (an embeddings index given as shards, say) by
    the columns a reader needs, before it reads any: the readers' own errors were a pyarrow
    ``ArrowInvalid`` or ``KeyError`` traceback naming no folder."""
    missing = [c for c in needed if c not in names]
    if missing:
        raise ShardError(
            f"{where} holds Parquet that is not `radjepa ingest` shards (no column "
            f"{', '.join(missing)}): give the DST folder `radjepa ingest` wrote"
        )


def rows_sorted_by(table: pa.Table, column: str) -> pa.Table:
    """``table``'s rows in ``column``'s order, as zero-copy slices: ``Table.sort_by`` takes
    the rows into one new chunk, and a shard's ``pixels`` (32-bit offsets) past 2 GiB
    (2048 rows of 1024 px uint8) did not fit one ("offset overflow")."""
    order = pc.sort_indices(table[column]).to_pylist()
    if not order:
        return table
    return pa.concat_tables([table.slice(i, 1) for i in order])


def pixels_to_bytes(pixels: np.ndarray) -> bytes:
    """Contract array -> shard bytes (row-major, little-endian)."""
    if pixels.dtype.name not in DTYPES or pixels.ndim != 2:
        raise ValueError(f"expected a 2-D uint8/uint16 array, got {pixels.dtype} {pixels.shape}")
    return np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes()


def pixels_from_bytes(b: bytes, h: int, w: int, dtype: str) -> np.ndarray:
    """Shard ``pixels`` bytes -> array [h, w] in native byte order (a copy, writable)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown shard dtype {dtype!r}; expected one of {DTYPES}")
    le = np.dtype(dtype).newbyteorder("<")
    if len(b) != h * w * le.itemsize:
        raise ValueError(f"pixel buffer of {len(b)} bytes does not hold {h}x{w} {dtype}")
    return np.frombuffer(b, dtype=le).reshape(h, w).astype(dtype)


def pixel_batch(rows: pa.Table | pa.RecordBatch) -> np.ndarray:
    """Shard rows -> ``[n, H, W]`` images read straight from the ``pixels`` column's buffer.

    Why not row by row: turning each row into a Python ``bytes`` object, decoding it and then
    stacking costs several copies per image, and the training stream decodes every image of
    every epoch. Here one record batch becomes one zero-copy (read-only) view; a table of
    several chunks costs one concatenation. Rows must share one size and dtype (one ingest
    config per folder); anything else is a :class:`ShardError` saying what differs.
    """
    batches = rows.to_batches() if isinstance(rows, pa.Table) else [rows]
    views = [_pixel_view(rb) for rb in batches if rb.num_rows]
    if not views:
        raise ShardError("no shard rows to decode")
    kinds = {(v.shape[1:], str(v.dtype)) for v in views}
    if len(kinds) > 1:
        raise ShardError(f"shard rows mix image sizes/dtypes: {sorted(kinds)}")
    return views[0] if len(views) == 1 else np.concatenate(views)


def _pixel_view(rb: pa.RecordBatch) -> np.ndarray:
    n = rb.num_rows
    sizes = [pc.min_max(rb.column(c)).as_py() for c in ("height", "width")]
    dtypes = pc.unique(rb.column("dtype")).to_pylist()
    if any(s["min"] != s["max"] for s in sizes) or len(dtypes) != 1:
        raise ShardError(
            f"shard rows mix image sizes (height {sizes[0]}, width {sizes[1]}) or dtypes {dtypes}"
        )
    h, w, dtype = sizes[0]["min"], sizes[1]["min"], dtypes[0]
    if dtype not in DTYPES:
        raise ShardError(f"unknown shard dtype {dtype!r}; expected one of {DTYPES}")
    col = rb.column("pixels")
    if col.type not in (pa.binary(), pa.large_binary()):  # int32 or (after a cast) int64 offsets
        raise ShardError(f"column 'pixels' is {col.type}; the shard schema says binary")
    if col.null_count:
        raise ShardError(f"{col.null_count} shard rows have no pixel bytes")
    le = np.dtype(dtype).newbyteorder("<")
    _, offsets_buf, data_buf = col.buffers()
    off = np.dtype("<i8" if col.type == pa.large_binary() else "<i4")
    offsets = np.frombuffer(offsets_buf, off, count=n + 1, offset=col.offset * off.itemsize)
    per_row = h * w * le.itemsize
    if not np.all(np.diff(offsets) == per_row):
        raise ShardError(f"pixel buffers are not all {h}x{w} {dtype} ({per_row} bytes each)")
    flat = np.frombuffer(data_buf, le, count=n * h * w, offset=int(offsets[0]))
    if not le.isnative:  # big-endian host: one converting copy
        flat = flat.astype(le.newbyteorder("="))
    else:
        flat.flags.writeable = False  # Arrow memory is immutable: writes must not reach it
    return flat.reshape(n, h, w)


def shard_scan_options() -> pads.ParquetFragmentScanOptions:
    """How a ``pyarrow.dataset`` (or ``ray.data.read_parquet``'s ``fragment_scan_options``)
    reads shards: each page checked against the CRC ingest writes with it. Without it, bytes
    changed inside a shard's pixel pages (a failing disk, a bad copy) decoded as images and
    were trained on, as nothing else checks them. A page written without a checksum (shards
    made before ingest wrote them) is read unchecked."""
    import pyarrow.dataset as pads

    return pads.ParquetFragmentScanOptions(page_checksum_verification=True)


def is_checksum_error(err: BaseException) -> bool:
    """Whether a read failed because a page's bytes no longer match their checksum: pyarrow's
    OSError, which names no file and has no errno (a damaged file, not a storage outage)."""
    return isinstance(err, OSError) and "CRC checksum verification failed" in str(err)


def is_damage_error(fs: pafs.FileSystem, err: BaseException) -> bool:
    """Whether an error reading a file of ``fs`` says the file's bytes are wrong, not that the
    storage failed to give them: pyarrow's ``ArrowInvalid``, a page failing its checksum (on
    any filesystem: the bytes arrived, and they are not those written), or on a local disk an
    OSError of pyarrow's without an errno (a footer or page header that no longer decodes)."""
    if isinstance(err, pa.ArrowInvalid) or is_checksum_error(err):
        return True
    local = isinstance(fs, pafs.LocalFileSystem)
    return local and isinstance(err, OSError) and not getattr(err, "errno", None)


def corrupted_shard(shown: str, reason: str) -> str:
    """The message for the shard ``shown`` whose pages fail their checksums (its footer is
    whole, so no other check notices): which file, and how to go on."""
    return (
        f"{shown} is damaged: its bytes changed after ingest wrote them ({reason}), as a failing "
        "disk or a bad copy leaves a file. Move it out of the DST; a re-run of `radjepa ingest` "
        "over the same sources stores its images again"
    )


def read_images(dst: str | Path, limit: int | None = None) -> tuple[np.ndarray, pa.Table]:
    """All (or the first ``limit``) images as one array [N, H, W] plus their metadata table.

    Shards must agree on size and dtype (one ingest config per output folder).
    """
    tables = []
    rows = 0
    for path in list_shards(dst):
        if limit is not None and rows >= limit:
            break
        require_columns(pq.read_schema(path).names, dst, ["pixels", "height", "width", "dtype"])
        try:
            t = pq.read_table(path, page_checksum_verification=True)
        except OSError as err:
            if not is_checksum_error(err):
                raise
            raise ShardError(corrupted_shard(path, str(err))) from None
        tables.append(t)
        rows += t.num_rows
    table = pa.concat_tables(tables)
    if limit is not None:
        table = table.slice(0, limit)
    if table.num_rows == 0:
        raise ShardError(f"shards under {dst} hold no rows")
    try:
        images = pixel_batch(table)  # [N, H, W]; refuses mixed sizes or dtypes
    except ShardError as err:
        raise ShardError(f"shards under {dst}: {err}") from None
    if not images.flags.writeable:  # one chunk: a view over the table's buffer
        images = images.copy()
    return images, table.drop_columns(["pixels"])

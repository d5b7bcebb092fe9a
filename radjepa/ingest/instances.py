"""Which DICOM instance a file holds: ingest's second identity, beside the file's bytes.

A PACS that re-exports an instance (in another transfer syntax, with another private tag or a
re-sent header) gives it other bytes but the same SOP Instance UID. Told apart by bytes alone
it was stored twice: a duplicate training image, and with a per-image hold-out split possibly
one copy on each side. As DICOM archives do, ingest identifies an instance by its SOP Instance
UID, here by its keyed pseudonym ``instance_pid`` (the raw UID never leaves the decoder): the
copy stored first is kept, in this run or an earlier one, and a later copy is a duplicate.
Unless their stored pixels differ materially: two images under one UID are a conflict (a
broken modality, a UID reused by an editing tool), quarantined as ``instance_conflict`` rather
than silently dropped.

The index of stored instances is read once per run (one short column per shard); pixels are
read only to compare a copy with the stored one, once per shard holding such an instance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from radjepa.imaging.contract import dtype_max
from radjepa.ingest.id_sets import InstanceShards
from radjepa.shards import pixels_from_bytes

__all__ = [
    "CONFLICT",
    "CONFLICT_DIFFERENCE",
    "InstanceIndex",
    "Verdict",
    "difference",
    "thumbnail",
]

log = logging.getLogger(__name__)

CONFLICT = "instance_conflict"  # an ingest quarantine reason, beside read_error
# Mean absolute difference of two copies' 16 x 16 block means, as a fraction of full scale,
# above which they are two images: a lossy re-export of one radiograph differs by well under
# 1%, two radiographs (even two chest PAs) by several percent.
CONFLICT_DIFFERENCE = 0.03
_GRID = 16
_ROWS_AT_ONCE = 64  # rows of a stored shard turned into Python objects at a time

Thumbnail = np.ndarray
Pixels = tuple[bytes, int, int, str]  # a row's pixels bytes, height, width and dtype
# the pixels of a row this run stored but has not written yet, by image id (None: not found)
PixelLookup = Callable[[str], "Pixels | None"]


def thumbnail(pixels: bytes, height: int, width: int, dtype: str) -> Thumbnail:
    """The 16 x 16 block means of a stored image on a 0-255 scale (256 bytes, kept for every
    row of a shard read back): enough to tell two images apart, blind to the compression
    noise that tells two encodings of one image apart."""
    img = pixels_from_bytes(pixels, height, width, dtype).astype(np.float32) / dtype_max(dtype)
    gh, gw = min(_GRID, height), min(_GRID, width)
    img = img[: height - height % gh, : width - width % gw]
    means = img.reshape(gh, img.shape[0] // gh, gw, img.shape[1] // gw).mean(axis=(1, 3))
    return np.rint(means * 255.0).astype(np.uint8)


def difference(a: Thumbnail, b: Thumbnail) -> float:
    """Mean absolute difference of two thumbnails as a fraction of full scale (1.0 when their
    shapes differ)."""
    if a.shape != b.shape:
        return 1.0
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() / 255.0)


@dataclass(frozen=True)
class Verdict:
    """What a decoded DICOM is to the instances already stored: ``new`` (store it), a
    ``duplicate`` of ``kept_image_id``, or a ``conflict`` with it (``difference`` says how far
    apart their pixels are)."""

    kind: Literal["new", "duplicate", "conflict"]
    kept_image_id: str | None = None
    difference: float | None = None
    in_run: bool = False


class InstanceIndex:
    """Stored instances (``instance_pid`` -> the shard that holds it) of a DST and of this run.

    ``shards``: the DST's shard paths; ``read_shard(path, columns)`` reads columns of one.
    Only the shard's number is kept per instance (the driver holds one entry per stored
    image: 20 bytes in :class:`~radjepa.ingest.id_sets.InstanceShards`, where a dict of
    ``str`` took about 120); the kept copy's image id and thumbnail come from reading that
    shard back, when a copy needs them. Rows this run stored but has not yet written are found
    by the ``pending`` lookup given to :meth:`check`.
    """

    def __init__(self, shards: list[str], read_shard: Callable[[str, list[str]], pa.Table]) -> None:
        self._read = read_shard
        self._shards: list[str] = list(shards)
        # pid -> index in _shards of the shards read now (the first stored copy is the kept
        # one), compact: one entry per stored image at archive scale
        self._stored = InstanceShards.from_shards(
            read_shard(path, ["instance_pid"])["instance_pid"] for path in self._shards
        )
        self._written: dict[str, int] = {}  # pid -> index in _shards: written by this run
        self._pending: dict[str, str] = {}  # pid -> image id: stored by this run, unwritten
        self._in_run: set[str] = set()  # pids this run stored
        self._kept: dict[str, tuple[str, Thumbnail]] = {}  # pid -> id, thumbnail: read back
        self._loaded: set[int] = set()

    def __len__(self) -> int:
        return len(self._stored) + len(self._written) + len(self._pending)

    def _shard_of(self, pid: str) -> int | None:
        """The index in ``_shards`` of the shard keeping ``pid``, None when none does."""
        n = self._written.get(pid)
        return self._stored.get(pid) if n is None else n

    def check(
        self,
        pid: str | None,
        image_id: str,
        pixels: Callable[[], Pixels],
        pending: PixelLookup,
    ) -> Verdict:
        """The verdict on a decoded row (``pixels`` gives its pixels, read only for an instance
        already stored); a ``new`` instance is recorded as stored (pending until
        :meth:`written` names its shard). A row without an instance (PNG, JPEG, a DICOM
        without SOP Instance UID) is always ``new``: its bytes are its identity."""
        if not pid:
            return Verdict("new")
        kept = self._kept_copy(pid, pending)
        if kept is None:
            if (
                pid in self._pending or self._shard_of(pid) is not None
            ):  # only if DST changed under us
                log.warning(
                    "the stored copy of a DICOM instance could not be read back: storing this "
                    "copy too rather than dropping it"
                )
                return Verdict("new")
            self._pending[pid] = image_id
            self._in_run.add(pid)
            return Verdict("new")
        kept_id, thumb = kept
        apart = difference(thumb, thumbnail(*pixels()))
        kind: Literal["duplicate", "conflict"] = (
            "conflict" if apart > CONFLICT_DIFFERENCE else "duplicate"
        )
        return Verdict(kind, kept_id, apart, pid in self._in_run)

    def written(self, path: str, table: pa.Table) -> None:
        """``table`` (rows this run stored) is now in the shard ``path``."""
        n = len(self._shards)
        self._shards.append(path)
        for image_id, pid in zip(
            table["image_id"].to_pylist(), table["instance_pid"].to_pylist(), strict=True
        ):
            if pid and self._pending.get(pid) == image_id:
                del self._pending[pid]
                self._written[pid] = n

    def _kept_copy(self, pid: str, pending: PixelLookup) -> tuple[str, Thumbnail] | None:
        """The stored copy's image id and thumbnail; None when ``pid`` is not stored."""
        if pid in self._pending:
            kept_id = self._pending[pid]
            row = pending(kept_id)
            return None if row is None else (kept_id, thumbnail(*row))
        n = self._shard_of(pid)
        if n is None:
            return None
        if n not in self._loaded:  # a whole shard once: re-exports come in batches
            self._loaded.add(n)  # once, also when it cannot be read
            try:
                self._thumbnails(n)
            except (OSError, pa.ArrowException, ValueError) as err:
                # a shard deleted or damaged since the index was read, a bucket's error: the
                # copy is stored (below), never dropped, and the run goes on
                log.warning("cannot read back the stored shard %s: %s", self._shards[n], err)
        return self._kept.get(pid)

    def _thumbnails(self, n: int) -> None:
        """The ids and thumbnails of the instances shard ``n`` keeps, turned into Python
        objects a few rows at a time (a shard's whole pixel column as Python bytes doubled its
        size in memory: 4 GiB more for 2048 rows of 1024 px uint16)."""
        columns = ["image_id", "instance_pid", "pixels", "height", "width", "dtype"]
        for batch in self._read(self._shards[n], columns).to_batches(max_chunksize=_ROWS_AT_ONCE):
            for r in batch.to_pylist():
                if r["instance_pid"] and self._shard_of(r["instance_pid"]) == n:
                    self._kept.setdefault(
                        r["instance_pid"],
                        (
                            r["image_id"],
                            thumbnail(r["pixels"], r["height"], r["width"], r["dtype"]),
                        ),
                    )

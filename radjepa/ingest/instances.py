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

The index of stored instances is read once per run (two short columns per shard); pixels are
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
    """Stored instances (``instance_pid`` -> image id and shard) of a DST and of this run.

    ``shards``: the DST's shard paths; ``read_shard(path, columns)`` reads columns of one.
    Rows this run stored but has not yet written are found by the ``pending`` lookup given to
    :meth:`check`.
    """

    def __init__(self, shards: list[str], read_shard: Callable[[str, list[str]], pa.Table]) -> None:
        self._read = read_shard
        self._where: dict[str, tuple[str, str | None]] = {}  # pid -> (image id, shard|None)
        self._from_earlier: set[str] = set()
        self._thumbs: dict[str, Thumbnail] = {}  # image id -> thumbnail, shards read whole
        self._loaded: set[str] = set()
        for path in shards:
            table = read_shard(path, ["image_id", "instance_pid"])
            for image_id, pid in zip(
                table["image_id"].to_pylist(), table["instance_pid"].to_pylist(), strict=True
            ):
                if pid and pid not in self._where:
                    self._where[pid] = (image_id, path)
        self._from_earlier = set(self._where)

    def __len__(self) -> int:
        return len(self._where)

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
        known = self._where.get(pid)
        if known is None:
            self._where[pid] = (image_id, None)
            return Verdict("new")
        kept_id, shard = known
        in_run = pid not in self._from_earlier
        kept = self._thumbnail(kept_id, shard, pending)
        if kept is None:  # only if DST changed under the lock: the stored copy stays
            log.warning("the stored copy of a duplicate DICOM instance could not be read back")
            return Verdict("duplicate", kept_id, None, in_run)
        apart = difference(kept, thumbnail(*pixels()))
        kind: Literal["duplicate", "conflict"] = (
            "conflict" if apart > CONFLICT_DIFFERENCE else "duplicate"
        )
        return Verdict(kind, kept_id, apart, in_run)

    def written(self, path: str, table: pa.Table) -> None:
        """``table`` (rows this run stored) is now in the shard ``path``."""
        for image_id, pid in zip(
            table["image_id"].to_pylist(), table["instance_pid"].to_pylist(), strict=True
        ):
            if pid and self._where.get(pid) == (image_id, None):
                self._where[pid] = (image_id, path)

    def _thumbnail(
        self, image_id: str, shard: str | None, pending: PixelLookup
    ) -> Thumbnail | None:
        if shard is None:
            row = pending(image_id)
            return None if row is None else thumbnail(*row)
        if shard not in self._loaded:  # a whole shard once: re-exports come in batches
            table = self._read(shard, ["image_id", "pixels", "height", "width", "dtype"])
            for r in table.to_pylist():
                self._thumbs[r["image_id"]] = thumbnail(
                    r["pixels"], r["height"], r["width"], r["dtype"]
                )
            self._loaded.add(shard)
        return self._thumbs.get(image_id)

"""What a DST already holds, compactly: ingest's identity sets at archive scale.

Every incremental run reads the ids of the bytes a DST has seen (``Destination.known_ids``)
and its stored DICOM instances (``InstanceIndex``) once. As Python ``str`` in a set or dict
they took 120-185 bytes an entry, on the driver and, for the ids, again in every decoder actor
(each unpickled its own copy from Ray's object store): at 10 million stored images 1.7 GiB of
ids per process, 16 copies on a 16-core node, and 1.1 GiB of instances on the driver. Ingest makes
these values lowercase hex of one length (a 64-character image id, a 32-character path hash or
instance pseudonym), so they are held here as their raw bytes, sorted, in one fixed-width numpy
array (32 or 16 bytes an entry, plus 4 a shard number), and looked up by binary search. Such an
object pickles as a few numpy buffers, which Ray stores out of band: the actors of a node map one
copy read-only instead of each building its own (``bench/identity_sets.py`` measures both,
docs/PERFORMANCE.md).

Exact, never lossy: a false positive would skip an image as already ingested. A value of
another form (a hand-made or damaged id in a shard, upper-case hex) is kept as the ``str`` it
is, beside the arrays, so membership is exactly that of a set of the same strings. Nulls and
empty strings are not kept: no id ingest computes is either.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Set
from typing import Any

import numpy as np
import pyarrow as pa

from radjepa.hex_columns import offsets, unhex

__all__ = ["PATH_PREFIX", "InputKeys", "InstanceShards", "KnownIds"]

log = logging.getLogger(__name__)

PATH_PREFIX = "path:"  # a known id of a file never read: its path hash (quarantine source_hash)
IMAGE_ID_CHARS = 64  # radjepa.imaging.deid.content_id: SHA-256 / HMAC-SHA256 hex
PATH_HASH_CHARS = 32  # keyed_hash: PSEUDONYM_HEX_CHARS, as the instance pseudonym

Strings = pa.Array | pa.ChunkedArray


def _chunks(values: Strings) -> list[pa.Array]:
    """A string column's chunks, each as a (large_)string array."""
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    return [
        c if pa.types.is_string(c.type) or pa.types.is_large_string(c.type) else c.cast(pa.string())
        for c in chunks
    ]


def hex_keys(values: Strings, chars: int) -> tuple[np.ndarray, list[str]]:
    """The values of an Arrow string column that are lowercase hex of ``chars`` characters, as
    their raw bytes (``[n] S<chars/2>``, in column order), read from the Arrow buffers without
    a Python object per row; and the other non-empty values as ``str`` (nulls and empty
    strings are dropped)."""
    keys: list[np.ndarray] = []
    others: list[str] = []
    for chunk in _chunks(values):
        if chunk.null_count:
            chunk = chunk.drop_null()
        if not len(chunk):
            continue
        fits = np.diff(offsets(chunk)) == chars
        if not fits.all():
            others.extend(v for v in chunk.filter(pa.array(~fits)).to_pylist() if v)
            chunk = chunk.filter(pa.array(fits))
            if not len(chunk):
                continue
        raw, hexed = unhex(chunk, chars)
        if not hexed.all():
            others.extend(chunk.filter(pa.array(~hexed)).to_pylist())
            raw = raw[hexed]
        keys.append(raw)
    joined = np.concatenate(keys) if keys else np.empty(0, f"S{chars // 2}")
    return joined, others


def _key(value: str, chars: int) -> bytes | None:
    """``value`` as a stored key: its bytes when it is lowercase hex of ``chars`` characters,
    else None (such a value can only be among the ``str`` kept beside the array)."""
    if len(value) != chars:
        return None
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        return None
    return raw if raw.hex() == value else None  # fromhex also takes upper case and spaces


def _find(keys: np.ndarray, key: bytes) -> int:
    """Index of ``key`` in the sorted ``keys``, -1 when it is not there."""
    needle = np.array([key], keys.dtype)  # compared at the array's width, NUL bytes included
    i = int(keys.searchsorted(needle)[0])
    # two elements read back as scalars both lose trailing NULs: equal iff the stored bytes are
    return i if i < len(keys) and keys[i] == needle[0] else -1


def _order(keys: np.ndarray) -> np.ndarray:
    """The stable sort order of fixed-width keys (their width a multiple of 8 bytes): by the
    first 8 bytes as a big-endian integer (the same order as the bytes', and an integer sort
    is about 10x quicker than numpy's sort of byte strings), fully when two keys share those
    bytes (among 10 million random hashes, a chance of about 3 in a million; hand-made ids
    may well)."""
    words = keys.view(">u8").reshape(len(keys), keys.itemsize // 8)
    order = np.argsort(words[:, 0], kind="stable")
    first = words[order, 0]
    if len(keys) > 1 and bool((first[1:] == first[:-1]).any()):
        order = np.argsort(keys, kind="stable")
    return order


def _first_of_each(keys: np.ndarray) -> np.ndarray:
    """Of sorted keys, where each distinct key first appears (a bool mask)."""
    words = keys.view(">u8").reshape(len(keys), keys.itemsize // 8)
    return np.concatenate(([True], (words[1:] != words[:-1]).any(axis=1)))[: len(keys)]


def _unique(keys: np.ndarray) -> np.ndarray:
    """``keys`` sorted, each once."""
    keys = keys[_order(keys)]
    return keys[_first_of_each(keys)]


class _Growing:
    """An array appended to a file's keys at a time, grown by half. Its blocks are large
    allocations, given back to the OS when replaced; a list of one small array per file
    (then concatenated) left their heap pages behind on the driver: about 300 MiB more than
    the ids themselves at 10 million stored images (``bench/identity_sets.py``)."""

    def __init__(self, dtype: str | type) -> None:
        self._array = np.empty(1024, dtype)
        self._size = 0

    def add(self, values: np.ndarray) -> None:
        end = self._size + len(values)
        if end > len(self._array):
            bigger = np.empty(max(end, len(self._array) * 3 // 2), self._array.dtype)
            bigger[: self._size] = self._array[: self._size]
            self._array = bigger
        self._array[self._size : end] = values
        self._size = end

    def values(self) -> np.ndarray:
        """The keys added, in order (a view: sorting copies them into an array of their size)."""
        return self._array[: self._size]


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


class KnownIds(Set[str]):
    """The ids of the bytes a DST has seen: image ids, and ``path:<source hash>`` of files
    quarantined unread. A read-only set of ``str``: ``in``, ``len``, iteration (decoded back
    to ``str``), and comparison with any set of the same strings.

    Built from the Arrow columns a DST's Parquet files hold (:meth:`from_arrow`); 32 bytes an
    image id and 16 a path hash, against about 150-200 as ``str`` in a set."""

    def __init__(self, ids: np.ndarray, paths: np.ndarray, others: frozenset[str]) -> None:
        self._ids = _readonly(ids)  # [n] S32, sorted, unique
        self._paths = _readonly(paths)  # [m] S16, sorted, unique
        self._others = others  # values of another form, as they are (``path:`` included)

    @classmethod
    def from_arrow(cls, ids: Iterable[Strings], path_hashes: Iterable[Strings]) -> KnownIds:
        """From columns of image ids (``images``' and ``duplicates``' ``image_id``,
        ``quarantine``'s ``sha256``) and of path hashes (``quarantine``'s ``source_hash``,
        known as ``path:<hash>``). One array of keys at a time: no ``str`` per row."""
        id_keys, path_keys, others = _Growing("S32"), _Growing("S16"), set()
        for column in ids:
            keys, odd = hex_keys(column, IMAGE_ID_CHARS)
            id_keys.add(keys)
            others.update(odd)
        for column in path_hashes:
            keys, odd = hex_keys(column, PATH_HASH_CHARS)
            path_keys.add(keys)
            others.update(f"{PATH_PREFIX}{h}" for h in odd)
        if others:
            log.warning(
                "%d stored ids are not ingest's lowercase hex (made by hand or damaged): kept "
                "as they are",
                len(others),
            )
        id_array = _unique(id_keys.values())
        del id_keys  # its buffer goes before the path hashes are sorted
        return cls(id_array, _unique(path_keys.values()), frozenset(others))

    @classmethod
    def of(cls, values: Iterable[str]) -> KnownIds:
        """From ``str`` values (``path:<hash>`` entries among them)."""
        values = [v for v in values if v]
        paths = [v[len(PATH_PREFIX) :] for v in values if v.startswith(PATH_PREFIX)]
        ids = [v for v in values if not v.startswith(PATH_PREFIX)]
        return cls.from_arrow([pa.array(ids, pa.string())], [pa.array(paths, pa.string())])

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        if value.startswith(PATH_PREFIX):
            key = _key(value[len(PATH_PREFIX) :], PATH_HASH_CHARS)
            keys = self._paths
        else:
            key = _key(value, IMAGE_ID_CHARS)
            keys = self._ids
        if key is None:
            return value in self._others
        return _find(keys, key) >= 0

    def __len__(self) -> int:
        return len(self._ids) + len(self._paths) + len(self._others)

    def __iter__(self) -> Iterator[str]:
        for raw in self._ids:
            yield raw.ljust(IMAGE_ID_CHARS // 2, b"\0").hex()  # numpy dropped trailing NULs
        for raw in self._paths:
            yield PATH_PREFIX + raw.ljust(PATH_HASH_CHARS // 2, b"\0").hex()
        yield from self._others

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (the few ``str`` of another form aside)."""
        return int(self._ids.nbytes + self._paths.nbytes)

    def __repr__(self) -> str:
        return (
            f"KnownIds({len(self._ids)} ids, {len(self._paths)} path hashes, "
            f"{len(self._others)} other, {self.nbytes} bytes)"
        )

    @classmethod
    def _from_iterable(cls, values: Iterable[str]) -> frozenset[str]:
        # what the set operators (&, |, -) return: a plain frozenset
        return frozenset(values)

    def __reduce__(self) -> tuple[Any, ...]:
        # the arrays as they are: pickle protocol 5 (Ray) passes their buffers out of band
        return (KnownIds, (self._ids, self._paths, self._others))


class InstanceShards:
    """Stored DICOM instances: ``instance_pid`` -> the number of the first shard holding it
    (the kept copy), as sorted 16-byte pseudonyms and int32 shard numbers (20 bytes an
    instance, against about 180 in a dict of ``str``). Read-only; built once per run."""

    def __init__(self, pids: np.ndarray, shards: np.ndarray, others: dict[str, int]) -> None:
        self._pids = _readonly(pids)  # [n] S16, sorted, unique
        self._shards = _readonly(shards)  # [n] int32
        self._others = others  # pseudonyms of another form -> shard

    @classmethod
    def from_shards(cls, columns: Iterable[Strings]) -> InstanceShards:
        """From each shard's ``instance_pid`` column, in shard order (shard ``i`` is the
        ``i``-th column): a pid in several shards maps to the first."""
        keys, numbers, others = _Growing("S16"), _Growing(np.int32), {}
        for n, column in enumerate(columns):
            k, odd = hex_keys(column, PATH_HASH_CHARS)
            keys.add(k)
            numbers.add(np.full(len(k), n, np.int32))
            for pid in odd:
                others.setdefault(pid, n)
        pids, shards = keys.values(), numbers.values()
        order = _order(pids)  # stable: equal pids stay in shard order, the first is kept
        pids, shards = pids[order], shards[order]
        first = _first_of_each(pids)
        return cls(pids[first], shards[first], others)

    def get(self, pid: str) -> int | None:
        """The shard number of ``pid``, None when no shard holds it."""
        key = _key(pid, PATH_HASH_CHARS)
        if key is None:
            return self._others.get(pid)
        i = _find(self._pids, key)
        return None if i < 0 else int(self._shards[i])

    def __contains__(self, pid: object) -> bool:
        return isinstance(pid, str) and self.get(pid) is not None

    def __len__(self) -> int:
        return len(self._pids) + len(self._others)

    @property
    def nbytes(self) -> int:
        return int(self._pids.nbytes + self._shards.nbytes)


def _sorted_once(keys: np.ndarray) -> np.ndarray:
    """``keys`` (a uint64 array of its own, sorted in place) each once. ``np.unique`` took
    about 1.1 s a million keys here (numpy 2's hash-based unique, then a sort); a sort and a
    comparison with the neighbour take under 0.1 s."""
    keys.sort()
    if len(keys) < 2:
        return keys
    first = np.empty(len(keys), bool)
    first[0] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    return keys if first.all() else keys[first]


class InputKeys:
    """64-bit keys of the inputs a DST records (``Destination.recorded_inputs``), sorted in one
    array, and those this run adds in a small set: 8 bytes a recorded input where a set of
    Python ints took about 60."""

    def __init__(self, parts: Iterable[np.ndarray]) -> None:
        arrays = [np.asarray(p, dtype=np.uint64) for p in parts]
        self._keys = _sorted_once(np.concatenate(arrays)) if arrays else np.empty(0, np.uint64)
        self._added: set[int] = set()

    def __len__(self) -> int:
        return len(self._keys) + len(self._added)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, int) or not 0 <= key < 2**64:
            return False
        if key in self._added:
            return True
        at = int(np.searchsorted(self._keys, np.uint64(key)))
        return at < len(self._keys) and int(self._keys[at]) == key

    def add(self, key: int) -> None:
        """This run records ``key`` too."""
        if key not in self:
            self._added.add(key)

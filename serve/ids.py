"""Compact columns of the similar-case index's image ids and pseudonyms.

An index row carries five strings (the image id and four pseudonyms). Held as Python ``str``
objects in lists, with dicts of row lists to look values up, they took 1-2 KB a row (a 768-d
float32 embedding is 3 KB): a gigabyte or more per million rows on every replica, for
bookkeeping (``bench/index.py`` measures both, docs/PERFORMANCE.md). Ingest makes them lowercase hex
of one length (64 characters for image ids, 32 for pseudonyms), so a column of such values is held
as their raw bytes in one fixed-width numpy array (16 or 32 bytes a row); any other column (ids of
other lengths, test ids, mixed case) as its UTF-8 bytes at the width of its longest value. Values
are looked up by binary search over a sort order kept beside the column (8 bytes a row, only for the
columns searched), and decoded back to ``str`` only when read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, overload

import numpy as np

from radjepa.hex_columns import unhex

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["IdColumn"]

_BLOCK = 65536  # rows decoded at once when a whole column is read
_HEX = re.compile(r"[0-9a-f]*")
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)
# ends every stored text value: numpy drops trailing NUL bytes when it reads an element, so a
# value ending in "\0" would come back shorter and equal to another; and it leaves the empty
# stored value (all NULs) to nulls alone
_END = b"\x01"


class IdColumn(Sequence):
    """A read-only column of ``str`` or None, one per index row, in one fixed-width array.

    ``hex_chars``: the length of every value when the column holds lowercase hex (stored as its
    bytes, half that width), None when it holds text. ``searchable`` keeps the sort order
    :meth:`rows_of` needs. Compares equal to a list or tuple of the same values, as the lists it
    replaced did."""

    def __init__(
        self,
        values: np.ndarray,
        valid: np.ndarray | None,
        hex_chars: int | None,
        *,
        searchable: bool = False,
    ) -> None:
        self.values = values  # [N] S<width>
        self.valid = valid  # [N] bool, None when no value is null
        self.hex_chars = hex_chars
        # stable: the rows of one value come out in row order, as the dict of lists gave them
        self._order = np.argsort(values, kind="stable") if searchable else None

    @classmethod
    def of(
        cls,
        values: IdColumn | pa.Array | pa.ChunkedArray | Iterable[str | None] | None,
        rows: int,
        *,
        searchable: bool = False,
    ) -> IdColumn:
        """A column of ``rows`` values from a list (None: every row null), an Arrow string
        array or chunks, or a column already built (kept as it is when it can be searched as
        asked)."""
        import pyarrow as pa

        if isinstance(values, IdColumn) and (values._order is not None or not searchable):
            column = values
        elif isinstance(values, IdColumn):
            column = cls(values.values, values.valid, values.hex_chars, searchable=True)
        else:
            if values is None:
                values = pa.nulls(rows, pa.string())
            elif not isinstance(values, pa.Array | pa.ChunkedArray):
                values = pa.array(list(values), pa.string())
            column = cls.from_arrow(values, searchable=searchable)
        if len(column) != rows:
            raise ValueError(f"{len(column)} values for {rows} rows")
        return column

    @classmethod
    def from_arrow(
        cls, values: pa.Array | pa.ChunkedArray | list[pa.Array], *, searchable: bool = False
    ) -> IdColumn:
        """Encode Arrow string chunks (as the loader reads them, a batch at a time)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        chunks = values.chunks if isinstance(values, pa.ChunkedArray) else values
        if isinstance(chunks, pa.Array):
            chunks = [chunks]
        # string and large_string are read as they are (_unhex reads either's offsets)
        chunks = [c if _offsets_type(c) else c.cast(pa.large_string()) for c in chunks]
        rows = sum(len(c) for c in chunks)
        valid = np.ones(rows, bool)
        start = 0
        for c in chunks:
            if c.null_count:
                valid[start : start + len(c)] = c.is_valid().to_numpy(zero_copy_only=False)
            start += len(c)
        hex_chars = _hex_chars(chunks)
        if hex_chars is None:
            width = max((int(pc.max(pc.binary_length(c)).as_py() or 0) for c in chunks), default=0)
            stored = np.empty(rows, f"S{width + len(_END)}")
        else:
            stored = np.empty(rows, f"S{hex_chars // 2}")
        start = 0
        for c in chunks:
            part = stored[start : start + len(c)]
            if hex_chars is None:
                part[:] = [b"" if v is None else v.encode() + _END for v in c.to_pylist()]
            else:
                part[:] = _unhex(c, hex_chars)
            start += len(c)
        return cls(stored, None if valid.all() else valid, hex_chars, searchable=searchable)

    @property
    def nbytes(self) -> int:
        """Bytes held: the values, the null mask and the sort order."""
        extra = (self.valid.nbytes if self.valid is not None else 0) + (
            self._order.nbytes if self._order is not None else 0
        )
        return int(self.values.nbytes + extra)

    def __len__(self) -> int:
        return len(self.values)

    @overload
    def __getitem__(self, i: int) -> str | None: ...
    @overload
    def __getitem__(self, i: slice) -> list[str | None]: ...
    def __getitem__(self, i: int | slice) -> str | None | list[str | None]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)  # numpy integers from row arrays, and IndexError beyond the end
        if self.valid is not None and not self.valid[i]:
            return None
        raw = bytes(self.values[i])
        if self.hex_chars is None:
            return raw[: -len(_END)].decode()
        return raw.ljust(self.values.itemsize, b"\0").hex()  # numpy dropped trailing zeros

    def __iter__(self) -> Iterator[str | None]:
        for block in self.blocks():
            yield from block

    def blocks(self, rows: int = _BLOCK) -> Iterator[list[str | None]]:
        """The values a block of rows at a time, decoded together (hex columns without a
        Python call per value): reading a whole column keeps one block of ``str`` at once."""
        for start in range(0, len(self), rows):
            stop = min(start + rows, len(self))
            if self.hex_chars is None:
                block = [self[i] for i in range(start, stop)]
            else:
                block = _hex(self.values[start:stop]).tolist()
                if self.valid is not None:
                    block = [
                        v if ok else None
                        for v, ok in zip(block, self.valid[start:stop], strict=True)
                    ]
            yield block

    def __eq__(self, other: object) -> bool:
        if isinstance(other, IdColumn | list | tuple):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # compared by value, like the lists it replaced

    def __repr__(self) -> str:
        kind = f"hex{self.hex_chars}" if self.hex_chars else f"text{self.values.itemsize}"
        return f"IdColumn({len(self)} rows, {kind}, {self.nbytes} bytes)"

    def repeated_rows(self) -> np.ndarray:
        """Rows holding a value an earlier row holds (int64, ascending; nulls aside): with the
        stable sort order, the first row of each value is kept and the others returned."""
        if self._order is None:
            raise TypeError("this column was built without searchable=True")
        ordered = self.values[self._order]
        again = ordered[1:] == ordered[:-1]
        if self.valid is not None:
            again &= self.valid[self._order[1:]]
        return np.sort(self._order[1:][again]).astype(np.int64)

    def rows_of(self, value: str | None) -> np.ndarray:
        """Rows holding ``value``, ascending (int64; empty for None and unknown values)."""
        if self._order is None:
            raise TypeError("this column was built without searchable=True")
        key = self._key(value)
        if key is None:
            return np.empty(0, np.int64)
        needle = np.array([key], self.values.dtype)  # the column's own dtype: no cast of it
        lo = int(np.searchsorted(self.values, needle, "left", self._order)[0])
        hi = int(np.searchsorted(self.values, needle, "right", self._order)[0])
        rows = self._order[lo:hi]
        if self.valid is not None:  # a null hex row is stored as zeros, a valid value's bytes
            rows = rows[self.valid[rows]]
        return rows.astype(np.int64)

    def _key(self, value: str | None) -> bytes | None:
        """``value`` as stored, or None when no row can hold it (null, wider than the column,
        or not hex of the column's length in a hex column)."""
        if value is None:
            return None
        if self.hex_chars is not None:
            if len(value) != self.hex_chars or not _HEX.fullmatch(value):
                return None
            return bytes.fromhex(value)
        key = value.encode() + _END
        return key if len(key) <= self.values.itemsize else None


def _hex_chars(chunks: list[pa.Array]) -> int | None:
    """The one length of the chunks' values when every one is lowercase hex of that even
    length (nulls aside), else None (the column is held as text)."""
    import pyarrow.compute as pc

    lengths: set[int] = set()
    for c in chunks:
        if len(c) == c.null_count:
            continue
        if not pc.all(pc.match_substring_regex(c, "^(?:[0-9a-f]{2})+$")).as_py():
            return None
        span = pc.min_max(pc.binary_length(c)).as_py()
        lengths |= {span["min"], span["max"]}
    return lengths.pop() if len(lengths) == 1 else None


def _unhex(chunk: pa.Array, hex_chars: int) -> np.ndarray:
    """The raw bytes of a chunk of lowercase hex values, each ``hex_chars`` long ([n] S<half>),
    read straight from the Arrow buffers; nulls become zeros (the null mask tells them apart)."""
    import pyarrow.compute as pc

    if len(chunk) == 0:
        return np.empty(0, f"S{hex_chars // 2}")
    if chunk.null_count:
        chunk = pc.fill_null(chunk, "0" * hex_chars)
    return unhex(chunk, hex_chars)[0]  # every value is lowercase hex: _hex_chars checked


def _offsets_type(chunk: pa.Array) -> type | None:
    """The numpy type of a string chunk's offsets (None: another type, cast first)."""
    import pyarrow as pa

    if pa.types.is_string(chunk.type):
        return np.int32
    return np.int64 if pa.types.is_large_string(chunk.type) else None


def _hex(stored: np.ndarray) -> np.ndarray:
    """Stored raw bytes back to lowercase hex ``str`` values ([n] U<2 x width>)."""
    raw = stored.view(np.uint8).reshape(len(stored), stored.itemsize)  # [n, bytes], zeros kept
    digits = np.empty((len(stored), 2 * stored.itemsize), np.uint8)
    digits[:, 0::2] = _HEX_DIGITS[raw >> 4]
    digits[:, 1::2] = _HEX_DIGITS[raw & 15]
    return digits.view(f"S{digits.shape[1]}").ravel().astype(f"U{digits.shape[1]}")

"""Lowercase hex values of an Arrow string column as their raw bytes, read from its buffers.

Ingest writes image ids and pseudonyms as lowercase hex of one length; both the ingest's sets
of what a DST holds (:mod:`radjepa.ingest.id_sets`) and the served index's id columns
(``serve/ids.py``) hold them as their bytes, half the width, in a fixed-width numpy array.
Decoded here once, without a Python object per row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = ["offsets", "unhex", "unhex_rows"]

_NOT_HEX = 255
_NIBBLE = np.full(256, _NOT_HEX, np.uint8)  # ASCII lowercase hex digit -> its value
_NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


def offsets(chunk: pa.Array) -> np.ndarray:
    """The value offsets of a string or large_string chunk (its own slice of them)."""
    kind = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
    return np.frombuffer(chunk.buffers()[1], kind)[chunk.offset : chunk.offset + len(chunk) + 1]


def unhex(chunk: pa.Array, chars: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a string chunk without nulls whose every value has ``chars`` characters, as
    raw bytes (``[n] S<chars/2>``), and which rows are lowercase hex (``[n]`` bool: the bytes
    of the others mean nothing)."""
    bounds = offsets(chunk)
    # every value has ``chars`` characters: the data between the outer offsets is the values
    # back to back
    data = np.frombuffer(chunk.buffers()[2], np.uint8)[bounds[0] : bounds[-1]]
    digits = _NIBBLE[data].reshape(len(chunk), chars)
    hexed = (digits != _NOT_HEX).all(axis=1)
    raw = np.ascontiguousarray(digits[:, 0::2] << 4 | digits[:, 1::2])
    return raw.view(f"S{chars // 2}").ravel(), hexed


def unhex_rows(values: pa.Array, chars: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row of a string array, nulls allowed, as raw bytes (``[n, chars/2]`` uint8; zeros
    for a null or another length, meaningless bytes for a row of the length that is not hex:
    read only where the mask is True), and which rows are lowercase hex of ``chars`` characters
    (``[n]`` bool: False for a null, another length or another character). Row for row, unlike
    :func:`unhex`'s caller in the id sets, which drops what is not hex: for reading two columns
    of one table side by side (an input's image id and its path hash)."""
    n = len(values)
    raw = np.zeros((n, chars // 2), np.uint8)
    ok = np.zeros(n, bool)
    if not n:
        return raw, ok
    fits = np.diff(offsets(values)) == chars
    if values.null_count:
        fits &= values.is_valid().to_numpy(zero_copy_only=False)
    if fits.any():
        rows = values if fits.all() else values.filter(pa.array(fits))
        got, hexed = unhex(rows, chars)
        raw[fits] = got.view(np.uint8).reshape(len(rows), chars // 2)
        ok[fits] = hexed
    return raw, ok

"""The 64-bit key of one ingest input: the bytes it held (its image id) read from where (its
path hash), for a whole column pair of a DST's Parquet file or for one input.

A re-run that meets an input DST already holds (a nightly re-run of the same folder, a run
resumed after an interruption) lists it as a duplicate only if DST holds no row of the same
(image id, path hash) pair: ``Destination.recorded_inputs`` keys every row of DST, the run keys
each input it meets (``pipelines.ingest``). The key is never stored, so it only has to be the
same function on both sides: :func:`input_keys` (a column pair) and :func:`input_key` (one
input) both fold their words with :func:`_fold`, and anything not of ingest's hex form with
:func:`_odd_key`. A ``hashlib`` digest per row in Python took 1.5 s a million DST rows and
6.4 s at 3M in ``bench/identity_sets.py``, against 0.95 and 3.0 s for the fold on numpy arrays
of the hex digits' bytes (docs/PERFORMANCE.md).

Forms (an id ingest computes is 64 lowercase hex: SHA-256 or HMAC-SHA256 of the file's bytes;
a path hash 32 lowercase hex: truncated HMAC-SHA256 of the path):

- id of 64 lowercase hex, path hash of 32: the id's four 64-bit words (the hex read as
  big-endian numbers, 16 digits a word), then the hash's two, folded from :data:`_SEED`;
- anything else (a null path hash, an id or hash made by hand or damaged, or the
  ``path:<hash>`` name ``known_ids`` gives a file quarantined unread, which no DST row holds
  and the run never keys: such a file has no id and no key): an 8-byte BLAKE2b of both
  values, one row at a time.

Why distinct pairs collide no more often than random 64-bit keys: :func:`_fold` runs
``h = g(h ^ w)`` over the words, ``g(x) = m ^ (m >> 32)`` with ``m = x * C mod 2**64`` for an
odd ``C``: a bijection of 64-bit words (an odd multiplier and an xorshift are both
invertible). Take two hex pairs and the last word where they differ: from there on both
fold the same words through the same bijections, so they collide exactly when ``h ^ w == h' ^
w'`` at that word. That word belongs to a digest (an id's or a path hash's) that differs
between the pairs, so it is a fresh pseudorandom 64-bit value, independent of everything else
folded: the chance is 2**-64 a pair of pairs, as for random keys (by the birthday bound about
n**2 / 2**65 for n inputs: 3e-6 at 10 million), and a clash costs only one duplicate row
unlisted. The multiplication is what keeps equal words from cancelling (an XOR of the halves
would key every pair whose id repeats its path hash 0); the shift carries a word's high bits
into the low bits the next multiplication spreads (a counter in a word's first digits still
changes the whole key). A hex key and a BLAKE2b key differ with the same odds. Hand-made
64-hex ids (counters, repeated digits) are not random, which the argument leans on;
``tests/test_input_keys.py`` checks a million such pairs, ``path:`` names included, for
clashes.

The single form reads the words with ``int(hex, 16)`` and folds Python ints: 2-3 us an input
where the BLAKE2b it replaced took 0.5-0.8 us (timeit, this box). A re-run calls it for every
input DST already holds, beside ~20 us reading that input's fields, so it adds under 10% there
(~17 s at 10 million such inputs); the column form is what removed seconds a million rows.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import pyarrow as pa

from radjepa.hex_columns import unhex_rows
from radjepa.ingest.id_sets import IMAGE_ID_CHARS, PATH_HASH_CHARS

__all__ = ["input_key", "input_keys"]

_MASK = 2**64 - 1
_MULTIPLIER = 0x9E3779B97F4A7C15  # odd: the golden ratio's 64-bit fraction
_SEED = 0x243F6A8885A308D3  # digits of pi: any constant does
_is_hex = re.compile("[0-9a-f]+").fullmatch  # what radjepa.hex_columns.unhex takes as hex

Word = TypeVar("Word", int, np.ndarray)


def _fold(seed: int, words: Sequence[Word]) -> Word:
    """``h = g(h ^ w)`` over ``words`` from ``seed``, ``g`` a bijection (see the module's
    docstring for why distinct inputs collide only by chance). The same operations on Python
    ints (masked to 64 bits) and on uint64 arrays (which wrap): one definition for the single
    input and the column."""
    h: Word = seed  # type: ignore[assignment]
    for w in words:
        h = ((h ^ w) * _MULTIPLIER) & _MASK
        h = h ^ (h >> 32)
    return h


def _odd_key(image_id: str, source_hash: str | None) -> int:
    """Key of a pair not of ingest's hex forms: an 8-byte BLAKE2b of both (JSON: a null path
    hash differs from the text ``None``)."""
    data = json.dumps([image_id, source_hash]).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def input_key(image_id: str, source_hash: str | None) -> int:
    """The key of one input (its image id, its path hash): :func:`input_keys` of a row."""
    if (
        source_hash is not None
        and len(source_hash) == PATH_HASH_CHARS
        and _is_hex(source_hash)
        and len(image_id) == IMAGE_ID_CHARS
        and _is_hex(image_id)
    ):
        x, y = int(image_id, 16), int(source_hash, 16)
        words = (x >> 192, x >> 128 & _MASK, x >> 64 & _MASK, x & _MASK, y >> 64, y & _MASK)
        return _fold(_SEED, words)
    return _odd_key(image_id, source_hash)


def _one_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        values = values.cast(pa.string())
    return values


def _columns(raw: np.ndarray) -> list[np.ndarray]:
    """Rows of raw bytes (``[n, 8k]`` uint8) as ``k`` arrays of their big-endian words (the
    hex digits read as numbers, as ``int(hex, 16)`` reads them)."""
    words = np.ascontiguousarray(raw).view(">u8")
    return [words[:, i].astype(np.uint64) for i in range(words.shape[1])]


def input_keys(
    image_ids: pa.Array | pa.ChunkedArray, source_hashes: pa.Array | pa.ChunkedArray
) -> np.ndarray:
    """The keys (uint64) of the rows of an image id column and the path hash column beside it
    whose id is not null, in row order: what :func:`input_key` gives each such row. A null id
    (a file quarantined unread) is no input DST lists duplicates of: it has no key. Read from
    the Arrow buffers; only rows not of the hex form (none that ingest writes) take a Python
    step."""
    ids, hashes = _one_array(image_ids), _one_array(source_hashes)
    if len(ids) != len(hashes):
        raise ValueError(f"{len(ids)} image ids beside {len(hashes)} path hashes")
    if ids.null_count:
        valid = ids.is_valid()
        ids, hashes = ids.filter(valid), hashes.filter(valid)
    keys = np.empty(len(ids), np.uint64)
    hash_raw, hash_ok = unhex_rows(hashes, PATH_HASH_CHARS)
    id_raw, id_ok = unhex_rows(ids, IMAGE_ID_CHARS)
    hexed = id_ok & hash_ok
    if hexed.any():
        keys[hexed] = _fold(_SEED, _columns(np.hstack([id_raw[hexed], hash_raw[hexed]])))
    if not hexed.all():
        rest = pa.array(~hexed)
        odd = zip(ids.filter(rest).to_pylist(), hashes.filter(rest).to_pylist(), strict=True)
        keys[~hexed] = np.fromiter((_odd_key(i, h) for i, h in odd), np.uint64)
    return keys

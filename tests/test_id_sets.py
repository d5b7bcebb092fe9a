"""Ingest's compact identity sets (radjepa.ingest.id_sets): exactly the membership of a set of
the same strings (a false positive skips an image as already ingested, a false negative
stores it twice), read from a real DST's Parquet files, and small in a pickle."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from radjepa.ingest.destination import Destination
from radjepa.ingest.id_sets import InstanceShards, KnownIds, hex_keys
from radjepa.shards import QUARANTINE_SCHEMA


def _hex(i: int, chars: int = 64) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()[:chars]


def _near(value: str, at: int) -> str:
    """``value`` with the byte at ``at`` changed by one."""
    raw = bytearray(bytes.fromhex(value))
    raw[at] = (raw[at] + 1) % 256
    return raw.hex()


# ids whose trailing bytes are NUL: numpy drops trailing NULs when it reads an element back,
# which made "ab..00" and "ab.." one value in a naive comparison
EDGE_IDS = ["00" * 32, "ab" * 31 + "00", "ab" * 30 + "0000", "ff" * 32, "00" * 31 + "01"]


def test_known_ids_answer_as_a_set_of_the_same_strings():
    ids = [_hex(i) for i in range(500)] + EDGE_IDS
    paths = [f"path:{_hex(i, 32)}" for i in range(500, 600)] + ["path:" + "00" * 16]
    known = KnownIds.of(ids + paths)
    assert len(known) == len(ids) + len(paths) and known == set(ids + paths)
    assert all(v in known for v in ids + paths)
    for value in ids:  # one byte away, first, middle and last: not known
        for at in (0, 15, 31):
            assert (_near(value, at) in known) is (_near(value, at) in set(ids))
    for value in paths:
        near = "path:" + _near(value[5:], 15)
        assert near not in known
        assert value[5:] not in known  # a path hash alone is not an image id
    assert f"path:{ids[0][:32]}" not in known  # nor is an id's half a path entry
    assert _hex(10_000) not in known and "path:" + _hex(10_000, 32) not in known
    assert "" not in known and "path:" not in known and None not in known and 7 not in known
    assert sorted(known) == sorted(set(ids + paths))  # iteration gives the strings back


def test_an_empty_dst_knows_nothing():
    known = KnownIds.of([])
    assert len(known) == 0 and not known and known == set() and list(known) == []
    assert _hex(1) not in known and "path:" + _hex(1, 32) not in known and "x" not in known
    assert pickle.loads(pickle.dumps(known)) == set()


def test_ids_of_another_form_are_kept_as_they_are(caplog):
    """A hand-made or damaged id in a shard (not ingest's lowercase hex) is matched only by
    itself, exactly as in a set of str: upper case is not its lower-case twin, a hex string
    with a space is not the id without it, a wrong length is not a prefix."""
    upper = _hex(1).upper()
    odd = [upper, "id-1", _hex(2)[:63], _hex(3) + "0", " " + _hex(4)[1:], "path:XYZ"]
    with caplog.at_level("WARNING", logger="radjepa.ingest.id_sets"):
        known = KnownIds.of(odd + [_hex(5)])
    assert "6 stored ids are not ingest's lowercase hex" in caplog.text
    assert known == set(odd + [_hex(5)])
    assert upper.lower() not in known and _hex(2) not in known and _hex(4) not in known
    assert _hex(3) not in known and "path:xyz" not in known
    assert KnownIds.of([_hex(1)]).__contains__(upper) is False  # and the other way round


def test_known_ids_read_straight_from_arrow_columns_of_any_layout():
    """Chunked columns, large_string, a slice (non-zero offset), nulls and empty strings (not
    ids: dropped) and the same id in several files (counted once)."""
    ids = [_hex(i) for i in range(40)]
    chunked = pa.chunked_array([pa.array(ids[:10]), pa.array(ids[10:20])])
    large = pa.array(ids[20:30] + [None, ""], pa.large_string())
    sliced = pa.array(["junk-before", *ids[30:40], "junk-after"]).slice(1, 10)
    known = KnownIds.from_arrow(
        [chunked, large, sliced, pa.array(ids[:5])],
        [pa.array([_hex(99, 32), None, ""]), pa.chunked_array([], pa.string())],
    )
    assert known == set(ids) | {f"path:{_hex(99, 32)}"}
    assert "junk-before" not in known and "junk-after" not in known


def test_hex_keys_are_the_raw_bytes_in_column_order():
    keys, others = hex_keys(pa.array([_hex(1), "x", None, _hex(2).upper(), _hex(3)]), 64)
    assert [bytes(k).ljust(32, b"\0").hex() for k in keys] == [_hex(1), _hex(3)]
    assert others == ["x", _hex(2).upper()]


def test_known_ids_pickle_as_numpy_buffers_not_one_object_per_id():
    """``ray.put`` pickles the known ids once per run and every decoder actor got them: as a
    frozenset of str each actor unpickled its own copy (about 150 bytes an id). Now they go as
    two buffers out of band (protocol 5: the object store maps them, no copy per actor), and
    the pickle itself is a few hundred bytes whatever the number of ids."""
    ids = [_hex(i) for i in range(20_000)]
    known = KnownIds.of(ids + ["path:" + _hex(1, 32), "odd-id"])
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(known, protocol=5, buffer_callback=buffers.append)
    assert len(data) < 1000 and sum(b.raw().nbytes for b in buffers) == 32 * 20_000 + 16
    back = pickle.loads(data, buffers=buffers)
    assert back == known and ids[123] in back and "odd-id" in back
    assert known.nbytes == 32 * 20_000 + 16


def _write_dst(root, images: list[list[str | None]], quarantine, duplicates) -> Destination:
    """A real DST: image shards with these image ids, a quarantine file with these (sha256,
    source_hash) rows, a duplicates file with these image ids."""
    dest = Destination(str(root))
    for n, ids in enumerate(images):
        pq.write_table(
            pa.table({"image_id": pa.array(ids, pa.string())}),
            root / "images" / f"part-r-{n:05d}.parquet",
        )
    rows = [
        {"sha256": s, "source_hash": h, "reason": "read_error", "message": "m", "run_id": "r"}
        for s, h in quarantine
    ]
    pq.write_table(
        pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA),
        root / "quarantine" / "quarantine-r.parquet",
    )
    pq.write_table(
        pa.table({"image_id": pa.array(duplicates, pa.string())}),
        root / "duplicates" / "duplicates-r.parquet",
    )
    return dest


def test_a_dst_knows_its_stored_quarantined_and_duplicate_bytes(tmp_path):
    """What the set of str said, from the files: stored ids, quarantined sha256 (a file read
    and refused), ``path:`` of files quarantined unread, duplicates' ids; compact in memory.
    A file read and refused is not known by its path too: a changed file there that cannot be
    read now (too large) counted as already in DST, which never held it."""
    stored = [[_hex(1), _hex(2)], [_hex(3), "ab" * 31 + "00"]]
    quarantine = [(_hex(4), _hex(40, 32)), (None, _hex(50, 32)), ("", None)]
    dest = _write_dst(tmp_path / "dst", stored, quarantine, [_hex(6)])
    known = dest.known_ids()
    assert isinstance(known, KnownIds)
    expected = {_hex(1), _hex(2), _hex(3), "ab" * 31 + "00", _hex(4), _hex(6)}
    assert known == expected | {f"path:{_hex(50, 32)}"}
    assert f"path:{_hex(40, 32)}" not in known  # read: its id is what DST knows of it
    assert "ab" * 31 + "01" not in known and _hex(7) not in known
    assert known.nbytes == 32 * 6 + 16


def test_instance_shards_keep_the_first_shard_of_each_instance():
    pids = [_hex(i, 32) for i in range(6)]
    shards = InstanceShards.from_shards(
        [
            pa.array([pids[0], pids[1], None, "", "pid-x"]),
            pa.chunked_array([pa.array([pids[1], pids[2]]), pa.array(["pid-x", "pid-y"])]),
            pa.array([pids[0], "00" * 16, "ab" * 15 + "00"]),
        ]
    )
    assert [shards.get(p) for p in pids[:3]] == [0, 0, 1]
    assert (shards.get("pid-x"), shards.get("pid-y")) == (0, 1)
    assert (shards.get("00" * 16), shards.get("ab" * 15 + "00")) == (2, 2)
    assert shards.get("ab" * 15 + "01") is None and shards.get(_near(pids[0], 15)) is None
    assert shards.get(pids[0].upper()) is None and shards.get("") is None
    assert len(shards) == 7 and pids[2] in shards and pids[5] not in shards
    assert shards.nbytes == 5 * (16 + 4)


@pytest.mark.parametrize("chars", [64, 32])
def test_every_single_byte_change_is_a_miss(chars):
    """Exactness at every byte position of a stored key (the binary search compares whole
    fixed-width keys, NUL bytes included)."""
    value = "00" * (chars // 4) + "ab" * (chars // 4)
    known = KnownIds.of([value if chars == 64 else f"path:{value}"])
    shards = InstanceShards.from_shards([pa.array([value])])
    for at in range(chars // 2):
        near = _near(value, at)
        assert (near if chars == 64 else f"path:{near}") not in known
        if chars == 32:
            assert shards.get(near) is None


def test_many_ids_sharing_prefixes_answer_as_a_set_and_a_dict_do():
    """Random ids drawn from few first bytes (so many share their first 8 bytes and the full
    sort is used), looked up with stored, fresh and one-byte-away values: the same answers as
    a set of str; instance pseudonyms repeated across shards: the same shard as a dict filled
    shard by shard with ``setdefault`` (the index before)."""
    import numpy as np

    rng = np.random.default_rng(0)

    def draw(n: int, width: int) -> list[str]:
        raw = rng.integers(0, 256, (n, width), np.uint8)
        raw[:, : width - 2] = rng.integers(0, 2, (n, 1), np.uint8)  # two prefixes only
        return [bytes(r).hex() for r in raw]

    ids, paths = draw(3000, 32), [f"path:{h}" for h in draw(500, 16)]
    known, expected = KnownIds.of(ids + paths), set(ids + paths)
    probes = ids[:300] + draw(300, 32) + [_near(v, 31) for v in ids[:300]] + paths[:100]
    probes += ["path:" + _near(p[5:], 15) for p in paths[:100]]
    assert [p in known for p in probes] == [p in expected for p in probes]
    assert known == expected

    columns = [draw(200, 16) for _ in range(5)]
    shard_of: dict[str, int] = {}
    for n, column in enumerate(columns):
        for pid in column:
            shard_of.setdefault(pid, n)
    shards = InstanceShards.from_shards(pa.array(c) for c in columns)
    assert len(shards) == len(shard_of)
    assert all(shards.get(p) == n for p, n in shard_of.items())
    assert all(shards.get(_near(p, 15)) == shard_of.get(_near(p, 15)) for p in columns[0])


def _held_bytes(build):
    """Python-heap (and numpy) bytes still held by what ``build()`` returns, and it."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        made = build()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, made
    finally:
        tracemalloc.stop()


def test_a_dst_of_many_images_is_read_into_a_few_bytes_an_id(tmp_path):
    """An incremental run holds every id its DST has seen on the driver and sent them to each
    decoder actor: as a set of str about 170 bytes an id (1.6 GiB at 10 million images, again
    in every actor). Read from real Parquet shards now: under 40 bytes an id and an instance,
    and a pickle whose in-band part does not grow with the DST (the ids go as buffers)."""
    from radjepa.ingest.instances import InstanceIndex

    n = 20_000
    ids = [_hex(i) for i in range(n)]
    dest = _write_dst(tmp_path / "dst", [ids[: n // 2], ids[n // 2 :]], [], [])
    for k, path in enumerate(dest.shards()):  # one instance pseudonym per stored image
        table = pq.read_table(path)
        pids = pa.array([_hex(-i - 1, 32) for i in range(k * n // 2, (k + 1) * n // 2)])
        pq.write_table(table.append_column("instance_pid", pids), path)

    held, known = _held_bytes(dest.known_ids)
    assert len(known) == n and ids[123] in known and _near(ids[123], 5) not in known
    assert held < 40 * n, f"{held / n:.0f} bytes an id"
    buffers: list[pickle.PickleBuffer] = []
    assert len(pickle.dumps(known, protocol=5, buffer_callback=buffers.append)) < 1000

    held, index = _held_bytes(lambda: InstanceIndex(dest.shards(), dest.read_columns))
    assert len(index) == n and held < 40 * n, f"{held / n:.0f} bytes an instance"


def test_input_keys_hold_exactly_the_recorded_keys_and_those_the_run_adds() -> None:
    """DST's recorded inputs (re-runs list a same-bytes duplicate only once) as one sorted
    array: every key found, the neighbours of each not, 64-bit extremes included."""
    from radjepa.ingest.destination import input_key
    from radjepa.ingest.id_sets import InputKeys

    rng = np.random.default_rng(7)
    recorded = {input_key(f"{i:064x}", f"{i:032x}") for i in range(500)} | {0, 2**64 - 1}
    parts = np.array(sorted(recorded), np.uint64)
    keys = InputKeys([parts[:200], parts[200:], np.empty(0, np.uint64)])
    assert len(keys) == len(recorded)
    assert all(k in keys for k in recorded)
    probes = {int(k) + d for k in parts for d in (-1, 1)} - recorded
    probes |= {int(v) for v in rng.integers(0, 2**63, 2000, dtype=np.uint64)} - recorded
    assert not any(k in keys for k in probes if 0 <= k < 2**64)
    assert -1 not in keys and 2**64 not in keys and "0" not in keys
    new = next(iter(probes))
    keys.add(new)
    keys.add(new)
    keys.add(next(iter(recorded)))
    assert new in keys and len(keys) == len(recorded) + 1
    assert len(InputKeys([])) == 0 and 0 not in InputKeys([])

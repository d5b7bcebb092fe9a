"""An ingest input's 64-bit key (image id, path hash): one definition for the whole columns of
DST's files (``Destination.recorded_inputs``) and for the one input a run meets, on every id
form DST can hold, without clashes at a million pairs, and without a Python step per DST row."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from radjepa.imaging.deid import DEV_SECRET, ID_SCHEME_UNKEYED, content_id, keyed_hash

_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def _hex(raw: np.ndarray, prefix: bytes = b"") -> pa.Array:
    """``prefix`` + lowercase hex of each row of ``raw`` ([n, bytes] uint8), from buffers."""
    n, width = raw.shape
    chars = len(prefix) + 2 * width
    digits = np.empty((n, chars), np.uint8)
    digits[:, : len(prefix)] = np.frombuffer(prefix, np.uint8)
    digits[:, len(prefix) :: 2] = _HEX[raw >> 4]
    digits[:, len(prefix) + 1 :: 2] = _HEX[raw & 15]
    offsets = np.arange(0, n * chars + 1, chars, dtype=np.int64)
    return pa.Array.from_buffers(
        pa.large_string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(digits.reshape(-1))]
    ).cast(pa.string())


def _counter_bytes(values: np.ndarray, width: int, first: bool = False) -> np.ndarray:
    """Hand-made digests: ``values`` big-endian in ``width`` bytes (``f"{i:0{2*width}x}"``), or
    in the first 8 bytes (``f"{i:016x}" + "0" * ...``: the high bits of a word)."""
    raw = np.zeros((len(values), width), np.uint8)
    at = slice(0, 8) if first else slice(width - 8, width)
    raw[:, at] = values.astype(">u8").view(np.uint8).reshape(-1, 8)
    return raw


def _agree(ids: list[str | None], hashes: list[str | None]) -> None:
    from radjepa.ingest.input_keys import input_key, input_keys

    single = [input_key(i, h) for i, h in zip(ids, hashes, strict=True) if i is not None]
    assert input_keys(pa.array(ids, pa.string()), pa.array(hashes, pa.string())).tolist() == single
    # the same rows in chunks, sliced, and as large_string: the same keys
    big = pa.chunked_array(
        [pa.array(ids[:3], pa.large_string()), pa.array(ids[3:], pa.large_string())]
    )
    sliced = pa.array([None, *hashes, "x"], pa.string()).slice(1, len(hashes))
    assert input_keys(big, sliced).tolist() == single


def test_the_column_and_the_single_input_key_every_id_form_alike() -> None:
    """Keyed and unkeyed image ids, ``path:<hash>``, and the forms no run writes (hand-made
    or damaged: upper case, another length, not hex, not ASCII, a null path hash) each get
    one key, whichever side computes it; a null id has none."""
    data = [b"one", b"two", b"three"]
    keyed = [content_id(d, DEV_SECRET) for d in data]
    unkeyed = content_id(data[0], DEV_SECRET, ID_SCHEME_UNKEYED)
    paths = [keyed_hash(DEV_SECRET, "source", f"/scan/{i}.dcm") for i in range(16)]
    ids: list[str | None] = [
        *keyed,
        unkeyed,
        f"path:{paths[4]}",
        keyed[0].upper(),
        keyed[0][:63],
        "g" * 64,
        "é" * 32,  # 64 bytes of UTF-8, no hex
        "",
        None,
        f"path:{paths[4].upper()}",
        f"path:{paths[4][:31]}x",
        f"PATH:{paths[4]}",
    ]
    hashes: list[str | None] = [*paths[:3], None, *paths[4:]][: len(ids)]
    hashes[5] = "None"  # beside row 3's null hash: not the same key
    _agree(ids, hashes)
    _agree([keyed[0], keyed[0], keyed[1]], [paths[0], paths[1], paths[0]])
    from radjepa.ingest.input_keys import input_key, input_keys

    assert input_key(keyed[0], None) != input_key(keyed[0], "None")
    assert len(input_keys(pa.array([], pa.string()), pa.array([], pa.string()))) == 0
    assert len(input_keys(pa.array([None], pa.string()), pa.array([paths[0]]))) == 0
    with pytest.raises(ValueError, match="2 image ids beside 1 path hashes"):
        input_keys(pa.array(keyed[:2]), pa.array(paths[:1]))


@pytest.mark.timeout(300)
def test_a_real_dst_keys_each_row_as_the_run_keys_its_input(ray_session, nih_dir, tmp_path):
    """A real ingest of NIH PNGs with a copy of one, a dangling link (quarantined unread: no
    id), a file that is no image (quarantined read), then a run meeting the copy again (a
    same_bytes row against DST): every row of every DST file gets the key the single-input
    form gives it, also as ``path:<its hash>``; a third run lists nothing again."""
    import shutil

    from pipelines.ingest import run_ingest
    from radjepa.config import load_config
    from radjepa.ingest.destination import Destination
    from radjepa.ingest.input_keys import input_key, input_keys

    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml",
        ["ingest.image_size=96", "ingest.decode_actors=1", "ingest.shard_rows=3"],
    )
    one, two, dst = tmp_path / "one", tmp_path / "two", tmp_path / "dst"
    one.mkdir()
    two.mkdir()
    pngs = sorted((nih_dir / "images").glob("*.png"))[:5]
    for png in pngs:
        shutil.copy(png, one / png.name)
    shutil.copy(pngs[0], one / "copy.png")
    (one / "gone.png").symlink_to(tmp_path / "never.png")
    (one / "junk.png").write_bytes(b"no image")
    shutil.copy(pngs[0], two / "again.png")
    first = run_ingest([str(one)], str(dst), cfg, progress=False)
    assert (first.ok, first.quarantined, first.duplicates) == (5, 2, 1)
    second = run_ingest([str(one), str(two)], str(dst), cfg, progress=False)
    assert (second.ok, second.quarantined, second.duplicates) == (0, 0, 9)

    rows = 0
    for sub, id_column in (
        ("images", "image_id"),
        ("quarantine", "sha256"),
        ("duplicates", "image_id"),
    ):
        for path in sorted((dst / sub).glob("*.parquet")):
            table = pq.read_table(path, columns=[id_column, "source_hash"])
            ids, hashes = table[id_column].to_pylist(), table["source_hash"].to_pylist()
            rows += len(ids)
            _agree(ids, hashes)
            unread = [h for i, h in zip(ids, hashes, strict=True) if i is None]
            _agree([f"path:{h}" for h in unread], unread)
            assert input_keys(table[id_column], table["source_hash"]).tolist() == [
                input_key(i, h) for i, h in zip(ids, hashes, strict=True) if i is not None
            ]
    assert rows == 5 + 2 + 2  # stored, quarantined (one unread), same bytes (run 1, run 2)
    keys, kept = Destination(str(dst)).recorded_inputs()
    assert len(keys) == 5 + 1 + 2 and set(kept) == set(kept.values())

    third = run_ingest([str(one), str(two)], str(dst), cfg, progress=False)
    assert (third.ok, third.duplicates) == (0, 9)
    assert pq.read_table(dst / "duplicates").num_rows == 2  # nothing listed again


def test_a_million_pairs_get_a_million_keys() -> None:
    """Distinct (id, path hash) pairs collide no more than random 64-bit keys would (none at
    a million: a chance of about 3e-8), also where the digests are not random: hand-made
    counters, one id from many paths, many ids from one path, and ``path:<h>`` beside its own
    ``h`` (an XOR of the halves keyed every such pair 0), and counters in a word's high bits."""
    from radjepa.ingest.input_keys import input_key, input_keys

    rng = np.random.default_rng(7)
    quarter = 250_000
    counters = np.arange(quarter, dtype=np.uint64)
    id_raw = [
        rng.integers(0, 256, (quarter // 2, 32), np.uint8),  # random pairs
        _counter_bytes((counters[::2] + 1) << 40, 32, first=True),  # in the first digits
        _counter_bytes(counters, 32),  # f"{i:064x}" beside f"{i:032x}"
        np.repeat(rng.integers(0, 256, (1, 32), np.uint8), quarter // 2, axis=0),  # one id
        rng.integers(0, 256, (quarter // 2, 32), np.uint8),  # ... many ids, one path
    ]
    hash_raw = [
        rng.integers(0, 256, (quarter // 2, 16), np.uint8),
        _counter_bytes((counters[::2] + 1) << 40, 16, first=True),
        _counter_bytes(counters, 16),
        rng.integers(0, 256, (quarter // 2, 16), np.uint8),
        np.repeat(rng.integers(0, 256, (1, 16), np.uint8), quarter // 2, axis=0),
    ]
    # (counted from 1 above: the pair of zeros is among the counters)
    own = np.concatenate(  # path:<h> beside h: random h, then counters
        [rng.integers(0, 256, (quarter // 2, 16), np.uint8), _counter_bytes(counters[::2], 16)]
    )
    ids = pa.chunked_array([*(_hex(r) for r in id_raw), _hex(own, b"path:")])
    hashes = pa.chunked_array([*(_hex(r) for r in hash_raw), _hex(own)])
    assert len(ids) == 4 * quarter

    keys = input_keys(ids, hashes)
    assert len(keys) == len(np.unique(keys)) == 4 * quarter
    sample = rng.choice(len(ids), 2000, replace=False)
    for i in sample.tolist():
        assert input_key(ids[i].as_py(), hashes[i].as_py()) == int(keys[i])


def _bench_like_dst(root: Path, rows: int) -> tuple[list[str], list[str | None]]:
    """Two image shards, a quarantine file (half its rows unread: no sha256) and a duplicates
    file, with ingest's id formats."""
    rng = np.random.default_rng(3)
    ids, hashes = [], []
    for sub in ("images", "quarantine", "duplicates"):
        (root / sub).mkdir(parents=True)
    for part in range(2):
        table = pa.table(
            {
                "image_id": _hex(rng.integers(0, 256, (rows, 32), np.uint8)),
                "source_hash": _hex(rng.integers(0, 256, (rows, 16), np.uint8)),
            }
        )
        pq.write_table(table, root / "images" / f"part-r1-{part:05d}.parquet")
        ids += table["image_id"].to_pylist()
        hashes += table["source_hash"].to_pylist()
    sha = [ids[0], None, ids[1], None]
    quarantine = pa.table(
        {
            "sha256": pa.array(sha, pa.string()),
            "source_hash": _hex(rng.integers(0, 256, (4, 16), np.uint8)),
        }
    )
    pq.write_table(quarantine, root / "quarantine" / "quarantine-r1.parquet")
    duplicates = pa.table(
        {"image_id": [ids[2]], "kept_image_id": [ids[2]], "source_hash": [hashes[5]]}
    )
    pq.write_table(duplicates, root / "duplicates" / "duplicates-r1.parquet")
    ids += sha + [ids[2]]
    hashes += quarantine["source_hash"].to_pylist() + [hashes[5]]
    return ids, hashes


def _recorded_inputs_calls(root: Path, rows: int) -> int:
    """The Python calls ``recorded_inputs`` makes on a DST of ``rows`` rows a shard; checks
    its keys are those the run gives each input it meets."""
    from radjepa.ingest.destination import Destination, input_key

    ids, hashes = _bench_like_dst(root, rows)
    dest = Destination(str(root))
    calls = 0

    def count(frame, event, arg):  # noqa: ANN001, ANN202 - sys.setprofile's signature
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        keys, kept = dest.recorded_inputs()
    finally:
        sys.setprofile(None)
    expected = {input_key(i, h) for i, h in zip(ids, hashes, strict=True) if i is not None}
    assert len(keys) == len(expected) == 2 * rows + 3  # the repeated input: one key
    assert all(k in keys for k in expected) and kept == {ids[2]: ids[2]}
    return calls


def test_recorded_inputs_takes_no_python_step_per_row(tmp_path) -> None:
    """``recorded_inputs`` read DST's columns into Python ``str`` and hashed each pair in
    Python (2.4-9 s a million rows on a shared 2-core box, with np.unique): now a file's columns are
    keyed at once, so the Python calls it makes grow with the files, not with the rows."""
    few = _recorded_inputs_calls(tmp_path / "few", 200)
    many = _recorded_inputs_calls(tmp_path / "many", 5000)
    assert many - few < 100, f"{many - few} more Python calls for {2 * (5000 - 200)} more rows"


def test_input_keys_sort_each_key_once_and_leave_the_parts_alone() -> None:
    from radjepa.ingest.id_sets import InputKeys

    part = np.array([9, 3, 3, 2**64 - 1, 0], np.uint64)
    keys = InputKeys([part, np.array([3, 7], np.uint64)])
    assert keys._keys.tolist() == [0, 3, 7, 9, 2**64 - 1] and len(keys) == 5
    assert part.tolist() == [9, 3, 3, 2**64 - 1, 0]  # the caller's array is not sorted
    one = InputKeys([np.array([5], np.uint64)])
    assert 5 in one and 4 not in one and len(one) == 1

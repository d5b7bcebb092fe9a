"""The fixed image set each checkpoint's RankMe is measured on: the same images as ever, read
without downloading the archive's pixels (it was streamed whole at every pretrain start and
every sweep trial to keep a few hundred images)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from radjepa.config import load_config
from radjepa.monitoring import monitor_images
from radjepa.shards import ShardError, pixel_batch
from radjepa.training_data import TRAINING_COLUMNS, is_holdout, shard_dataset
from tests.read_only_fs import ReadOnlyLocalFs, read_shards_through

SIDE = 64  # 4 KiB of incompressible pixels per image: they dominate the shards' bytes
SHARDS, ROWS, GROUP = 3, 800, 100  # 8 row groups per shard


def _previous_monitor_images(data: str, fraction: float, limit: int) -> np.ndarray:
    """The set as it was chosen before: every shard's pixels streamed, the chosen ids kept."""
    ds = shard_dataset(data)
    ids = ds.to_table(columns=["image_id"]).column("image_id").to_pylist()
    held = [i for i, x in enumerate(ids) if is_holdout(x, fraction)]
    pick = held if len(held) >= 32 else list(range(len(ids)))
    chosen = pa.array([ids[i] for i in pick[:limit]], pa.string())
    parts = []
    for path in ds.files:
        with ds.filesystem.open_input_file(path) as f:
            batches = pq.ParquetFile(f, pre_buffer=False).iter_batches(
                batch_size=64, columns=TRAINING_COLUMNS
            )
            for rb in batches:
                keep = pc.is_in(rb.column("image_id"), value_set=chosen)
                if pc.any(keep).as_py():
                    parts.append(np.array(pixel_batch(rb.filter(keep))))
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Shards of several row groups each, every image's pixels random bytes."""
    root = tmp_path_factory.mktemp("archive")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for s in range(SHARDS):
        ids = [f"{s * ROWS + i:064x}" for i in range(ROWS)]
        pixels = [rng.integers(0, 256, SIDE * SIDE, np.uint8).tobytes() for _ in ids]
        table = pa.table(
            {
                "image_id": ids,
                "pixels": pa.array(pixels, pa.binary()),
                "height": pa.array([SIDE] * ROWS, pa.int32()),
                "width": pa.array([SIDE] * ROWS, pa.int32()),
                "dtype": ["uint8"] * ROWS,
            }
        )
        pq.write_table(table, root / "images" / f"part-{s:05d}.parquet", row_group_size=GROUP)
    return root


@pytest.mark.parametrize(
    ("fraction", "limit"),
    [
        (0.05, 8),  # the hold-out's first images, found in the first row groups
        (0.05, 256),  # more than the hold-out holds: all of it, from every shard
        (0.01, 8),  # under 32 held out: the archive's first images instead
        (0.0, 900),  # no hold-out: the first images, across row groups and shards
    ],
)
def test_the_set_is_the_same_images_in_the_same_order_as_before(archive, fraction, limit):
    cfg = load_config(None, [f"data.holdout_fraction={fraction}"])
    got = monitor_images(str(archive), cfg, limit=limit)
    want = _previous_monitor_images(str(archive), fraction, limit)
    assert got.shape == want.shape and got.shape[1:] == (SIDE, SIDE)
    np.testing.assert_array_equal(got, want)
    assert got.flags.writeable


class _CountingFile:
    """A shard file that counts the bytes read from it."""

    def __init__(self, f, fs: _CountingFs) -> None:
        self.f, self.fs = f, fs

    def read(self, n: int = -1) -> bytes:
        data = self.f.read() if n is None or n < 0 else self.f.read(n)
        self.fs.read += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()

    @property
    def closed(self) -> bool:
        return self.f.closed


class _CountingFs(ReadOnlyLocalFs):
    """The local filesystem, counting the bytes read through it and the files opened."""

    name = "counting"

    def __init__(self) -> None:
        super().__init__()
        self.read, self.opened = 0, set()

    def open_input_file(self, path: str):
        self.opened.add(path)
        return pa.PythonFile(_CountingFile(self.fs.open_input_file(path), self), mode="r")


def test_only_the_row_groups_holding_the_set_are_read(archive, monkeypatch):
    # the first 8 hold-out images lie in the first shard's first row groups: what is read is
    # bounded by them and the ids, not by the archive
    counting = _counted_shards(monkeypatch)
    cfg = load_config(None, ["data.holdout_fraction=0.05"])
    got = monitor_images(str(archive), cfg, limit=8)
    assert len(got) == 8
    pixels = SHARDS * ROWS * SIDE * SIDE
    held = [i for i in range(SHARDS * ROWS) if is_holdout(f"{i:064x}", 0.05)]
    groups = {i // GROUP for i in held[:8]}  # the row groups holding the set
    # theirs, and one more row group's worth for the ids and the footers
    assert 0 < counting.read < (len(groups) + 1) * GROUP * SIDE * SIDE
    assert counting.read < pixels / 5


def _counted_shards(monkeypatch) -> _CountingFs:
    """Make the readers under test read every shard through a :class:`_CountingFs`."""
    counting = _CountingFs()
    read_shards_through(monkeypatch, counting)
    return counting


def _small_shards(root: Path) -> None:
    """40 shards of 10 images of 4 x 4 pixels, every pixel of shard ``s`` = ``s``."""
    (root / "images").mkdir()
    for s in range(40):
        ids = [f"{s:05d}-{i:03d}" for i in range(10)]
        table = pa.table(
            {
                "image_id": ids,
                "pixels": pa.array([bytes([s]) * 16] * 10, pa.binary()),
                "height": pa.array([4] * 10, pa.int32()),
                "width": pa.array([4] * 10, pa.int32()),
                "dtype": ["uint8"] * 10,
            }
        )
        pq.write_table(table, root / "images" / f"part-{s:05d}.parquet")


def test_without_a_hold_out_only_the_shards_holding_the_first_images_are_opened(
    tmp_path, monkeypatch
):
    # data.holdout_fraction=0 (the demo's): the first images are the set, and the shards past
    # them were each opened (every shard of the archive) to look for hold-out ids none can be
    _small_shards(tmp_path)
    counting = _counted_shards(monkeypatch)
    cfg = load_config(None, ["data.holdout_fraction=0"])
    got = monitor_images(str(tmp_path), cfg, limit=25)
    assert [int(im[0, 0]) for im in got] == [i // 10 for i in range(25)]  # the first 25
    assert sorted(Path(p).name for p in counting.opened) == [
        f"part-{s:05d}.parquet" for s in range(3)
    ]


def test_a_hold_out_too_small_to_use_keeps_only_the_ids_that_can_be_picked(tmp_path):
    # every shard is read to learn that the hold-out is too small (under 32 images), and every
    # id was kept as a Python string on the way: ~1.4 GB for ten million images
    from radjepa.monitoring import _id_groups
    from radjepa.training_data import training_files

    _small_shards(tmp_path)
    fs, files = training_files(str(tmp_path))
    fraction = 0.01
    held = [f"{s:05d}-{i:03d}" for s in range(40) for i in range(10)]
    held = [x for x in held if is_holdout(x, fraction)]
    assert 0 < len(held) < 32
    groups = _id_groups(str(tmp_path), fs, files, fraction, 25)
    assert len(groups) == 40  # every shard's ids were read
    kept = [x for _, _, ids in groups for x in ids]
    first = [f"{i // 10:05d}-{i % 10:03d}" for i in range(25)]
    assert kept == first + [x for x in held if x not in first]
    cfg = load_config(None, [f"data.holdout_fraction={fraction}"])
    got = monitor_images(str(tmp_path), cfg, limit=25)  # the first images all the same
    assert [int(im[0, 0]) for im in got] == [i // 10 for i in range(25)]


def test_a_monitor_image_changed_inside_its_shard_stops_naming_the_shard(tmp_path):
    # the set's pixels decoded whatever bytes the pages held: a shard a disk or a copy changed
    # gave the quality metrics of other images, or an error naming no file
    from radjepa.training_data import TrainingDataError
    from tests.test_shards import corrupt_pages, ingest_written_shard

    rng = np.random.default_rng(0)
    images = (rng.integers(0, 16, (64, SIDE, SIDE)) * 8).astype(np.uint8)
    path = ingest_written_shard(tmp_path, images, [f"{i:064x}" for i in range(64)])
    cfg = load_config(None, ["data.holdout_fraction=0"])
    np.testing.assert_array_equal(monitor_images(str(tmp_path), cfg, limit=64), images)
    corrupt_pages(path, "pixels")
    with pytest.raises(TrainingDataError) as stopped:
        monitor_images(str(tmp_path), cfg, limit=64)
    assert str(stopped.value).startswith(f"{path} is damaged: its bytes changed after ingest")


def test_a_monitor_page_header_that_no_longer_decodes_names_its_shard(tmp_path):
    # only checksum failures were named: a page header (no checksum covers it) that no
    # longer decodes stopped the run on pyarrow's error, naming no file
    from radjepa.training_data import TrainingDataError
    from tests.test_shards import corrupt_page_header, ingest_written_shard

    images = np.random.default_rng(0).integers(0, 256, (64, SIDE, SIDE)).astype(np.uint8)
    path = ingest_written_shard(tmp_path, images, [f"{i:064x}" for i in range(64)])
    corrupt_page_header(path, "pixels")
    cfg = load_config(None, ["data.holdout_fraction=0"])
    with pytest.raises(TrainingDataError) as stopped:
        monitor_images(str(tmp_path), cfg, limit=64)
    assert str(stopped.value).startswith(f"{path} is damaged: its bytes changed after ingest")
    assert stopped.value.__cause__ is None


def test_pixel_bytes_of_another_size_name_their_shard(tmp_path):
    (tmp_path / "images").mkdir()
    table = pa.table(
        {
            "image_id": ["a", "b"],
            "pixels": pa.array([bytes(16), bytes(15)], pa.binary()),
            "height": pa.array([4, 4], pa.int32()),
            "width": pa.array([4, 4], pa.int32()),
            "dtype": ["uint8", "uint8"],
        }
    )
    path = tmp_path / "images" / "part-00000.parquet"
    pq.write_table(table, path)
    cfg = load_config(None, ["data.holdout_fraction=0"])
    with pytest.raises(
        ShardError, match="^" + re.escape(f"{path}: pixel buffers are not all 4x4 uint8")
    ):
        monitor_images(str(tmp_path), cfg, limit=2)

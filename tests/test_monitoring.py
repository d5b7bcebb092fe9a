"""The fixed image set each checkpoint's RankMe is measured on: the same images as ever, read
without downloading the archive's pixels (it was streamed whole at every pretrain start and
every sweep trial to keep a few hundred images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from radjepa.config import load_config
from radjepa.monitoring import monitor_images
from radjepa.shards import pixel_batch
from radjepa.training_data import TRAINING_COLUMNS, is_holdout, shard_dataset

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


class _CountingFs(pafs.FileSystemHandler):
    """The local filesystem, counting the bytes read through it (pyarrow's own handler API,
    so the datasets and Parquet readers under test read through it unchanged)."""

    def __init__(self) -> None:
        self.fs, self.read = pafs.LocalFileSystem(), 0

    def get_type_name(self) -> str:
        return "counting"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def equals(self, other) -> bool:
        return other is self

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def open_input_file(self, path: str):
        return pa.PythonFile(_CountingFile(self.fs.open_input_file(path), self), mode="r")

    def open_input_stream(self, path: str):
        return self.open_input_file(path)

    def _writes(self, *args, **kwargs):
        raise NotImplementedError("the monitor set is only ever read")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _writes
    delete_file = move = copy_file = open_output_stream = open_append_stream = _writes


def test_only_the_row_groups_holding_the_set_are_read(archive, monkeypatch):
    # the first 8 hold-out images lie in the first shard's first row groups: what is read is
    # bounded by them and the ids, not by the archive
    from radjepa import training_data

    real = training_data.shard_files
    counting = _CountingFs()

    def counted(data: str):
        _, files = real(data)
        return pafs.PyFileSystem(counting), files

    monkeypatch.setattr(training_data, "shard_files", counted)
    cfg = load_config(None, ["data.holdout_fraction=0.05"])
    got = monitor_images(str(archive), cfg, limit=8)
    assert len(got) == 8
    pixels = SHARDS * ROWS * SIDE * SIDE
    held = [i for i in range(SHARDS * ROWS) if is_holdout(f"{i:064x}", 0.05)]
    groups = {i // GROUP for i in held[:8]}  # the row groups holding the set
    # theirs, and one more row group's worth for the ids and the footers
    assert 0 < counting.read < (len(groups) + 1) * GROUP * SIDE * SIDE
    assert counting.read < pixels / 5

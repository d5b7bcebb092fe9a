"""radjepa.shards.pixel_batch: shard rows -> one image array, straight from the Arrow buffer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from radjepa.shards import ShardError, pixel_batch, pixels_from_bytes, pixels_to_bytes


def _rows(images: list[np.ndarray], dtype: str | None = None) -> pa.RecordBatch:
    return pa.record_batch(
        {
            "pixels": pa.array([pixels_to_bytes(a) for a in images], pa.binary()),
            "height": pa.array([a.shape[0] for a in images], pa.int32()),
            "width": pa.array([a.shape[1] for a in images], pa.int32()),
            "dtype": pa.array([dtype or a.dtype.name for a in images], pa.string()),
        }
    )


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_pixel_batch_matches_the_row_by_row_decode(dtype):
    rng = np.random.default_rng(0)
    top = np.iinfo(dtype).max
    images = [rng.integers(0, top, (12, 10), dtype=dtype, endpoint=True) for _ in range(7)]
    rb = _rows(images)
    out = pixel_batch(rb)
    assert out.shape == (7, 12, 10) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, np.stack(images))
    rows = [pixels_from_bytes(b, 12, 10, dtype) for b in rb.column("pixels").to_pylist()]
    np.testing.assert_array_equal(out, np.stack(rows))
    assert not out.flags.writeable  # one record batch: a view, no copy

    # a slice (non-zero Arrow offset) and a table of several chunks
    np.testing.assert_array_equal(pixel_batch(rb.slice(2, 3)), np.stack(images[2:5]))
    large = rb.set_column(0, "pixels", rb.column("pixels").cast(pa.large_binary()))
    np.testing.assert_array_equal(pixel_batch(large.slice(1)), np.stack(images[1:]))
    table = pa.Table.from_batches([rb.slice(0, 4), rb.slice(4)])
    assert table.column("pixels").num_chunks == 2
    np.testing.assert_array_equal(pixel_batch(table), np.stack(images))


def test_pixel_batch_refuses_rows_it_cannot_stack():
    a, b = np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8)
    with pytest.raises(ShardError, match="mix image sizes"):
        pixel_batch(_rows([a, b]))
    with pytest.raises(ShardError, match="mix image sizes"):
        pixel_batch(pa.Table.from_batches([_rows([a]), _rows([b])]))
    with pytest.raises(ShardError, match="unknown shard dtype"):
        pixel_batch(_rows([a], dtype="float32"))
    short = _rows([a]).set_column(0, "pixels", pa.array([b"\0" * 15], pa.binary()))
    with pytest.raises(ShardError, match="not all 4x4 uint8"):
        pixel_batch(short)
    missing = _rows([a]).set_column(0, "pixels", pa.array([None], pa.binary()))
    with pytest.raises(ShardError, match="no pixel bytes"):
        pixel_batch(missing)
    as_text = _rows([a]).set_column(0, "pixels", pa.array(["x" * 16], pa.string()))
    with pytest.raises(ShardError, match="the shard schema says binary"):
        pixel_batch(as_text)
    with pytest.raises(ShardError, match="no shard rows"):
        pixel_batch(_rows([a]).slice(0, 0))


def test_read_images_refuses_a_folder_that_mixes_sizes(tmp_path):
    import pyarrow.parquet as pq

    from radjepa.shards import read_images

    images = tmp_path / "images"
    images.mkdir()
    for i, shape in enumerate([(4, 4), (4, 5)]):
        rows = _rows([np.full(shape, i, np.uint8)] * 2)
        pq.write_table(pa.Table.from_batches([rows]), images / f"part-{i}.parquet")
    with pytest.raises(ShardError, match=r"shards under .* mix image sizes"):
        read_images(tmp_path)
    first, _ = read_images(tmp_path, limit=2)  # the first shard alone is fine
    assert first.shape == (2, 4, 4) and first.flags.writeable


def test_an_embeddings_index_given_as_shards_is_named_in_one_line(tmp_path):
    """The index `radjepa embed` writes is Parquet too, and one folder name away from the
    shards: `pretrain`/`sweep --data` and `probe --shards` on it were a pyarrow ArrowInvalid or
    KeyError traceback (exit 1) naming no folder."""
    import subprocess
    import sys

    from serve_helpers import REPO, TINY_CONFIG, make_checkpoint
    from shard_tables import write_embeddings_index

    from radjepa.config import load_config
    from radjepa.shards import read_images
    from radjepa.training_data import TrainingDataError, inspect_shards

    index = write_embeddings_index(tmp_path / "index")
    says = f"{index} holds Parquet that is not `radjepa ingest` shards (no column "
    with pytest.raises(ShardError, match="no column pixels, height, width, dtype"):
        read_images(index)
    with pytest.raises(TrainingDataError, match="no column height, width, dtype"):
        inspect_shards(str(index), load_config(TINY_CONFIG))

    ckpt = str(make_checkpoint(tmp_path / "ckpt"))
    probe = ["probe", ckpt, "--shards", str(index), "--label", "sex=F", "--no-mlflow"]
    for args in (["pretrain", "--data", str(index)], [*probe, "--out", str(tmp_path / "p")]):
        res = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", *args, "-c", str(TINY_CONFIG)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 2, res.stderr
        assert says in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_files_a_mac_or_spark_leaves_beside_the_shards_are_not_read_as_shards(tmp_path):
    """A Mac copying the folder leaves ``._part-N.parquet`` (AppleDouble: Finder data, not
    Parquet) beside each shard: read_images and embed's listing read it and stopped with a
    pyarrow ArrowInvalid ("Parquet magic bytes not found"), while pretraining's Ray Data read
    of the same folder skipped it."""
    import pyarrow.parquet as pq

    from radjepa.shards import list_shards, read_images

    images = tmp_path / "images"
    images.mkdir()
    pq.write_table(
        pa.Table.from_batches([_rows([np.full((4, 4), 7, np.uint8)] * 3)]),
        images / "part-0.parquet",
    )
    (images / "._part-0.parquet").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 4092)
    (images / "_SUCCESS.parquet").write_bytes(b"")
    assert [p.rsplit("/", 1)[-1] for p in map(str, list_shards(tmp_path))] == ["part-0.parquet"]
    pixels, meta = read_images(tmp_path)
    assert pixels.shape == (3, 4, 4) and int(pixels.max()) == 7 and meta.num_rows == 3


def test_rows_sorted_by_a_column_fit_past_two_gib_of_pixels():
    """A shard's rows are written in image-id order; Table.sort_by took them into one chunk,
    and 2048 rows of 1024 px uint8 pixels (2 GiB in a 32-bit-offset binary column) raised
    "offset overflow" at the first shard of such a run. The chunks here share one buffer, so
    2.4 GiB of rows cost 300 MiB."""
    import numpy as np
    import pyarrow as pa

    from radjepa.shards import rows_sorted_by

    size, n, chunks = 1 << 20, 300, 8
    data = pa.py_buffer(np.zeros(size * n, dtype=np.uint8))
    offsets = pa.py_buffer(np.arange(0, size * (n + 1), size, dtype=np.int32))
    pixels = pa.Array.from_buffers(pa.binary(), n, [None, offsets, data])
    ids = [
        [f"{(c * 7919 + i * 104729) % 99991:05d}-{c}-{i}" for i in range(n)] for c in range(chunks)
    ]
    table = pa.table(
        {
            "image_id": pa.chunked_array([pa.array(c) for c in ids]),
            "pixels": pa.chunked_array([pixels] * chunks),
        }
    )
    assert table["pixels"].nbytes > 2**31
    out = rows_sorted_by(table, "image_id")
    got = out["image_id"].to_pylist()
    assert got == sorted(i for c in ids for i in c)
    assert out.num_rows == table.num_rows and out["pixels"].nbytes == table["pixels"].nbytes
    assert rows_sorted_by(table.slice(0, 0), "image_id").num_rows == 0


def ingest_written_shard(dst, images: np.ndarray, ids: list[str]):
    """``images`` (N x H x W uint8) stored by ingest's own shard writer (the Parquet options
    it writes with) as ``dst/images/part-...-00000.parquet``; returns its path."""
    from radjepa.ingest.destination import Destination
    from radjepa.shards import SHARD_SCHEMA

    n, height, width = images.shape
    cols = {
        "image_id": ids,
        "pixels": [pixels_to_bytes(im) for im in images],
        "height": [height] * n,
        "width": [width] * n,
        "dtype": [images.dtype.name] * n,
    }
    table = pa.table({f.name: pa.array(cols.get(f.name, [None] * n), f.type) for f in SHARD_SCHEMA})
    name = Destination(str(dst)).write("images", "part-20261205T132317-e6250c-00000.parquet", table)
    return Path(dst) / name


def _column_start(path, column: str) -> tuple[int, int]:
    """Where ``column``'s first page starts in the Parquet file ``path`` (one row group), and
    how many bytes its pages take."""
    import pyarrow.parquet as pq

    group = pq.ParquetFile(path).metadata.row_group(0)
    (chunk,) = [
        group.column(i)
        for i in range(group.num_columns)
        if group.column(i).path_in_schema == column
    ]
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    return start, chunk.total_compressed_size


def _overwrite(path, offset: int, new: bytes) -> None:
    data = bytearray(Path(path).read_bytes())
    data[offset : offset + len(new)] = new
    Path(path).write_bytes(bytes(data))


def corrupt_pages(path, column: str) -> None:
    """Zero 64 bytes in the middle of ``column``'s data in the Parquet file ``path``, as a
    failing disk or a bad copy changes a file: its footer stays whole."""
    start, size = _column_start(path, column)
    _overwrite(path, start + size // 2, bytes(64))


def corrupt_page_header(path, column: str) -> None:
    """Change the header of ``column``'s first page in the Parquet file ``path``, which no
    checksum covers: the page no longer decodes, and the footer stays whole."""
    start, _ = _column_start(path, column)
    _overwrite(path, start + 2, b"\xff\xff")


def test_pixels_changed_inside_a_shard_stop_the_read_naming_the_shard(tmp_path):
    # nothing checked a shard's pages: bytes changed in its pixels decoded as images (or as
    # a row count that does not fit) and were trained on, or failed naming no file
    import pyarrow.parquet as pq

    from radjepa.shards import read_images

    rng = np.random.default_rng(0)
    images = (rng.integers(0, 16, (50, 32, 32)) * 8).astype(np.uint8)
    path = ingest_written_shard(tmp_path, images, [f"{i:064x}" for i in range(50)])
    assert np.array_equal(read_images(tmp_path)[0], images)
    corrupt_pages(path, "pixels")
    with pytest.raises(ShardError) as stopped:
        read_images(tmp_path)
    message = str(stopped.value)
    assert message.startswith(f"{path} is damaged: its bytes changed after ingest wrote them")
    assert "CRC checksum verification failed" in message and "Move it out of the DST" in message
    # shards written before ingest wrote checksums are read as before
    pq.write_table(pa.Table.from_batches([_rows(list(images))]), path)
    assert np.array_equal(read_images(tmp_path)[0], images)


def test_files_listed_before_are_found_in_the_folder_as_spelled_now(tmp_path):
    # a sweep trial gets the files its driver listed through a link another node may lack;
    # the trial's location has its links resolved, and the files are read there
    import pyarrow.parquet as pq

    from radjepa.shards import shard_files

    real = tmp_path / "real" / "images"
    real.mkdir(parents=True)
    for name in ("part-0.parquet", "part-1.parquet"):
        pq.write_table(pa.table({"image_id": ["a"]}), real / name)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    _, listed = shard_files(str(tmp_path / "link"))
    assert listed == [
        str(tmp_path / "link" / "images" / n) for n in ("part-0.parquet", "part-1.parquet")
    ]
    (real / "part-2.parquet").write_bytes(b"")  # written after the listing: not taken
    _, again = shard_files(str((tmp_path / "link").resolve()), listed)
    assert again == [str(real / n) for n in ("part-0.parquet", "part-1.parquet")]
    (real / "part-1.parquet").unlink()  # moved away since the listing: said, not read
    with pytest.raises(ShardError, match=r"1 shard\(s\) listed when the run started are gone"):
        shard_files(str(real.parent), listed)

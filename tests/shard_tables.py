"""Ingest-shaped shards written straight from arrays, for tests of what reads shards.

Running the ingest decoder is the faithful way to get shards, but tests of the readers need rows
ingest would rarely produce on the bundled sample (no label, a shared patient, null metadata):
this writes them in the exact shard schema, so a schema change breaks them loudly here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from radjepa.shards import IMAGES_DIR, SHARD_SCHEMA, pixels_to_bytes


def write_shard(root: Path, images: np.ndarray, **columns: list) -> Path:
    """One ``part-0.parquet`` under ``root/images`` holding ``images`` (N x H x W uint8) and the
    given columns; every other shard column is null."""
    n, height, width = images.shape
    cols = {
        "pixels": [pixels_to_bytes(im) for im in images],
        "height": [height] * n,
        "width": [width] * n,
        "dtype": [str(images.dtype)] * n,
        **columns,
    }
    unknown = set(cols) - set(SHARD_SCHEMA.names)
    if unknown:
        raise KeyError(f"not shard columns: {sorted(unknown)}")
    table = pa.table({f.name: pa.array(cols.get(f.name, [None] * n), f.type) for f in SHARD_SCHEMA})
    folder = Path(root) / IMAGES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "part-0.parquet"
    pq.write_table(table, path)
    return path


def write_metadata_shard(root: Path, n: int = 64, size: int = 256) -> Path:
    """Shards whose metadata says ``n`` images of ``size`` x ``size`` and that hold no pixels:
    enough for the checks a command runs before it starts Ray, which read metadata only."""
    folder = Path(root) / IMAGES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "image_id": [f"img{i:03d}" for i in range(n)],
            "height": [size] * n,
            "width": [size] * n,
            "dtype": ["uint8"] * n,
        }
    )
    pq.write_table(table, folder / "part-0.parquet")
    return Path(root)


def write_blank_shards(root: Path, n: int = 64, size: int = 256) -> Path:
    """``root/shards``: one shard of ``n`` black ``size`` x ``size`` images with only the
    columns pretrain, sweep and embed check before they start Ray (and that a sweep can train
    on); returns the shards folder."""
    folder = Path(root) / "shards" / IMAGES_DIR
    folder.mkdir(parents=True)
    table = pa.table(
        {
            "image_id": [f"img{i:03d}" for i in range(n)],
            "pixels": pa.array([bytes(size * size)] * n, pa.binary()),
            "height": [size] * n,
            "width": [size] * n,
            "dtype": ["uint8"] * n,
        }
    )
    pq.write_table(table, folder / "part-0.parquet")
    return folder.parent


def write_embeddings_index(root: Path, n: int = 4, dim: int = 8) -> Path:
    """Parquet in the layout `radjepa embed` writes (``pipelines.embed.OUTPUT_COLUMNS``, files
    straight in ``root``): what a user may give where shards are expected."""
    from pipelines.embed import OUTPUT_COLUMNS

    cols: dict[str, pa.Array] = {
        c: pa.array([f"{c}{i}" for i in range(n)], pa.string())
        for c in OUTPUT_COLUMNS
        if c != "embedding"
    }
    values = pa.array(np.zeros(n * dim, np.float32))
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(values, dim)
    Path(root).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), Path(root) / "part-0.parquet")
    return Path(root)

"""Ingest and training agree on which files of an ingest DST are shards.

Training listed every ``images/*.parquet`` not starting with ``.`` or ``_``; ingest's own reads
of DST (duplicate detection, re-runs, totals) only the files it names. A Parquet file dropped
into ``DST/images`` (a file manager's copy ``part-... (1).parquet``, a shard from another DST,
a hand-made file) was trained on while ingest did not count it: a copy was trained on twice, a
re-run stored a foreign shard's images again, and a file of another schema stopped pretraining
with a TypeError traceback. Every DST here is written by the real ``radjepa ingest``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from radjepa.config import load_config
from radjepa.ingest.destination import Destination
from radjepa.shards import ShardError, is_output_name, list_shards
from radjepa.training_data import TrainingDataError, inspect_shards

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.02",  # ~0.5 GB on the 24 GiB dev box
    }
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, nih_dir) -> Path:
    """24 NIH radiographs ingested by the CLI into a DST of three shards (8 rows each)."""
    src = tmp_path_factory.mktemp("src")
    for p in sorted((nih_dir / "images").glob("*.png"))[:24]:
        shutil.copy(p, src / p.name)
    dst = tmp_path_factory.mktemp("ingested") / "dst"
    res = _cli("ingest", str(src), str(dst), "-c", str(TINY), "--set", "ingest.shard_rows=8")
    assert res.returncode == 0, res.stderr[-3000:]
    return dst


@pytest.fixture
def dst(ingested, tmp_path) -> Path:
    copy = tmp_path / "dst"
    shutil.copytree(ingested, copy)
    return copy


def _drop_foreign_files(dst: Path) -> list[str]:
    """What lands in DST/images from outside ingest: a file manager's copy of a shard, a
    shard copied in under a name of one's own, and a table of another schema."""
    shards = sorted((dst / "images").glob("part-*.parquet"))
    copy = dst / "images" / f"{shards[0].stem} (1).parquet"
    shutil.copy(shards[0], copy)
    shutil.copy(shards[1], dst / "images" / "from-site-b.parquet")
    pq.write_table(
        pa.table({"image_id": ["a"], "label": [1]}), dst / "images" / "zz-labels.parquet"
    )
    return sorted([copy.name, "from-site-b.parquet", "zz-labels.parquet"])


def test_a_copy_named_by_a_file_manager_is_not_an_ingest_file():
    name = "part-20261205T132317-e6250c-00000"
    assert is_output_name("images", f"{name}.parquet")
    for copy in (f"{name} (1)", f"{name} copy", f"{name} - Copy", f"{name}(2)", f"{name}.parquet"):
        assert not is_output_name("images", f"{copy}.parquet"), copy
    assert is_output_name("quarantine", "quarantine-20261205T132317-e6250c.parquet")
    assert not is_output_name("quarantine", "quarantine-20261205T132317-e6250c (1).parquet")


def test_training_lists_exactly_the_shards_ingest_knows(dst):
    wrote = Destination(str(dst)).shards()
    assert len(wrote) == 3
    assert list_shards(dst) == wrote
    (dst / "images" / "old").mkdir()  # a folder of an earlier copy: pyarrow read it too
    shutil.copy(wrote[0], dst / "images" / "old" / Path(wrote[0]).name)
    info = inspect_shards(str(dst), load_config(TINY))
    assert info.rows == 24 == Destination(str(dst)).totals().images


def test_foreign_parquet_in_a_dst_is_refused_by_name_before_training(dst, caplog):
    before = list_shards(dst)
    foreign = _drop_foreign_files(dst)
    with pytest.raises(ShardError) as err:
        list_shards(dst)
    message = str(err.value)
    assert all(repr(name) in message for name in foreign), message
    assert "3 Parquet file(s) that `radjepa ingest` did not write" in message
    with pytest.raises(TrainingDataError, match="did not write"):
        inspect_shards(str(dst), load_config(TINY))
    with pytest.raises(ShardError, match="did not write"):
        list_shards(dst / "images")  # given the shard folder itself
    # ingest's view of DST is unchanged, and it names the files at the start of a run
    dest = Destination(str(dst))
    assert dest.shards() == before and dest.totals().images == 24
    with caplog.at_level(logging.WARNING, logger="radjepa.ingest.destination"):
        assert dest.warn_foreign_files() == [f"images/{n}" for n in foreign]
    assert "3 Parquet file(s) that ingest did not write" in caplog.text
    assert "`radjepa pretrain` refuses DST" in caplog.text
    for name in foreign:
        (dst / "images" / name).unlink()
    assert list_shards(dst) == before
    # one beside the quarantine is only ignored: training, which never reads it, goes on
    (dst / "quarantine" / "notes.parquet").write_bytes(b"another tool's file")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="radjepa.ingest.destination"):
        assert dest.warn_foreign_files() == ["quarantine/notes.parquet"]
    assert "1 Parquet file(s) that ingest did not write" in caplog.text
    assert "refuses" not in caplog.text
    assert list_shards(dst) == before


def test_pretrain_refuses_a_dst_with_foreign_parquet_in_one_line(dst):
    """Was: the run trained on 72 rows of 48 images (a copied shard and a foreign one), or,
    with a file of another schema sorted last, a TypeError traceback (exit 1)."""
    foreign = _drop_foreign_files(dst)
    res = _cli("pretrain", "-c", str(TINY), "--data", str(dst), timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and all(name in lines[0] for name in foreign), res.stderr[-3000:]
    assert "starting local Ray" not in res.stderr  # refused before any cluster work


def test_a_folder_of_ones_own_shards_is_still_read_whole(dst, tmp_path):
    """Only an ingest DST (a manifest or key record beside images/) is held to ingest's names:
    a folder of shards put together by hand is read as it always was."""
    own = tmp_path / "own"
    own.mkdir()
    for i, path in enumerate(sorted((dst / "images").glob("part-*.parquet"))):
        shutil.copy(path, own / f"batch {i}.parquet")
    assert len(list_shards(own)) == 3
    assert inspect_shards(str(own), load_config(TINY)).rows == 24
    nested = tmp_path / "nested"
    shutil.copytree(own, nested / "images")
    assert len(list_shards(nested)) == 3

"""A resumed sweep trains on the images it was started on (``sweep_shards.json``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from radjepa.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cfg(out: Path, **extra):
    overrides = {"train.output_dir": str(out), "train.batch_size": 4, "tune.name": "s", **extra}
    return load_config(CONFIGS / "tiny_cpu.yaml", overrides)


@pytest.fixture
def two_shards(nih_shards, tmp_path) -> Path:
    """A plain folder of two shards of the real ingest's rows (20 images each)."""
    table = pq.read_table(sorted((nih_shards / "images").glob("*.parquet")))
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(table.slice(0, 20), folder / "a.parquet")
    pq.write_table(table.slice(20, 20), folder / "b.parquet")
    return folder


def _started(cfg, data: str, sweep_dir: str):
    from pipelines.sweep_shards import keep_shards, sweep_shards

    info = sweep_shards(cfg, data, resume=False)
    keep_shards(sweep_dir, data, info)
    return info


def test_a_resume_trains_on_the_files_the_sweep_started_on(two_shards, tmp_path):
    from pipelines.sweep_shards import sweep_shards

    cfg, data, sweep_dir = _cfg(tmp_path), str(two_shards), str(tmp_path / "s")
    started = _started(cfg, data, sweep_dir)
    saved = json.loads((tmp_path / "s" / "sweep_shards.json").read_text())
    assert saved == {
        "data": data,
        "files": ["a.parquet", "b.parquet"],
        "fingerprint": started.fingerprint,
    }
    # an ingest adds a shard meanwhile: the resume does not train on it (a listing would)
    pq.write_table(pq.read_table(two_shards / "b.parquet").slice(0, 8), two_shards / "c.parquet")
    resumed = sweep_shards(cfg, data, resume=True)
    assert [Path(f).name for f in resumed.files] == ["a.parquet", "b.parquet"]
    assert resumed.rows == 40 and resumed.fingerprint == started.fingerprint
    assert sweep_shards(cfg, data, resume=False).rows == 48


def test_the_same_images_stored_again_under_other_names_resume(two_shards, tmp_path):
    # a damaged shard moved out of the DST and its images ingested again: a new file name
    from pipelines.sweep_shards import sweep_shards

    cfg, data, sweep_dir = _cfg(tmp_path), str(two_shards), str(tmp_path / "s")
    started = _started(cfg, data, sweep_dir)
    (two_shards / "b.parquet").rename(two_shards / "b2.parquet")
    resumed = sweep_shards(cfg, data, resume=True)
    assert [Path(f).name for f in resumed.files] == ["a.parquet", "b2.parquet"]
    assert resumed.fingerprint == started.fingerprint


def test_other_images_are_refused_unless_allowed(two_shards, tmp_path, caplog):
    from pipelines.sweep import SweepError
    from pipelines.sweep_shards import sweep_shards

    cfg, data, sweep_dir = _cfg(tmp_path), str(two_shards), str(tmp_path / "s")
    started = _started(cfg, data, sweep_dir)
    fp = started.fingerprint[:12]
    b = two_shards / "b.parquet"
    table = pq.read_table(b)
    pq.write_table(table.slice(0, 10), b)  # written again with fewer images
    with pytest.raises(SweepError) as said:
        sweep_shards(cfg, data, resume=True)
    message = str(said.value)
    assert message.startswith(
        f"sweep 's' was started on other images at {data} (its shards were written again "
        f"since: data fingerprint {fp} -> "
    )
    assert message.endswith(
        "put the shards back to resume it, set train.allow_config_change=true to train its "
        "remaining trials on these, or start a new sweep (another tune.name)"
    )
    b.rename(tmp_path / "b.parquet")  # gone, and the folder holds other images
    with pytest.raises(SweepError, match=r"\(1 of the 2 shard\(s\) it started on are gone "):
        sweep_shards(cfg, data, resume=True)
    allowed = _cfg(tmp_path, **{"train.allow_config_change": True})
    with caplog.at_level(logging.WARNING, logger="pipelines.sweep_shards"):
        assert sweep_shards(allowed, data, resume=True).rows == 20
    assert "sweep s resumes on other images (1 of the 2 shard(s)" in caplog.text


def test_without_a_readable_listing_for_this_folder_the_folder_is_listed(
    two_shards, tmp_path, caplog
):
    from pipelines.sweep_shards import SWEEP_SHARDS_FILE, sweep_shards

    cfg, data, sweep_dir = _cfg(tmp_path), str(two_shards), tmp_path / "s"
    extra = pq.read_table(two_shards / "b.parquet").slice(0, 8)
    # started by an earlier version, which saved no listing
    assert sweep_shards(cfg, data, resume=True).rows == 40
    _started(cfg, data, str(sweep_dir))
    pq.write_table(extra, two_shards / "c.parquet")
    # resumed on another folder: keep_sweep_config refuses it, naming both
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(extra, other / "x.parquet")
    assert sweep_shards(cfg, str(other), resume=True).rows == 8
    (sweep_dir / SWEEP_SHARDS_FILE).write_text('{"data": ')  # cut short by a kill
    with caplog.at_level(logging.WARNING, logger="pipelines.sweep_shards"):
        assert sweep_shards(cfg, data, resume=True).rows == 48
    assert "sweep_shards.json cannot be read: the shards at" in caplog.text


def test_a_sweep_folder_that_cannot_be_read_is_said_in_one_line(two_shards, tmp_path):
    # read before the output store is checked: pyarrow's error escaped as a traceback
    from pipelines.sweep import SweepError
    from pipelines.sweep_shards import sweep_shards

    cfg = _cfg(tmp_path, **{"train.output_dir": "nosuch://bucket/out"})
    with pytest.raises(SweepError) as said:
        sweep_shards(cfg, str(two_shards), resume=True)
    assert str(said.value) == (
        "cannot read sweep 's' at nosuch://bucket/out/s/sweep_shards.json: Unrecognized "
        "filesystem type in URI: nosuch://bucket/out/s/sweep_shards.json"
    )


def test_the_saved_location_keeps_no_credentials(tmp_path):
    # the file lies beside the checkpoints, as sweep_config.json does (credentials ***)
    from pipelines.sweep_shards import keep_shards
    from radjepa.training_data import ShardSummary

    info = ShardSummary("x", 1, 1, 0, 64, "uint8", "f" * 64, None, ("s3://b/dst/images/a.parquet",))
    keep_shards(str(tmp_path), "s3://AKIA:secret@b/dst", info)
    saved = json.loads((tmp_path / "sweep_shards.json").read_text())
    assert saved["data"] == "s3://AKIA:***@b/dst" and saved["files"] == ["a.parquet"]

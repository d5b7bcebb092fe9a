"""Which checkpoint folders of a run the driver removes because Ray Train never will: copies cut
short and folders Ray never recorded, and never a recorded one, the resume point, a recent one
or anything outside the run's checkpoint folders. Real training checkpoints on local disk and
through ``file://`` (pyarrow's URI code path, as for ``s3://``); Ray's record is written in the
format of the pinned Ray (2.60), as Ray leaves it in the run folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from pipelines.stray_checkpoints import (
    QUIET_S,
    RAY_CHECKPOINT_SNAPSHOT,
    prune_stray_checkpoints,
    recorded_checkpoints,
)
from radjepa.checkpoint import META, OPTIM, OPTIM_JSON, WEIGHTS, is_cut_short, save_checkpoint
from radjepa.config import load_config
from radjepa.engine import Pretrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
OLDEST, RECORDED, RESUMED, NEWEST = (
    f"checkpoint_2026-01-01_10-0{m}-00.000001" for m in (0, 2, 4, 6)
)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """One real training checkpoint (weights, optimizer state, metadata)."""
    trainer = Pretrainer(load_config(TINY, ["train.run_name=r"]), "cpu")
    trainer.train_step(torch.randn(2, 1, 96, 96, generator=torch.Generator().manual_seed(0)))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "whole", trainer)


def _record(run: Path, *names: str) -> None:
    """Ray Train's checkpoint_manager_snapshot.json naming ``names`` (the last is the latest)."""
    results = [{"version": 0, "checkpoint_dir_name": n, "metrics": {}} for n in names]
    record = {
        "ray_version": "2.60.0",
        "checkpoint_results": results,
        "checkpoint_report_indices": list(range(len(names))),
        "latest_checkpoint_result": results[-1] if results else None,
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": len(names),
        "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }
    (run / RAY_CHECKPOINT_SNAPSHOT).write_text(json.dumps(record))


def _age(folder: Path, seconds: float) -> None:
    """Set the folder and its files back in time, as if written ``seconds`` ago."""
    t = time.time() - seconds
    for p in [folder, *folder.rglob("*")]:
        os.utime(p, (t, t), follow_symlinks=False)


def _cut_short(src: Path, dst: Path, name: str, size: int | None) -> Path:
    """A copy of ``src`` as a crash mid-copy leaves it: ``name`` truncated to ``size`` bytes,
    or missing (None), as object storage shows a file not yet uploaded."""
    shutil.copytree(src, dst)
    if size is None:
        (dst / name).unlink()
    else:
        with open(dst / name, "r+b") as f:
            f.truncate(size)
    return dst


@pytest.mark.parametrize(
    ("name", "size"),
    [(WEIGHTS, 3_000_000), (OPTIM, 100), (WEIGHTS, 4), (META, 50), (OPTIM_JSON, 0), (OPTIM, None)],
)
def test_a_copy_cut_short_is_told_from_a_whole_one(whole, tmp_path, name, size):
    assert not is_cut_short(whole)
    assert is_cut_short(_cut_short(whole, tmp_path / "cut", name, size))


def test_an_empty_folder_is_cut_short_and_another_versions_checkpoint_is_whole(whole, tmp_path):
    (tmp_path / "empty").mkdir()  # a crash right after Ray created the folder
    assert is_cut_short(tmp_path / "empty")
    other = tmp_path / "v2"
    shutil.copytree(whole, other)
    meta = json.loads((other / META).read_text())
    (other / META).write_text(json.dumps({**meta, "format_version": 2}))
    assert not is_cut_short(other)  # whole: resume refuses it, pruning must not take it for junk


@pytest.fixture
def run(whole, tmp_path) -> Path:
    """A run folder an hour and more after a crash: Ray recorded RECORDED, the run resumes from
    RESUMED (whole, never recorded: its driver died before recording it), NEWEST was cut short
    by the crash and OLDEST is a whole copy Ray's record no longer names (set aside)."""
    run = tmp_path / "t"
    run.mkdir()
    for name in (OLDEST, RECORDED, RESUMED):
        shutil.copytree(whole, run / name)
    _cut_short(whole, run / NEWEST, WEIGHTS, 1_000_000)
    _record(run, RECORDED)
    for name in (OLDEST, RECORDED, RESUMED, NEWEST):
        _age(run / name, QUIET_S + 60)
    return run


def _names(run: Path) -> set[str]:
    return {p.name for p in run.glob("checkpoint_*") if p.is_dir()}


def test_before_the_run_only_the_copy_cut_short_goes(run, caplog):
    size = sum(f.stat().st_size for f in (run / NEWEST).iterdir())
    with caplog.at_level(logging.INFO, logger="pipelines.stray_checkpoints"):
        pruned = prune_stray_checkpoints(str(run), restored=str(run / RESUMED), finished=False)
    assert pruned.folders == (NEWEST,) and pruned.freed_bytes == size
    assert _names(run) == {OLDEST, RECORDED, RESUMED}
    lines = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
    assert len(lines) == 1 and NEWEST in lines[0] and "cut short" in lines[0]


def test_after_the_run_whole_folders_older_than_rays_newest_go_too(run, whole):
    # the run went on and Ray recorded its new checkpoint
    shutil.copytree(whole, run / "checkpoint_2026-01-01_10-08-00.000001")
    _record(run, RECORDED, "checkpoint_2026-01-01_10-08-00.000001")
    pruned = prune_stray_checkpoints(str(run), restored=str(run / RESUMED), finished=True)
    assert pruned.folders == (OLDEST, NEWEST)
    # Ray's own (even an older one) and the resume point stay
    assert _names(run) == {RECORDED, RESUMED, "checkpoint_2026-01-01_10-08-00.000001"}


def test_a_folder_ray_recorded_stays_even_cut_short(run):
    _record(run, RECORDED, NEWEST)  # Ray would refuse to start on a record naming a deleted one
    prune_stray_checkpoints(str(run), restored=str(run / RESUMED), finished=True)
    assert NEWEST in _names(run)


def test_nothing_goes_without_a_newer_whole_checkpoint_ray_recorded(run):
    _record(run)  # the record was set aside: nothing newer is known good
    pruned = prune_stray_checkpoints(str(run), restored=str(run / RESUMED), finished=True)
    assert pruned.folders == (NEWEST,)  # only the copy cut short
    assert _names(run) == {OLDEST, RECORDED, RESUMED}


def test_a_folder_written_within_the_quiet_time_stays(run, caplog):
    # another driver of the same run name may be copying into it right now
    _age(run / NEWEST, 60)
    with caplog.at_level(logging.INFO, logger="pipelines.stray_checkpoints"):
        pruned = prune_stray_checkpoints(str(run), restored=str(run / RESUMED), finished=True)
    assert NEWEST in _names(run) and NEWEST not in pruned.folders
    assert "written 60 s ago" in caplog.text


def test_an_unreadable_record_prunes_nothing(run):
    (run / RAY_CHECKPOINT_SNAPSHOT).write_text('{"checkpoint_results": [')
    assert recorded_checkpoints(str(run)) is None
    pruned = prune_stray_checkpoints(str(run), restored=None, finished=True)
    assert not pruned.folders and NEWEST in _names(run)


def test_nothing_outside_the_runs_checkpoint_folders_is_touched(run, whole, tmp_path):
    # a symlinked checkpoint_* pointing elsewhere, a file named like a checkpoint, other folders
    elsewhere = _cut_short(whole, tmp_path / "elsewhere", OPTIM, None)
    (run / "checkpoint_2026-01-01_10-07-00.000001").symlink_to(elsewhere)
    (run / "checkpoint_2026-01-01_10-07-30.000001").write_text("not a folder")
    _cut_short(whole, run / "notes", WEIGHTS, None)
    for p in (elsewhere, run / "notes"):
        _age(p, QUIET_S + 60)
    prune_stray_checkpoints(str(run), restored=str(run / RESUMED), finished=True)
    assert sorted(p.name for p in elsewhere.iterdir()) == [META, OPTIM_JSON, WEIGHTS]
    assert (run / "checkpoint_2026-01-01_10-07-00.000001").is_symlink()
    assert (run / "checkpoint_2026-01-01_10-07-30.000001").is_file()
    assert (run / "notes").is_dir() and (run / RAY_CHECKPOINT_SNAPSHOT).is_file()


def test_a_run_on_a_uri_is_pruned_the_same(run):
    # file:// goes through pyarrow's URI code path, as s3:// and gs:// do
    pruned = prune_stray_checkpoints(
        run.as_uri(), restored=(run / RESUMED).as_uri(), finished=False
    )
    assert pruned.folders == (NEWEST,) and _names(run) == {OLDEST, RECORDED, RESUMED}


def test_a_finished_run_on_an_s3_compatible_store_keeps_the_metrics_ray_recorded(tmp_path):
    # a re-run of a finished run takes the metrics Ray recorded with the checkpoint it resumes
    # from; on an S3-compatible store that checkpoint's location carries the store's query
    # (?scheme=...&endpoint_override=...), which the checkpoint's name was read with, so no
    # record matched and the re-run printed no final loss
    from pipelines.pretrain import already_trained
    from radjepa.resume import ResumePoint

    run = tmp_path / "t"
    run.mkdir()
    _record(run, RECORDED)
    record = json.loads((run / RAY_CHECKPOINT_SNAPSHOT).read_text())
    for result in (record["latest_checkpoint_result"], *record["checkpoint_results"]):
        result["metrics"] = {"step": 2, "loss": 0.25}
    (run / RAY_CHECKPOINT_SNAPSHOT).write_text(json.dumps(record))
    query = "?scheme=http&endpoint_override=127.0.0.1:9000"
    resume = ResumePoint(f"s3://bucket/out/t/{RECORDED}{query}", 2, (), {}, 1)
    cfg = load_config(TINY, ["train.run_name=t", "train.steps=2"])
    result = already_trained(cfg, str(run), resume)
    assert result.metrics == {"step": 2, "loss": 0.25}

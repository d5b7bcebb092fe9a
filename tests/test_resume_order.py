"""Which checkpoint of a run is the newest: the highest step its folder records, never the
folder's name. Ray Train names the folders ``checkpoint_<local wall-clock time>`` of rank 0's
node without a time zone, so a daylight-saving fall-back (or a resume on a node in another
zone) sets the names back while the steps go on."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from radjepa.checkpoint import save_checkpoint
from radjepa.config import load_config
from radjepa.engine import Pretrainer
from radjepa.resume import (
    checkpoint_dirs,
    checkpoint_folders,
    find_resume_point,
    newest_intact_checkpoint,
)

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# steps 20 and 40 an hour apart across the fall-back: 01:55, then 01:05 again, then 01:15
AT_20 = "checkpoint_2026-10-25_01-55-00.000001"
AT_40 = "checkpoint_2026-10-25_01-05-00.000001"
AT_60 = "checkpoint_2026-10-25_01-15-00.000001"


def _cfg():
    return load_config(TINY, ["train.run_name=r"])


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """Real training checkpoints at steps 20, 40 and 60 whose names sort 40, 60, 20."""
    trainer = Pretrainer(_cfg(), "cpu")
    trainer.train_step(torch.randn(2, 1, 96, 96, generator=torch.Generator().manual_seed(0)))
    for step, name in ((20, AT_20), (40, AT_40), (60, AT_60)):
        save_checkpoint(tmp_path / "r" / name, trainer, step=step)
    return tmp_path / "r"


def test_the_newest_checkpoint_is_the_highest_step_not_the_latest_name(run_dir):
    assert [(c.name, c.step) for c in checkpoint_folders(str(run_dir))] == [
        (AT_60, 60),
        (AT_40, 40),
        (AT_20, 20),
    ]
    assert [name for name, _ in checkpoint_dirs(run_dir.as_uri())] == [AT_60, AT_40, AT_20]
    point = find_resume_point(_cfg(), str(run_dir))
    assert point.step == 60 and point.path.endswith(AT_60) and point.damaged == ()
    assert newest_intact_checkpoint(str(run_dir)) == str(run_dir / AT_60)
    assert newest_intact_checkpoint(str(run_dir), skip=[AT_60]) == str(run_dir / AT_40)


def test_a_folder_without_a_readable_step_is_met_first_and_skipped_as_damaged(run_dir):
    # cut short before its metadata was written: its step is unknown, and it is never the pick
    cut = run_dir / "checkpoint_2026-10-25_00-00-00.000001"
    cut.mkdir()
    (cut / "weights.safetensors").write_bytes(b"\0" * 100)
    assert [c.name for c in checkpoint_folders(str(run_dir))] == [cut.name, AT_60, AT_40, AT_20]
    point = find_resume_point(_cfg(), str(run_dir))
    assert point.step == 60 and point.damaged == (cut.name,)
    assert newest_intact_checkpoint(str(run_dir)) == str(run_dir / AT_60)


def test_equal_steps_fall_back_to_the_later_name(run_dir):
    import shutil

    again = run_dir / "checkpoint_2026-10-25_00-30-00.000001"
    shutil.copytree(run_dir / AT_60, again)
    later = run_dir / "checkpoint_2026-10-25_03-00-00.000001"
    shutil.copytree(run_dir / AT_60, later)
    assert [c.name for c in checkpoint_folders(str(run_dir))][:3] == [later.name, AT_60, again.name]


def test_a_finished_run_prunes_unrecorded_folders_of_earlier_steps(run_dir):
    # Ray recorded step 60 (01:15); the unrecorded whole step 20 is named later (01:55): by
    # name it looked newer and stayed in the run's storage for good
    from pipelines.stray_checkpoints import RAY_CHECKPOINT_SNAPSHOT, prune_stray_checkpoints

    result = {"version": 0, "checkpoint_dir_name": AT_60, "metrics": {"step": 60}}
    record = {
        "checkpoint_results": [result],
        "latest_checkpoint_result": result,
        "pending_training_results": [],
    }
    (run_dir / RAY_CHECKPOINT_SNAPSHOT).write_text(json.dumps(record))
    then = time.time() - 2 * 3600
    for p in run_dir.rglob("*"):
        os.utime(p, (then, then))
    pruned = prune_stray_checkpoints(str(run_dir), restored=str(run_dir / AT_40), finished=True)
    assert pruned.folders == (AT_20,)
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == [AT_40, AT_60]


def test_restore_point_compares_steps_not_names(run_dir):
    # after a worker failure Ray offers what this run last reported: a higher step than the
    # driver's pick wins whatever its name; a lower or damaged one loses to the pick
    import ray.train

    from pipelines.restore import restore_point

    pick = str(run_dir / AT_40)
    newer = ray.train.Checkpoint(str(run_dir / AT_60))  # its name sorts before the pick's...
    older = ray.train.Checkpoint(str(run_dir / AT_20))  # ... and this one's after it
    assert restore_point(newer, pick, ()) is newer
    assert restore_point(older, pick, ()).path == pick
    assert restore_point(newer, pick, (AT_60,)).path == pick
    assert restore_point(None, pick, ()).path == pick
    assert restore_point(older, None, ()) is older
    same = ray.train.Checkpoint(pick)
    assert restore_point(same, pick, ()) is same  # at least as new: Ray's offer
    (run_dir / AT_60 / "meta.json").unlink()  # an offer damaged since Ray recorded it
    assert restore_point(newer, pick, ()).path == pick


def test_a_restored_folder_is_reported_again_only_above_ray_s_step(run_dir):
    # the group restored the newest intact folder: Ray is told of it only when it is newer
    # than Ray's offer; reporting an older one made it the run's latest checkpoint
    import ray.train

    from pipelines.restore import _unrecorded

    at_60 = ray.train.Checkpoint(str(run_dir / AT_60))
    at_20 = ray.train.Checkpoint(str(run_dir / AT_20))
    assert _unrecorded(at_60, at_20, str(run_dir / AT_60))  # named earlier, a higher step
    assert not _unrecorded(at_20, at_60, str(run_dir / AT_20))  # named later, a lower step
    assert _unrecorded(at_60, None, str(run_dir / AT_60))
    assert not _unrecorded(at_60, at_60, str(run_dir / AT_60))


class _ReadFailsOnce:
    """The run folder's filesystem, failing the first read of one file as an object store's
    throttled GET does (a retry reads it whole)."""

    def __init__(self, fs, failing: str, failed: list[str]) -> None:
        self._fs, self._failing, self._failed = fs, failing, failed

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def open_input_stream(self, path):
        if path.endswith(self._failing) and not self._failed:
            self._failed.append(path)
            raise OSError("When reading information for key: AWS Error SLOW_DOWN (503)")
        return self._fs.open_input_stream(path)


def test_a_step_the_storage_failed_to_read_stops_the_resume(run_dir, monkeypatch):
    # one failed read of step 20's meta.json sorted its folder with the cut-short ones, first;
    # the resume then read it whole and continued from step 20, passing over step 60
    from radjepa import locations
    from radjepa.resume import ResumeError

    real = locations.filesystem
    failed: list[str] = []

    def flaky(location):
        fs, root = real(location)
        return _ReadFailsOnce(fs, f"{AT_20}/meta.json", failed), root

    monkeypatch.setattr(locations, "filesystem", flaky)
    with pytest.raises(ResumeError, match=f"cannot read the step of checkpoint .*{AT_20}"):
        find_resume_point(_cfg(), str(run_dir))
    assert failed
    failed.clear()
    with pytest.raises(ResumeError, match="re-run when the storage answers"):
        newest_intact_checkpoint(str(run_dir))
    # a folder with no meta.json at all records no step: cut short, not a storage failure
    (run_dir / AT_20 / "meta.json").unlink()
    assert find_resume_point(_cfg(), str(run_dir)).step == 60


def test_an_offer_whose_step_cannot_be_read_is_not_passed_over(run_dir):
    # Ray's offer (step 60) whose meta.json the storage fails to read is not known to be
    # older: restoring the driver's older pick (step 40) redid 20 steps
    import ray.train

    from pipelines.restore import _unrecorded, restore_point

    meta = run_dir / AT_60 / "meta.json"
    meta.unlink()
    meta.mkdir()  # a read the storage refuses (not a missing file)
    offered = ray.train.Checkpoint(str(run_dir / AT_60))
    assert restore_point(offered, str(run_dir / AT_40), ()) is offered
    at_40 = ray.train.Checkpoint(str(run_dir / AT_40))
    assert not _unrecorded(at_40, offered, str(run_dir / AT_40))


def test_every_rank_gets_a_location_it_can_open_on_an_object_store():
    # rank 0 passed on the picked Checkpoint's path, which on an object store has lost its
    # scheme ("bucket/runs/..."): every rank failed to open it, on every retry
    import ray.train

    from pipelines.restore import restore_decision

    newest = "gs://bucket/runs/r/checkpoint_2026-10-25_01-15-00.000001"
    use_offered, location, unrecorded = restore_decision(None, newest, None, ())
    assert (use_offered, location, unrecorded) == (False, newest, True)
    assert ray.train.Checkpoint(location).path == newest.removeprefix("gs://")
    pick = "gs://bucket/runs/r/checkpoint_2026-10-25_01-05-00.000001"
    assert restore_decision(None, None, pick, ()) == (False, pick, False)
    assert restore_decision(None, None, None, ()) == (False, None, False)

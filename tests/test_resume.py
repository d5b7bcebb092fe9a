"""What a re-run of a run name resumes from, decided in the driver before any Ray work: the
newest checkpoint that reads cleanly, and only with a config the checkpoint can continue."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from radjepa.checkpoint import load_checkpoint, save_checkpoint
from radjepa.config import load_config
from radjepa.engine import Pretrainer
from radjepa.resume import (
    ResumeError,
    check_resume_config,
    check_resume_workers,
    find_resume_point,
    newest_intact_checkpoint,
)

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(*sets: str):
    return load_config(TINY, ["train.run_name=r", *sets])


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run folder with real training checkpoints at steps 1 and 2, named as Ray Train names
    them (``checkpoint_<timestamp>``: the names sort in reporting order)."""
    trainer = Pretrainer(_cfg(), "cpu")
    gen = torch.Generator().manual_seed(0)
    for name in ("checkpoint_2026-01-01_10-00-00.000001", "checkpoint_2026-01-01_10-05-00.000001"):
        trainer.train_step(torch.randn(2, 1, 96, 96, generator=gen))
        save_checkpoint(tmp_path / "r" / name, trainer)
    return tmp_path / "r"


def test_a_new_run_has_no_resume_point(tmp_path):
    assert find_resume_point(_cfg(), str(tmp_path / "r")) is None


def test_resumes_from_the_newest_checkpoint(run_dir):
    point = find_resume_point(_cfg(), str(run_dir))
    assert point is not None and point.step == 2 and point.damaged == ()
    assert point.path.endswith("10-05-00.000001")


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(run_dir, caplog):
    latest = run_dir / "checkpoint_2026-01-01_10-05-00.000001"
    with open(latest / "weights.safetensors", "r+b") as f:
        f.truncate(1000)
    with caplog.at_level(logging.WARNING, logger="radjepa.resume"):
        point = find_resume_point(_cfg(), run_dir.as_uri())  # a URI, as on object storage
    assert point.step == 1 and point.damaged == (latest.name,)
    assert point.path == (run_dir / "checkpoint_2026-01-01_10-00-00.000001").as_uri()
    assert any(latest.name in r.getMessage() for r in caplog.records)


def test_a_restarted_worker_group_finds_the_newest_intact_folder(run_dir, tmp_path):
    # what rank 0 of a group restarted mid-run looks for beside Ray's record (which misses a
    # checkpoint reported within a poll of the failure): no config check, damaged ones skipped
    newest, older = (str(run_dir / n) for n in sorted(p.name for p in run_dir.iterdir())[::-1])
    assert newest_intact_checkpoint(str(run_dir)) == newest
    assert newest_intact_checkpoint(str(run_dir), skip=[Path(newest).name]) == older
    with open(Path(newest) / "weights.safetensors", "r+b") as f:
        f.truncate(1000)  # cut short by the failure
    assert newest_intact_checkpoint(str(run_dir)) == older
    assert newest_intact_checkpoint(str(tmp_path / "not-yet")) is None  # a run's first start


def test_a_checkpoint_the_storage_fails_to_read_is_not_skipped_as_damaged(run_dir, monkeypatch):
    """An object store's throttling (or a network error, a permission) on the newest checkpoint
    made the resume skip it as damaged: its steps were trained again, and the good folder was
    later removed as a stray. Now the run stops in one line, and a restarted worker group falls
    back to Ray's offer as it does when the listing fails."""
    from radjepa import locations

    real = locations.filesystem

    class Throttled:
        def __init__(self, fs):
            self.fs = fs

        def open_input_stream(self, path):
            if "10-05-00" in path:
                raise OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce")
            return self.fs.open_input_stream(path)

        def __getattr__(self, name):
            return getattr(self.fs, name)

    def throttled(location):
        fs, path = real(location)
        return Throttled(fs), path

    monkeypatch.setattr(locations, "filesystem", throttled)
    with pytest.raises(ResumeError) as err:
        find_resume_point(_cfg(), str(run_dir))
    said = str(err.value)
    assert "\n" not in said and "checkpoint_2026-01-01_10-05-00.000001" in said
    assert "SLOW_DOWN" in said and "re-run when the storage answers" in said
    with pytest.raises(ResumeError):
        newest_intact_checkpoint(str(run_dir))


def test_no_readable_checkpoint_is_one_line_naming_them(run_dir):
    for ckpt in run_dir.iterdir():
        (ckpt / "optimizer.json").write_text("{not json")
    with pytest.raises(ResumeError, match="no checkpoint of .* can be read") as err:
        find_resume_point(_cfg(), str(run_dir))
    assert "\n" not in str(err.value) and "10-05-00" in str(err.value)


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        # a newer radjepa's checkpoint format (e.g. a cluster image rolled back mid-run)
        (lambda meta: meta.update(format_version=2), "written by a newer version of radjepa"),
        # a config key this version's model schema does not have
        (lambda meta: meta["config"]["model"].update(gated_mlp=True), "does not fit this version"),
    ],
    ids=["newer format", "unknown model key"],
)
def test_a_checkpoint_of_another_version_is_not_skipped_as_damaged(run_dir, edit, says):
    # it was treated as damaged and skipped: the re-run went on from the checkpoint before it,
    # silently dropping the newer one's steps (and when none was older, advised deleting them)
    latest = run_dir / "checkpoint_2026-01-01_10-05-00.000001"
    meta = json.loads((latest / "meta.json").read_text())
    edit(meta)
    (latest / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ResumeError, match=says) as err:
        find_resume_point(_cfg(), str(run_dir))
    message = str(err.value)
    assert "\n" not in message and latest.name in message and "delete" not in message
    assert "with the radjepa version that wrote it" in message


def test_another_model_is_refused_in_one_line(run_dir):
    with pytest.raises(ResumeError, match=r"another model \(model.depth 4 -> 2\)") as err:
        find_resume_point(_cfg("model.depth=2"), str(run_dir))
    assert "\n" not in str(err.value)
    # the attention kernel is no part of the weights
    assert find_resume_point(_cfg("model.attention=manual"), str(run_dir)).step == 2


def test_another_drop_path_is_a_training_setting_not_another_model(run_dir):
    # it changes no weight shape: it was refused as "another model" even with permission
    with pytest.raises(ResumeError, match=r"other settings \(model.drop_path 0.0 -> 0.1\)"):
        find_resume_point(_cfg("model.drop_path=0.1"), str(run_dir))
    cfg = _cfg("model.drop_path=0.1", "train.allow_config_change=true")
    point = find_resume_point(cfg, str(run_dir))
    assert point.step == 2 and point.changed == {"model.drop_path": (0.0, 0.1)}
    trainer = Pretrainer(cfg, "cpu")  # what the workers then load it into
    load_checkpoint(point.path, trainer)
    assert trainer.step == 2


def test_changed_optimisation_settings_need_explicit_permission(run_dir, caplog):
    changes = ["optim.betas=[0.8, 0.99]", "ema.start=0.99", "train.seed=3", "masks.min_keep=5"]
    with pytest.raises(ResumeError) as err:
        find_resume_point(_cfg(*changes), str(run_dir))
    text = str(err.value)
    for key in ("optim.betas", "ema.start", "train.seed", "masks.min_keep"):
        assert key in text
    assert "train.allow_config_change=true" in text and "\n" not in text

    point = find_resume_point(_cfg(*changes, "train.allow_config_change=true"), str(run_dir))
    assert set(point.changed) == {"optim.betas", "ema.start", "train.seed", "masks.min_keep"}
    assert point.changed["ema.start"] == (0.996, 0.99)


@pytest.mark.parametrize(
    "key",
    [
        "data.crop_scale=[0.5, 1.0]",
        "train.batch_size=4",
        # which images are trained on and which are held out (RankMe's set): swapped mid-run
        "data.holdout_fraction=0.2",
    ],
)
def test_crops_batch_size_and_holdout_are_guarded_too(key):
    with pytest.raises(ResumeError, match=key.split("=")[0]):
        check_resume_config(_cfg(), _cfg(key), 8)


def test_more_steps_and_bookkeeping_changes_resume_freely_and_the_schedule_jump_is_said(caplog):
    # a run continued past its end with more steps restarts its LR mid-cosine (a warm restart,
    # no warmup): it was an INFO that the schedules "now span" the new length
    from radjepa.schedules import schedule_at

    new = _cfg("train.steps=120", "train.log_every=1", "train.checkpoint_every=7")
    with caplog.at_level(logging.WARNING, logger="radjepa.resume"):
        assert check_resume_config(_cfg(), new, 60) == {}
    (said,) = [r.getMessage() for r in caplog.records]
    was, now = schedule_at(60, _cfg()), schedule_at(60, new)
    assert now.lr > 10 * was.lr and now.momentum < was.momentum
    assert "train.steps 60 -> 120 re-times the schedules from step 60" in said
    assert f"lr {was.lr:.3g} -> {now.lr:.3g}" in said
    assert f"EMA momentum {was.momentum:.6g} -> {now.momentum:.6g} (no new warmup)" in said
    caplog.clear()  # a hundred times the steps: the resume step lands in the new warmup
    with caplog.at_level(logging.WARNING, logger="radjepa.resume"):
        check_resume_config(_cfg(), _cfg("train.steps=6000"), 60)
    assert "(back in the warmup, to step " in caplog.records[0].getMessage()


@pytest.mark.parametrize("name", ["weights.safetensors", "optimizer.safetensors"])
def test_a_file_one_byte_short_is_found_from_headers_alone(run_dir, name):
    # the driver's check reads kilobytes (headers and JSON), never the tensors
    from radjepa.checkpoint import CheckpointError, check_resumable

    latest = sorted(run_dir.iterdir())[-1]
    step, saved = check_resumable(latest.as_uri())
    assert step == 2 and saved.model == _cfg().model
    size = (latest / name).stat().st_size
    with open(latest / name, "r+b") as f:
        f.truncate(size - 1)
    with pytest.raises(CheckpointError, match=f"{name}: {size - 1} bytes but its header"):
        check_resumable(str(latest))


def test_resuming_on_another_number_of_ranks_needs_permission(run_dir):
    # the global batch is batch_size x ranks; num_workers=0 resolves on the cluster in hand
    point = find_resume_point(_cfg(), str(run_dir))
    was = point.num_workers
    assert was >= 1
    check_resume_workers(point, _cfg(f"train.num_workers={was}"))
    with pytest.raises(ResumeError, match=f"trained on {was} workers; this run would use"):
        check_resume_workers(point, _cfg(f"train.num_workers={was + 1}"))
    check_resume_workers(
        point, _cfg(f"train.num_workers={was + 1}", "train.allow_config_change=true")
    )

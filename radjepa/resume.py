"""Which checkpoint a re-run continues from, and whether the new config may continue it.

Checked by the driver before any cluster work: Ray Train restores its latest checkpoint
whatever its state, and a config that silently differs from the checkpoint's turns the run
into another experiment under the same name. Plain pyarrow filesystems, so local folders and
object storage are read the same way.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from radjepa import locations
from radjepa.config import Config, flatten
from radjepa.error_text import error_line

__all__ = [
    "NOT_THE_MODEL",
    "RESUME_GUARDED",
    "CheckpointFolder",
    "ResumeError",
    "ResumePoint",
    "check_resume_config",
    "check_resume_workers",
    "checkpoint_dirs",
    "checkpoint_folders",
    "checkpoint_step",
    "find_resume_point",
    "newest_intact_checkpoint",
]

log = logging.getLogger(__name__)

# Settings the optimisation in a checkpoint depends on: a resume with other values continues a
# different experiment than the one recorded, so it needs train.allow_config_change. The
# hold-out fraction decides which images are trained on and which are held out (the RankMe
# set): another one swaps seen and unseen images mid-run. Drop-path is a training setting of
# the model, no part of its weights.
RESUME_GUARDED = (
    "masks.",
    "ema.",
    "optim.",
    "data.crop_size",
    "data.crop_scale",
    "data.crop_ratio",
    "data.holdout_fraction",
    "model.drop_path",
    "train.seed",
    "train.batch_size",
)

# model settings that are no part of the weights: another value is no other model
NOT_THE_MODEL = ("model.attention", "model.drop_path")


class ResumeError(ValueError):
    """The run's checkpoints cannot be continued with this config (phrased for the user)."""


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a re-run continues from, the damaged ones it skips, and the guarded
    keys the new config changes (only non-empty with train.allow_config_change)."""

    path: str
    step: int
    damaged: tuple[str, ...]
    changed: dict[str, tuple[Any, Any]]
    num_workers: int  # the ranks it was trained with (train.num_workers=0 resolves per cluster)


@dataclass(frozen=True)
class CheckpointFolder:
    """A checkpoint folder of a run and the step its ``meta.json`` records (None: none that
    reads, as in a folder cut short before its metadata was written, or a damaged one)."""

    name: str
    location: str
    step: int | None


def checkpoint_step(location: str, fs: Any = None) -> int | None:
    """The step recorded in the ``meta.json`` of the checkpoint folder at ``location`` (a path
    on ``fs`` when given, else a folder or URI), or None when there is none: the file is
    missing or holds no step (a folder cut short, or a damaged one, which
    :func:`check_resumable` then names and says why). A read the storage failed (a network
    error, throttling) raises :class:`~radjepa.checkpoint.CheckpointUnreadable`: nothing is
    known of that folder's step, and taken for none it sorted the folder with the cut-short
    ones, where a resume that then read it whole continued from its older step."""
    import json

    from radjepa.checkpoint import META, CheckpointUnreadable

    try:
        if fs is None:
            fs, location = locations.filesystem(location)
        with fs.open_input_stream(f"{location.rstrip('/')}/{META}") as f:
            step = json.loads(f.read().decode("utf-8")).get("step")
    except FileNotFoundError:
        return None
    except (ValueError, AttributeError):  # not JSON, not UTF-8, not an object
        return None
    except OSError as err:
        if err.errno == errno.ENOENT:
            return None
        said = f"cannot read the step of checkpoint {location}: {err}"
        raise CheckpointUnreadable(said) from None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def checkpoint_folders(run_dir: str) -> list[CheckpointFolder]:
    """The run's checkpoint folders, newest first by the step each records, the name breaking
    ties. Ray Train names them ``checkpoint_<local wall-clock time>`` of rank 0's node, with no
    time zone: after a daylight-saving fall-back, or a resume on a node in another zone, the
    names no longer sort in step order, and a resume picked an older step. Folders that record
    no step come first, so that every reader meets them before the intact ones: they are cut
    short or damaged (skipped with a warning, and taken out of Ray's record). A step the
    storage failed to read is a :class:`ResumeError`, as a listing that failed is: the folder
    may be the newest, and a resume stops rather than pass over it."""
    import pyarrow.fs as pafs

    try:
        fs, root = locations.filesystem(run_dir)
        entries = fs.get_file_info(pafs.FileSelector(root.rstrip("/"), allow_not_found=True))
    except (OSError, ValueError) as err:
        raise ResumeError(f"cannot list the checkpoints in {run_dir}: {err}") from None
    from radjepa.checkpoint import CheckpointUnreadable

    try:
        folders = [
            CheckpointFolder(
                e.base_name,
                locations.join_location(run_dir, e.base_name),
                checkpoint_step(e.path, fs),
            )
            for e in entries
            if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_")
        ]
    except CheckpointUnreadable as err:
        raise ResumeError(
            f"{err}: re-run when the storage answers (the checkpoints cannot be put in step "
            "order without it)"
        ) from None
    return sorted(folders, key=lambda c: (c.step is None, c.step or 0, c.name), reverse=True)


def checkpoint_dirs(run_dir: str) -> list[tuple[str, str]]:
    """(name, location) of the run's checkpoint folders, newest first
    (:func:`checkpoint_folders`' order)."""
    return [(c.name, c.location) for c in checkpoint_folders(run_dir)]


def newest_intact_checkpoint(run_dir: str, skip: Sequence[str] = ()) -> str | None:
    """The newest checkpoint folder of ``run_dir`` that reads cleanly (but those named in
    ``skip``), or None: what a worker group restarted mid-run continues from when it is newer
    than what Ray recorded (``pipelines.restore.restore_point``). The folder is this run's,
    so its config is the run's and is not checked again. A folder the storage failed to read
    is a :class:`ResumeError`, as a listing that failed is: not a reason to pass over it."""
    from radjepa.checkpoint import CheckpointError, CheckpointUnreadable, check_resumable

    for name, location in checkpoint_dirs(run_dir):
        if name in skip:
            continue
        try:
            check_resumable(location)
        except CheckpointError:  # cut short by the failure that restarted the group
            continue
        except CheckpointUnreadable as err:
            raise ResumeError(str(err)) from None
        return location
    return None


def find_resume_point(cfg: Config, run_dir: str) -> ResumePoint | None:
    """The newest checkpoint of ``run_dir`` that reads cleanly, checked against ``cfg``. A
    damaged one (a disk that filled up, an upload cut short) otherwise failed every retry and
    every re-run although an intact older checkpoint lay beside it. None for a new run. A
    checkpoint the storage fails to read (a network error, throttling) stops the run in one line
    instead: skipped, its steps were redone and the good folder later removed as a stray."""
    from radjepa.checkpoint import (
        CheckpointError,
        CheckpointUnreadable,
        CheckpointVersionError,
        check_resumable,
    )

    damaged: list[str] = []
    for name, location in checkpoint_dirs(run_dir):
        try:
            step, saved = check_resumable(location)
        except CheckpointVersionError as err:
            # whole, but not this version's to read: an older checkpoint would drop its steps
            raise ResumeError(
                f"{error_line(err)}: resume run {run_dir} with the radjepa version that "
                "wrote it (continuing from an earlier checkpoint would discard its steps), or "
                "choose another train.run_name"
            ) from None
        except CheckpointUnreadable as err:
            raise ResumeError(
                f"{error_line(err)}: re-run when the storage answers (a checkpoint that "
                "cannot be read just now is not skipped, or its steps would be trained again)"
            ) from None
        except CheckpointError as err:
            log.warning("checkpoint %s is damaged, skipping it: %s", location, err)
            damaged.append(name)
            continue
        if damaged:
            log.warning(
                "resuming from %s (step %d), the newest checkpoint that reads cleanly: %s "
                "cannot be read",
                name,
                step,
                ", ".join(damaged),
            )
        changed = check_resume_config(saved, cfg, step)
        return ResumePoint(location, step, tuple(damaged), changed, saved.train.num_workers)
    if damaged:
        raise ResumeError(
            f"no checkpoint of {run_dir} can be read ({', '.join(damaged)}): delete them to "
            "start the run over, or choose another train.run_name"
        )
    return None


def _describe(diff: dict[str, tuple[Any, Any]], keys: list[str]) -> str:
    return ", ".join(f"{k} {diff[k][0]!r} -> {diff[k][1]!r}" for k in keys)


def _say_schedule_jump(saved: Config, cfg: Config, step: int) -> None:
    """Warn with the values a new ``train.steps`` moves the schedules by at the resume step.

    Every schedule is a function of ``step / train.steps``: continuing a finished run with more
    steps restarts the LR from mid-cosine with no warmup and lowers the EMA momentum from its
    end value (a warm restart, the kind of shock behind a loss that falls, then rises), and a
    change mid-run moves all three at once. Allowed (the documented way to train on), but said
    with its numbers, not as a note that the schedules "now span" the new length."""
    from radjepa.schedules import schedule_at, warmup_steps

    was = schedule_at(min(step, saved.train.steps), saved)
    now = schedule_at(step, cfg)
    warm = warmup_steps(cfg)
    # the warmup is a fraction of train.steps: far more steps can put the resume step back in it
    warmup = f"back in the warmup, to step {warm}" if step < warm else "no new warmup"
    log.warning(
        "run %s: train.steps %d -> %d re-times the schedules from step %d: lr %.3g -> %.3g, "
        "weight decay %.3g -> %.3g, EMA momentum %.6g -> %.6g (%s). To train longer "
        "without this jump, start a new run with the longer train.steps",
        cfg.train.run_name,
        saved.train.steps,
        cfg.train.steps,
        step,
        was.lr,
        now.lr,
        was.weight_decay,
        now.weight_decay,
        was.momentum,
        now.momentum,
        warmup,
    )


def check_resume_config(saved: Config, cfg: Config, step: int) -> dict[str, tuple[Any, Any]]:
    """What ``cfg`` changes against the config a run's checkpoint was trained with. Another
    model cannot load the weights at all; other masks, EMA, optimizer, crops, hold-out, drop-path,
    seed or batch size would silently turn the run into a different experiment, so they need
    ``train.allow_config_change``; more (or fewer) steps re-time the schedules, with a
    warning that gives the jump."""
    old, new = flatten(saved), flatten(cfg)
    diff = {
        k: (old.get(k), new.get(k))
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    }
    name = cfg.train.run_name
    model = [k for k in diff if k.startswith("model.") and k not in NOT_THE_MODEL]
    if model:
        raise ResumeError(
            f"run {name} has a checkpoint at step {step} of another model "
            f"({_describe(diff, model)}): resume with its model settings or choose another "
            "train.run_name"
        )
    guarded = [k for k in diff if k.startswith(RESUME_GUARDED)]
    if guarded and not cfg.train.allow_config_change:
        raise ResumeError(
            f"run {name} has a checkpoint at step {step} trained with other settings "
            f"({_describe(diff, guarded)}): use the run's settings, set "
            "train.allow_config_change=true to continue with the new ones, or choose another "
            "train.run_name"
        )
    if "train.steps" in diff:
        _say_schedule_jump(saved, cfg, step)
    if guarded:
        log.warning(
            "run %s resumes at step %d with changed settings (train.allow_config_change): %s",
            name,
            step,
            _describe(diff, guarded),
        )
    return {k: diff[k] for k in guarded}


def check_resume_workers(resume: ResumePoint, cfg: Config) -> None:
    """The global batch is train.batch_size per rank times the ranks: resuming on another
    number of ranks (``num_workers=0`` resolves on the cluster in hand) changes it like a
    batch-size change does, which needs train.allow_config_change too."""
    was, now = resume.num_workers, cfg.train.num_workers
    if was == now or was == 0:
        return
    if not cfg.train.allow_config_change:
        raise ResumeError(
            f"run {cfg.train.run_name} has a checkpoint at step {resume.step} trained on {was} "
            f"workers; this run would use {now} (global batch {was * cfg.train.batch_size} -> "
            f"{now * cfg.train.batch_size}): set train.num_workers={was}, set "
            "train.allow_config_change=true, or choose another train.run_name"
        )
    log.warning(
        "run %s resumes at step %d on %d workers instead of %d (train.allow_config_change)",
        cfg.train.run_name,
        resume.step,
        now,
        was,
    )

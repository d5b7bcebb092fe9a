"""Ray Train's record of a pretraining run's checkpoints, and the folders it will never remove.

Ray copies a checkpoint straight into its final folder (``run_dir/checkpoint_<timestamp>``),
then records it in ``checkpoint_manager_snapshot.json``; ``train.keep_checkpoints``
(``CheckpointConfig.num_to_keep``) only ever deletes folders named in that record. So a copy
cut short (a crash, a full disk), a checkpoint copied by a driver that died before recording
it, and every folder of a record set aside (unreadable: :func:`unrecord_deleted_checkpoints`)
stayed in the run's storage for good: on a disk that had filled up they kept it full after the
re-run.

What is removed, only among the ``checkpoint_*`` folders directly in the run folder:

- a folder cut short (:func:`radjepa.checkpoint.is_cut_short`): never a good copy;
- after a run that succeeded, a whole folder of an earlier step than the newest whole
  checkpoint Ray recorded: a newer good copy exists, and Ray's retention applies to it.

What never is: a folder Ray recorded (its record would name a deleted folder, and Ray refuses to
start on that), the checkpoint this run resumed from, anything when Ray's record cannot be read,
a folder the storage cannot tell about (a read error, no modification times), a symlink, and a
folder written to within :data:`QUIET_S`: another driver of the same run name (a duplicate
submission) may be copying into it. Works on any location the run writes to (a folder or a
pyarrow filesystem URI).

A damaged checkpoint Ray did record, which a resume skips, is taken out of the record first
(:func:`unrecord_checkpoints`): counted toward ``train.keep_checkpoints``, it made Ray delete a
good checkpoint in its place; out of it, it is a stray folder like the others. A checkpoint
folder deleted by hand is taken out of the record too (:func:`unrecord_deleted_checkpoints`):
Ray refuses to start on a record naming a folder that no longer exists.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from radjepa import locations

log = logging.getLogger(__name__)

# Ray Train's record of the checkpoints it reported, in the run folder
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"
# a folder written to this recently may be a copy in progress (object storage shows a large
# file only once uploaded, with the time its upload began): an hour is far longer than any
# checkpoint copy, and a stray folder left now is removed by a later run
QUIET_S = 3600.0


@dataclass(frozen=True)
class Pruned:
    """What :func:`prune_stray_checkpoints` removed."""

    folders: tuple[str, ...] = ()  # their names, oldest first
    freed_bytes: int = 0

    def __add__(self, other: Pruned) -> Pruned:
        return Pruned(self.folders + other.folders, self.freed_bytes + other.freed_bytes)


def recorded_checkpoints(run_dir: str) -> set[str] | None:
    """The checkpoint folder names Ray's record of ``run_dir`` holds (kept, latest, pending);
    empty without a record; None when there is one this code cannot read (cut short, or a
    format other than the pinned Ray's): then nothing can be said to be unrecorded."""
    text = locations.read_text(locations.join_location(run_dir, RAY_CHECKPOINT_SNAPSHOT))
    if text is None:
        return set()
    try:
        record = json.loads(text)
        results = [*record["checkpoint_results"], *record.get("pending_training_results", [])]
        if record.get("latest_checkpoint_result"):
            results.append(record["latest_checkpoint_result"])
        return {r["checkpoint_dir_name"] for r in results}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def recorded_metrics(run_dir: str, name: str) -> dict[str, Any] | None:
    """The metrics Ray recorded with the checkpoint folder ``name`` of ``run_dir`` (what its
    ``Result.metrics`` holds when that checkpoint is the run's latest); None when Ray's record
    does not hold it or cannot be read."""
    text = locations.read_text(locations.join_location(run_dir, RAY_CHECKPOINT_SNAPSHOT))
    if text is None:
        return None
    try:
        record = json.loads(text)
        results = [record.get("latest_checkpoint_result"), *record["checkpoint_results"]]
        for result in results:
            if result and result["checkpoint_dir_name"] == name:
                return dict(result["metrics"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return None


def unrecord_deleted_checkpoints(run_dir: str) -> bool:
    """Take the checkpoint folders that were deleted out of Ray's record of ``run_dir`` (the
    damaged one a warning named, or all of them, as the error for a run whose checkpoints are
    all damaged advises); True when the record changed.

    Ray refuses to start on a record naming a folder that no longer exists, with a traceback
    asking to delete the whole run folder, MLflow run id included. Out of the record, the run
    resumes from its newest checkpoint folder (``resume_from``) or starts over, and the
    checkpoints left still count toward ``train.keep_checkpoints``: Ray removes them in turn
    (a record set aside whole left them in the run's storage). With every recorded folder
    deleted the record is left empty, which Ray (pinned 2.60) loads as no checkpoint; its
    report count goes on. The record is replaced whole, as in :func:`unrecord_checkpoints`.

    A record that cannot be read (cut short by a full disk or a kill mid-write), or one that
    names deleted folders but cannot be rewritten (lists of unequal length, a full disk), is set
    aside as ``.stale``: Ray refuses to start on it, and nothing can be taken from it. A record in a
    format this code does not know is left for Ray to read."""
    from radjepa.resume import checkpoint_dirs

    location = locations.join_location(run_dir, RAY_CHECKPOINT_SNAPSHOT)
    text = locations.read_text(location)
    if text is None:
        return False
    try:
        record = json.loads(text)
    except ValueError:
        _set_aside(location)
        log.warning(
            "run %s: Ray's record of its checkpoints is unreadable (cut short?) and is set aside "
            "as %s.stale; the run resumes from its newest checkpoint folder that reads cleanly",
            run_dir,
            RAY_CHECKPOINT_SNAPSHOT,
        )
        return True
    try:  # Ray's own format (pinned 2.60): one we do not know is left for Ray to read
        named = {r["checkpoint_dir_name"] for r in record["checkpoint_results"]}
    except (KeyError, TypeError):
        return False
    on_disk = {name for name, _ in checkpoint_dirs(run_dir)}
    missing = sorted(named - on_disk)
    if not missing:
        return False
    outcome = "resumes from its newest checkpoint folder" if on_disk else "starts over"
    try:
        left, _ = _without(record, set(missing))
        _replace(location, left)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        # a storage too full to take the new record still renames: the run must not stop here
        _set_aside(location)
        log.warning(
            "run %s: %s deleted, so the run %s; Ray's record of its checkpoints cannot be "
            "rewritten (%s) and is set aside as %s.stale (older checkpoint folders are no "
            "longer removed by train.keep_checkpoints)",
            run_dir,
            ", ".join(missing),
            outcome,
            err,
            RAY_CHECKPOINT_SNAPSHOT,
        )
        return True
    log.warning(
        "run %s: %s deleted, so the run %s; taken out of Ray's checkpoint record (the "
        "checkpoints left still count toward train.keep_checkpoints)",
        run_dir,
        ", ".join(missing),
        outcome,
    )
    return True


def _set_aside(location: str) -> None:
    """Move Ray's record at ``location`` to ``.stale`` beside it (kept for a look, never read)."""
    fs, path = locations.filesystem(location)
    fs.move(path, path + ".stale")


def _replace(location: str, record: dict) -> None:
    """Write ``record`` over Ray's record at ``location`` whole: a new file moved over it (one
    object on object storage), so a failed write leaves the old record as it was."""
    fs, path = locations.filesystem(location)
    try:
        with fs.open_output_stream(path + ".new") as f:
            f.write(json.dumps(record).encode())
    except OSError:
        try:  # a part written on a full disk must not stay beside the record
            fs.delete_file(path + ".new")
        except OSError:
            pass
        raise
    fs.move(path + ".new", path)


# the lists of Ray's record (pinned 2.60) that name checkpoint folders without metrics
_RECORD_NAME_LISTS = (
    "validated_checkpoint_dir_names",
    "timed_out_validation_checkpoint_dir_names",
    "failed_validation_checkpoint_dir_names",
)


def unrecord_checkpoints(run_dir: str, names: Iterable[str]) -> tuple[str, ...]:
    """Take the checkpoint folders ``names`` out of Ray's record of ``run_dir``; the names
    taken out (the others were not recorded).

    For the damaged checkpoints a resume skips (:func:`radjepa.resume.find_resume_point`): Ray
    counted them toward ``train.keep_checkpoints`` and kept the newest, so the resumed run's
    first checkpoint made Ray delete the good one it resumed from and keep the damaged one.
    Out of the record they are stray folders: one cut short goes with
    :func:`prune_stray_checkpoints`, any other once a newer whole checkpoint is recorded; the
    folders themselves are not touched here (a storage that failed a read is not proof of
    damage). The record is replaced whole (a new file moved over it: one object on object
    storage), so a failed write leaves Ray's record as it was. Ray's latest checkpoint, if
    taken out, becomes the newest one left. A record in a format this code does not know, or
    one the storage cannot read or write, is left as it is: a warning says so."""
    names = set(names)
    location = locations.join_location(run_dir, RAY_CHECKPOINT_SNAPSHOT)
    try:
        text = locations.read_text(location)
        if text is None or not names:
            return ()
        record, dropped = _without(json.loads(text), names)
        if not dropped:
            return ()
        _replace(location, record)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning(
            "run %s: could not take the damaged %s out of Ray's checkpoint record (%s: %s); "
            "train.keep_checkpoints may count them until they rotate out",
            run_dir,
            ", ".join(sorted(names)),
            type(err).__name__,
            err,
        )
        return ()
    log.warning(
        "run %s: the damaged %s no longer count toward train.keep_checkpoints (taken out of "
        "Ray's checkpoint record, so Ray keeps the good checkpoints instead)",
        run_dir,
        ", ".join(dropped),
    )
    return dropped


def _without(record: dict, names: set[str]) -> tuple[dict, tuple[str, ...]]:
    """Ray's record (its JSON) less the results of the folders ``names``, and those dropped.
    KeyError, TypeError or ValueError when the record is not in the format this code knows."""

    def named(result: dict) -> bool:
        return result["checkpoint_dir_name"] in names

    results, indices = record["checkpoint_results"], record["checkpoint_report_indices"]
    pending, specs = record["pending_training_results"], record["pending_validation_specs"]
    if len(results) != len(indices) or len(pending) != len(specs):
        raise ValueError("Ray's checkpoint record has lists of unequal length")
    latest = record.get("latest_checkpoint_result")
    dropped = sorted({r["checkpoint_dir_name"] for r in results if named(r)})
    if not dropped:
        return record, ()
    kept = [(r, i) for r, i in zip(results, indices, strict=True) if not named(r)]
    waiting = [(r, s) for r, s in zip(pending, specs, strict=True) if not named(r)]
    out = dict(record)
    out["checkpoint_results"] = [r for r, _ in kept]
    out["checkpoint_report_indices"] = [i for _, i in kept]
    out["pending_training_results"] = [r for r, _ in waiting]
    out["pending_validation_specs"] = [s for _, s in waiting]
    for key in _RECORD_NAME_LISTS:
        if key in out:
            out[key] = [n for n in out[key] if n not in names]
    if latest is not None and named(latest):
        out["latest_checkpoint_result"] = max(kept, key=lambda k: k[1])[0] if kept else None
    return out, tuple(dropped)


def prune_stray_checkpoints(
    run_dir: str, *, restored: str | None, finished: bool, now: float | None = None
) -> Pruned:
    """Remove the stray checkpoint folders of ``run_dir`` (see the module docstring), logging
    each. ``restored``: the checkpoint this run resumes from (kept). ``finished``: the run
    succeeded, so whole folders older than Ray's newest recorded whole one go too; before the
    run only folders cut short do, the resume point not having been loaded yet. A problem with
    the storage is logged and leaves the folders: tidying never fails a run."""
    try:
        return _prune(run_dir, restored, finished, time.time() if now is None else now)
    except (OSError, ValueError) as err:
        log.warning("run %s: left its stray checkpoint folders: %s", run_dir, err)
        return Pruned()


def _prune(run_dir: str, restored: str | None, finished: bool, now: float) -> Pruned:
    from radjepa.checkpoint import is_cut_short
    from radjepa.resume import checkpoint_folders

    recorded = recorded_checkpoints(run_dir)
    if recorded is None:
        log.info("run %s: Ray's checkpoint record is unreadable; no folder is pruned", run_dir)
        return Pruned()
    keep = {locations.base_name(restored)} if restored else set()
    fs, root = locations.filesystem(run_dir)
    whole: dict[str, bool] = {}
    # by step, not name: Ray's names are local wall-clock times, which a DST fall-back or a
    # node in another time zone sets back (radjepa.resume.checkpoint_folders)
    order: dict[str, tuple[int, str] | None] = {}
    for folder in reversed(checkpoint_folders(run_dir)):  # oldest first
        name = folder.name
        order[name] = None if folder.step is None else (folder.step, name)
        try:
            whole[name] = not is_cut_short(folder.location)
        except OSError as err:  # unknown: neither removed nor counted as a good copy
            log.warning("checkpoint %s cannot be read, so it is kept: %s", folder.location, err)
    newest_at = max(
        (order[n] for n, ok in whole.items() if ok and n in recorded and order[n] is not None),
        default=None,
    )
    pruned = Pruned()
    for name, ok in whole.items():
        if name in recorded or name in keep:
            continue
        at = order[name]
        # a whole folder with no step that reads (another version's?) is not known older: kept
        older = newest_at is not None and at is not None and at < newest_at
        if ok and not (finished and older):
            continue
        location = locations.join_location(run_dir, name)
        path = f"{root.rstrip('/')}/{name}"
        size = _quiet_size(fs, path, location, now)
        if size is None:
            continue
        fs.delete_dir(path)
        why = (
            f"step {at[0]}, older than {newest_at[1]} (step {newest_at[0]}), which Ray recorded"
            if ok and at is not None and newest_at is not None
            else "cut short"
        )
        log.info("removed checkpoint folder %s (%s; not recorded by Ray)", location, why)
        pruned += Pruned((name,), size)
    return pruned


def _quiet_size(fs: pafs.FileSystem, path: str, location: str, now: float) -> int | None:
    """The bytes of the folder at ``path``, or None (it stays) when it is a symlink, tells no
    modification time, or was written to within :data:`QUIET_S`."""
    local = locations.local_path(location)
    if local is not None and os.path.islink(local):
        log.info("checkpoint %s is a symlink: left as it is", location)
        return None
    entries = [fs.get_file_info(path), *fs.get_file_info(pafs.FileSelector(path, recursive=True))]
    times = [e.mtime.timestamp() for e in entries if e.mtime is not None]
    if not times:
        log.info("checkpoint %s tells no modification time: left as it is", location)
        return None
    age = now - max(times)
    if age < QUIET_S:
        log.info(
            "checkpoint %s is incomplete or stray but was written %.0f s ago (another driver "
            "of this run may be copying it): left for a later run to remove",
            location,
            age,
        )
        return None
    return sum(e.size or 0 for e in entries if e.type == pafs.FileType.File)

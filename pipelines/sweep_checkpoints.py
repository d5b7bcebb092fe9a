"""Deleting the checkpoints of a finished sweep's other trials (``tune.trial_checkpoints``).

Every trial keeps ``train.keep_checkpoints`` checkpoints, each the encoder, its EMA target,
the predictor and the optimizer state: the 24-trial ViT-B sweep left about 48 of them, and
nothing ever deleted one. After a sweep only the best trial's matter (``best.yaml`` names its
checkpoint). Nothing else points at the others: a trial's MLflow run records metrics and
params only, the parent run's ``best.yaml`` is a copy in the tracking store, and a sweep
registers no model. Whether a sweep is finished enough to lose them (no trial failed, none
left unfinished: ``--resume`` restarts those from their checkpoints) is decided by the caller.
Works on any location the sweep writes to (a folder or a pyarrow filesystem URI).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow.fs as pafs

from radjepa import locations

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tidied:
    """What :func:`delete_other_trials_checkpoints` removed."""

    trials: int  # trials whose checkpoints were deleted
    folders: int  # checkpoint folders deleted
    freed_bytes: int


def human_size(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def delete_other_trials_checkpoints(
    trials_dir: str, trial_ids: list[str], keep: str
) -> Tidied | None:
    """Delete the ``checkpoint_*`` folders of ``trials_dir/trial-<id>`` for every id of
    ``trial_ids`` but ``keep``. Only those folders: the trials' small records (their MLflow run
    id, Ray's checkpoint list) stay, and a folder of no listed trial is never touched.

    None, deleting nothing, when the kept trial's folder is missing: the sweep's layout is not
    the one expected, and guessing could delete the one checkpoint worth keeping.
    """
    fs, root = locations.filesystem(trials_dir)
    root = root.rstrip("/")
    if fs.get_file_info(f"{root}/trial-{keep}").type != pafs.FileType.Directory:
        log.warning(
            "kept every trial's checkpoints: the best trial's folder %s is missing",
            locations.join_location(trials_dir, f"trial-{keep}"),
        )
        return None
    trials = folders = freed = 0
    for trial_id in trial_ids:
        if trial_id == keep:
            continue
        found = fs.get_file_info(
            pafs.FileSelector(f"{root}/trial-{trial_id}", allow_not_found=True)
        )
        ckpts = [
            e.path
            for e in found
            if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_")
        ]
        for path in ckpts:
            files = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            freed += sum(f.size or 0 for f in files if f.type == pafs.FileType.File)
            fs.delete_dir(path)
        folders += len(ckpts)
        trials += bool(ckpts)
    return Tidied(trials, folders, freed)

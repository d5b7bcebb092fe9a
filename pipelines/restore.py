"""Which checkpoint a (re)started worker group of a run loads.

Ray offers the newest checkpoint it recorded; the run folder may hold a newer one it never
recorded, or the offer may be damaged. The driver's pick (``find_resume_point``) travels in
the loop config, rank 0 looks at the run folder again when the group starts, and every rank
loads what rank 0 decided. Pretrain and every sweep trial resume through these, so they live
apart from the pretraining job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pipelines.stray_checkpoints import unrecord_checkpoints, unrecord_deleted_checkpoints
from radjepa import locations
from radjepa.resume import ResumePoint

log = logging.getLogger(__name__)


def resume_loop_config(run_dir: str, resume: ResumePoint | None) -> dict[str, Any]:
    """What a run's workers need to resume from the driver's pick (``find_resume_point``)
    rather than Ray's offer, which may be older or damaged (see :func:`restore_point`); Ray's
    record is first rid of the folders that are gone, and of the damaged ones, which otherwise
    count toward train.keep_checkpoints: the run's first new checkpoint made Ray delete the
    good one it resumed from and keep the damaged one. Pretrain and each sweep trial call it."""
    unrecord_deleted_checkpoints(run_dir)
    if resume is None:
        return {}
    if resume.damaged:
        unrecord_checkpoints(run_dir, resume.damaged)
    return {"resume_from": resume.path, "damaged_checkpoints": list(resume.damaged)}


def restore_decision(
    offered: Any, newest: str | None, resume_from: str | None, damaged: Sequence[str]
) -> tuple[bool, str | None, bool]:
    """Rank 0's decision, which every rank acts on: whether to load Ray's offer, else the
    location of the folder to load (None: start afresh), and whether to report it again
    (:func:`_unrecorded`). A location, not the picked Checkpoint's ``path``: on an object store
    that path has lost its scheme (``bucket/run/checkpoint_...``), which no rank could open."""
    location = newest or resume_from
    pick = restore_point(offered, location, damaged)
    if pick is None or pick is offered:
        return pick is not None, None, False
    return False, location, _unrecorded(pick, offered, newest)


def restore_point(offered: Any, resume_from: str | None, damaged: Sequence[str]) -> Any:
    """The checkpoint a (re)started worker group loads: Ray's offer or the newest folder of
    the run that reads cleanly (``resume_from``: rank 0's look at the run folder, else the
    driver's pick, ``find_resume_point``).

    Ray offers the newest checkpoint it recorded, and the two differ when Ray's offer is
    damaged, when Ray's record was set aside (unreadable, ``unrecord_deleted_checkpoints``: no
    offer) or every folder it named was deleted (no offer), when a driver died between copying
    a checkpoint into the run folder and recording it, and when a worker died within a poll of
    the controller (2 s) after reporting one: Ray records a checkpoint only once a poll has
    collected every rank's report, so it drops that one although rank 0 wrote it whole, and
    offers the one before (or none: a run killed so after its first checkpoint started over).
    Either way the run redid a whole ``train.checkpoint_every`` interval or more. Ray's offer
    wins when its step is at least as high. Steps, not folder names, are compared: Ray names
    the folders by rank 0's local wall-clock time, which a daylight-saving fall-back or a node
    in another time zone sets back.
    """
    import ray.train

    from radjepa.checkpoint import CheckpointUnreadable
    from radjepa.resume import checkpoint_step

    if not resume_from:
        return offered
    if offered is not None and locations.base_name(offered.path) not in damaged:
        try:
            was, pick = _offered_step(offered), checkpoint_step(resume_from)
        except CheckpointUnreadable as err:
            # a step not known is no reason to pass over Ray's offer (an unreadable offer
            # taken for a damaged one restored an older folder)
            log.warning("%s; continuing from the checkpoint Ray recorded", err)
            return offered
        if pick is None or (was is not None and was >= pick):
            return offered  # a pick that no longer reads is no reason to pass over Ray's
    return ray.train.Checkpoint(resume_from)


def _offered_step(offered: Any) -> int | None:
    """The step of a checkpoint Ray offers, read where Ray keeps it."""
    from radjepa.resume import checkpoint_step

    return checkpoint_step(offered.path, offered.filesystem)


def _unrecorded(restored: Any, offered: Any, newest: str | None) -> bool:
    """Whether the group restored the run folder's newest intact checkpoint and its step is
    higher than that of Ray's offer, the newest Ray recorded: a folder Ray has no record of.
    An offer whose step cannot be read (damaged) is not known to be older: nothing is
    reported, which would make an older checkpoint the run's latest."""
    if restored is None or restored is offered or newest is None:
        return False
    if locations.base_name(restored.path) != locations.base_name(newest):
        return False
    if offered is None:
        return True
    from radjepa.checkpoint import CheckpointUnreadable

    try:
        was, now = _offered_step(offered), _offered_step(restored)
    except CheckpointUnreadable:  # not known to be newer: not reported
        return False
    return was is not None and now is not None and now > was


def newest_intact(run_dir: str, damaged: Sequence[str]) -> str | None:
    """``newest_intact_checkpoint``, or None when the run folder cannot be listed just now (an
    object store's hiccup): Ray's offer then, rather than one more failure of the group."""
    from radjepa.resume import ResumeError, newest_intact_checkpoint

    try:
        return newest_intact_checkpoint(run_dir, damaged)
    except ResumeError as err:
        log.warning("%s; continuing from the checkpoint Ray recorded", err)
        return None

"""Freeing the resources of sweep trials that Tune stopped.

Each sweep trial runs one TorchTrainer, whose controller actor (owned by the trial's actor)
reserves the trial's CPUs and GPUs in a placement group. A placement group made by an actor
that is not detached lives as long as the *driver's job*, not as long as that actor: when Tune
stops a trial (ASHA, the collapse stopper) it ends the trial's actor, the controller dies with
it, and the group stays. Ray Train starts a cleaner beside each run to remove it, but the cleaner
asks the state API, which a local instance lacks (no dashboard) and which refuses to answer
when two local instances share a machine, so on a laptop nothing removed it: every stopped trial
kept its CPUs until the sweep's driver exited. Measured on the 4-CPU local instance of a 2-core
machine: two trials stopped at their first report left 0.75 CPU free, and the third trial got
its rank but never a CPU for Ray Data to read a shard, so the sweep waited forever in silence.

The sweep's driver therefore removes, itself, the placement groups of its own job whose creating
actor has died: such a group can never be used again (only its creator schedules into it).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_warned = False


def _actor_groups() -> list[tuple[bytes, bool]]:
    """This job's live, non-detached placement groups made by an actor: (id, creator dead).

    Read through Ray's private state accessor: the public table leaves out the creator."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    nil_actor = ray.ActorID.nil().binary()  # a group the driver made (Tune's own per trial)
    groups = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (
            pg.state == gcs_pb2.PlacementGroupTableData.CREATED
            and not pg.is_detached
            and pg.creator_actor_id not in (b"", nil_actor)
            and pg.creator_job_id.hex() == job
        ):
            groups.append((pg.placement_group_id, pg.creator_actor_dead))
    return groups


def release_orphaned_placement_groups() -> tuple[int, int]:
    """Remove this job's placement groups whose creating actor is dead: (removed, left), where
    ``left`` counts the actor-made groups whose creator still lives.

    Never raises: a Ray whose private table changed gets one warning, and the sweep goes on
    as before.
    """
    global _warned
    try:
        import ray
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        groups = _actor_groups()
        dead = [pg_id for pg_id, creator_dead in groups if creator_dead]
        for pg_id in dead:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg_id)))
        if dead:
            log.info("freed the resources of %d stopped sweep trial(s)", len(dead))
        return len(dead), len(groups) - len(dead)
    except Exception as err:  # noqa: BLE001 - a cleanup; the sweep must not fail on it
        if not _warned:
            _warned = True
            log.warning(
                "cannot free the resources of stopped trials (%s: %s): on a local instance a "
                "long sweep may stall; lower tune.max_concurrent or turn off tune.asha",
                type(err).__name__,
                err,
            )
        return 0, 0

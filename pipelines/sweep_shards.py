"""The shard files a sweep's trials train on, kept in the sweep's folder for its ``--resume``.

Every trial of one start of a sweep reads the files its driver listed (``ShardSummary.files``).
A ``--resume`` listed the folder again: shards an ingest had added since were trained on by
the trials it started or restarted, and the sweep then ranked trials trained on two sets of
images against each other, its data fingerprint changed on the parent run without a word.
The listing is saved as the sweep starts (``sweep_shards.json``); a resume trains on the same
images, and refuses other ones (:func:`sweep_shards`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from radjepa import locations
from radjepa.config import Config
from radjepa.shards import ShardsGoneError, shard_files
from radjepa.training_data import ShardSummary, TrainingDataError, inspect_shards

log = logging.getLogger(__name__)

SWEEP_SHARDS_FILE = "sweep_shards.json"


@dataclass(frozen=True)
class KeptShards:
    """What a sweep was started on: the shard folder, its files' names, the images' data
    fingerprint (``ShardSummary.fingerprint``)."""

    data: str
    files: tuple[str, ...]
    fingerprint: str


def keep_shards(sweep_dir: str, data: str, info: ShardSummary) -> None:
    """Save the files the sweep's trials train on and their images' fingerprint, for its
    next ``--resume``."""
    saved = {
        "data": _spelled(data),
        "files": [f.rsplit("/", 1)[-1] for f in info.files],
        "fingerprint": info.fingerprint,
    }
    locations.write_text(locations.join_location(sweep_dir, SWEEP_SHARDS_FILE), json.dumps(saved))


def sweep_shards(cfg: Config, data: str, resume: bool) -> ShardSummary:
    """The shards the sweep's trials train on, inspected: a new sweep's (the folder's listing
    now), or a resumed one's, which must hold the images it started on. Those are the files it
    saved where they are all still there; else, where the folder's files now hold the same
    images (a damaged shard moved out and its images ingested again), those. Other images are
    refused unless ``train.allow_config_change``: the sweep would rank trials trained on two
    sets. Raises :class:`TrainingDataError` for shards that cannot be trained on."""
    from pipelines.sweep import SweepError  # pipelines.sweep imports this module

    kept = _kept_shards(cfg, data) if resume else None
    if kept is None:
        return inspect_shards(data, cfg)
    try:
        shard_files(data, kept.files)
        gone: list[str] = []
    except ShardsGoneError as err:
        gone = err.gone
    except (OSError, ValueError) as err:  # an unreachable bucket, ...
        raise TrainingDataError(f"cannot read shards at {data}: {err}") from None
    info = inspect_shards(data, cfg, () if gone else kept.files)
    if info.fingerprint == kept.fingerprint:
        return info
    changed = f"data fingerprint {kept.fingerprint[:12]} -> {info.fingerprint[:12]}"
    if gone:
        changed = (
            f"{len(gone)} of the {len(kept.files)} shard(s) it started on are gone (first: "
            f"{gone[0]}) and the shards there now hold other images: {changed}"
        )
    else:
        changed = f"its shards were written again since: {changed}"
    if not cfg.train.allow_config_change:
        raise SweepError(
            f"sweep '{cfg.tune.name}' was started on other images at {data} ({changed}): put "
            "the shards back to resume it, set train.allow_config_change=true to train its "
            "remaining trials on these, or start a new sweep (another tune.name)"
        )
    log.warning(
        "sweep %s resumes on other images (%s; train.allow_config_change)", cfg.tune.name, changed
    )
    return info


def _kept_shards(cfg: Config, data: str) -> KeptShards | None:
    """What a sweep being resumed saved of its shards; None where it saved nothing (started by
    an earlier version, or the file was cut short as the driver was killed: the folder is
    listed anew, said) or read another folder (``keep_sweep_config`` refuses that resume,
    naming both). Read before the output store is checked: a store that cannot be read is
    said in one line."""
    from pipelines.pretrain import storage_root
    from pipelines.sweep import SweepError  # pipelines.sweep imports this module

    path = ""
    try:
        path = locations.join_location(storage_root(cfg), cfg.tune.name, SWEEP_SHARDS_FILE)
        text = locations.read_text(path)
    except (OSError, ValueError) as err:  # an unknown scheme, an unreachable bucket, ...
        where = locations.redact(path or cfg.train.output_dir)
        raise SweepError(f"cannot read sweep '{cfg.tune.name}' at {where}: {err}") from None
    if text is None:
        log.info(
            "sweep %s saved no shard listing: the shards at %s are listed", cfg.tune.name, data
        )
        return None
    try:
        raw = json.loads(text)
        kept = KeptShards(str(raw["data"]), tuple(map(str, raw["files"])), str(raw["fingerprint"]))
    except (ValueError, KeyError, TypeError):
        log.warning("%s cannot be read: the shards at %s are listed anew", path, data)
        return None
    if kept.data != _spelled(data) or not kept.files or not kept.fingerprint:
        return None
    return kept


def _spelled(data: str) -> str:
    """The shard location as saved and compared: absolute, credentials ``***`` (the file lies
    beside the checkpoints; keys rotated since do not make it another folder)."""
    return locations.redact(locations.absolute(data))

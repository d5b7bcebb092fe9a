"""Training that diverged: the record of a run whose loss or weights became non-finite.

Rank 0 writes a marker into the run folder and reports why under :data:`DIVERGED`; the
driver (pretrain, or a sweep trial) reads the marker after the run, since Ray's result holds
only the last checkpoint's metrics, tags the MLflow run, says it in one line, and clears the
marker when the run starts again.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from radjepa import locations

log = logging.getLogger(__name__)
# the key of the last report of a run whose loss or weights became non-finite: why, in words
DIVERGED = "diverged"
# written into the run folder by rank 0 when training diverged; removed when the run starts again
DIVERGED_MARKER = "diverged.json"


def read_divergence(run_dir: str) -> dict[str, Any] | None:
    """What rank 0 recorded when the run's loss or weights became non-finite, or None."""
    text = locations.read_text(locations.join_location(run_dir, DIVERGED_MARKER))
    if text is None:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        record = {}
    return {"step": record.get("step"), DIVERGED: record.get(DIVERGED) or "non-finite values"}


def clear_divergence(run_dir: str) -> None:
    """Remove the divergence record of an earlier attempt of the run (a re-run that resumes)."""
    marker = locations.join_location(run_dir, DIVERGED_MARKER)
    if locations.read_text(marker) is not None:
        fs, path = locations.filesystem(marker)
        fs.delete_file(path)


def divergence_message(metrics: dict[str, Any], checkpoint: Any, storage: str) -> str:
    """One line for a run that stopped because its loss or weights became non-finite."""
    step = metrics.get("step")
    where = "no checkpoint was written before it"
    if checkpoint is not None:
        from radjepa.checkpoint import read_meta

        path = locations.spell_like(storage, checkpoint.path)
        try:
            with checkpoint.as_directory() as local:
                where = f"the last good checkpoint is {path} (step {read_meta(local)['step']})"
        except Exception:  # noqa: BLE001 - the path alone still says where
            where = f"the last good checkpoint is {path}"
    return (
        f"training diverged at step {step}: {metrics.get(DIVERGED)}. It was stopped without "
        f"retries (a retry from the last checkpoint repeats the same steps); {where}, and no "
        "checkpoint of the diverged weights was kept. Lower optim.lr (or raise "
        "optim.warmup_fraction, or check the data), then re-run with "
        "--set train.allow_config_change=true to continue from it, or choose a new "
        "train.run_name"
    )


def record_divergence(uri: str, run_id: str, metrics: dict[str, Any]) -> None:
    """Tag the MLflow run with where and why it diverged (it is then marked FAILED)."""
    from pipelines.tracking import client as tracking_client

    try:
        client = tracking_client(uri)
        client.set_tag(run_id, "radjepa.diverged_at_step", str(metrics.get("step")))
        client.set_tag(run_id, "radjepa.diverged", str(metrics.get(DIVERGED))[:5000])
    except Exception:  # noqa: BLE001 - the FAILED status and the message still say it
        log.warning("could not tag MLflow run %s as diverged", run_id, exc_info=True)

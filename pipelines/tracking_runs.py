"""Finding and ending MLflow runs whose driver died without saying so.

A driver killed with SIGKILL (the OOM killer, a lost node or pod, a preempted VM) never reaches
the handlers that mark its run KILLED or FAILED, and the run stays RUNNING in the UI for good
unless someone re-runs the same command (which continues it). MLflow has no heartbeat, so a run
counts as abandoned when nothing of it moved for a while: its start, its newest metric value
(the time its step ran), the latest re-run that continued it (:data:`REOPENED_TAG`), and for a
sweep's parent run the same of every trial run under it.
``radjepa runs reap`` marks such runs KILLED, with a tag saying why and when. The tag stands only
while reap's KILLED does: a re-run that continues such a run (:func:`reopen`), or its own driver
ending it after all (:func:`end_run`: it was alive), moves it to ``radjepa.reaped_before``.
The tags saying why a run failed (:data:`FAILURE_TAGS`) stand only while that failure does: the
same two steps move each to ``<tag>_before``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "FAILURE_TAGS",
    "REAPED_BEFORE_TAG",
    "REAPED_TAG",
    "REOPENED_TAG",
    "RunGone",
    "StaleRun",
    "end_run",
    "parse_duration",
    "iso_utc",
    "reap",
    "reopen",
    "stale_runs",
]

REAPED_TAG = "radjepa.reaped"  # the run is KILLED because `runs reap` found it abandoned
REAPED_BEFORE_TAG = "radjepa.reaped_before"  # it was, then a re-run continued it
# why a run ended FAILED: a sweep with no best trial, a diverged pretrain run or trial
FAILURE_TAGS = ("radjepa.failure", "radjepa.diverged", "radjepa.diverged_at_step")
# when a re-run last continued the run (ISO 8601, UTC): its sign of life until its first new step
REOPENED_TAG = "radjepa.reopened_at"
_ISO_UTC = "%Y-%m-%dT%H:%M:%SZ"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class StaleRun:
    run_id: str
    name: str
    experiment: str
    last_activity_ms: int  # the newest sign of life: start, a metric value, a resume, a child's

    def idle_s(self, now_ms: int) -> float:
        return (now_ms - self.last_activity_ms) / 1000


def parse_duration(text: str) -> float:
    """``90m``, ``2h``, ``1d``, ``45s`` (or combined, ``1h30m``) in seconds; a ValueError with
    one line otherwise. A bare number is refused: minutes or hours, it would be a guess."""
    spec = text.strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", spec)
    if not spec or "".join(n + u for n, u in parts) != spec:
        raise ValueError(f"{text!r} is not a duration: write e.g. 90m, 2h, 1d or 1h30m")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


def _activity(run: Any) -> int:
    """The newest time (ms) the run itself shows: its start, its end, its newest metric value
    per key (MLflow's latest value of a key is its highest step, the newest one we log), and
    when a re-run last continued it. Without the last, a run resumed after days looked idle
    since its last step before the resume (reopening cannot move its start or clear its end),
    and a reap before the resumed attempt's first logged step marked it KILLED while it
    trained."""
    times = [run.info.start_time or 0, run.info.end_time or 0]
    times += [m.timestamp for m in run.data.to_proto().metrics]
    times.append(_iso_ms(run.data.tags.get(REOPENED_TAG, "")))
    return max(times)


def _iso_ms(text: str) -> int:
    """:func:`iso_utc` read back; 0 for anything else (a tag edited by hand counts as no sign)."""
    try:
        return int(datetime.strptime(text, _ISO_UTC).replace(tzinfo=UTC).timestamp()) * 1000
    except ValueError:
        return 0


def _search(client: Any, experiment_ids: list[str], query: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string=query, max_results=1000, page_token=token
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def stale_runs(
    client: Any, experiments: list[Any], older_than_s: float, now_ms: int | None = None
) -> list[StaleRun]:
    """RUNNING runs of ``experiments`` (MLflow Experiment objects) with no sign of life for
    ``older_than_s``, oldest activity first."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    cutoff = now_ms - older_than_s * 1000
    names = {e.experiment_id: e.name for e in experiments}
    ids = list(names)
    found = []
    for run in _search(client, ids, "attributes.status = 'RUNNING'"):
        last = _activity(run)
        if last >= cutoff:
            continue
        # a sweep's parent logs nothing itself while its trials train: their runs are its pulse
        children = _search(client, ids, f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        last = max([last, *(_activity(c) for c in children)])
        if last < cutoff:
            name = run.info.run_name or run.data.tags.get("mlflow.runName", "")
            found.append(StaleRun(run.info.run_id, name, names[run.info.experiment_id], last))
    return sorted(found, key=lambda r: r.last_activity_ms)


def reap(client: Any, runs: list[StaleRun], older_than: str, now_ms: int | None = None) -> None:
    """Mark ``runs`` KILLED, ended at their last activity, with a tag saying why and when.

    A run reaped while its driver was in fact alive (waiting hours for a node, say) is not
    harmed: MLflow still takes its metrics, and its driver sets FINISHED or FAILED at the end
    as usual (:func:`end_run`); a re-run of the same command sets it RUNNING again."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    when = iso_utc(now_ms)
    for run in runs:
        client.set_tag(
            run.run_id,
            REAPED_TAG,
            f"marked KILLED by `radjepa runs reap --older-than {older_than}` at {when}: "
            f"RUNNING with no activity since {iso_utc(run.last_activity_ms)} (its driver died?)",
        )
        client.set_terminated(run.run_id, "KILLED", end_time=run.last_activity_ms)


class RunGone(LookupError):
    """The MLflow run a re-run would continue is not in the store it looked in: ``why`` says
    "not in" (another store: the team moved to a tracking server, MLFLOW_TRACKING_URI set
    since) or "deleted in" (from the UI)."""

    def __init__(self, run_id: str, why: str) -> None:
        super().__init__(f"MLflow run {run_id} is {why} the store")
        self.run_id, self.why = run_id, why


def reopen(client: Any, run_id: str, now_ms: int | None = None) -> None:
    """Set a run that a re-run continues (a pretrain resume, a resumed sweep or trial) RUNNING
    again. A run ``runs reap`` had marked KILLED kept its ``radjepa.reaped`` tag through the
    resume, so the UI and any search on the tag showed a run training again, or finished since,
    as reaped ("its driver died?"). The tag is moved to ``radjepa.reaped_before`` with the time
    of the resume: ``radjepa.reaped`` is on a run only while it is KILLED by reap, and the
    history stays on the run (the latest reap, when several).

    Every reopen sets :data:`REOPENED_TAG` to now, before the run is RUNNING again: the resumed
    attempt's sign of life for :func:`stale_runs` until it logs its first step (a tag, not a
    metric, so that no chart in the UI shows it as a training value).

    The run keeps the end time reap (or its last end) gave it until its driver ends it again:
    MLflow has no way to clear one. ``MlflowClient.update_run`` passes the run's current
    end_time on, ``set_terminated`` turns a missing one into now, and the stores'
    ``update_run_info`` change end_time only when given one; MLflow's own resume
    (``mlflow.start_run(run_id=...)``) keeps it the same way. So while it runs again the UI
    shows it RUNNING with the old End Time and a Duration up to that time. A run the store does
    not hold, or holds deleted, is :class:`RunGone`.

    The tags of a failure (:data:`FAILURE_TAGS`) move the same way, to ``<tag>_before``: a
    diverged pretrain run continued with ``train.allow_config_change``, or a sweep whose trials
    all failed continued with ``--resume``, ended FINISHED still tagged as diverged or failed."""
    from mlflow.exceptions import MlflowException

    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RunGone(run_id, "not in") from None
        raise
    if run.info.lifecycle_stage == "deleted":  # update_run refuses it
        raise RunGone(run_id, "deleted in")
    reaped = run.data.tags.get(REAPED_TAG)
    client.set_tag(run_id, REOPENED_TAG, iso_utc(now_ms))
    client.update_run(run_id, status="RUNNING")
    _clear_failure(client, run_id, run.data.tags)
    if reaped is None:
        return
    _unreap(client, run_id, f"{reaped}; resumed by a re-run at {iso_utc(now_ms)}")


def end_run(client: Any, run_id: str, status: str, now_ms: int | None = None) -> None:
    """End a run from its driver (FINISHED, FAILED or KILLED): what pretrain, a sweep and its
    trials do at their end. A run ``runs reap`` had marked KILLED while its driver was in fact
    alive was set FINISHED by that driver but kept ``radjepa.reaped``, so it looked reaped
    ("its driver died?") while FINISHED. The tag is moved to ``radjepa.reaped_before`` with
    who ended the run when: ``radjepa.reaped`` stays on a run only while reap's KILLED stands.
    A run ended FINISHED loses its failure tags too (:func:`reopen` says why), for a run
    continued without being reopened. The status is set first, so a store failing in between
    leaves a reaped run as reap left it."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    client.set_terminated(run_id, status, end_time=now_ms)
    tags = client.get_run(run_id).data.tags
    if status == "FINISHED":
        _clear_failure(client, run_id, tags)
    reaped = tags.get(REAPED_TAG)
    if reaped is not None:
        _unreap(client, run_id, f"{reaped}; its driver ended it {status} at {iso_utc(now_ms)}")


def _unreap(client: Any, run_id: str, note: str) -> None:
    """Move a run's ``radjepa.reaped`` tag to ``radjepa.reaped_before`` (the latest reap's note
    and what undid it; MLflow caps a tag value at 5000 characters)."""
    client.set_tag(run_id, REAPED_BEFORE_TAG, note[:5000])
    client.delete_tag(run_id, REAPED_TAG)


def _clear_failure(client: Any, run_id: str, tags: dict[str, str]) -> None:
    """Move the run's failure tags to ``<tag>_before``, values as they were (the latest
    failure's): they describe an attempt that a re-run or a success has since replaced."""
    for tag in FAILURE_TAGS:
        if tag in tags:
            client.set_tag(run_id, f"{tag}_before", tags[tag])
            client.delete_tag(run_id, tag)


def iso_utc(ms: int) -> str:
    """A store's millisecond timestamp as ISO 8601 in UTC (runs outlive the operator's zone)."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime(_ISO_UTC)

"""A sweep's MLflow runs, as the driver keeps them.

Each trial makes its own child run as it trains
(``pipelines.pretrain_tracking.start_tracking``); the driver, which sees every trial, keeps the
rest: the parent run, made once and continued by ``--resume``; the table of every trial's
outcome and ``best.yaml``, logged to it when the sweep ends; the child runs closed with the
status the table shows; and, when the sweep is interrupted or fails, its runs ended KILLED or
FAILED rather than left RUNNING.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from radjepa import locations
from radjepa.config import Config

if TYPE_CHECKING:
    from pipelines.sweep import TrialRow

log = logging.getLogger(__name__)


# the parent run's artifact listing every trial: settings, metric, status, why it failed
TRIALS_FILE = "trials.json"


def parent_run(
    cfg: Config, root: str, sweep_dir: str, resume: bool, provenance: dict[str, str]
) -> tuple[str, str]:
    """The sweep's MLflow parent run: created once, continued by ``--resume``."""
    from pipelines.sweep import SweepError  # pipelines.sweep imports this module
    from pipelines.tracking import client as tracking_client
    from pipelines.tracking import ensure_experiment, log_params, store_uri

    # the store pretrain uses (prepare_outputs made sure remote outputs have one configured)
    uri = store_uri(cfg, create=True)
    if uri is None:
        raise SweepError(f"no MLflow store for outputs at {root}: set tracking.uri")
    exp = ensure_experiment(uri, cfg.tracking.experiment, root)
    client = tracking_client(uri)
    id_file = locations.join_location(sweep_dir, "mlflow_parent_run_id")
    previous = locations.read_text(id_file) if resume else None
    if previous:
        from pipelines.pretrain_tracking import run_gone_message
        from pipelines.tracking_runs import RunGone, reopen

        try:
            reopen(client, previous.strip())  # RUNNING again, and no longer tagged as reaped
        except RunGone as err:
            raise SweepError(run_gone_message(err, id_file, uri)) from None
        return previous.strip(), uri
    run_id = client.create_run(
        exp, run_name=cfg.tune.name, tags={"radjepa.job": "sweep", **provenance}
    ).info.run_id
    try:
        log_params(run_id, uri, cfg)
        locations.write_text(id_file, run_id)
    except BaseException as err:
        # the sweep ends before its trials: the run it made must not stay RUNNING for good (a
        # Ctrl-C or SIGTERM here left it so, and without its id file no --resume finds it)
        from pipelines.tracking import mark_run

        interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))
        mark_run(uri, run_id, "KILLED" if interrupted else "FAILED")
        raise
    return run_id, uri


def _finish_parent_run(
    uri: str,
    parent_run_id: str,
    rows: list[TrialRow],
    best: TrialRow | None,
    best_yaml: str | None,
    metric: str,
) -> None:
    from pipelines.tracking import client as tracking_client
    from pipelines.tracking import redact
    from pipelines.tracking_runs import end_run

    client = tracking_client(uri)
    _close_trial_runs(client, parent_run_id, rows)
    # every trial's outcome, the reasons of failed ones included: a trial that failed before
    # its own run was made (a setting its workers refused) left no trace in MLflow
    table = [
        {"trial": r.trial_id, "params": r.params, metric: r.metric, "status": r.status}
        | ({"error": r.error} if r.error else {})
        for r in rows
    ]
    client.log_text(parent_run_id, redact(json.dumps(table, indent=1, default=str)), TRIALS_FILE)
    if best is not None and best_yaml is not None:
        _log_best(client, parent_run_id, f"best_{metric}", best.metric)
        client.set_tag(parent_run_id, "radjepa.best_trial", best.trial_id)
        client.log_text(parent_run_id, redact(best_yaml), "best.yaml")
        end_run(client, parent_run_id, "FINISHED")  # a reap's tag goes: the driver was alive
        return
    # the command fails (no best trial): its run was FINISHED, with nothing saying why
    failed = sum(r.status == "error" for r in rows)
    why = (
        f"every trial failed ({failed}); the reasons are in {TRIALS_FILE}"
        if failed == len(rows)
        else f"no trial finished without collapsing or failing ({TRIALS_FILE})"
    )
    client.set_tag(parent_run_id, "radjepa.failure", why)
    end_run(client, parent_run_id, "FAILED")


def record_sweep(
    uri: str,
    parent_run_id: str,
    rows: list[TrialRow],
    best: TrialRow | None,
    best_yaml: str | None,
    metric: str,
) -> str | None:
    """:func:`_finish_parent_run`, or why the store refused it, in one line. The sweep's work
    is done and ``best.yaml`` written by then: a store failing here (a server restarting, a
    locked database) escaped as MLflow's traceback, the runs were marked FAILED and the
    checkpoints were never tidied. The parent run is left as it was (RUNNING): ``--resume``
    restores the finished sweep without training again and records it then."""
    from pipelines.tracking import redact
    from radjepa.error_text import first_line

    try:
        _finish_parent_run(uri, parent_run_id, rows, best, best_yaml, metric)
    except Exception as err:  # noqa: BLE001 - any store failure: the sweep itself succeeded
        log.debug("recording sweep run %s failed", parent_run_id, exc_info=True)
        return redact(f"{type(err).__name__}: {first_line(str(err))}")
    return None


def _log_best(client: Any, run_id: str, key: str, value: float) -> None:
    """Log the best trial's metric once per value: a ``--resume`` of a sweep whose parent run
    already holds it (it ended after the log, or it had finished) logged it again at step 0,
    and the run's chart showed two points where one trial was best. A new best (the resumed
    trials beat it) is the next step."""
    history = client.get_metric_history(run_id, key)
    last = max(history, key=lambda m: (m.step, m.timestamp), default=None)
    if last is not None and last.value == value:
        return
    client.log_metric(run_id, key, value, step=0 if last is None else last.step + 1)


def end_sweep_runs(uri: str | None, parent_run_id: str | None, status: str) -> None:
    """End an interrupted or failed sweep's MLflow runs with ``status``: the trials still
    RUNNING, then the sweep's own run (none without tracking). Never raises, as neither step
    does: the interruption or the failure is what to report."""
    if not parent_run_id:
        return
    from pipelines.tracking import mark_run

    _end_open_trial_runs(uri, parent_run_id, status)
    mark_run(uri, parent_run_id, status)


def _end_open_trial_runs(uri: str, parent_run_id: str, status: str) -> None:
    """End the child runs of an interrupted sweep that are still RUNNING: the trials Tune
    stopped never reach the end of ``_trial``. ``--resume`` sets them RUNNING again. Never
    raises: the interruption is what to report."""
    from pipelines.tracking import client as tracking_client
    from pipelines.tracking import mark_run

    try:
        client = tracking_client(uri)
        exp_id = client.get_run(parent_run_id).info.experiment_id
        children = client.search_runs(
            [exp_id],
            f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'",
            max_results=50000,
        )
    except Exception:  # noqa: BLE001
        log.warning("could not list the trial runs of sweep run %s", parent_run_id, exc_info=True)
        return
    for run in children:
        mark_run(uri, run.info.run_id, status)


def _close_trial_runs(client: Any, parent_run_id: str, rows: list[TrialRow]) -> None:
    """Tag every child run with the status the table shows. A trial stopped by the scheduler
    or the collapse stopper, or one that crashed, never reaches the end of ``_trial``: close
    its run too, so the MLflow UI does not list it as RUNNING forever. A run ``runs reap``
    marked KILLED while the sweep was alive (trials waiting for nodes log nothing) is ended
    as the table shows it too, and loses the reap's tag (``tracking_runs.end_run``)."""
    from pipelines.sweep import DIVERGED_STATUS  # pipelines.sweep imports this module
    from pipelines.tracking_runs import REAPED_TAG, end_run

    by_trial = {r.trial_id: r for r in rows}
    exp_id = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs(
        [exp_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=50000
    )
    for run in children:
        row = by_trial.get(run.data.tags.get("radjepa.trial_id", ""))
        if row is None:
            continue
        client.set_tag(run.info.run_id, "radjepa.status", row.status)
        # KILLED: an interruption ended it (_end_open_trial_runs), and the resumed sweep did
        # not run it again (Tune had stopped it already): it ends as the table says
        if run.info.status in ("RUNNING", "KILLED") or REAPED_TAG in run.data.tags:
            state = "FAILED" if row.status in ("error", DIVERGED_STATUS) else "FINISHED"
            end_run(client, run.info.run_id, state)

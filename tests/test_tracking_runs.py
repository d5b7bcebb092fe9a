"""`radjepa runs reap`: runs whose driver died (SIGKILL, a lost node) are marked KILLED, with a
tag saying why, and nothing alive is touched (a real sqlite MLflow store, the real CLI)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOUR_MS = 3600 * 1000


def _radjepa(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )


@pytest.fixture
def store(tmp_path, migrated_store):
    """Runs in the store `pretrain` would use with ``train.output_dir`` = tmp_path."""
    import mlflow
    from mlflow.entities import Metric

    from pipelines.tracking import ensure_experiment

    uri = migrated_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    exp = ensure_experiment(uri, "radjepa")
    now = int(time.time() * 1000)

    def run(name: str, started_h: float, metric_h: float | None = None, **tags: str) -> str:
        r = client.create_run(
            exp, start_time=now - int(started_h * HOUR_MS), run_name=name, tags=tags
        )
        if metric_h is not None:
            at = now - int(metric_h * HOUR_MS)
            client.log_batch(r.info.run_id, metrics=[Metric("loss", 1.0, at, 7)])
        return r.info.run_id

    ids = {
        "dead": run("dead", 5, metric_h=3),  # its driver was SIGKILLed 3 h ago
        "silent": run("silent", 4),  # killed before its first metric
        "training": run("training", 5, metric_h=0.1),  # alive: a step 6 minutes ago
        "new": run("new", 0.2),  # started 12 minutes ago, no step yet
        "sweep": run("sweep", 6),  # a sweep parent logs nothing itself ...
    }
    ids["trial"] = run("trial", 6, metric_h=0.2, **{"mlflow.parentRunId": ids["sweep"]})
    finished = run("finished", 9, metric_h=8)
    client.set_terminated(finished, "FINISHED")
    ids["finished"] = finished
    return tmp_path, client, ids


def test_reap_marks_only_runs_idle_for_longer_than_asked_killed(store):
    out, client, ids = store
    cfg = ["--set", f"train.output_dir={out}"]

    dry = _radjepa("runs", "reap", "--older-than", "2h", "--dry-run", *cfg, cwd=out)
    assert dry.returncode == 0, dry.stderr
    assert ids["dead"] in dry.stdout and ids["silent"] in dry.stdout
    assert "would mark 2 run(s) of radjepa KILLED" in dry.stdout
    assert {client.get_run(i).info.status for i in ids.values()} == {"RUNNING", "FINISHED"}

    done = _radjepa("runs", "reap", "--older-than", "2h", *cfg, cwd=out)
    assert done.returncode == 0, done.stderr
    assert "marked 2 run(s) of radjepa KILLED" in done.stdout
    status = {name: client.get_run(i).info.status for name, i in ids.items()}
    assert status == {
        "dead": "KILLED",
        "silent": "KILLED",
        "training": "RUNNING",
        "new": "RUNNING",
        "sweep": "RUNNING",  # its trial logged 12 minutes ago
        "trial": "RUNNING",
        "finished": "FINISHED",
    }
    dead = client.get_run(ids["dead"])
    assert "runs reap --older-than 2h" in dead.data.tags["radjepa.reaped"]
    assert "no activity since" in dead.data.tags["radjepa.reaped"]
    # it ended when it was last seen alive (its last metric), not when it was reaped
    assert dead.info.end_time == client.get_metric_history(ids["dead"], "loss")[0].timestamp

    again = _radjepa("runs", "reap", "--older-than", "2h", *cfg, cwd=out)
    assert again.returncode == 0 and "no RUNNING run idle for over 2h in radjepa" in again.stdout
    # a shorter threshold reaches the others, the sweep parent together with its trial
    short = _radjepa("runs", "reap", "--older-than", "5m", *cfg, cwd=out)
    assert "marked 4 run(s) of radjepa KILLED" in short.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--older-than", "2"], "'2' is not a duration: write e.g. 90m, 2h, 1d or 1h30m"),
        (["--older-than", "2h", "-e", "nope"], "no experiment nope in the MLflow store"),
    ],
)
def test_reap_refuses_bad_input_in_one_line(store, args, says):
    out, client, ids = store
    res = _radjepa("runs", "reap", *args, "--set", f"train.output_dir={out}", cwd=out)
    assert res.returncode == 2
    assert says in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert client.get_run(ids["dead"]).info.status == "RUNNING"


def test_reap_creates_no_store_where_there_is_none(tmp_path):
    res = _radjepa(
        "runs", "reap", "--older-than", "2h", "--set", f"train.output_dir={tmp_path}", cwd=tmp_path
    )
    assert res.returncode == 2 and "no MLflow store at" in res.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_a_reaped_run_that_is_resumed_is_no_longer_tagged_reaped(tmp_path):
    # the pretrain resume (and a sweep's --resume) set the run RUNNING again but left
    # `radjepa.reaped` on it: the UI, and a search on the tag, showed a run training again (and
    # later FINISHED) as "marked KILLED ... its driver died?"
    from pipelines.pretrain_tracking import start_tracking
    from pipelines.sweep_tracking import parent_run
    from pipelines.tracking import client as tracking_client
    from radjepa.config import load_config

    cfg = load_config(
        REPO / "configs" / "tiny_cpu.yaml",
        [f"train.output_dir={tmp_path}", "train.run_name=r1", "tune.name=s1"],
    )
    run_id, uri = start_tracking(cfg, str(tmp_path), str(tmp_path / "r1"))
    sweep_id, _ = parent_run(cfg, str(tmp_path), str(tmp_path / "s1"), False, {})
    time.sleep(1.1)  # both idle for longer than the threshold below
    reaped = _radjepa(
        "runs", "reap", "--older-than", "1s", "--set", f"train.output_dir={tmp_path}", cwd=tmp_path
    )
    assert "marked 2 run(s) of radjepa KILLED" in reaped.stdout, reaped.stderr
    client = tracking_client(uri)
    said = client.get_run(run_id).data.tags["radjepa.reaped"]
    reaped_end = client.get_run(run_id).info.end_time

    assert start_tracking(cfg, str(tmp_path), str(tmp_path / "r1"))[0] == run_id  # the resume
    assert parent_run(cfg, str(tmp_path), str(tmp_path / "s1"), True, {})[0] == sweep_id
    for resumed in (run_id, sweep_id):
        run = client.get_run(resumed)
        assert run.info.status == "RUNNING"
        assert "radjepa.reaped" not in run.data.tags
        assert "runs reap --older-than 1s" in run.data.tags["radjepa.reaped_before"]
    before = client.get_run(run_id).data.tags["radjepa.reaped_before"]
    assert before.startswith(said + "; resumed by a re-run at ")
    # MLflow cannot clear an end time (README, tracking_runs.reopen): reap's stays until the
    # driver ends the run. Should a newer MLflow clear it, reopen and the README can say so
    assert client.get_run(run_id).info.end_time == reaped_end
    # a later resume, with no reap since, leaves the record as it is
    assert start_tracking(cfg, str(tmp_path), str(tmp_path / "r1"))[0] == run_id
    assert client.get_run(run_id).data.tags["radjepa.reaped_before"] == before


def test_a_reaped_run_its_driver_ends_after_all_is_no_longer_tagged_reaped(tmp_path):
    # a run reaped while its driver was alive (waiting for nodes, say) was set FINISHED by that
    # driver but kept `radjepa.reaped`: FINISHED, and tagged "marked KILLED ... its driver died?"
    from serve_helpers import make_checkpoint

    from pipelines.pretrain_tracking import finish_tracking, start_tracking
    from pipelines.sweep import TrialRow
    from pipelines.sweep_tracking import _finish_parent_run, parent_run
    from pipelines.tracking import client as tracking_client
    from pipelines.tracking import mark_run
    from pipelines.tracking_runs import reap, stale_runs
    from radjepa.config import load_config

    def cfg(run: str):
        sets = [f"train.output_dir={tmp_path}", f"train.run_name={run}", "tune.name=s1"]
        return load_config(REPO / "configs" / "tiny_cpu.yaml", sets)

    done, uri = start_tracking(cfg("done"), str(tmp_path), str(tmp_path / "done"))
    failed, _ = start_tracking(cfg("failed"), str(tmp_path), str(tmp_path / "failed"))
    sweep, _ = parent_run(cfg("x"), str(tmp_path), str(tmp_path / "s1"), False, {})
    trial, _ = start_tracking(  # as a sweep trial opens its run
        cfg("trial-t1"),
        str(tmp_path),
        str(tmp_path / "trials" / "trial-t1"),
        parent_run_id=sweep,
        tags={"radjepa.job": "sweep-trial", "radjepa.trial_id": "t1"},
    )
    client = tracking_client(uri)
    time.sleep(1.1)  # all idle for longer than the threshold below
    experiment = client.get_experiment_by_name("radjepa")
    reap(client, stale_runs(client, [experiment], 1.0), "1s")  # what `runs reap` does
    said = {r: client.get_run(r).data.tags["radjepa.reaped"] for r in (done, failed, sweep, trial)}
    assert {client.get_run(r).info.status for r in said} == {"KILLED"}
    untouched, _ = start_tracking(cfg("later"), str(tmp_path), str(tmp_path / "later"))

    # each driver, alive all along, ends its run as usual
    finish_tracking(cfg("done"), uri, done, str(make_checkpoint(tmp_path / "ckpt")), {})
    mark_run(uri, failed, "FAILED")
    stopped = TrialRow("t1", {}, 2.0, "stopped", 3, None)  # the scheduler stopped it
    _finish_parent_run(uri, sweep, [stopped], stopped, "x: 1\n", "rankme")
    mark_run(uri, untouched, "KILLED")

    ended = {done: "FINISHED", failed: "FAILED", sweep: "FINISHED", trial: "FINISHED"}
    for run_id, status in ended.items():
        run = client.get_run(run_id)
        assert run.info.status == status
        assert "radjepa.reaped" not in run.data.tags
        before = run.data.tags["radjepa.reaped_before"]
        assert before.startswith(f"{said[run_id]}; its driver ended it {status} at "), before
    assert client.get_run(trial).data.tags["radjepa.status"] == "stopped"
    # a run reap never marked gains no record
    tags = client.get_run(untouched).data.tags
    assert "radjepa.reaped" not in tags and "radjepa.reaped_before" not in tags


def test_a_resumed_sweep_ends_the_trials_tune_had_stopped_and_fails_without_a_best(tmp_path):
    # an interruption marked every RUNNING trial run KILLED, those Tune had already stopped
    # (ASHA, the collapse stopper) too; --resume does not run them again, and they stayed
    # KILLED for good. And a sweep whose every trial failed ended its run FINISHED, with no
    # trace of why: trials failing before their own run was made left nothing in MLflow
    import json

    from pipelines.pretrain_tracking import start_tracking
    from pipelines.sweep import STOPPED, TrialRow
    from pipelines.sweep_tracking import _finish_parent_run, end_sweep_runs, parent_run
    from pipelines.tracking import client as tracking_client
    from pipelines.tracking_runs import end_run, reopen
    from radjepa.config import load_config

    def cfg(run: str):
        sets = [f"train.output_dir={tmp_path}", f"train.run_name={run}", "tune.name=s1"]
        return load_config(REPO / "configs" / "tiny_cpu.yaml", sets)

    sweep, uri = parent_run(cfg("x"), str(tmp_path), str(tmp_path / "s1"), False, {})
    trials = {}
    for t in ("t0", "t1", "t2"):
        trials[t], _ = start_tracking(
            cfg(f"trial-{t}"),
            str(tmp_path),
            str(tmp_path / "trials" / f"trial-{t}"),
            parent_run_id=sweep,
            tags={"radjepa.job": "sweep-trial", "radjepa.trial_id": t},
        )
    client = tracking_client(uri)
    end_run(client, trials["t0"], "FINISHED")  # ran to its end; t1 stopped by ASHA; t2 running
    end_sweep_runs(uri, sweep, "KILLED")  # Ctrl-C
    assert client.get_run(trials["t1"]).info.status == "KILLED"
    reopen(client, sweep)  # --resume: t2 runs again and ends its own run
    reopen(client, trials["t2"])
    end_run(client, trials["t2"], "FINISHED")
    rows = [
        TrialRow("t0", {"ema.start": 0.99}, 3.0, "ok", 8, None),
        TrialRow("t1", {"ema.start": 0.996}, 2.0, STOPPED, 4, None),
        TrialRow("t2", {"ema.start": 0.999}, 3.5, "ok", 8, None),
    ]
    _finish_parent_run(uri, sweep, rows, rows[2], "x: 1\n", "rankme")
    for t, run_id in trials.items():
        assert client.get_run(run_id).info.status == "FINISHED", t
    assert client.get_run(trials["t1"]).data.tags["radjepa.status"] == STOPPED
    assert client.get_run(sweep).info.status == "FINISHED"

    failed, _ = parent_run(cfg("y"), str(tmp_path), str(tmp_path / "s2"), False, {})
    why = "ConfigError: invalid configuration: ema: Value error, ema.start must be <= ema.end"
    rows = [TrialRow(f"f{i}", {"ema.start": 0.999}, None, "error", None, None, why) for i in (0, 1)]
    _finish_parent_run(uri, failed, rows, None, None, "rankme")
    run = client.get_run(failed)
    assert run.info.status == "FAILED"
    assert (
        run.data.tags["radjepa.failure"] == "every trial failed (2); the reasons are in trials.json"
    )
    listed = json.loads(
        client.download_artifacts(failed, "trials.json", str(tmp_path))
        and (tmp_path / "trials.json").read_text()
    )
    assert [t["error"] for t in listed] == [why, why] and listed[0]["status"] == "error"


def test_a_failure_s_tags_go_once_a_re_run_continues_or_finishes_the_run(tmp_path):
    # a diverged pretrain run continued with allow_config_change, and a sweep whose trials
    # all failed continued with --resume, ended FINISHED still tagged as diverged or failed
    from pipelines.pretrain_tracking import start_tracking
    from pipelines.sweep import TrialRow
    from pipelines.sweep_tracking import _finish_parent_run, parent_run
    from pipelines.tracking import client as tracking_client
    from pipelines.tracking import mark_run
    from pipelines.tracking_runs import end_run
    from radjepa.config import load_config

    failure_tags = {"radjepa.failure", "radjepa.diverged", "radjepa.diverged_at_step"}
    cfg = load_config(
        REPO / "configs" / "tiny_cpu.yaml",
        [f"train.output_dir={tmp_path}", "train.run_name=r1", "tune.name=s1"],
    )
    run_id, uri = start_tracking(cfg, str(tmp_path), str(tmp_path / "r1"))
    client = tracking_client(uri)
    client.set_tag(run_id, "radjepa.diverged_at_step", "40")  # as pretrain tags it
    client.set_tag(run_id, "radjepa.diverged", "loss is nan")
    mark_run(uri, run_id, "FAILED")
    sweep, _ = parent_run(cfg, str(tmp_path), str(tmp_path / "s1"), False, {})
    failed = [TrialRow("t0", {}, None, "error", None, None, "OSError: gone")]
    _finish_parent_run(uri, sweep, failed, None, None, "rankme")
    why = client.get_run(sweep).data.tags["radjepa.failure"]

    assert start_tracking(cfg, str(tmp_path), str(tmp_path / "r1"))[0] == run_id  # the re-run
    assert parent_run(cfg, str(tmp_path), str(tmp_path / "s1"), True, {})[0] == sweep
    for resumed in (run_id, sweep):
        tags = client.get_run(resumed).data.tags
        assert client.get_run(resumed).info.status == "RUNNING"
        assert not failure_tags & set(tags), tags
    tags = client.get_run(run_id).data.tags
    assert tags["radjepa.diverged_before"] == "loss is nan"
    assert tags["radjepa.diverged_at_step_before"] == "40"
    assert client.get_run(sweep).data.tags["radjepa.failure_before"] == why
    ok = TrialRow("t0", {}, 3.0, "ok", 8, None)
    _finish_parent_run(uri, sweep, [ok], ok, "x: 1\n", "rankme")
    assert client.get_run(sweep).info.status == "FINISHED"
    assert "radjepa.failure" not in client.get_run(sweep).data.tags

    # a run ended FINISHED by its driver without having been reopened loses them too; one
    # ended FAILED keeps them (they say why)
    other, _ = start_tracking(cfg, str(tmp_path), str(tmp_path / "r2"))
    for ended, status in ((run_id, "FAILED"), (other, "FINISHED")):
        client.set_tag(ended, "radjepa.diverged", "weights are inf")
        end_run(client, ended, status)
    assert client.get_run(run_id).data.tags["radjepa.diverged"] == "weights are inf"
    tags = client.get_run(other).data.tags
    assert "radjepa.diverged" not in tags and tags["radjepa.diverged_before"] == "weights are inf"


def test_a_run_that_cannot_be_ended_after_an_error_is_said_in_one_line(
    tmp_path, migrated_store, caplog
):
    # the warning printed the store's whole traceback beside the command's one-line error (a
    # sqlite store an interrupted write left locked, in one CI run)
    import logging

    from pipelines.tracking import mark_run

    uri = migrated_store(tmp_path / "mlflow.db")
    gone = "0" * 32  # a store that cannot end the run: one line, the traceback at DEBUG only
    with caplog.at_level(logging.DEBUG, logger="pipelines.tracking"):
        mark_run(uri, gone, "FAILED")
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.exc_info is None and "\n" not in warning.getMessage()
    assert warning.getMessage().startswith(f"could not mark MLflow run {gone} as FAILED (")

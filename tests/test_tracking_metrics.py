"""Training metrics reach MLflow without holding up training: a store that does not answer, or
refuses writes for a while, costs no step time, and its values are kept and written once it
takes them again (real MLflow client, a real closed loopback port, a real sqlite store)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from serve_helpers import free_port

from pipelines.tracking_metrics import MetricSink


def test_an_unreachable_tracking_server_never_holds_up_a_step(caplog):
    # against a server that stopped answering, one metric write took 247 s (MLflow retries each
    # request 7 times with back-off), inside the training loop: a GPU job stood still
    sink = MetricSink(f"http://127.0.0.1:{free_port()}", "0" * 32, max_pending=5)
    started = time.monotonic()
    for step in (1, 2, 3):
        sink.log({"loss": 1.0 / step, "lr": 0.1, "momentum": 0.99}, step)
    assert time.monotonic() - started < 0.5
    lost = sink.close(timeout_s=1)
    assert time.monotonic() - started < 5
    assert lost == 9  # 3 steps x 3 values: queued, dropped past max_pending, or in flight
    assert "9 metric values of MLflow run" in caplog.text


@pytest.fixture
def store_run(tmp_path, migrated_store):
    import mlflow

    from pipelines.tracking import ensure_experiment

    uri = migrated_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    return uri, client, client.create_run(ensure_experiment(uri, "radjepa")).info.run_id


def test_values_refused_for_a_while_are_written_in_order_once_the_store_takes_them(
    store_run, caplog
):
    uri, client, run_id = store_run
    sink = MetricSink(uri, run_id, retry_s=0.2)
    sink.log({"loss": 1.0}, 1)
    _wait_for(lambda: len(client.get_metric_history(run_id, "loss")) == 1)

    client.delete_run(run_id)  # MLflow refuses writes to a deleted run: a store that says no
    logged_at = int(time.time() * 1000)
    for step in (2, 3, 4):
        sink.log({"loss": 1.0 / step}, step)
    _wait_for(lambda: "MLflow metric logging failed" in caplog.text)
    client.restore_run(run_id)

    assert sink.close(timeout_s=30) == 0
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    # each value keeps the time its step was logged, not the time the store took it
    assert all(abs(m.timestamp - logged_at) < 2000 for m in history[1:])
    assert "works again" in caplog.text


def _wait_for(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_rank_0_waits_at_the_end_longer_than_one_mlflow_request_retries():
    # a write that met a stopped server sits in MLflow's own retries; a 60 s wait at the end of
    # training ran out between two of them and 174 values were lost though the server was back
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_BACKOFF_JITTER,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    )
    from urllib3.util.retry import Retry

    from pipelines.pretrain import METRICS_FLUSH_S

    retries = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()
    retry, span = Retry(total=retries, backoff_factor=MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()), 0.0
    for _ in range(retries):
        retry = retry.increment(method="POST", url="/", error=ConnectionRefusedError())
        span += retry.get_backoff_time() + MLFLOW_HTTP_REQUEST_BACKOFF_JITTER.get()
    assert span > 200  # MLflow's defaults: 7 retries, 244 s of back-off plus jitter
    assert METRICS_FLUSH_S > span


def test_a_resumed_run_keeps_one_value_per_step_and_logs_the_redone_steps_as_replays(store_run):
    # a worker group restarted from the step-2 checkpoint (or a re-run of the same command)
    # redoes steps 3-4, which the run already held: they were logged again under the same keys
    # and steps, two values per step on every curve
    uri, client, run_id = store_run
    first = MetricSink(uri, run_id)
    for step in (1, 2, 3, 4):
        first.log({"loss": float(step), "lr": 0.1}, step)
    assert first.close(timeout_s=30) == 0
    assert "radjepa.resumes" not in client.get_run(run_id).data.tags  # a new run, no resume

    again = MetricSink(uri, run_id, start_step=2)
    for step in (3, 4, 5, 6):
        again.log({"loss": 10.0 * step, "lr": 0.2}, step)
    assert again.close(timeout_s=30) == 0

    def history(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]

    assert history("loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0)]
    assert [s for s, _ in history("lr")] == [1, 2, 3, 4, 5, 6]
    assert history("replay/loss") == [(3, 30.0), (4, 40.0)]
    assert history("replay/lr") == [(3, 0.2), (4, 0.2)]
    tags = client.get_run(run_id).data.tags
    assert tags["radjepa.resumes"] == "1" and tags["radjepa.resumed_from_step"] == "2"
    assert "from step 2; steps 3-4 were logged before" in tags["radjepa.resume.1"]

    # a second restart, from the step-6 checkpoint: nothing redone, counted all the same
    third = MetricSink(uri, run_id, start_step=6)
    third.log({"loss": 70.0}, 7)
    assert third.close(timeout_s=30) == 0
    tags = client.get_run(run_id).data.tags
    assert tags["radjepa.resumes"] == "2" and tags["radjepa.resumed_from_step"] == "6"
    assert "redone" not in tags["radjepa.resume.2"]
    assert history("loss")[-1] == (7, 70.0) and len(history("replay/loss")) == 2


def test_a_resume_that_logs_nothing_is_recorded_all_the_same(store_run):
    # a re-run that resumed at step 4 and diverged at step 6, before its first log step
    # (train.log_every 100), closed its sink with nothing queued: the run recorded no resume
    # (the tags were written with the first value), and its record of what happened was wrong
    uri, client, run_id = store_run
    first = MetricSink(uri, run_id)
    first.log({"loss": 1.0}, 4)
    assert first.close(timeout_s=30) == 0

    again = MetricSink(uri, run_id, start_step=4)
    assert again.close(timeout_s=30) == 0
    tags = client.get_run(run_id).data.tags
    assert tags["radjepa.resumes"] == "1" and tags["radjepa.resumed_from_step"] == "4"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [4]


def test_a_resume_record_the_store_does_not_take_holds_the_end_briefly_and_is_said(
    monkeypatch, caplog
):
    # with nothing logged (an attempt that failed before its first log step), close() waits
    # for the resume record alone: against a store that stopped answering it sat in MLflow's
    # own retries (~250 s) at the end of the attempt, then said nothing of the record
    import pipelines.tracking_metrics as tm

    monkeypatch.setattr(tm, "_RECORD_WAIT_S", 1.0)
    sink = MetricSink(f"http://127.0.0.1:{free_port()}", "0" * 32, start_step=4)
    _wait_for(lambda: sink._metric is not None)  # MLflow imported: the writer asks the store
    started = time.monotonic()
    assert sink.close(timeout_s=300) == 0
    assert time.monotonic() - started < 10
    assert "whether this attempt resumed it is not recorded" in caplog.text


def _fresh_python(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``script`` run by a Python process of its own (nothing of MLflow imported yet, as in
    a Ray Train worker before its first step), with this repository importable."""
    import os
    import sys

    repo = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_mlflow_is_imported_by_the_writer_thread_not_by_the_training_loop(tmp_path):
    # the sink's constructor imported mlflow.entities (~1 s, more on a loaded box) in the
    # training loop, before the first step of every run: in a fresh process, the import is
    # seen from the thread that makes it
    script = """
import importlib.abc, sys, threading
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mlflow":
            seen.append(threading.current_thread().name)
        return None
sys.meta_path.insert(0, Watch())
from pipelines.tracking_metrics import MetricSink
sink = MetricSink(sys.argv[1], "0" * 32, retry_s=0.2)
sink.log({"loss": 1.0}, 1)
sink.close(timeout_s=120)  # returns once the writer tried: no such run in the new store
print(seen)
"""
    out = _fresh_python(script, f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['mlflow-metrics']", out.stdout


def test_a_sink_without_mlflow_counts_every_value_lost_and_says_why_once(tmp_path):
    # with MLflow not importable the writer thread ends at once; log() still queued every value
    # up to max_pending and then warned "MLflow unreachable for a long time", a wrong cause
    script = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
sys.modules["mlflow"] = None  # any import of mlflow now fails
from pipelines.tracking_metrics import MetricSink
sink = MetricSink("sqlite:///unused.db", "0" * 32, max_pending=5)
sink._thread.join(60)  # the writer has given up
for step in range(1, 11):
    sink.log({"loss": 1.0, "lr": 0.1}, step)
print("lost", sink.close(timeout_s=5), len(sink._pending))
"""
    out = _fresh_python(script, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["lost", "20", "0"], out.stdout + out.stderr
    assert out.stderr.count("MLflow metric logging is off: cannot import MLflow") == 1, out.stderr
    assert "unreachable" not in out.stderr, out.stderr


def test_a_failing_store_is_retried_every_retry_s_not_at_every_step_that_logs(monkeypatch):
    """Each log() woke the writer's wait: a store that failed was retried at every log step
    (every step at train.log_every=1), each try a request that may itself wait its timeout."""
    tries: list[float] = []

    def failing(self, batch):
        tries.append(time.monotonic())
        return False

    monkeypatch.setattr(MetricSink, "_write", failing)
    sink = MetricSink("sqlite:///unused.db", "0" * 32, retry_s=1.0)
    _wait_for(lambda: len(tries) == 1)
    for step in range(1, 41):  # 40 steps logged within 0.4 s
        sink.log({"loss": 1.0}, step)
        time.sleep(0.01)
    assert len(tries) == 1
    _wait_for(lambda: len(tries) == 2)
    assert tries[1] - tries[0] >= 0.95
    assert sink.close(timeout_s=0) == 40  # a last try on close, then the values are lost

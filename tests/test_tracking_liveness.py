"""What the MLflow store tells about who is alive and who moved what: a resumed run is not reaped
before its first new step, a proxy in front of a downed tracking server is "does not answer",
and two promotes at once leave a true record (real sqlite MLflow stores, a real loopback HTTP
server)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from serve_helpers import REPO, TINY_CONFIG

HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS


def test_a_run_resumed_days_after_its_last_step_is_not_stale_before_its_first_new_one(
    tmp_path, migrated_store
):
    # reopen only set the run RUNNING (MLflow cannot clear its end time, nor move its start):
    # resumed on Friday after a reap on Tuesday, it looked idle since Monday's last step, and a
    # cron `runs reap --older-than 2h` before the resumed attempt's first step marked it KILLED
    import mlflow
    from mlflow.entities import Metric

    from pipelines.tracking import ensure_experiment
    from pipelines.tracking_runs import REOPENED_TAG, reap, reopen, stale_runs

    uri = migrated_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment(ensure_experiment(uri, "radjepa"))
    now = int(time.time() * 1000)
    run_id = client.create_run(experiment.experiment_id, start_time=now - 4 * DAY_MS).info.run_id
    client.log_batch(run_id, metrics=[Metric("loss", 1.0, now - 4 * DAY_MS + HOUR_MS, 100)])
    tuesday = now - 3 * DAY_MS
    reap(client, stale_runs(client, [experiment], 2 * 3600, tuesday), "2h", tuesday)
    assert client.get_run(run_id).info.status == "KILLED"

    reopen(client, run_id, now)  # the same pretrain command again: Ray is starting
    assert client.get_run(run_id).info.status == "RUNNING"
    ten_minutes_on = now + 10 * 60 * 1000
    assert stale_runs(client, [experiment], 2 * 3600, ten_minutes_on) == []
    # the sign of life is a tag: no chart of the run shows a value that training never logged
    run = client.get_run(run_id)
    assert set(run.data.metrics) == {"loss"} and REOPENED_TAG in run.data.tags
    # and a resumed attempt that dies before its first step is reaped like any other
    [stale] = stale_runs(client, [experiment], 2 * 3600, now + 3 * HOUR_MS)
    assert stale.run_id == run_id and stale.last_activity_ms // 1000 == now // 1000


@contextmanager
def _answering(status: int) -> Iterator[str]:
    """A loopback HTTP server answering every request with ``status``: an ingress in front of a
    tracking server that is down answers 502, 503 or 504."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = f"<html><body>{status}</body></html>".encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET  # noqa: N815 - MLflow's own calls get the same answer

        def log_message(self, *args):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


@pytest.mark.parametrize(
    ("status", "phrase"),
    [(502, "Bad Gateway"), (503, "Service Unavailable"), (504, "Gateway Timeout")],
)
def test_a_proxy_answering_for_a_server_that_is_down_does_not_pass(status, phrase):
    # any HTTP answer passed, so MLflow's client then retried the proxy's 502 with back-off
    # for about 4 minutes of silence before it failed
    from pipelines.tracking import check_reachable

    with _answering(status) as uri:
        started = time.monotonic()
        with pytest.raises(ConnectionError) as err:
            check_reachable(uri, timeout_s=2)
        assert time.monotonic() - started < 3
    said = str(err.value)
    assert said.startswith(f"the MLflow tracking server {uri} does not answer (its /health ")
    assert f"{status} {phrase}" in said and "\n" not in said


def test_a_server_that_answers_anything_else_passes():
    # auth and paths are for MLflow's own calls to report
    from pipelines.tracking import check_reachable

    for status in (200, 401, 404, 500):
        with _answering(status) as uri:
            check_reachable(uri, timeout_s=2)


def test_models_list_through_a_proxy_whose_server_is_down_says_so_in_seconds(tmp_path):
    with _answering(502) as uri:
        started = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "models", "list", "-c", str(TINY_CONFIG)]
            + ["--set", f"tracking.uri={uri}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=90,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )
        took = time.monotonic() - started
    assert res.returncode == 2, res.stderr
    assert f"the MLflow tracking server {uri} does not answer" in res.stderr
    assert "502 Bad Gateway" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert took < 60  # the interpreter and imports; it was over 4 minutes


@pytest.fixture
def registry(tmp_path, migrated_store):
    """``enc`` with versions 1, 2 and 3 (READY) in a sqlite store, @champion -> 1."""
    import mlflow

    from pipelines.model_registry import promote
    from pipelines.tracking import ensure_experiment

    uri = migrated_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    run_id = client.create_run(ensure_experiment(uri, "radjepa")).info.run_id
    (tmp_path / "model").mkdir()
    client.create_registered_model("enc")
    for _ in range(3):
        client.create_model_version("enc", source=str(tmp_path / "model"), run_id=run_id)
    promote(uri, "enc", "1", "champion", "the first", actor="cy")
    return uri, client


class _Then:
    def __init__(self, before=lambda: None, after=lambda: None) -> None:
        self.before, self.after = before, after


@contextmanager
def _during_first(method: str, then: _Then) -> Iterator[None]:
    """Run ``then`` around the first call of MlflowClient.``method`` (just before it, or just
    after it): another operator's command acting at that moment, on the same real store."""
    import mlflow

    original = getattr(mlflow.MlflowClient, method)
    calls = []

    def hooked(self, *args, **kwargs):
        first = not calls
        calls.append(args)
        if first:
            then.before()
        done = original(self, *args, **kwargs)
        if first:
            then.after()
        return done

    setattr(mlflow.MlflowClient, method, hooked)
    try:
        yield
    finally:
        setattr(mlflow.MlflowClient, method, original)


def test_a_promote_records_the_version_the_alias_held_when_it_moved(registry):
    # `previous` came from the first look-up: bo promoted 3 in between, and ana's record said
    # she replaced 1 (overwriting bo's demotion of 1) while 3, which she did replace, had none
    from pipelines.model_registry import promote

    uri, client = registry
    bo = _Then(before=lambda: promote(uri, "enc", "3", "champion", "B: 3 better", actor="bo"))
    with _during_first("get_model_version", bo):
        done = promote(uri, "enc", "2", "champion", "A: 2 better", actor="ana")
    assert done.previous == "3"

    tags = {v: client.get_model_version("enc", v).tags for v in ("1", "2", "3")}
    assert tags["2"]["radjepa.promotion"].endswith(": A: 2 better (replaced version 3)")
    assert tags["3"]["radjepa.promotion"].endswith(": B: 3 better (replaced version 1)")
    assert tags["3"]["radjepa.demotion"].startswith("champion moved to version 2 by ana ")
    assert tags["1"]["radjepa.demotion"].startswith("champion moved to version 3 by bo ")
    assert str(client.get_registered_model("enc").aliases["champion"]) == "2"


def test_a_promote_another_one_overtook_says_where_the_alias_points(registry):
    from pipelines.model_registry import RegistryError, promote

    uri, client = registry
    bo = _Then(after=lambda: promote(uri, "enc", "3", "champion", "B: 3 better", actor="bo"))
    with (
        _during_first("set_registered_model_alias", bo),
        pytest.raises(RegistryError) as err,
    ):
        promote(uri, "enc", "2", "champion", "A: 2 better", actor="ana")
    assert str(err.value).startswith("enc@champion moved to version 2, but something else moved")
    assert "it points to version 3 now" in str(err.value)
    assert str(client.get_registered_model("enc").aliases["champion"]) == "3"
    # both moves happened, and each version says so
    tags = {v: client.get_model_version("enc", v).tags for v in ("2", "3")}
    assert tags["3"]["radjepa.promotion"].endswith("(replaced version 2)")
    assert tags["2"]["radjepa.demotion"].startswith("champion moved to version 3 by bo ")


def test_a_record_that_fails_after_the_alias_moved_says_the_alias_moved(registry):
    # it said "cannot read the MLflow store", and the operator could not tell whether servers
    # would now load the new version
    from pipelines.model_registry import RegistryError, promote

    uri, client = registry
    # version 1 (the one replaced) is deleted by someone else right after the alias moved
    gone = _Then(after=lambda: client.delete_model_version("enc", "1"))
    with (
        _during_first("set_registered_model_alias", gone),
        pytest.raises(RegistryError) as err,
    ):
        promote(uri, "enc", "2", "champion", "A: 2 better", actor="ana")
    said = str(err.value)
    assert said.startswith("enc@champion moved to version 2, but recording it failed: "), said
    assert "\n" not in said
    assert str(client.get_registered_model("enc").aliases["champion"]) == "2"

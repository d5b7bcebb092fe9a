"""`radjepa models list / promote`: moving the alias servers load, with a record of the move,
against a real MLflow registry on sqlite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from serve_helpers import REPO, TINY_CONFIG, make_checkpoint

from pipelines.model_registry import RegistryError, list_versions, promote


@pytest.fixture
def store(tmp_path, monkeypatch, migrated_store):
    """Two versions of ``tiny-enc`` registered as pretrain registers them, in the default store
    of ``train.output_dir``; returns (uri, the --set that names that output_dir)."""
    import mlflow

    from pipelines.tracking import ensure_experiment, register_artifact_dir, tracking_uri
    from radjepa.config import load_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # MLflow's client follows this, serve's lookup does not: versions were registered in one
    # store and looked for in the other. The registry is the tracking store's own
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    runs = tmp_path / "runs"
    cfg = load_config(TINY_CONFIG, [f"train.output_dir={runs}"])
    uri = tracking_uri(cfg.tracking, runs)
    assert migrated_store(runs / "mlflow.db") == uri
    exp = ensure_experiment(uri, cfg.tracking.experiment, str(runs))
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    ckpt = make_checkpoint(tmp_path / "ckpt")
    for step in ("7", "9"):
        run = client.create_run(exp)
        client.log_artifacts(run.info.run_id, str(ckpt), f"checkpoint-step-{step}")
        register_artifact_dir(
            uri,
            run.info.run_id,
            f"checkpoint-step-{step}",
            "tiny-enc",
            tags={"run_name": f"run-{step}", "step": step},
        )
        client.set_terminated(run.info.run_id, "FINISHED")
    return uri, f"train.output_dir={runs}"


def test_promotion_moves_the_alias_and_both_versions_record_it(store):
    from serve.registry import registered_version

    uri, _ = store
    first = promote(uri, "tiny-enc", "1", "champion", "beat the baseline", actor="ana")
    assert first.previous is None
    second = promote(uri, "tiny-enc", "2", "champion", "  AUROC +0.02\n on CXR14 ", actor="bo")
    assert second.previous == "1"
    assert str(registered_version("models:/tiny-enc@champion", tracking_uri=uri).version) == "2"

    rows = {r.version: r for r in list_versions(uri, "tiny-enc")}
    assert list(rows) == ["2", "1"]  # newest first
    assert rows["2"].aliases == ("champion",) and rows["1"].aliases == ()
    assert rows["2"].step == "9" and rows["2"].run_name == "run-9" and rows["2"].status == "READY"
    assert rows["2"].promoted.startswith("champion by bo at ")
    assert rows["2"].promoted.endswith(": AUROC +0.02 on CXR14 (replaced version 1)")
    import mlflow

    tags = mlflow.MlflowClient(uri, registry_uri=uri).get_model_version("tiny-enc", "1").tags
    assert tags["radjepa.demotion"].startswith("champion moved to version 2 by bo at ")
    again = promote(uri, "tiny-enc", "2", "champion", "re-run")
    assert again.previous == again.version == "2"  # nothing moved, nothing recorded
    assert "re-run" not in list_versions(uri, "tiny-enc")[0].promoted
    # the same version spelled "02": version 2 was tagged as demoted in favour of itself
    spelled = promote(uri, "tiny-enc", "02", "champion", "leading zero")
    assert spelled.previous == spelled.version == "2"
    tags = mlflow.MlflowClient(uri, registry_uri=uri).get_model_version("tiny-enc", "2").tags
    assert "radjepa.demotion" not in tags and "leading zero" not in tags["radjepa.promotion"]


@pytest.mark.parametrize(
    "args, match",
    [
        (("tiny-enc", "5", "champion", "why"), "tiny-enc has no version 5"),
        (("no-such", "1", "champion", "why"), "no registered model named 'no-such'"),
        (("tiny-enc", "1", "champion", "   "), "needs a reason"),
        (("tiny-enc", "1", "latest", "why"), "alias 'latest'"),
        (("tiny-enc", "1", "v2", "why"), "alias 'v2'"),
        (("tiny-enc", "1", "V2", "why"), "alias 'V2'"),
        (("tiny-enc", "1", "prod 2026", "why"), "alias 'prod 2026'"),
        (("tiny-enc", "1", "team/prod", "why"), "alias 'team/prod'"),
        (("tiny-enc", "1", "", "why"), "alias ''"),
    ],
)
def test_a_promotion_that_cannot_be_done_changes_nothing(store, args, match):
    uri, _ = store
    with pytest.raises(RegistryError, match=match):
        promote(uri, *args)
    assert all(not r.aliases and r.promoted is None for r in list_versions(uri, "tiny-enc"))


def test_an_alias_mlflow_accepts_is_accepted(store):
    """MLflow's rule, not a stricter one: a dated alias starting with a digit was refused."""
    from serve.registry import registered_version

    uri, _ = store
    done = promote(uri, "tiny-enc", "2", "2026-12-prod", "December release")
    assert (done.alias, done.version) == ("2026-12-prod", "2")
    found = registered_version("models:/tiny-enc@2026-12-prod", tracking_uri=uri)
    assert str(found.version) == "2"


def _radjepa(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("radjepa")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipelines.cli"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_cli_promotes_lists_and_refuses_in_one_line(store, tmp_path):
    _, output_dir = store
    common = ["-c", str(TINY_CONFIG), "--set", output_dir, "--name", "tiny-enc"]
    done = _radjepa("models", "promote", "2", "--reason", "first release", *common, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "tiny-enc@champion -> version 2" in done.stdout
    assert "models:/tiny-enc@champion" in done.stdout

    listed = _radjepa("models", "list", *common, cwd=REPO)
    assert listed.returncode == 0, listed.stderr
    assert "champion" in listed.stdout and "first release" in listed.stdout

    missing = _radjepa("models", "promote", "2", *common, cwd=REPO)
    assert missing.returncode == 2 and "--reason" in missing.stderr  # required by typer
    nowhere = tmp_path / "typo"
    bad = _radjepa(
        "models", "list", "-c", str(TINY_CONFIG), "--set", f"train.output_dir={nowhere}", cwd=REPO
    )
    assert bad.returncode == 2 and "there is no MLflow store at" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not nowhere.exists()


def test_a_user_without_a_name_is_recorded_by_uid(store, monkeypatch):
    import getpass

    def nameless() -> str:  # a container uid without a passwd entry
        raise KeyError("getpwuid(): uid not found")

    monkeypatch.setattr(getpass, "getuser", nameless)
    uri, _ = store
    promote(uri, "tiny-enc", "1", "champion", "first")
    assert list_versions(uri, "tiny-enc")[1].promoted.startswith(f"champion by uid {os.getuid()} ")


@pytest.mark.parametrize("command", [["list"], ["promote", "1", "--reason", "why"]])
def test_a_store_that_cannot_be_read_is_one_line_naming_it(tmp_path, command):
    # a file that is not a sqlite database (a copy cut short, another tool's file) was a
    # 25-line sqlalchemy traceback and exit 1; runs reap already said it in one line
    db = tmp_path / "mlflow.db"
    db.write_text("not a database\n")
    args = ["-c", str(TINY_CONFIG), "--set", f"tracking.uri=sqlite:///{db}"]
    res = _radjepa("models", *command, *args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert f"cannot read the MLflow store sqlite:///{db}: " in res.stderr
    assert "file is not a database" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert db.read_text() == "not a database\n"  # left as it was


def test_a_tracking_server_that_does_not_answer_is_said_in_seconds(tmp_path):
    # MLflow retries each request with back-off: `models list` printed retry warnings for
    # minutes before its traceback; pretrain and sweep already asked the server once, briefly
    import time

    from serve_helpers import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    res = _radjepa(
        "models", "list", "-c", str(TINY_CONFIG), "--set", f"tracking.uri={uri}", cwd=tmp_path
    )
    assert res.returncode == 2, res.stderr
    assert f"the MLflow tracking server {uri} does not answer (connection refused)" in res.stderr
    assert "tracking.enabled" not in res.stderr  # no such way out for a registry command
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert time.monotonic() - started < 60


def test_promoting_a_probe_head_says_to_serve_it_with_head(store, tmp_path):
    # the hint said `--model models:/radjepa-probe-head@champion` for a head too: served so,
    # a head is loaded as an encoder; `radjepa serve` takes heads with --head
    import mlflow
    from serve_helpers import register_probe_head

    uri, output_dir = store
    exp = mlflow.MlflowClient(uri, registry_uri=uri).get_experiment_by_name("radjepa").experiment_id
    register_probe_head(uri, exp, "tiny-head", tmp_path / "head")
    common = ["-c", str(TINY_CONFIG), "--set", output_dir]
    done = _radjepa("models", "promote", "1", "-r", "ok", "--name", "tiny-head", *common, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "serve it: --head models:/tiny-head@champion" in done.stdout
    enc = _radjepa("models", "promote", "1", "-r", "ok", "--name", "tiny-enc", *common, cwd=REPO)
    assert "serve it: --model models:/tiny-enc@champion" in enc.stdout


@pytest.mark.parametrize(
    "command",
    [["models", "list"], ["models", "promote", "1", "--reason", "why"], ["runs", "reap"]],
)
def test_a_store_file_without_mlflow_tables_is_refused_and_left_as_it_was(tmp_path, command):
    # MLflow opened a 0-byte mlflow.db (a copy cut short, a `touch`) by creating its tables in
    # it: `models list` answered "no registered model" and left a new ~1 MB store behind.
    # Refused like a missing file, without writing to it.
    db = tmp_path / "mlflow.db"
    db.touch()
    args = ["-c", str(TINY_CONFIG), "--set", f"train.output_dir={tmp_path}"]
    if command == ["runs", "reap"]:
        args += ["--older-than", "2h"]
    res = _radjepa(*command, *args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert f"there is no MLflow store at {db}: the file is empty (0 bytes)" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert db.stat().st_size == 0


def test_a_registry_reference_into_a_file_without_mlflow_tables_changes_nothing(tmp_path):
    # serve, probe and embed resolve models:/ references through the same kind of check
    import sqlite3
    from contextlib import closing

    from serve.registry import ModelNotFound, resolve_model

    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(ModelNotFound, match=r"no MLflow store at .*: the file is empty \(0 bytes"):
        resolve_model("models:/tiny-enc/1", tracking_uri=f"sqlite:///{empty}")
    assert empty.stat().st_size == 0
    other = tmp_path / "other.db"  # another tool's sqlite database
    with closing(sqlite3.connect(other)) as con:
        con.execute("CREATE TABLE notes (text TEXT)")
    with pytest.raises(ModelNotFound, match="the file holds no MLflow tables"):
        resolve_model("models:/tiny-enc@champion", tracking_uri=f"sqlite:///{other}")
    with closing(sqlite3.connect(other)) as con:
        assert [r[0] for r in con.execute("SELECT name FROM sqlite_master")] == ["notes"]


def test_a_store_read_only_to_its_reader_can_be_listed(tmp_path):
    """`models list` or `runs reap --dry-run` from an account (or a mount) that may only read
    the store: every open created ``mlflow.db.lock`` first, and failed on it although MLflow
    itself reads the store fine. The reader's view here is a read-only bind mount."""
    import subprocess

    from pipelines.tracking import client

    store, view = tmp_path / "store", tmp_path / "view"
    store.mkdir()
    view.mkdir()
    client(f"sqlite:///{store / 'mlflow.db'}").create_registered_model("tiny-enc")
    if subprocess.run(["mount", "--bind", str(store), str(view)]).returncode != 0:
        pytest.skip("needs permission to mount (root in a privileged container)")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        uri = f"sqlite:///{view / 'mlflow.db'}"
        with pytest.raises(OSError):
            (view / "probe").write_text("")  # read-only indeed
        # its lock file is taken read-only
        assert [m.name for m in client(uri).search_registered_models()] == ["tiny-enc"]
        (store / "mlflow.db.lock").unlink()
        # no lock file, and none can be made: nothing this reader could build, none needed
        assert [m.name for m in client(uri).search_registered_models()] == ["tiny-enc"]
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)

"""`radjepa submit` / `radjepa jobs` against a REAL Ray head with its job server on loopback.

The head is a separate cluster from the session `ray_session` fixture: its own temp dir, free
ports for every listener, token auth with a throwaway token. Teardown never uses `ray stop`
(which kills every Ray on the machine, including other test sessions'): the head runs as
`ray start --block` in its own session, and we signal exactly the process tree under it (Ray
daemons, workers, job drivers), SIGTERM first, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import jobs

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
N_IMAGES = 4
CLUSTER_DEID_SECRET = secrets.token_hex(16)


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # 401 without a token still means it is up
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"job server at {url} did not come up (exit code {proc.poll()})")


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) for every live process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
        table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def _tree(root: int) -> set[int]:
    """The live, non-zombie processes descending from ``root`` (root included).

    Ray puts job drivers (and may put workers) in sessions of their own, so the head's process
    group alone would miss them; parentage does not change with setsid.
    """
    table = _proc_table()
    found, frontier = set(), [root]
    while frontier:
        pid = frontier.pop()
        if pid in table and table[pid][1] != "Z":
            found.add(pid)
        frontier += [c for c, (ppid, _) in table.items() if ppid == pid and c not in found]
    return found


def _signal_all(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _stop_head(proc: subprocess.Popen[bytes], grace_s: float = 2.0) -> set[int]:
    """Stop the head and everything it spawned, and nothing else; returns survivors (none).

    `ray stop` is not an option: it kills every Ray process on the machine by name, including
    other test sessions'. We signal exactly the process tree under our `ray start` (collected
    before anything dies, so orphans re-parented to init are still ours): SIGTERM, then SIGKILL.
    """
    tree = _tree(proc.pid)
    _signal_all(tree, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _alive(tree):
        time.sleep(0.2)
    for pid in list(_alive(tree)):
        tree |= _tree(pid)  # anything spawned meanwhile
    _signal_all(_alive(tree), signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(tree):
        time.sleep(0.2)
    return _alive(tree)


def _alive(pids: set[int]) -> set[int]:
    table = _proc_table()
    return {p for p in pids if p in table and table[p][1] != "Z"}


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict[str, str]]:
    """A real Ray head (2 CPUs) whose dashboard/job server listens on 127.0.0.1:<free port>.

    Yields the env a client needs (address + token). AF_UNIX socket paths are short-limited,
    so the temp dir is a short one under /tmp, not pytest's tmp_path.
    """
    temp_dir = tempfile.mkdtemp(prefix="rjh", dir="/tmp")
    (gcs, dash, agent_http, agent_grpc, node_mgr, obj_mgr, renv, metrics, client) = _free_ports(9)
    token = secrets.token_hex(32)
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_V2_ENABLED": "1",
        # the cluster's own environment (a pod's Secret, a VM's env file): jobs read it there
        "RADJEPA_DEID_SECRET": CLUSTER_DEID_SECRET,
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--dashboard-agent-listen-port", str(agent_http),
        "--dashboard-agent-grpc-port", str(agent_grpc),
        "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
        "--runtime-env-agent-port", str(renv), "--metrics-export-port", str(metrics),
        "--ray-client-server-port", str(client),
        "--min-worker-port", "0", "--max-worker-port", "0",  # 0/0: OS-assigned worker ports
        "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(200 * 1024**2),
        "--temp-dir", temp_dir, "--disable-usage-stats",
    ]  # fmt: skip
    log_path = Path(temp_dir + ".log")
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_http(url, 60, proc)
        yield {"RAY_JOB_ADDRESS": url, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    except TimeoutError:
        pytest.fail(f"ray head did not start:\n{log_path.read_text()[-3000:]}")
    finally:
        survivors = _stop_head(proc)
        assert not survivors, f"Ray head processes survived teardown: {survivors}"
        shutil.rmtree(temp_dir, ignore_errors=True)
        log_path.unlink(missing_ok=True)


def _radjepa(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess:
    outer = {
        k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"}
    }
    full_env = {**outer, **env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _has_ingest() -> bool:
    return (REPO / "pipelines" / "ingest.py").exists() and "ingest" in _cli_commands()


def _cli_commands() -> set[str]:
    import typer

    from pipelines.cli import app

    return set(typer.main.get_command(app).commands)


@pytest.mark.slow
def test_submit_runs_ingest_to_succeeded_and_jobs_commands_see_it(
    ray_head: dict[str, str], nih_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted((nih_dir / "images").glob("*.png"))[:N_IMAGES]:
        shutil.copy(p, src / p.name)
    dst = tmp_path / "dst"
    job_id = f"rj-ok-{secrets.token_hex(4)}"
    secret = CLUSTER_DEID_SECRET  # in the head's environment, never in the job's record
    env = {**ray_head, "RADJEPA_DEID_SECRET": ""}  # not the submitter's: none is sent
    if _has_ingest():
        cmd = ["ingest", str(src), str(dst), "-c", "configs/tiny_cpu.yaml"]
        cmd += ["--set", "ingest.image_size=128"]  # options after the command travel with it
    else:  # ingest not merged yet: the same path with the cheapest real command
        cmd = ["config", "validate", "-c", "configs/tiny_cpu.yaml"]

    res = _radjepa(["submit", "--job-id", job_id, *cmd], env)

    assert res.returncode == 0, res.stdout + res.stderr
    assert f"job {job_id} SUCCEEDED" in res.stderr
    assert secret not in res.stdout + res.stderr
    if cmd[0] == "ingest":
        from radjepa.imaging.deid import keyed_hash

        assert f"{N_IMAGES} stored" in res.stdout  # the job's own summary, streamed back
        table = pq.read_table(dst / "images")
        assert table.num_rows == N_IMAGES
        assert set(table.column("height").to_pylist()) == {128}
        # pseudonyms were keyed with the cluster's secret, not the public development key
        expected = {keyed_hash(secret.encode(), "source", str(src / p.name)) for p in src.iterdir()}
        assert set(table.column("source_hash").to_pylist()) == expected
    else:
        assert "ok: configs/tiny_cpu.yaml" in res.stdout  # the streamed job log

    listed = _radjepa(["jobs", "list"], ray_head)
    assert listed.returncode == 0, listed.stderr
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    logs = _radjepa(["jobs", "logs", job_id], ray_head)
    assert logs.returncode == 0 and logs.stdout.strip()
    assert logs.stdout.strip() in res.stdout or res.stdout.strip() in logs.stdout
    stop = _radjepa(["jobs", "stop", job_id], ray_head)
    assert stop.returncode == 0 and "already finished" in stop.stdout


@pytest.mark.slow
def test_failing_job_exits_nonzero_and_prints_its_error(ray_head: dict[str, str]) -> None:
    # a config the cluster lacks: a local one, or a --set, is checked before it is submitted
    res = _radjepa(["submit", "config", "validate", "-c", "/cluster-only/bogus.yaml"], ray_head)

    assert res.returncode == 2, res.stdout + res.stderr  # the driver's own user-error code
    assert re.search(r"job \S+ FAILED", res.stderr)
    assert "bogus" in res.stderr  # Ray's failure message carries the job's last log lines

    for follow in ([], ["--follow"]):  # the log stream's 404 is the same clear user error
        missing = _radjepa(["jobs", "logs", "raysubmit_doesnotexist", *follow], ray_head)
        assert missing.returncode == 2 and "raysubmit_doesnotexist" in missing.stderr
        assert "Traceback" not in missing.stderr


@pytest.mark.slow
def test_a_job_refuses_outputs_in_its_temporary_working_dir(
    ray_head: dict[str, str], nih_shards: Path
) -> None:
    """A relative train.output_dir in a job is the job's uploaded copy, named by the code's
    hash: the refusal looked for RAY_JOB_SUBMISSION_ID, which Ray 2.60 never sets, so a real
    job trained and left its checkpoints and runs there."""
    args = ["submit", "pretrain", "-c", "configs/tiny_cpu.yaml", "--data", str(nih_shards)]
    res = _radjepa([*args, "--set", "train.output_dir=runs"], ray_head)

    assert res.returncode != 0, res.stdout + res.stderr
    assert "train.output_dir is the relative path 'runs' inside a Ray Job" in res.stderr


@pytest.mark.slow
def test_a_job_knows_the_commit_it_was_submitted_from(ray_head: dict[str, str]) -> None:
    """The upload leaves .git behind, so a job's MLflow runs recorded no commit at all: the
    submitter now passes the one it read, and the job reports it as such."""
    from pipelines.provenance import git_state

    state = git_state(REPO / "pipelines" / "cli.py")
    assert state is not None  # the tests run from a checkout
    commit, dirty = state
    res = _radjepa(["submit", "version"], ray_head)

    assert res.returncode == 0, res.stdout + res.stderr
    changes = " with uncommitted changes" if dirty else ""
    assert f"commit {commit}{changes} (as submitted)" in res.stdout


@pytest.mark.slow
def test_no_wait_prints_the_id_and_logs_follow_picks_it_up(ray_head: dict[str, str]) -> None:
    sub = _radjepa(["submit", "--no-wait", "--", "config", "show"], ray_head)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().splitlines()[-1]
    assert job_id.startswith("raysubmit_")

    follow = _radjepa(["jobs", "logs", job_id, "--follow"], ray_head)

    assert follow.returncode == 0, follow.stdout + follow.stderr
    assert "model:" in follow.stdout  # `config show` printed the resolved YAML on the cluster


@pytest.mark.slow
def test_jobs_stop_ends_a_running_job_and_follow_exits_stopped(ray_head: dict[str, str]) -> None:
    from ray.job_submission import JobSubmissionClient

    # a plain long-running entrypoint: what is under test is stop + follow, not the command
    client = JobSubmissionClient(
        ray_head["RAY_JOB_ADDRESS"],
        headers={"Authorization": f"Bearer {ray_head['RAY_AUTH_TOKEN']}"},
    )
    job_id = client.submit_job(entrypoint="echo started; sleep 120")
    deadline = time.monotonic() + 30
    while jobs.outcome(client, job_id).status != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.3)

    stop = _radjepa(["jobs", "stop", job_id], ray_head)
    assert stop.returncode == 0 and f"stop requested for {job_id}" in stop.stdout
    follow = _radjepa(["jobs", "logs", job_id, "--follow"], ray_head, timeout=60)

    assert follow.returncode == jobs.EXIT_STOPPED, follow.stdout + follow.stderr
    assert f"job {job_id} STOPPED" in follow.stderr
    assert "started" in follow.stdout


@pytest.mark.slow
def test_jobs_stop_gives_a_submitted_job_time_to_end_its_runs(
    ray_head: dict[str, str], tmp_path: Path
) -> None:
    """Ray's job supervisor sends SIGKILL 3 s after SIGTERM by default: an interrupted sweep
    needed 3.4 s to have Tune save its state and end its MLflow runs KILLED, so a `jobs stop`
    could leave them RUNNING. A submission carries a longer grace; this job's SIGTERM handler
    needs 6 s, as the submission's env gives it, and says so only if it was not killed."""
    import dataclasses

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(
        ray_head["RAY_JOB_ADDRESS"],
        headers={"Authorization": f"Bearer {ray_head['RAY_AUTH_TOKEN']}"},
    )
    sub = jobs.build_submission(["version"], working_dir=tmp_path, environ={})
    # the marker is computed: the log's first line quotes the entrypoint itself
    slow_exit = "trap 'sleep 6; echo ended-$((6*7)); exit 0' TERM; echo started; sleep 120 & wait"
    sub = dataclasses.replace(sub, entrypoint=f"bash -c {shlex.quote(slow_exit)}")
    job_id = jobs.submit(client, sub)
    deadline = time.monotonic() + 60
    while "started" not in jobs.logs(client, job_id) and time.monotonic() < deadline:
        time.sleep(0.3)

    assert jobs.stop(client, job_id)
    res = jobs.wait(client, job_id, timeout_s=60)

    assert res.status == "STOPPED"
    assert "ended-42" in jobs.logs(client, job_id)


@pytest.mark.slow
def test_jobs_stop_ends_a_submitted_ingest_as_ctrl_c_does(
    ray_head: dict[str, str], nih_dir: Path, tmp_path: Path
) -> None:
    """The job supervisor's SIGTERM met ray.init's handler in the ingest's driver: Ray's C++
    stack dump, exit 15, no last line. Now the job's log ends with the interrupted line."""
    from ray.job_submission import JobSubmissionClient

    from pipelines.ingest import INTERRUPTED

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for p in sorted((nih_dir / "images").glob("*.png"))[:300]:
        shutil.copy(p, src / p.name)
    cmd = ["ingest", str(src), str(dst), "-c", "configs/tiny_cpu.yaml"]
    sub = _radjepa(["submit", "--no-wait", "--", *cmd], ray_head)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().splitlines()[-1]
    client = JobSubmissionClient(
        ray_head["RAY_JOB_ADDRESS"],
        headers={"Authorization": f"Bearer {ray_head['RAY_AUTH_TOKEN']}"},
    )
    deadline = time.monotonic() + 90
    while "Starting execution of Dataset" not in jobs.logs(client, job_id):
        assert time.monotonic() < deadline, jobs.logs(client, job_id)[-3000:]
        time.sleep(0.3)

    assert jobs.stop(client, job_id)
    res = jobs.wait(client, job_id, timeout_s=60)

    text = jobs.logs(client, job_id)
    assert res.status == "STOPPED"
    assert "SIGTERM received" not in text and "Traceback" not in text, text[-3000:]
    assert text.strip().splitlines()[-1] == INTERRUPTED, text[-3000:]
    assert not (dst / ".ingest.lock").exists()
    # and on record in DST, with what it kept (a stopped job's run was missing from it)
    manifest = json.loads((dst / "manifest.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["interrupted"]
    assert manifest["images"] == manifest["runs"][0]["ok"]


@pytest.mark.slow
def test_a_working_dir_too_large_to_upload_is_named_with_what_to_do(
    ray_head: dict[str, str], tmp_path: Path
) -> None:
    # the job server takes 100 MiB per request, far under Ray's 512 MiB package limit: a bigger
    # working dir came back as "status code 413: Maximum request body size 104857600 exceeded.."
    wd = tmp_path / "checkout"
    wd.mkdir()
    # random, so the zip keeps it; its first bytes fixed, so it never begins like a DICOM
    (wd / "weights.onnx").write_bytes(b"ONNX" + os.urandom(101 * 1024**2))

    res = _radjepa(["submit", "--working-dir", str(wd), "--", "config", "show"], ray_head)

    assert res.returncode == 2, res.stdout + res.stderr
    error = res.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: submission failed: the zipped working dir {wd} is larger")
    assert "accepts (100 MiB)" in error and ".rayignore" in error and "excludes:" in error


@pytest.mark.slow
def test_the_address_given_wins_over_ray_address_in_the_shell(ray_head: dict[str, str]) -> None:
    # Ray's client replaces the address it is given with $RAY_ADDRESS: `--address` (or
    # RAY_JOB_ADDRESS) naming one cluster went to the one RAY_ADDRESS named, silently
    (dead,) = _free_ports(1)
    server = ray_head["RAY_JOB_ADDRESS"]
    for override in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env = {**ray_head, override: server}
        given = _radjepa(["jobs", "list", "--address", f"http://127.0.0.1:{dead}"], env)
        assert given.returncode == 2, given.stdout + given.stderr
        assert f"cannot reach the Ray job server at http://127.0.0.1:{dead}" in given.stderr
        env["RAY_JOB_ADDRESS"] = f"127.0.0.1:{dead}"
        from_env = _radjepa(["jobs", "list"], env)
        assert from_env.returncode == 2 and f"127.0.0.1:{dead}" in from_env.stderr
        assert "Traceback" not in given.stderr + from_env.stderr
    # host:port in RAY_ADDRESS is the job server's URL, as documented (Ray took it for a GCS
    # address: a traceback after a minute's wait)
    bare = {**ray_head, "RAY_JOB_ADDRESS": "", "RAY_ADDRESS": server.removeprefix("http://")}
    listed = _radjepa(["jobs", "list"], bare)
    assert listed.returncode == 0, listed.stdout + listed.stderr


def test_unreachable_server_and_missing_address_are_user_errors() -> None:
    (port,) = _free_ports(1)
    res = _radjepa(["submit", "--address", f"127.0.0.1:{port}", "config", "validate"], {})
    assert res.returncode == 2
    assert "cannot reach the Ray job server" in res.stderr
    env = {k: "" for k in jobs.ADDRESS_ENVS}
    res = _radjepa(["jobs", "list"], env)
    assert res.returncode == 2 and "no Ray job server address" in res.stderr


def test_submission_uploads_checkout_without_venv_and_no_secret(tmp_path: Path) -> None:
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "RADJEPA_DEID_SECRET": "s3cr3t"}
    sub = jobs.build_submission(["pretrain", "--data", "/d"], working_dir=REPO, environ=environ)

    assert sub.entrypoint == "python -m pipelines.cli pretrain --data /d"
    assert sub.runtime_env["working_dir"] == str(REPO)
    assert {".venv", ".git", "runs", "*.parquet"} <= set(sub.runtime_env["excludes"])
    assert sub.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert len(sub.runtime_env["env_vars"]["RADJEPA_GIT_COMMIT"]) == 40  # .git stays behind
    assert "RADJEPA_DEID_SECRET" not in sub.runtime_env["env_vars"]
    assert "s3cr3t" not in sub.describe()


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1:5000",
        "http://localhost:5000/",
        "https://[::1]:5000",
        "http://127.0.1.1",
        "http://0.0.0.0:5000",  # what `mlflow server --host 0.0.0.0` prints
        "http://[::ffff:127.0.0.1]:5000",
        "http://127.1:5000",
        "http://localhost.localdomain:5000",
    ],
)
def test_a_loopback_tracking_uri_is_not_passed_to_the_job(uri: str, caplog) -> None:
    # a laptop's port-forward to MLflow (set for `radjepa models promote`) replaced the
    # cluster's tracking server: on the head it is the driver's own loopback, and the job's
    # runs failed to log with "does not answer" and no word of where the URI came from
    environ = {"MLFLOW_TRACKING_URI": uri}
    with caplog.at_level("WARNING", logger="pipelines.jobs"):
        sub = jobs.build_submission(["pretrain"], working_dir=REPO, environ=environ)
    assert "MLFLOW_TRACKING_URI" not in sub.runtime_env.get("env_vars", {})
    assert "not passed to the job" in caplog.text
    with pytest.raises(
        jobs.JobsError, match="--pass-env MLFLOW_TRACKING_URI: it names this machine.* --env "
    ):
        jobs.build_submission(
            ["pretrain"], working_dir=REPO, environ=environ, pass_env=["MLFLOW_TRACKING_URI"]
        )
    # a Ray instance on this machine: --env sets it, and nothing says it is not passed
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipelines.jobs"):
        sub = jobs.build_submission(
            ["pretrain"], working_dir=REPO, environ=environ, env={"MLFLOW_TRACKING_URI": uri}
        )
    assert sub.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == uri and not caplog.text
    for remote in ("http://mlflow.mlflow:5000", "http://localhost@mlflow:5000", "http://10.0.0.7"):
        sub = jobs.build_submission(
            ["pretrain"], working_dir=REPO, environ={"MLFLOW_TRACKING_URI": remote}
        )
        assert sub.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == remote


def _refusal(**kwargs) -> str:
    kwargs.setdefault("working_dir", REPO)
    kwargs.setdefault("args", ["ingest", "a", "b"])
    with pytest.raises(jobs.JobsError) as err:
        jobs.build_submission(kwargs.pop("args"), **kwargs)
    return str(err.value)


def test_a_secret_never_goes_into_the_jobs_record(tmp_path: Path) -> None:
    # Ray stores a job's entrypoint and runtime env in plain text in its record: `GET /api/jobs/`
    # and `ray job list` showed RADJEPA_DEID_SECRET (--pass-deid-secret), MLflow's password
    # (--pass-env) and S3 keys (--env) to everyone with the dashboard
    environ = {
        "RADJEPA_DEID_SECRET": "deid-value",
        "MLFLOW_TRACKING_PASSWORD": "mlflow-value",
        "SITE_A": "site-value",
    }
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "cli.py").write_text("")
    (tmp_path / "site.yaml").write_text("ingest:\n  secret_env: SITE_A\n")
    renv = tmp_path / "renv.yaml"
    renv.write_text("env_vars:\n  HF_TOKEN: hf-value\n")
    pip_renv = tmp_path / "pip.yaml"
    pip_renv.write_text("pip:\n  - --extra-index-url https://u:pip-value@pypi.example/simple\n")
    (tmp_path / "keys.yaml").write_text("serve:\n  api_keys_env: SITE_KEYS\n")
    cases = [
        ({"pass_deid_secret": True}, "--pass-deid-secret is refused"),
        ({"pass_env": ["RADJEPA_DEID_SECRET"]}, "RADJEPA_DEID_SECRET would be stored"),
        ({"pass_env": ["MLFLOW_TRACKING_PASSWORD"]}, "MLFLOW_TRACKING_PASSWORD would be"),
        ({"env": {"AWS_SECRET_ACCESS_KEY": "aws-value"}}, "AWS_SECRET_ACCESS_KEY would be"),
        # a base64 key may start with "/" and hold more: it looked like a path and was sent
        (
            {"env": {"AWS_SECRET_ACCESS_KEY": "/wJalrXUtnFEMI/K7MDENG/bPxRfiCY-value"}},
            "AWS_SECRET_ACCESS_KEY would be",
        ),
        ({"runtime_env_file": renv}, "HF_TOKEN would be stored"),
        # a variable the job's config names for the key, whatever it is called
        (
            {"args": ["ingest", "a", "b", "-c", "site.yaml"], "pass_env": ["SITE_A"],
             "working_dir": tmp_path},
            "SITE_A would be stored",
        ),
        # the API's bearer keys, by default name and by the name the config gives them, and
        # plural or glued credential words
        ({"env": {"RADJEPA_API_KEYS": "api-value"}}, "RADJEPA_API_KEYS would be stored"),
        (
            {"args": ["serve", "-c", "keys.yaml"], "env": {"SITE_KEYS": "k-value"},
             "working_dir": tmp_path},
            "SITE_KEYS would be stored",
        ),
        ({"env": {"PGPASSWORD": "pg-value"}}, "PGPASSWORD would be stored"),
        ({"env": {"DB_PASSWORDS": "db-value"}}, "DB_PASSWORDS would be stored"),
        ({"runtime_env_file": pip_renv}, "the runtime env (pip, conda, py_modules ...) holds"),
        (
            {"environ": {"MLFLOW_TRACKING_URI": "http://bob:mlflow-value@mlflow:5000"}},
            "MLFLOW_TRACKING_URI holds a credential",
        ),
        (
            {"args": ["models", "list", "--set", "tracking.uri=postgresql://u:pg-value@db/m"]},
            "the command holds a credential",
        ),
        # credentials in a URL's query and in a connection string passed as well
        (
            {"args": ["pretrain", "--data", "s3://b/s?access_key=AKIA&secret_key=s3-value"]},
            "the command holds a credential",
        ),
        (
            {"environ": {"MLFLOW_TRACKING_URI": "https://mlflow/?token=tok-value"}},
            "MLFLOW_TRACKING_URI holds a credential",
        ),
        (
            {"args": ["ingest", "https://a.blob.core.windows.net/c/x.zip?sv=2022&sig=sas-value",
                      "out"]},
            "the command holds a credential",
        ),
        (
            {"env": {"AZURE_STORAGE_CONNECTION_STRING":
                     "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=az-value"}},
            "AZURE_STORAGE_CONNECTION_STRING holds a credential",
        ),
    ]  # fmt: skip
    for kwargs, says in cases:
        kwargs.setdefault("environ", environ)
        message = _refusal(**kwargs)
        assert says in message, (kwargs, message)
        assert "docs/CLUSTER.md" in message and "dashboard" in message
        assert "-value" not in message  # names only, never values

    # not secrets: whole name parts only, URLs without a password
    fine = {
        "TOKENIZERS_PARALLELISM": "false",
        "KEYRING_BACKEND": "x",
        "DATA": "s3://b/k",
        # references to a secret the cluster holds, and switches, are not secrets
        "GOOGLE_APPLICATION_CREDENTIALS": "/var/secrets/sa.json",
        "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/token",
        "AWS_KMS_KEY_ID": "1234abcd-12ab",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
        "PRIVATE_NETWORK": "10.0.0.0/8",
        "REPORT_URL": "http://host:5000/r?email=a@b.com",
        # query parameters that only look like credentials, and a URL with no password
        "ARCHIVE": "https://data.example.org/x.zip?keyword=chest",
        "LISTING": "s3://b/p?sort_keys=1",
        "DB": "postgresql://mlflow:@db/m",
    }
    sub = jobs.build_submission(
        ["ingest", "s3://u@b/raw", "b"], working_dir=REPO, env=fine, environ={}
    )
    assert fine.items() <= sub.runtime_env["env_vars"].items()


def test_pass_deid_secret_is_a_one_line_refusal_before_any_upload() -> None:
    (dead,) = _free_ports(1)  # refused before the job server is even looked for
    env = {"RAY_JOB_ADDRESS": f"http://127.0.0.1:{dead}", "RADJEPA_DEID_SECRET": "deid-value"}
    for extra in (["--pass-deid-secret"], ["--pass-env", "RADJEPA_DEID_SECRET"]):
        res = _radjepa(["submit", *extra, "--", "ingest", "a", "b"], env)
        assert res.returncode == 2, res.stdout + res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
        assert "Traceback" not in res.stderr and "deid-value" not in res.stdout + res.stderr
        assert "cannot reach" not in res.stderr


def test_an_invalid_local_config_is_refused_before_the_upload(tmp_path: Path) -> None:
    # it was submitted (the error said only once the job's driver had started on the cluster)
    (tmp_path / "bad.yaml").write_text("masks:\n  num_targetz: 3\n")
    (tmp_path / "good.yaml").write_text("train:\n  steps: 3\n")
    message = _refusal(args=["pretrain", "-c", "bad.yaml"], working_dir=tmp_path, environ={})
    assert message == (
        f"not submitted: the job's config {tmp_path / 'bad.yaml'}: invalid configuration:\n"
        "  masks.num_targetz: unknown key"
    )
    # its --set overrides with it
    args = ["sweep", "--config", "good.yaml", "--set", "optim.lr=.inf"]
    message = _refusal(args=args, working_dir=tmp_path, environ={})
    assert "optim.lr: must be a finite number" in message
    # valid, or not here (a path on the cluster's nodes, a bucket): the job reads it there
    for config in ("good.yaml", "/cluster/only.yaml", "s3://bucket/bad.yaml"):
        sub = jobs.build_submission(["pretrain", "-c", config], working_dir=tmp_path, environ={})
        assert config in sub.entrypoint


def test_runtime_env_file_merges_and_bad_input_is_named(tmp_path: Path) -> None:
    f = tmp_path / "re.yaml"
    f.write_text("env_vars:\n  A: '1'\nexcludes: ['bigdir']\npip: ['x']\n")
    sub = jobs.build_submission(
        ["config", "show"], working_dir=tmp_path, runtime_env_file=f, env={"A": "2"}, environ={}
    )
    # --env wins over the file; the stop grace is there unless either sets it
    assert sub.runtime_env["env_vars"] == {"A": "2", jobs.STOP_GRACE_ENV: str(jobs.STOP_GRACE_S)}
    assert "bigdir" in sub.runtime_env["excludes"] and ".venv" in sub.runtime_env["excludes"]
    assert sub.runtime_env["pip"] == ["x"]
    f.write_text(f"env_vars:\n  {jobs.STOP_GRACE_ENV}: '120'\n")
    sub = jobs.build_submission(["version"], working_dir=tmp_path, runtime_env_file=f, environ={})
    assert sub.runtime_env["env_vars"][jobs.STOP_GRACE_ENV] == "120"

    f.write_text("env_vars:\n  A: 1\n")
    with pytest.raises(jobs.JobsError, match="quote numbers"):
        jobs.build_submission(["version"], working_dir=tmp_path, runtime_env_file=f, environ={})
    # a string was split into characters, and its "*" excluded every file from the upload
    f.write_text("excludes: '*.npy'\n")
    with pytest.raises(jobs.JobsError, match=r"excludes must be a list of patterns.*got str"):
        jobs.build_submission(["version"], working_dir=tmp_path, runtime_env_file=f, environ={})
    # empty sections (a key with nothing under it) are no sections, not a wrong type
    f.write_text("env_vars:\nexcludes:\n")
    sub = jobs.build_submission(["version"], working_dir=tmp_path, runtime_env_file=f, environ={})
    assert ".venv" in sub.runtime_env["excludes"]
    with pytest.raises(jobs.JobsError, match="cannot itself be submitted"):
        jobs.build_entrypoint(["submit", "version"])
    with pytest.raises(jobs.JobsError, match="KEY=VALUE"):
        jobs.parse_env_assignments(["NOEQUALS"])
    with pytest.raises(jobs.JobsError, match="Ray Client address"):
        jobs.resolve_address("ray://head:10001", {})
    assert jobs.resolve_address(None, {"RAY_ADDRESS": "h:8265"}) == "http://h:8265"


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda f: f.mkdir(), "cannot read runtime env file .*: Is a directory"),
        (lambda f: f.write_bytes(b"\xff\xfe\x00env"), "is not UTF-8 text"),
    ],
)
def test_a_runtime_env_path_that_is_no_yaml_text_is_named(tmp_path: Path, make, says) -> None:
    # `--runtime-env` given a folder or a binary file was a Python traceback and exit 1
    f = tmp_path / "runtime_env"
    make(f)
    with pytest.raises(jobs.JobsError, match=says):
        jobs.build_submission(["version"], working_dir=tmp_path, runtime_env_file=f, environ={})


def test_the_upload_keeps_the_bundled_sample_whole(tmp_path: Path) -> None:
    # packed by Ray's own runtime-env zip step with our excludes: a re-included folder alone
    # left "*.dcm" excluding the sample's DICOMs (a cluster smoke test ingested 8 of 64)
    import zipfile

    from ray._private.runtime_env.packaging import _zip_files

    sub = jobs.build_submission(["version"], working_dir=REPO, environ={})
    out = tmp_path / "pkg.zip"
    _zip_files(str(REPO), sub.runtime_env["excludes"], str(out), include_gitignore=True)
    names = set(zipfile.ZipFile(out).namelist())
    sample = {
        p.relative_to(REPO).as_posix() for p in (REPO / "data" / "sample").rglob("*") if p.is_file()
    }
    assert sample and sample <= names
    assert any(n.endswith(".dcm") for n in sample)
    assert not any(n.startswith((".venv/", "runs/", ".git/")) for n in names)


def test_the_upload_leaves_secret_files_behind(tmp_path: Path) -> None:
    # a dotenv file, the API keys file and the VMs' env file that docs/CLUSTER.md has you write
    # in the checkout were zipped into every job and unpacked world-readable on its nodes
    import zipfile

    from ray._private.runtime_env.packaging import _zip_files

    wd = tmp_path / "checkout"
    (wd / "pipelines").mkdir(parents=True)
    (wd / "pipelines" / "cli.py").write_text("")
    secret_files = [".env", ".env.local", "site.env", ".envrc", ".netrc", "api-keys",
                    "radjepa-api-keys/keys", "radjepa-env/radjepa.env", "cluster/tls.key",
                    "cluster/tls.pem"]  # fmt: skip
    for name in secret_files:
        (wd / name).parent.mkdir(parents=True, exist_ok=True)
        (wd / name).write_text("s3cr3t\n")
    sub = jobs.build_submission(["version"], working_dir=wd, environ={})
    out = tmp_path / "pkg.zip"
    _zip_files(str(wd), sub.runtime_env["excludes"], str(out), include_gitignore=True)
    names = set(zipfile.ZipFile(out).namelist())

    assert "pipelines/cli.py" in names
    assert not names & set(secret_files), names & set(secret_files)
    assert not any(n.startswith(("radjepa-env", "radjepa-api-keys")) for n in names)


def test_root_options_may_come_before_a_submitted_command_and_signals_exit_as_a_shell_says():
    # `submit -- --log-level DEBUG serve ...` (the README's advice for a replica's traceback)
    # was "unknown radjepa command '--log-level'"; a driver the OOM killer ended made submit
    # exit 247 (Ray reports -9)
    sub = jobs.build_submission(["--log-level", "DEBUG", "version"], working_dir=REPO, environ={})
    assert sub.entrypoint.endswith("-m pipelines.cli --log-level DEBUG version")
    assert jobs.command_name(["--log-level=debug", "serve", "x"]) == "serve"
    with pytest.raises(jobs.JobsError, match="cannot itself be submitted"):
        jobs.build_submission(["--log-level", "INFO", "jobs", "list"], working_dir=REPO, environ={})
    with pytest.raises(jobs.JobsError, match="unknown radjepa option '--bogus'"):
        jobs.command_name(["--bogus", "version"])
    res = _radjepa(
        ["submit", "--", "--bogus", "version"], {"RAY_JOB_ADDRESS": "http://127.0.0.1:1"}
    )
    assert res.returncode == 2 and "unknown radjepa option '--bogus'" in res.stderr, res.stderr
    killed = jobs.JobOutcome("raysubmit_1", "FAILED", driver_exit_code=-9)
    assert killed.exit_code == 137
    assert jobs.JobOutcome("raysubmit_2", "FAILED", driver_exit_code=2).exit_code == 2


def test_server_tracebacks_are_cut_to_their_last_line() -> None:
    reply = RuntimeError(
        "Request failed with status code 500: Traceback (most recent call last):\n"
        '  File "job_head.py", line 1, in submit_job\n    raise ValueError(...)\n'
        "ValueError: Job with submission_id rj-1 already exists. Please use a different one.\n"
    )
    assert jobs.server_message(reply) == (
        "Request failed with status code 500: ValueError: Job with submission_id rj-1 already "
        "exists. Please use a different one."
    )
    assert jobs.server_message(RuntimeError("plain")) == "plain"


def test_the_submitted_commit_is_recorded_only_when_it_looks_like_one(tmp_path: Path) -> None:
    from pipelines.provenance import (
        GIT_COMMIT_ENV,
        GIT_DIRTY_ENV,
        GIT_SOURCE_ENV,
        code_tags,
        submitter_env,
    )

    outside = tmp_path / "copy.py"  # an uploaded working dir: no checkout tracks it
    outside.write_text("")
    sha = "0123456789abcdef" * 2 + "01234567"
    submitted = submitter_env(REPO)
    assert submitted[GIT_SOURCE_ENV] == "submitter"  # overrides the image's own "image"
    tags = code_tags(outside, submitted | {GIT_COMMIT_ENV: sha.upper(), GIT_DIRTY_ENV: "false"})
    assert tags == {
        "mlflow.source.git.commit": sha,
        "radjepa.git_dirty": "false",
        "radjepa.git_source": "submitter",
    }
    image = {GIT_COMMIT_ENV: sha, GIT_SOURCE_ENV: "image"}  # as cluster/Dockerfile sets them
    assert code_tags(outside, image)["radjepa.git_source"] == "image"
    assert code_tags(outside, {GIT_COMMIT_ENV: sha})["radjepa.git_dirty"] == "unknown"
    assert code_tags(outside, image | {GIT_COMMIT_ENV: ""}) == {}  # built without the arg
    assert code_tags(outside, {GIT_COMMIT_ENV: "main; rm -rf /"}) == {}
    assert code_tags(outside, {}) == {}
    here = code_tags(REPO / "pipelines" / "cli.py", {GIT_COMMIT_ENV: sha})
    assert here["mlflow.source.git.commit"] != sha and "radjepa.git_source" not in here


class _JobServer:
    """A stand-in job server on loopback that answers Ray's client as a head does (the version
    check, one job's info; no log stream), and can go away and come back on its port: what a
    dropped and restarted ``kubectl port-forward`` looks like to ``radjepa``."""

    def __init__(self, port: int) -> None:
        self.port, self.status, self.server = port, "RUNNING", None

    def start(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/api/version":
                    body: dict = {"version": "4", "ray_version": "2.60.0", "ray_commit": "x"}
                    body["session_name"] = "s"
                elif owner.status == "502" and self.path.startswith("/api/jobs/"):
                    self.send_error(502, "Bad Gateway")  # an ingress before a restarting head
                    return
                elif self.path.startswith("/api/jobs/raysubmit_x") and "logs" not in self.path:
                    body = {"type": "SUBMISSION", "submission_id": "raysubmit_x"}
                    body |= {"status": owner.status, "entrypoint": "radjepa pretrain"}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_job_server_that_stops_answering_is_waited_for_then_one_line_and_exit_4(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a port-forward that dropped while `submit`/`jobs logs --follow` waited ended the command
    # with requests' traceback and exit 1, which reads as the job's failure (a script submits
    # again, a second driver on the same run) while the job went on
    from typer.testing import CliRunner

    from pipelines.cli import app

    (port,) = _free_ports(1)
    server = _JobServer(port)
    server.start()
    client = jobs.connect(f"http://127.0.0.1:{port}")
    server.stop()
    with pytest.raises(jobs.JobServerLost, match="may still be running; once the server"):
        jobs.wait(client, "raysubmit_x", poll_s=0.05, lost_grace_s=0.3)

    # back within the grace (the port-forward restarted): the wait goes on to the job's end
    def come_back() -> None:
        time.sleep(1.0)
        server.status = "SUCCEEDED"
        server.start()

    threading.Thread(target=come_back, daemon=True).start()
    assert jobs.wait(client, "raysubmit_x", poll_s=0.05, lost_grace_s=30).status == "SUCCEEDED"

    server.status = "RUNNING"
    monkeypatch.setattr(jobs, "SERVER_LOST_GRACE_S", 0.3)
    stop_soon = threading.Timer(1.0, server.stop)
    stop_soon.start()
    res = CliRunner().invoke(
        app, ["jobs", "logs", "raysubmit_x", "--follow", "--address", f"http://127.0.0.1:{port}"]
    )
    stop_soon.join()
    assert res.exit_code == jobs.EXIT_SERVER_LOST == 4, (res.output, res.exception)
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: the job server stopped answering ([Errno 111] "), last
    assert "job raysubmit_x may still be running" in last and "Traceback" not in res.output
    for call in (jobs.list_jobs, lambda c: jobs.logs(c, "raysubmit_x")):
        with pytest.raises(jobs.JobServerLost, match="stopped answering"):
            call(client)

    # a proxy before the server answers 502 while the head restarts: the same wait, not a
    # failure of the job (exit 2 read as a bad config, and a script submitted again)
    server.status = "502"
    server.start()
    with pytest.raises(jobs.JobServerLost, match=r"its proxy said 502.*may still be running"):
        jobs.wait(client, "raysubmit_x", poll_s=0.05, lost_grace_s=0.3)
    server.stop()

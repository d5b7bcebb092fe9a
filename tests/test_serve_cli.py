"""`radjepa serve` as a user runs it: a foreground process on a loopback port, Ctrl-C to stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from interrupts import foreground_process
from processes import processes_naming
from serve_helpers import REPO, TINY_CONFIG, dicom_from_png, free_port, make_checkpoint, nih_pngs

from serve.local import STOP_BUDGET_S

KEYS = "k1-" + "a" * 40 + ",k2-" + "b" * 40  # a comma-separated list, as documented


def _radjepa(*args: str, env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen:
    """The CLI as a user runs it. ``serve`` without ``--port`` gets ``--port 0`` (any free
    port): its port is checked before most of what these tests check, and the default 8000
    may be held by a server the developer runs (`radjepa serve` in another terminal made a
    dozen of them fail with "cannot listen on 127.0.0.1:8000")."""
    if args[:1] == ("serve",) and "--port" not in args:
        args = (*args, "--port", "0")
    exe = Path(sys.executable).with_name("radjepa")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipelines.cli"]
    return foreground_process([*cmd, *args], env=env, cwd=cwd, stderr=subprocess.STDOUT)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RADJEPA_API_KEYS", "RAY_ADDRESS")}
    return env | extra


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` now (children, their children, ...)."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    pairs = [tuple(int(x) for x in line.split()) for line in table.strip().splitlines()]
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [child for child, ppid in pairs if ppid == parent]
        found += kids
        todo += kids
    return found


def _running(pids: list[int]) -> list[str]:
    """Those of ``pids`` still running (a zombie has ended), as 'pid name'."""
    alive = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            name = (
                Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            )
        except OSError:
            continue
        if stat.rpartition(")")[2].split()[0] != "Z":
            alive.append(f"{pid} {name}")
    return alive


def _output_within(proc: subprocess.Popen, seconds: float) -> str:
    """What ``proc`` printed until it ended, killed when it runs past ``seconds`` (its output
    so far is then what the test's assertion shows)."""
    try:
        return proc.communicate(timeout=seconds)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0]


def _kill(described: list[str]) -> None:
    for entry in described:  # what a failed run left behind: this test's processes only
        try:
            os.kill(int(entry.split()[0]), signal.SIGKILL)
        except OSError:
            pass


def _until_curl_line(proc: subprocess.Popen, timeout_s: float = 120) -> list[str]:
    lines: list[str] = []
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("curl "):
            break
    return lines


def test_serve_refuses_to_start_without_keys(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    proc = _radjepa("serve", "--model", str(ckpt), env=_env())
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "no API keys configured" in out and "--insecure-local" in out
    # the variable to set is named, not only the config key that names it
    assert "set RADJEPA_API_KEYS (serve.api_keys_env)" in out


def test_serve_refuses_keyless_mode_on_a_cluster_in_one_line_before_joining_it(tmp_path):
    # on a cluster whose Serve runs, serve.start's host is ignored: the keyless API answered
    # wherever the cluster's proxies listen (0.0.0.0 under a RayService)
    ckpt = make_checkpoint(tmp_path / "ckpt")
    # a cluster of other machines (TEST-NET: nothing answers, and joining it would be said
    # otherwise); this machine's own `ray start` is checked once joined (test_serve_cluster)
    remote = "192.0.2.1:6379"
    proc = _radjepa("serve", "--model", str(ckpt), "--insecure-local", env=_env(RAY_ADDRESS=remote))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    (line,) = [x for x in out.splitlines() if x.startswith("error: ")]
    assert "insecure local mode (no API keys) is refused on a Ray cluster" in line, out
    assert "Traceback" not in out and "cannot reach" not in out


@pytest.mark.parametrize(
    ("keys", "insecure", "header"),
    [
        (True, False, True),
        (True, True, True),  # --insecure-local with keys: the keys are still asked for
        (False, True, False),
    ],
)
def test_the_printed_curl_example_sends_a_key_placeholder_whenever_keys_are_asked_for(
    keys, insecure, header
):
    """It expanded ${RADJEPA_API_KEYS%%,*}: a scoped entry ("KEY patient_linkage") sent the
    scope too, keys of the keys file or of a renamed serve.api_keys_env sent nothing, and
    --insecure-local with keys configured sent no header (401)."""
    from serve.local import curl_example
    from serve.security import ApiSettings, key_digest

    settings = ApiSettings(
        insecure_local=insecure, file_keys={key_digest("k" * 20): ()} if keys else {}
    )
    line = curl_example("http://127.0.0.1:8000", settings)
    assert ('-H "Authorization: Bearer <your API key>"' in line) is header, line
    assert "$" not in line and line.endswith(" http://127.0.0.1:8000/v1/embed"), line


def test_the_printed_url_brackets_an_ipv6_host():
    from serve.local import base_url

    assert base_url("::1", 8000) == "http://[::1]:8000"
    assert base_url("127.0.0.1", 0) == "http://127.0.0.1:0"
    assert base_url("localhost", 8000) == "http://localhost:8000"


def test_serve_on_a_taken_port_fails_in_one_line_before_starting_ray(tmp_path):
    # a port another server holds: Ray Serve's proxy would fail to bind inside its actor and
    # print ~150 lines of tracebacks, exit code 1, after ~50 s of Ray start-up
    ckpt = make_checkpoint(tmp_path / "ckpt")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = _radjepa(
            "serve", "--model", str(ckpt), "--port", str(port), env=_env(RADJEPA_API_KEYS=KEYS)
        )
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert f"error: cannot listen on 127.0.0.1:{port}" in out and "--port" in out
    assert "Traceback" not in out and "starting local Ray" not in out


@pytest.mark.parametrize("flag", ["--model", "--head", "--index"])
def test_serve_with_a_mistyped_path_fails_in_one_line_before_starting_ray(tmp_path, flag):
    # a typo in --index used to pass the start-up checks: the ingress replica failed to load it
    # three times, then the driver raised "Deploying application radjepa failed" (~230 lines,
    # exit 1, after ~60 s); a typo in --model or --head was one line, but after ~30 s of Ray
    ckpt = make_checkpoint(tmp_path / "ckpt")
    args = {"--model": str(ckpt), flag: str(tmp_path / "no-such-folder")}
    proc = _radjepa(
        "serve", *(x for kv in args.items() for x in kv), env=_env(RADJEPA_API_KEYS=KEYS)
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert f"error: serve.{flag[2:]} not found: {tmp_path / 'no-such-folder'}" in out
    assert "Traceback" not in out and "starting local Ray" not in out


@pytest.mark.parametrize(
    ("secret", "says"),
    [
        (
            None,
            "error: RADJEPA_DEID_SECRET is not set: set it to the key the archive was ingested with",
        ),
        # bytes that are not UTF-8 (a key file pasted with its binary bytes): a UnicodeEncodeError
        # traceback from a Ray task, ~30 s after Ray and Serve had started
        (
            "\udcff\udcfe" + "k" * 30,
            "error: RADJEPA_DEID_SECRET is not UTF-8 text: set it to printable characters",
        ),
    ],
    ids=["unset", "not-utf8"],
)
def test_serve_without_a_usable_deid_secret_fails_in_one_line_before_starting_ray(
    tmp_path, secret, says
):
    # the key uploads are pseudonymised with was resolved only in a Ray task once Ray and Serve
    # were up (~20 s of Ray start-up, Serve's proxy lines, then the error); a local Ray's
    # replicas have this process's environment, so it is checked here first, like the keys
    ckpt = make_checkpoint(tmp_path / "ckpt")
    # short: Ray's socket paths under it must fit in 107 bytes, should a Ray start after all
    ray_tmp = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))
    env = {k: v for k, v in _env(RADJEPA_API_KEYS=KEYS).items() if k != "RADJEPA_DEID_SECRET"}
    env["RAY_TMPDIR"] = str(ray_tmp)  # where a local instance would put its session
    if secret is not None:
        env["RADJEPA_DEID_SECRET"] = secret  # surrogates: the bytes 0xff 0xfe in the environment
    try:
        proc = _radjepa("serve", "--model", str(ckpt), "--port", "0", env=env)
        out, _ = proc.communicate(timeout=120)
        started_ray = [p.name for p in ray_tmp.rglob("session_*")]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 2, out
    lines = [x for x in out.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(says), out
    assert "Traceback" not in out and "starting local Ray" not in out and "Serve" not in out
    assert "k" * 30 not in out  # the key is never echoed
    assert not started_ray, "Ray was started before the refusal"


@pytest.fixture
def registry(tmp_path, migrated_store):
    """A sqlite store holding versions 1 and 2 of ``tiny-enc`` (@champion -> 2), as pretrain
    registers them, and a probe head: (the store URI, an address where no Ray listens)."""
    import mlflow
    from serve_helpers import register_probe_head

    from pipelines.tracking import ensure_experiment, register_artifact_dir

    uri = migrated_store(tmp_path / "mlflow.db")
    exp = ensure_experiment(uri, "radjepa")
    client = mlflow.MlflowClient(uri)
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(make_checkpoint(tmp_path / "ckpt")), "ckpt")
    for _ in range(2):
        register_artifact_dir(uri, run.info.run_id, "ckpt", "tiny-enc")
    client.set_registered_model_alias("tiny-enc", "champion", "2")
    register_probe_head(uri, exp, "tiny-head", tmp_path / "head")
    # a refusal that came only after joining Ray would say "cannot reach the Ray cluster"
    return uri, f"127.0.0.1:{free_port()}"


@pytest.mark.parametrize(
    ("refs", "says"),
    [
        (
            ["--model", "models:/tiny-enc/9"],
            "cannot resolve models:/tiny-enc/9: tiny-enc has no version 9 in the MLflow store "
            "{uri}; it has versions 2, 1 and aliases @champion -> 2",
        ),
        (
            ["--model", "models:/tiny-enc@prod"],
            "cannot resolve models:/tiny-enc@prod: tiny-enc has no alias 'prod' in the MLflow "
            "store {uri}; it has versions 2, 1 and aliases @champion -> 2",
        ),
        (
            ["--model", "models:/tiny-encoder@champion"],
            "cannot resolve models:/tiny-encoder@champion in the MLflow store {uri}: no "
            "registered model named 'tiny-encoder' in this store (it holds tiny-enc, tiny-head)",
        ),
        (
            ["--model", "models:/tiny-enc@champion", "--head", "models:/tiny-head/4"],
            "cannot resolve models:/tiny-head/4: tiny-head has no version 4 in the MLflow store "
            "{uri}; it has versions 1 and no aliases",
        ),
        (
            ["--model", "models:/tiny-enc@champion", "--index", "models:/tiny-enc/1"],
            "serve.index must be a folder or Parquet file on this machine",
        ),
    ],
    ids=["version", "alias", "name", "head", "index"],
)
def test_serve_refuses_a_registry_reference_that_does_not_exist_before_starting_ray(
    registry, tmp_path, refs, says
):
    # the driver looked models:/ references up only once Ray and Serve were up (~15 s), and
    # said "Model Version ... not found" without naming what the store does hold
    uri, no_ray = registry
    env = _env(RADJEPA_API_KEYS=KEYS, RAY_ADDRESS=no_ray)
    proc = _radjepa("serve", "-c", str(TINY_CONFIG), "--set", f"tracking.uri={uri}", *refs, env=env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert f"error: {says.format(uri=uri)}" in out, out
    assert "Traceback" not in out and "Ray cluster" not in out


@pytest.mark.parametrize(
    ("head", "says"),
    [
        (
            "models:/tiny-enc/1",
            "serve.head models:/tiny-enc/1 is an encoder checkpoint, not a probe head: give it "
            "as --model",
        ),
        (
            "models:/tiny-head/1",
            "serve.head models:/tiny-head/1 is not a readable probe head: ",
        ),
        ("models:/other-head/1", "probe head was fitted on encoder "),
    ],
    ids=["encoder", "not-a-head", "other-encoder"],
)
def test_serve_refuses_a_registered_head_it_cannot_serve_before_starting_ray(
    registry, tmp_path, head, says
):
    # the driver looked a registered head up by its metadata only: a version that is an
    # encoder, a head that cannot be read, or one fitted on another encoder was found by each
    # API replica (Ray's retried deployment failure: ~220 lines, exit 1, 100-125 s)
    import mlflow
    import torch
    from serve_helpers import make_head

    from pipelines.tracking import register_artifact_dir

    uri, no_ray = registry
    torch.manual_seed(1)
    other = make_checkpoint(tmp_path / "other", step=3)
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.get_experiment_by_name("radjepa").experiment_id)
    client.log_artifacts(run.info.run_id, str(make_head(tmp_path / "oh", 192, encoder=other)), "h")
    register_artifact_dir(uri, run.info.run_id, "h", "other-head")
    env = _env(RADJEPA_API_KEYS=KEYS, RAY_ADDRESS=no_ray)
    refs = ["--model", "models:/tiny-enc@champion", "--head", head]
    proc = _radjepa("serve", "-c", str(TINY_CONFIG), "--set", f"tracking.uri={uri}", *refs, env=env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    (line,) = [x for x in out.splitlines() if x.startswith("error: ")]
    assert line.startswith(f"error: {says}"), out
    assert "Traceback" not in out and "Ray cluster" not in out


def test_serve_names_the_part_of_an_index_it_cannot_read(tmp_path):
    # a damaged part was refused before Ray, but in Arrow's words only ("Parquet magic bytes
    # not found in footer...": which file?); the replicas name it, and now the CLI does too
    import numpy as np
    from serve_helpers import write_index

    ckpt = make_checkpoint(tmp_path / "ckpt")
    emb = np.random.default_rng(0).standard_normal((3, 192)).astype(np.float32)
    part = write_index(tmp_path / "index" / "part-1.parquet", emb, ["a", "b", "c"], ckpt)
    write_index(tmp_path / "index" / "part-0.parquet", emb, ["d", "e", "f"], ckpt)
    part.write_bytes(part.read_bytes()[:-100])  # cut short, as by a full disk
    proc = _radjepa(
        *("serve", "--model", str(ckpt), "--index", str(tmp_path / "index")),
        env=_env(RADJEPA_API_KEYS=KEYS),
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert f"error: {part}: unreadable: " in out, out
    assert "Traceback" not in out and "starting local Ray" not in out


def test_serve_says_in_seconds_that_the_tracking_server_does_not_answer(registry):
    # MLflow retried the look-up for minutes (over a minute on the dev box), after Ray started
    _, no_ray = registry
    server = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    proc = _radjepa(
        "serve",
        *("-c", str(TINY_CONFIG), "--set", f"tracking.uri={server}"),
        *("--model", "models:/tiny-enc@champion"),
        env=_env(RADJEPA_API_KEYS=KEYS, RAY_ADDRESS=no_ray),
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert (
        f"error: cannot resolve models:/tiny-enc@champion: the MLflow tracking server {server} "
        "does not answer (connection refused)"
    ) in out
    assert "Ray cluster" not in out and time.monotonic() - started < 60


@pytest.mark.slow
def test_serve_prints_url_answers_and_stops_cleanly_on_ctrl_c(tmp_path, nih_dir):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    port = free_port()
    keys_file = tmp_path / "keys"  # as a Secret volume without defaultMode leaves it: 0644
    keys_file.write_text("k3-" + "c" * 40 + "\n")
    keys_file.chmod(0o644)
    proc = _radjepa(
        "serve",
        "--config",
        str(TINY_CONFIG),
        "--model",
        str(ckpt),
        "--port",
        str(port),
        "--set",
        f"serve.api_keys_file={keys_file}",
        env=_env(RADJEPA_API_KEYS=KEYS),
    )
    lines: list[str] = []
    try:
        lines = _until_curl_line(proc, 90)
        url = f"http://127.0.0.1:{port}"
        assert any(f"RadJEPA API at {url}" in x for x in lines), "".join(lines)
        assert "/v1/embed" in lines[-1]
        # the keys file is read once before the service starts: one warning, not one per read
        assert sum("readable by every user" in x for x in lines) == 1, "".join(lines)
        # nor Ray's "new http_options ... will not be applied": serve.start applied them
        assert not any("will not be applied" in x for x in lines), "".join(lines)
        # the printed curl example works as printed once its placeholder is given a key
        (tmp_path / "image.dcm").write_bytes(dicom_from_png(nih_pngs(nih_dir, 1)[0]))
        assert "<your API key>" in lines[-1]
        shell = subprocess.run(
            ["bash", "-c", lines[-1].replace("<your API key>", KEYS.split(",")[0])],
            cwd=tmp_path,
            env=_env(RADJEPA_API_KEYS=KEYS),
            capture_output=True,
            text=True,
            timeout=60,
        )
        body = json.loads(shell.stdout)
        assert body["results"][0]["dim"] == 192, shell.stdout + shell.stderr
        png = nih_pngs(nih_dir, 1)[0].read_bytes()
        r = httpx.post(
            f"{url}/v1/embed", content=png, headers={"content-type": "image/png"}, timeout=60
        )
        assert r.status_code == 401  # keys were configured: no bearer, no answer
    finally:
        started = _descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        stopping = time.monotonic()
        # a stop past its budget still ends here, to be told apart from one that hangs
        out, _ = proc.communicate(timeout=150)
        took = time.monotonic() - stopping
    left = _running(started)
    _kill(left)
    assert proc.returncode == 0, out[-2000:]
    assert "shutting down" in out and out.strip().splitlines()[-1] == "stopped", out[-2000:]
    # the documented bound, within a Kubernetes pod's default 30 s grace (Ray Serve's own
    # shutdown could wait 35 s, and once outlasted 60 s on a loaded CI box); the headroom is
    # for a test machine busier than the one the budget was measured on
    assert took < STOP_BUDGET_S + 10, f"radjepa serve took {took:.0f} s to stop"
    assert not left, f"processes of the local Ray outlived `radjepa serve`: {left}"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=2)


def _sigterms_until_exit(proc: subprocess.Popen, every_s: float = 0.25) -> int:
    """SIGTERM ``proc`` every ``every_s`` until it exits (a supervisor or a `kill` loop
    repeating itself); returns how many were sent."""
    sent = 0
    while proc.poll() is None and sent < 2000:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            break
        sent += 1
        time.sleep(every_s)
    return sent


@pytest.mark.slow
@pytest.mark.parametrize("storm", [False, True], ids=["one-sigterm", "sigterm-storm"])
def test_sigterm_stops_serve_and_its_local_ray_and_start_warnings_are_said_once(tmp_path, storm):
    """SIGTERM (kill, systemd, a pod stopping) met the handlers ray.init installs: the command
    exited from its sleep, then aborted in interpreter teardown (exit -6), and the raylet died
    with it while its DashboardAgent and RuntimeEnvAgent ran on, orphans of a Ray nobody owned.
    It stops now as Ctrl-C does: Serve, then every process of the local Ray, exit 0. And the
    start-up warnings of keyless mode and the public development key, said on the terminal
    before Ray started, came again from the API replica through Ray's log forwarding.

    ``storm``: SIGTERMs every 250 ms until it exits end it as one does. ray.shutdown puts
    SIGTERM back to its default action before it stops the local Ray's processes (a second or
    so, several SIGTERMs of the storm), and one arriving then killed the command (exit -15, 2
    runs in 2 at 50 ms). Not faster: the keeper thread of stop_ray_ignoring_sigterm leaves a
    window of a few ms right after Ray's reset, which nothing can close, and a storm every 50 ms
    would land in it in some runs on a loaded box."""
    ckpt = make_checkpoint(tmp_path / "ckpt")
    port = free_port()
    env = {k: v for k, v in _env().items() if k != "RADJEPA_DEID_SECRET"}  # the public key
    # short: Ray's socket paths under it must fit in 107 bytes
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rj-", dir="/tmp")
    env["COLUMNS"] = "400"  # each warning on one line of the log handler's
    proc = _radjepa(
        *("serve", "--config", str(TINY_CONFIG), "--model", str(ckpt)),
        *("--port", str(port), "--insecure-local"),
        env=env,
    )
    try:
        lines = _until_curl_line(proc)
        assert lines and lines[-1].startswith("curl "), "".join(lines)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    finally:
        started = _descendants(proc.pid)
        if storm:
            storming = threading.Thread(target=_sigterms_until_exit, args=(proc,), daemon=True)
            storming.start()
        else:
            proc.send_signal(signal.SIGTERM)
        out = _output_within(proc, 90)
        left = _running(started)
        _kill(left)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    said = "".join(lines) + out
    assert proc.returncode == 0, said[-3000:]
    assert out.count("shutting down") == 1 and "SIGTERM received" not in said, said[-3000:]
    assert out.strip().splitlines()[-1] == "stopped", said[-3000:]
    assert started, "no process of the local Ray was seen"
    assert not left, f"processes of the local Ray outlived `radjepa serve`: {left}"
    assert said.count("insecure local mode") == 1, said
    assert said.count("PUBLIC development key") == 1, said


def _other_encoder(tmp_path: Path) -> Path:
    """A checkpoint of the same architecture with other weights (another training run)."""
    import torch

    torch.manual_seed(1)
    return make_checkpoint(tmp_path / "other", step=3)


@pytest.mark.parametrize(
    ("what", "says"),
    [
        ("other-head", "probe head was fitted on encoder "),
        ("checkpoint", "serve.head {uri} is an encoder checkpoint, not a probe head: give it as"),
        ("nothing", "probe head not found: {uri} has no head.json"),
    ],
)
def test_serve_fetches_a_head_given_as_a_uri_and_checks_it_before_starting_ray(
    tmp_path, what, says
):
    # a head URI took the checkpoint's fetch path, which looks for an encoder's files: every
    # head on object storage was refused as "model checkpoint not found: ... has no meta.json"
    from serve_helpers import make_head

    ckpt = make_checkpoint(tmp_path / "ckpt")
    folder = {
        "other-head": lambda: make_head(tmp_path / "h", 192, encoder=_other_encoder(tmp_path)),
        "checkpoint": lambda: ckpt,
        "nothing": lambda: tmp_path,
    }[what]()
    uri = folder.as_uri()  # file:// takes the path of s3:// and gs:// (pyarrow filesystems)
    env = _env(
        RADJEPA_API_KEYS=KEYS,
        RAY_ADDRESS=f"127.0.0.1:{free_port()}",  # a refusal after joining Ray names the cluster
        RADJEPA_CACHE=str(tmp_path / "cache"),
    )
    proc = _radjepa("serve", "--model", str(ckpt), "--head", uri, env=env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    (line,) = [x for x in out.splitlines() if x.startswith("error: ")]
    assert line.startswith(f"error: {says.format(uri=uri)}"), out
    assert "Traceback" not in out and "Ray cluster" not in out


def test_serve_refuses_a_cut_short_index_part_before_ray_when_the_replicas_fetch_the_model(
    mlflow_server, tmp_path
):
    # the parts were read before Ray only when the model was on this disk (or by the key check
    # of a local Ray): with a version on a tracking server and a cluster, a truncated copy of a
    # part failed in every API replica instead
    import numpy as np
    from serve_helpers import write_index

    from pipelines.tracking import client, ensure_experiment, register_artifact_dir

    ckpt = make_checkpoint(tmp_path / "ckpt")
    mc = client(mlflow_server)
    run_id = mc.create_run(ensure_experiment(mlflow_server, "radjepa")).info.run_id
    mc.log_artifacts(run_id, str(ckpt), "ckpt")
    version = register_artifact_dir(mlflow_server, run_id, "ckpt", "srv-enc")
    emb = np.random.default_rng(0).standard_normal((3, 192)).astype(np.float32)
    write_index(tmp_path / "index" / "part-0.parquet", emb, ["d", "e", "f"], ckpt)
    part = write_index(tmp_path / "index" / "part-1.parquet", emb, ["a", "b", "c"], ckpt)
    part.write_bytes(part.read_bytes()[:-100])  # cut short, as by a full disk
    env = _env(RADJEPA_API_KEYS=KEYS, RAY_ADDRESS=f"127.0.0.1:{free_port()}")
    proc = _radjepa(
        *("serve", "-c", str(TINY_CONFIG), "--set", f"tracking.uri={mlflow_server}"),
        *("--model", f"models:/srv-enc/{version}", "--index", str(tmp_path / "index")),
        env=env,
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert f"error: {part}: unreadable: " in out, out
    assert "Traceback" not in out and "Ray cluster" not in out


@pytest.mark.parametrize("what", ["head", "index"])
def test_serve_checks_head_and_index_against_a_registered_fingerprint_when_a_cluster_fetches(
    mlflow_server, tmp_path, what
):
    # on a cluster (RAY_ADDRESS) the replicas fetch a version on a tracking server themselves,
    # so a head or index of another encoder was refused only by every replica (~230 lines, exit
    # 1): a version `radjepa pretrain` registered now records its encoder's fingerprint, which
    # the CLI checks both against before it joins Ray
    import numpy as np
    from serve_helpers import make_head, write_index

    from pipelines.pretrain_tracking import finish_tracking
    from pipelines.tracking import client, ensure_experiment
    from radjepa.config import load_config
    from radjepa.eval.heads import ENCODER_TAG, checkpoint_fingerprint
    from serve.registry import resolve_model

    ckpt = make_checkpoint(tmp_path / "ckpt")
    other = _other_encoder(tmp_path)
    run_id = client(mlflow_server).create_run(ensure_experiment(mlflow_server, "radjepa"))
    cfg = load_config(TINY_CONFIG, ["tracking.registered_model=srv-enc"])
    version = finish_tracking(cfg, mlflow_server, run_id.info.run_id, str(ckpt), {})
    ref = f"models:/srv-enc/{version}"
    tag = client(mlflow_server).get_model_version("srv-enc", version).tags[ENCODER_TAG]
    # what the replicas would fetch and fingerprint
    assert tag == checkpoint_fingerprint(resolve_model(ref, tracking_uri=mlflow_server).path)
    if what == "head":
        refs = ["--head", str(make_head(tmp_path / "head", 192, encoder=other))]
        says = "probe head was fitted on encoder "
    else:
        emb = np.random.default_rng(0).standard_normal((3, 192)).astype(np.float32)
        write_index(tmp_path / "index" / "part-0.parquet", emb, ["a", "b", "c"], other)
        refs = ["--index", str(tmp_path / "index")]
        says = f"index {tmp_path / 'index'} was embedded by encoder "
    env = _env(RADJEPA_API_KEYS=KEYS, RAY_ADDRESS=f"127.0.0.1:{free_port()}")
    proc = _radjepa(
        *("serve", "-c", str(TINY_CONFIG), "--set", f"tracking.uri={mlflow_server}"),
        *("--model", ref, *refs),
        env=env,
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    (line,) = [x for x in out.splitlines() if x.startswith("error: ")]
    assert line.startswith(f"error: {says}") and tag[:12] in line, out
    assert "Traceback" not in out and "Ray cluster" not in out


@pytest.mark.parametrize("model", ["registry", "uri"])
def test_serve_checks_head_and_index_against_a_fetched_model_before_starting_ray(
    request, tmp_path, model
):
    # a version on a tracking server (or a checkpoint URI) was not fetched before Ray, so a
    # head or index of another encoder was refused only by the replicas of the local Ray:
    # ~2 minutes, ~230 lines and exit 1. Those replicas share this machine's cache, so the
    # CLI now fetches the model first (they find it there) and checks both against it.
    import numpy as np
    from serve_helpers import make_head, write_index

    from pipelines.tracking import client, ensure_experiment, register_artifact_dir

    ckpt = make_checkpoint(tmp_path / "ckpt")
    other = _other_encoder(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # not read for a URI
    if model == "registry":
        mlflow_server = store = request.getfixturevalue("mlflow_server")  # a tracking server
        mc = client(mlflow_server)
        run_id = mc.create_run(ensure_experiment(mlflow_server, "radjepa")).info.run_id
        mc.log_artifacts(run_id, str(ckpt), "ckpt")
        ref = f"models:/srv-enc/{register_artifact_dir(mlflow_server, run_id, 'ckpt', 'srv-enc')}"
        refs = ["--head", str(make_head(tmp_path / "head", 192, encoder=other))]
        says = "probe head was fitted on encoder "
    else:
        ref = ckpt.as_uri()
        emb = np.random.default_rng(0).standard_normal((3, 192)).astype(np.float32)
        write_index(tmp_path / "index" / "part-0.parquet", emb, ["a", "b", "c"], other)
        refs = ["--index", str(tmp_path / "index")]
        says = f"index {tmp_path / 'index'} was embedded by encoder "
    ray_tmp = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))  # short: Ray's socket paths
    env = _env(
        RADJEPA_API_KEYS=KEYS,
        RADJEPA_CACHE=str(tmp_path / "cache"),
        RAY_TMPDIR=str(ray_tmp),  # where a local instance would put its session
    )
    try:
        proc = _radjepa(
            *("serve", "-c", str(TINY_CONFIG), "--set", f"tracking.uri={store}"),
            *("--model", ref, *refs, "--port", "0"),
            env=env,
        )
        out, _ = proc.communicate(timeout=300)
        started_ray = [p.name for p in ray_tmp.rglob("session_*")]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 2, out
    (line,) = [x for x in out.splitlines() if x.startswith("error: ")]
    assert line.startswith(f"error: {says}"), out
    assert "Traceback" not in out and "starting local Ray" not in out
    assert not started_ray, "Ray was started before the refusal"


def test_serve_says_a_missing_pseudonym_key_before_it_fetches_the_model(tmp_path):
    # on the local Ray it starts, serve fetches a remote model before Ray, to check the head and
    # index against it (minutes for a large encoder); a missing key was said only after that
    # fetch, which had put the weights into the cache for nothing
    ckpt = make_checkpoint(tmp_path / "ckpt")
    env = _env(RADJEPA_API_KEYS=KEYS, RADJEPA_CACHE=str(tmp_path / "cache"))
    env.pop("RADJEPA_DEID_SECRET", None)
    proc = _radjepa(
        *("serve", "-c", str(TINY_CONFIG), "--set", "ingest.allow_development_key=false"),
        *("--model", ckpt.as_uri(), "--port", "0"),
        env=env,
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    (line,) = [x for x in out.splitlines() if x.startswith("error: ")]
    assert line.startswith("error: RADJEPA_DEID_SECRET is not set"), out
    assert not list((tmp_path / "cache").rglob("meta.json")), "the model was fetched first"


def test_serve_says_in_one_line_which_deployment_failed_to_start_and_why(tmp_path):
    # an index part whose pages are damaged with its footer intact passes the footer check
    # before Ray; the API replicas fail to read it. Serve retried each replica 3 times, then
    # the command ended in Ray's traceback (~230 lines, the replica tracebacks forwarded from
    # the Serve controller, then the driver's RuntimeError naming no cause), exit 1
    import numpy as np
    from serve_helpers import write_index

    ckpt = make_checkpoint(tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    # values of one decimal: snappy finds repeats, so the pages are compressed streams
    emb = np.round(rng.standard_normal((2000, 192)), 1).astype(np.float32)
    ids = [f"img{i}" for i in range(len(emb))]
    write_index(tmp_path / "index" / "part-0.parquet", emb[:10], ids[:10], ckpt)
    part = write_index(tmp_path / "index" / "part-1.parquet", emb, ids, ckpt)
    data = bytearray(part.read_bytes())
    middle = len(data) // 2
    data[middle - 32768 : middle + 32768] = bytes(65536)  # a 64 KiB block lost, footer intact
    part.write_bytes(bytes(data))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))  # short: Ray's socket paths
    env = _env(RADJEPA_API_KEYS=KEYS, RAY_TMPDIR=str(ray_tmp))
    try:
        proc = _radjepa(
            *("serve", "-c", str(TINY_CONFIG), "--model", str(ckpt)),
            *("--index", str(tmp_path / "index"), "--port", "0"),
            env=env,
        )
        out = _output_within(proc, 300)
        left = processes_naming(str(ray_tmp))
        _kill(left)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 1, out[-3000:]
    errors = [x for x in out.splitlines() if x.startswith("error: ")]
    assert errors == [
        f"error: the RadjepaAPI deployment failed to start: {part}: unreadable: "
        "Corrupt snappy compressed data."
    ], out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    # a local Ray's replicas read this machine's files: the replica is not retried
    assert out.count("Adding 1 replica to Deployment(name='RadjepaAPI'") == 1, out[-3000:]
    assert not left, f"processes of the local Ray outlived `radjepa serve`: {left}"

"""Joining the Ray cluster RAY_ADDRESS names: an address that cannot work fails in seconds, in
one line, through every entry point, and never falls back to a local instance.

ray.init retried an address where nothing answers for 14 minutes on the dev box before it failed
with three tracebacks; a command here gets two minutes (imports on a busy 2-core machine
included; seconds on an idle one), so such a hang fails the test instead of stalling the suite.
The listeners bind every interface because Ray, like the check, dials a loopback address as the
machine's own IP.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from processes import processes_naming
from shard_tables import write_blank_shards

from pipelines.cluster_address import ClusterConnectionError, check_cluster_address

REPO = Path(__file__).resolve().parents[1]
COMMAND_TIMEOUT_S = 120


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def metadata_shards(tmp_path: Path) -> Path:
    """An ingest output with the columns pretrain, sweep and embed check before they start Ray."""
    return write_blank_shards(tmp_path)


def _command(name: str, tmp: Path, shards: Path) -> list[str]:
    out = ["--set", f"train.output_dir={tmp / 'runs'}"]
    model = tmp / "model"
    if name in ("embed", "serve"):  # both read the checkpoint before they start Ray
        from serve_helpers import make_checkpoint

        make_checkpoint(model)
    model.mkdir(exist_ok=True)
    return {
        "ingest": ["pipelines.cli", "ingest", "data/sample/archive", str(tmp / "dst")],
        "pretrain": ["pipelines.cli", "pretrain", "-c", "configs/tiny_cpu.yaml", "--data", str(shards), *out],
        "sweep": ["pipelines.cli", "sweep", "-c", "configs/sweep-tiny.yaml", "--data", str(shards), *out],
        "embed": ["pipelines.cli", "embed", str(shards), str(tmp / "index"), "--model", str(model)],
        "serve": ["pipelines.cli", "serve", "--insecure-local", "--model", str(model), "--port", "0"],
        # what `radjepa submit` and the RayJob manifests may run inside a job
        "job pretrain": ["pipelines.pretrain", "--config", "configs/tiny_cpu.yaml", "--data", str(shards), *out],
        "job ingest": ["pipelines.ingest", "data/sample/archive", str(tmp / "dst-job")],
        # benchmarks run as scripts; they join Ray as the jobs do
        "bench ingest": ["bench/ingest.py", "--images", "2", "--source-size", "64"],
        "bench serve": ["bench/serve.py", "--requests", "2", "--concurrency", "1"],
    }[name]  # fmt: skip


@pytest.mark.parametrize(
    "command",
    [
        "ingest", "pretrain", "sweep", "embed", "serve", "job pretrain", "job ingest",
        "bench ingest", "bench serve",
    ],
)  # fmt: skip
def test_an_unreachable_cluster_fails_without_waiting_in_one_line(
    command: str, tmp_path: Path, metadata_shards: Path, request: pytest.FixtureRequest
) -> None:
    port = _unused_port()
    ray_tmp = tmp_path / "ray-tmp"
    env = {
        **os.environ,
        "RAY_ADDRESS": f"127.0.0.1:{port}",
        "RAY_TMPDIR": str(ray_tmp),  # where a local instance would put its session
        "RADJEPA_DEID_SECRET": "x" * 32,
    }
    args = _command(command, tmp_path, metadata_shards)
    script = args[0].endswith(".py")
    if script:  # the benches read the NIH sample (the serve bench before it joins Ray)
        request.getfixturevalue("nih_dir")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["TMPDIR"] = str(tmp_path)  # where the benches make their corpus and checkpoint

    try:
        res = subprocess.run(
            [sys.executable, *([] if script else ["-m"]), *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{command}` still tried to join 127.0.0.1:{port} after {COMMAND_TIMEOUT_S} s")

    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    if args[0] == "pipelines.cli":  # the CLI logs to stdout: its stderr is the error alone
        assert len(lines) == 1, res.stderr
    assert lines[-1].startswith(f"error: cannot reach the Ray cluster at 127.0.0.1:{port}")
    assert "connection refused" in lines[-1] and "unset RAY_ADDRESS" in lines[-1]
    assert "Traceback" not in res.stderr
    assert not list(ray_tmp.rglob("session_*")), "a local Ray instance was started instead"
    if script:  # a benchmark's stdout is its one JSON line: none for a run that did not happen
        assert res.stdout == ""
        # and its temporary folders (the serve bench's random checkpoint) are gone
        assert not [p.name for p in tmp_path.glob("*bench*")]


@pytest.mark.parametrize(
    ("bench", "says"),
    [
        # through ensure_ray the bench joined whatever RAY_ADDRESS named, where its serve.run
        # and serve.shutdown replace and then stop that cluster's own Serve applications
        ("bench serve", "bench/serve.py measures Ray Serve on this machine"),
        # it divided the cluster's throughput by this machine's cores, and a cluster's other
        # nodes cannot read its corpus in this machine's temporary folder
        ("bench ingest", "bench/ingest.py measures ingest per core of this machine"),
    ],
)
def test_a_bench_refuses_a_running_cluster(
    bench: str, says: str, ray_session, tmp_path: Path, nih_dir: Path
) -> None:
    address = ray_session.get_runtime_context().gcs_address
    env = {
        **os.environ,
        "RAY_ADDRESS": address,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "TMPDIR": str(tmp_path),
    }
    res = subprocess.run(
        [sys.executable, *_command(bench, tmp_path, shards=tmp_path)],  # reads no shards
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stdout == ""
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {says}")
    assert address in last and "Unset RAY_ADDRESS" in last
    assert not [p.name for p in tmp_path.glob("*bench*")]


@contextmanager
def _http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    server = HTTPServer(("0.0.0.0", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_port() -> Iterator[int]:
    """A web server (what a dashboard port, 8265, is)."""

    class Hello(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with _http_server(Hello) as port:
        yield port


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never says a word."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen(8)
        yield s.getsockname()[1]


@contextmanager
def _grpc_server(add_services: Callable[[object], None]) -> Iterator[int]:
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_services(server)
    port = server.add_insecure_port("0.0.0.0:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


@pytest.fixture
def grpc_port() -> Iterator[int]:
    """A gRPC server that is not a GCS (as a Ray Client server, 10001, is not)."""
    with _grpc_server(lambda server: None) as port:
        yield port


@pytest.fixture
def gcs_port() -> Iterator[tuple[int, list[str]]]:
    """A stand-in GCS that answers the cluster-id query; yields the port and the calls seen."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    calls: list[str] = []

    class NodeInfo(gcs_service_pb2_grpc.NodeInfoGcsServiceServicer):
        def GetClusterId(self, request, context):  # noqa: N802 - the generated gRPC API
            calls.append("GetClusterId")
            return gcs_service_pb2.GetClusterIdReply(cluster_id=b"\x01" * 28)

    def add(server: grpc.Server) -> None:
        gcs_service_pb2_grpc.add_NodeInfoGcsServiceServicer_to_server(NodeInfo(), server)

    with _grpc_server(add) as port:
        yield port, calls


def _refused(address: str, timeout_s: float = 1.0) -> str:
    start = time.monotonic()
    with pytest.raises(ClusterConnectionError) as err:
        check_cluster_address(address, timeout_s=timeout_s)
    assert time.monotonic() - start < timeout_s + 3
    message = str(err.value)
    assert "\n" not in message
    return message


def test_an_open_port_that_is_not_ray_fails_within_the_timeout(
    silent_port: int, http_port: int
) -> None:
    for port in (silent_port, http_port):
        message = _refused(f"127.0.0.1:{port}")
        assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in message
        assert "no Ray GCS answered within 1 s" in message


def test_a_grpc_service_that_is_not_a_gcs_is_named(grpc_port: int) -> None:
    message = _refused(f"127.0.0.1:{grpc_port}")
    assert "not a Ray head's GCS" in message and "ray://" in message


def test_a_gcs_that_answers_passes(gcs_port: tuple[int, list[str]]) -> None:
    port, calls = gcs_port
    check_cluster_address(f"127.0.0.1:{port}", timeout_s=5)
    assert calls == ["GetClusterId"]


@pytest.fixture
def token_gcs_port() -> Iterator[int]:
    """A stand-in GCS of a cluster with token auth, given no token (as Ray 2.60 answers then)."""
    import grpc
    from ray.core.generated import gcs_service_pb2_grpc

    class NodeInfo(gcs_service_pb2_grpc.NodeInfoGcsServiceServicer):
        def GetClusterId(self, request, context):  # noqa: N802 - the generated gRPC API
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken: token is missing")

    def add(server: grpc.Server) -> None:
        gcs_service_pb2_grpc.add_NodeInfoGcsServiceServicer_to_server(NodeInfo(), server)

    with _grpc_server(add) as port:
        yield port


def test_a_gcs_that_wants_a_token_says_so(token_gcs_port: int) -> None:
    message = _refused(f"127.0.0.1:{token_gcs_port}")
    assert "wants an auth token" in message and "RAY_AUTH_TOKEN" in message


def test_ray_client_addresses_are_dialled_as_written() -> None:
    port = _unused_port()
    message = _refused(f"ray://127.0.0.1:{port}")
    assert f"cannot reach the Ray cluster at ray://127.0.0.1:{port}: connection refused" in message


@pytest.mark.parametrize(
    "address", ["head.radjepa.invalid:6379", "ray://head.radjepa.invalid:10001"]
)
def test_a_host_name_that_does_not_resolve_is_named(address: str) -> None:
    """`.invalid` never resolves (RFC 2606): whether the DNS server says so at once or never
    answers, the check says it cannot resolve the host, in one line, within its bound."""
    message = _refused(address)
    assert "cannot resolve host head.radjepa.invalid" in message and "RAY_ADDRESS" in message


_SILENT_DNS = """
import fcntl, socket, struct, sys
# this process has its own network: bring its loopback up (SIOCSIFFLAGS: up, loopback, running)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", 0x1 | 0x8 | 0x40))
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dns.bind(("127.0.0.1", 53))  # what resolv.conf names: it reads nothing and answers nothing
from pipelines.cluster_address import ClusterConnectionError, check_cluster_address
try:
    check_cluster_address(sys.argv[1], timeout_s=1)
except ClusterConnectionError as err:
    sys.exit(f"error: {err}")
"""


def _private_network_and_resolver() -> list[str] | None:
    """A command prefix giving the command its own network and /etc/resolv.conf (user, mount
    and network namespaces), or None where this machine does not allow that."""
    if not all(shutil.which(tool) for tool in ("unshare", "mount", "sh")):
        return None
    probe = ["unshare", "--user", "--map-root-user", "--mount", "--net", "true"]
    if subprocess.run(probe, capture_output=True, timeout=30).returncode != 0:
        return None
    return probe[:-1]


def test_a_dns_server_that_never_answers_is_given_up_on_at_the_deadline(tmp_path: Path) -> None:
    """The resolver's own timeouts (here 2 s x 2 attempts; glibc's default is 5 s x 2) are not
    the check's bound: a real resolver asking a real DNS server that never answers is given up
    on at the check's 1 s, and the message says why. Before, the lookup ran unbounded and ended
    in "does not resolve" once the resolver itself gave up."""
    prefix = _private_network_and_resolver()
    if prefix is None:
        pytest.skip("needs unshare with user, mount and network namespaces")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
    inner = f'mount --bind "{resolv}" /etc/resolv.conf && exec "$0" "$@"'
    python = [sys.executable, "-c", _SILENT_DNS, "head.radjepa.invalid:6379"]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    res = subprocess.run(
        [*prefix, "sh", "-c", inner, *python],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert (
        "cannot resolve host head.radjepa.invalid within 1 s (its DNS server does not answer)"
        in line
    )


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("http://127.0.0.1:8265", "is a job server (dashboard) URL"),
        ("https://head.example:8265", "set RAY_JOB_ADDRESS for them"),
        ("localhost", "RAY_ADDRESS=localhost is not a Ray cluster address: give HOST:PORT"),
        ("head:port", "is not a Ray cluster address"),
    ],
)
def test_addresses_ray_init_cannot_join_are_explained(address: str, expected: str) -> None:
    assert expected in _refused(address)


def test_auto_without_an_instance_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._private import services

    # other test sessions may run Ray on this machine: `auto` must find none of them
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: set())
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert "RAY_ADDRESS=auto but no Ray instance runs on this machine" in _refused("auto")


@pytest.mark.parametrize("raw", ["local ", " \t", "\tlocal\n"])
def test_a_padded_or_blank_address_still_means_this_machine(
    raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ray.init given no address reads RAY_ADDRESS itself, as written: a padded `local` or a
    blank value (a .env file, a YAML manifest) was 'Invalid address format' there."""
    import ray
    from ray._private import services

    from pipelines.runtime import ensure_ray

    seen: list[str | None] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(os.environ.get("RAY_ADDRESS")))
    monkeypatch.setenv("RAY_ADDRESS", raw)
    ensure_ray()
    assert services.canonicalize_bootstrap_address(seen[0]) is None  # Ray starts a local one


@pytest.mark.slow
def test_an_unset_address_starts_a_ray_of_its_own_beside_one_ray_start_recorded() -> None:
    """`ray start` records its cluster in <temp>/ray/ray_current_cluster, and ray.init given
    no address joins it: with RAY_ADDRESS unset (documented as "a local instance") every
    command then failed on num_cpus ("When connecting to an existing cluster...") or would
    have run on that cluster. A record pointing at a port nobody serves stands in for it."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    try:
        (tmp / "ray").mkdir()
        (tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_unused_port()}")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(
            RAY_TMPDIR=str(tmp),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        )
        code = (
            "import ray\n"
            "from pipelines.runtime import ensure_ray\n"
            "ensure_ray(local_cpus=1)\n"
            "print('own Ray at', ray.get_runtime_context().gcs_address)\n"
            "ray.shutdown()\n"
        )
        res = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        assert "own Ray at" in res.stdout
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_padded_auto_is_checked_as_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from ray._private import services

    from pipelines.runtime import ensure_ray

    # the suite's own Ray session would make ensure_ray return before any check
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: set())
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    monkeypatch.setenv("RAY_ADDRESS", " auto\n")
    with pytest.raises(ClusterConnectionError, match="RAY_ADDRESS=auto but no Ray instance runs"):
        ensure_ray()


@pytest.fixture
def token_only_gcs_port() -> Iterator[tuple[int, str]]:
    """A stand-in GCS of a cluster with token auth that answers only the right token."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    token = "0123456789abcdef" * 2

    class NodeInfo(gcs_service_pb2_grpc.NodeInfoGcsServiceServicer):
        def GetClusterId(self, request, context):  # noqa: N802 - the generated gRPC API
            if dict(context.invocation_metadata()).get("authorization") != f"Bearer {token}":
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken")
            return gcs_service_pb2.GetClusterIdReply(cluster_id=b"\x01" * 28)

    def add(server: grpc.Server) -> None:
        gcs_service_pb2_grpc.add_NodeInfoGcsServiceServicer_to_server(NodeInfo(), server)

    with _grpc_server(add) as port:
        yield port, token


def test_auto_uses_this_machines_token_as_ray_init_does(
    token_only_gcs_port: tuple[int, str], tmp_path: Path
) -> None:
    """ray.init turns token auth on for `auto` when this machine holds a token (so a head that
    `ray start` runs here with token auth is joined), never for an explicit address. A fresh
    process: token auth, once on, stays on in the process that turned it on."""
    port, token = token_only_gcs_port
    code = (
        "import sys\n"
        "from ray._private import services\n"
        f"services.get_ray_address_from_environment = lambda *a: '127.0.0.1:{port}'\n"
        "from pipelines.cluster_address import ClusterConnectionError, check_cluster_address\n"
        "try:\n"
        "    check_cluster_address(sys.argv[1], timeout_s=5)\n"
        "except ClusterConnectionError as err:\n"
        "    sys.exit(f'error: {err}')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    env.update(HOME=str(tmp_path), RAY_AUTH_TOKEN=token)  # the token this machine holds

    def check(address: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code, address],
            cwd=REPO,
            env={**env, "RAY_ADDRESS": address},
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )

    res = check("auto")
    assert res.returncode == 0, res.stderr
    res = check(f"127.0.0.1:{port}")  # explicit: Ray wants RAY_AUTH_MODE=token, and so do we
    assert res.returncode == 1 and "wants an auth token" in res.stderr, res.stderr


@pytest.mark.parametrize("once", [False, True])
def test_sigterm_is_routed_to_ctrl_c_and_with_once_only_the_first(once: bool) -> None:
    # ingest's entry points (once=True): a second SIGTERM must not cut short the shutdown the
    # first started; the sweep (once=False): a second one raises again, as a second Ctrl-C does
    import signal

    from pipelines.runtime import sigterm_as_ctrl_c

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    raised = 0
    with sigterm_as_ctrl_c(once=once):
        for _ in range(2):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(2)  # the handler runs in between, in this (the main) thread
            except KeyboardInterrupt:
                raised += 1
    after = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert raised == (1 if once else 2)
    # both ways the caller gets its handlers back (it left SIGTERM ignored after once=True,
    # for the rest of an in-process caller's life): a command whose process is ending ignores
    # SIGTERM itself from there
    assert after == before


def test_a_block_no_sigterm_reached_puts_both_handlers_back() -> None:
    # a run that ends without a signal leaves the process as it found it (pretrain is called
    # in-process too, and a SIGTERM after it must do what it did before)
    import signal

    from pipelines.runtime import sigterm_as_ctrl_c

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with sigterm_as_ctrl_c(once=True):
        assert signal.getsignal(signal.SIGTERM) is not before[0]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_block_puts_back_every_signal_handler_it_changed() -> None:
    # Ray Tune sets a handler of its own for SIGUSR1 in every sweep and never puts the old one
    # back: after run_sweep an in-process caller's SIGUSR1 went to a sweep long over, where
    # it had ended the process (its default) or run the caller's handler
    import signal

    from pipelines.runtime import sigterm_as_ctrl_c

    def callers(signum: int, frame: object) -> None:
        pass

    before = signal.signal(signal.SIGUSR1, callers)
    try:
        with sigterm_as_ctrl_c(once=True):
            signal.signal(signal.SIGUSR1, lambda *_: None)  # what Tune's fit does
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        after = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR1, before)
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    assert after == (callers, signal.SIG_DFL)


@pytest.mark.parametrize("once", [False, True])
def test_a_sigterm_ray_init_met_is_the_routed_ctrl_c_and_once_the_first(once: bool) -> None:
    # ray.init installs its own SIGTERM handler (sys.exit(15)); one that fired while ray.init
    # ran was raised as KeyboardInterrupt, but the routing came back afterwards even with
    # once=True, so a second SIGTERM raised again inside the cleanup (a lock left behind)
    import signal

    from pipelines.runtime import _keep_sigterm_routing, sigterm_as_ctrl_c

    before = signal.getsignal(signal.SIGTERM)
    try:
        with sigterm_as_ctrl_c(once=once) as routing:
            with pytest.raises(KeyboardInterrupt), _keep_sigterm_routing():
                signal.signal(signal.SIGTERM, lambda *_: None)  # what ray.init does
                raise SystemExit(signal.SIGTERM)  # its handler, on a SIGTERM
            inside = signal.getsignal(signal.SIGTERM)
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert routing.stopping is once
    assert inside == (signal.SIG_IGN if once else routing)
    assert after == before


@pytest.mark.parametrize(
    "command",
    ["ingest", "pretrain", "sweep", "embed", "serve", "demo", "job ingest", "job pretrain"],
)
def test_a_local_ray_that_does_not_start_in_time_is_one_line_and_exit_1(
    command: str, tmp_path: Path, metadata_shards: Path
) -> None:
    """On a loaded machine ray.init gave up on the local instance it started ("Timed out
    waiting for file .../gcs_server_port_...", or "The current node timed out during
    startup") and every command that starts one ended in Ray's traceback; the Ray Job entry
    points (`python -m pipelines.ingest|pretrain`) still did after `radjepa` said it. Ray's own
    wait for the GCS, set to 0 s, is that timeout, for real."""
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_TMPDIR=str(ray_tmp),
        RAY_gcs_server_port_wait_time_s="0",
        RADJEPA_DEID_SECRET="x" * 32,
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    if command == "demo":
        args = ["pipelines.cli", "demo", "--out", str(tmp_path / "demo"), "--no-serve"]
    else:
        args = _command(command, tmp_path, metadata_shards)
    try:
        res = subprocess.run(
            [sys.executable, "-m", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        deadline = time.monotonic() + 15  # ray.init's reaper stops what it had started
        while (left := processes_naming(str(ray_tmp))) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[-1] == (
        "error: could not start a local Ray: this machine was too busy to bring it up within "
        "0 s (its GCS server did not start in time); retry when it is less loaded, or start "
        "Ray once with `ray start --head` and run with RAY_ADDRESS=auto"
    ), res.stderr
    assert not left, f"processes of the local Ray outlived the command: {left}"


def test_the_raylet_start_up_timeout_is_said_and_nothing_else_is_taken_for_it() -> None:
    # the raylet's registration wait is a fixed 30 s with no setting to shorten it: its error,
    # as Ray 2.60's ray._private.node raises it, is given here
    from pipelines.runtime import start_timeout_message

    raylet = Exception(
        "The current node timed out during startup. This could happen because some of the "
        "raylet failed to startup or the GCS has become overloaded."
    )
    said = start_timeout_message(raylet)
    assert said is not None and "within 30 s (its raylet did not register in time)" in said

    class Other(Exception):
        pass

    for other in (
        Other(str(raylet)),  # any other class with the same words
        RuntimeError(str(raylet)),
        Exception("The node failed for another reason"),
        RuntimeError("Timed out waiting for file /tmp/ray/session_x/raylet_port_abc"),
        TimeoutError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_abc"),
    ):
        assert start_timeout_message(other) is None, other


def test_sigterm_is_ignored_after_the_job_only_where_an_entry_point_said_the_process_ends_with_it(
    monkeypatch,
) -> None:
    # one switch for `radjepa` (cli.main), `python -m pipelines.ingest` and `python -m
    # pipelines.pretrain`: each decided it apart (a flag, and `__name__ == "__main__"` twice)
    import signal

    from pipelines import runtime

    before = signal.getsignal(signal.SIGTERM)
    try:
        monkeypatch.setattr(runtime, "_process_ends_with_job", False)
        runtime.ignore_sigterm_after_the_job()  # an in-process caller keeps its handler
        assert signal.getsignal(signal.SIGTERM) == before
        assert not runtime.process_ends_with_job()
        runtime.declare_process_ends_with_job()
        assert runtime.process_ends_with_job()
        runtime.ignore_sigterm_after_the_job()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("entry", ["cli", "ingest", "pretrain"])
def test_each_entry_point_run_as_a_process_says_it_ends_with_the_job(entry: str) -> None:
    # run as a process (`--help` ends it before any job), each entry point sets the switch;
    # imported, as an in-process caller of its main() does, none does
    code = (
        "import importlib, runpy, sys\n"
        "import pipelines.runtime as r\n"
        f"importlib.import_module('pipelines.{entry}')\n"
        "print('imported', r.process_ends_with_job())\n"
        "sys.argv = ['x', '--help']\n"
        "try:\n"
        f"    runpy.run_module('pipelines.{entry}', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('run', r.process_ends_with_job())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    said = [line for line in res.stdout.splitlines() if line.startswith(("imported ", "run "))]
    assert said == ["imported False", "run True"], res.stdout


def test_use_gpu_true_waits_for_a_cluster_s_gpu_auto_says_it_runs_on_cpu_and_locally_refuses(
    ray_session, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A GPU group that autoscales from zero (raycluster.yaml), or whose pods join after the
    head (a RayService deploys then), has no GPU when a job starts: ``true`` was refused there
    ("would wait forever"), and ``auto`` ran ViT-B on CPU without a word. The session's Ray has
    no GPU; RAY_ADDRESS naming a cluster is what makes it one here."""
    import logging

    from pipelines import runtime
    from pipelines.runtime import ClusterResourceError, resolve_num_workers, resolve_use_gpu
    from serve.deployment import _resolve_gpu

    monkeypatch.setattr(runtime, "_WARNED", set())
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with caplog.at_level(logging.WARNING, logger="pipelines.runtime"):
        assert resolve_use_gpu("auto") is False and resolve_use_gpu("false") is False
        assert not caplog.text  # a local Ray without GPUs: CPU is what it has
        with pytest.raises(ClusterResourceError, match="train.use_gpu=true but this local Ray"):
            resolve_use_gpu("true")
        with pytest.raises(ValueError, match="serve.use_gpu=true but this local Ray"):
            _resolve_gpu("true")

        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
        assert resolve_use_gpu("true") is True and _resolve_gpu("true") is True
        assert resolve_use_gpu("true") is True  # said once
        assert _resolve_gpu("auto") is False
        assert resolve_use_gpu("false") is False
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "train.use_gpu=true and the cluster has no GPU yet: the job waits until a GPU node "
        "joins (an autoscaled GPU group, pods still starting)",
        "serve.use_gpu=true and the cluster has no GPU yet: the job waits until a GPU node "
        "joins (an autoscaled GPU group, pods still starting)",
        "serve.use_gpu=auto and the cluster has no GPU now: running on CPU (a GPU group that "
        "autoscales from zero is not counted: --set serve.use_gpu=true waits for it)",
    ]
    # one rank per GPU counts none yet: the ranks to wait for must be given
    with pytest.raises(ClusterResourceError, match="set train.num_workers to the ranks"):
        resolve_num_workers(True, 1.0)

    # a Ray worker (Serve building a config's app on the head, a sweep trial) gets no
    # RAY_ADDRESS and cannot know who started its Ray: `true` waits there (the driver refuses)
    @ray_session.remote(num_cpus=0)
    def in_a_task() -> tuple[bool, bool, str | None]:
        from pipelines.runtime import in_ray_worker

        return in_ray_worker(), resolve_use_gpu("true"), os.environ.get("RAY_ADDRESS")

    assert runtime.in_ray_worker() is False
    worker, waits, address = ray_session.get(in_a_task.remote())
    assert (worker, waits) == (True, True), address

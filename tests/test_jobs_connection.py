"""How ``radjepa submit`` / ``radjepa jobs`` talk to what answers at the job server's address.

Real HTTP servers on loopback stand in for what sits in front of a Ray head (an ingress that
answers 502 while the head restarts, an authenticating proxy, a single sign-on page, a head
that took the connection and never answers), and Ray's own JobSubmissionClient talks to them:
no mock of the client, so a Ray upgrade that changes how it fails shows here.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines import jobs

RAY_VERSION = {"version": "4", "ray_version": "2.60.0", "ray_commit": "x", "session_name": "s"}

# (status, headers, body) for a request's method, path and headers
Answer = tuple[int, dict[str, str], str]
Answering = Callable[[str, str, dict[str, str]], Answer]


def _json(body: object) -> Answer:
    return 200, {"Content-Type": "application/json"}, json.dumps(body)


def _ray(method: str, path: str, headers: dict[str, str]) -> Answer:
    """A job server with no jobs."""
    if path == "/api/version":
        return _json(RAY_VERSION)
    if path == "/api/jobs/" and method == "GET":
        return _json([])
    return 404, {"Content-Type": "text/plain"}, "Not Found"


@pytest.fixture
def serve() -> Iterator[Callable[[Answering], str]]:
    """Start an HTTP server on a free loopback port answering with the given function; its
    URL. ``hold`` (set by a test) makes the answers wait until the test ends."""
    servers: list[ThreadingHTTPServer] = []
    release = threading.Event()

    def start(answer: Answering) -> str:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                status, headers, body = answer(self.command, self.path, dict(self.headers))
                if status == 0:  # never answer (until the test ends)
                    release.wait(30)
                    return
                data = body.encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _answer

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    release.set()
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No token mode, headers or CA bundle from the shell running the tests."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_JOB_HEADERS", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    for name in jobs.ADDRESS_ENVS:
        monkeypatch.delenv(name, raising=False)


def _cli_error(*argv: str) -> str:
    """The one-line error a radjepa command ends with (main() prints it, exit code 2)."""
    from pipelines.cli import app
    from pipelines.cli_common import UserError

    res = CliRunner().invoke(app, list(argv))
    assert isinstance(res.exception, UserError), (res.output, res.exception)
    return str(res.exception)


def test_a_proxy_answering_502_for_a_restarting_head_is_one_line(serve) -> None:
    # Ray's version check raised requests' HTTPError: a 53-line traceback and exit 1
    url = serve(lambda m, p, h: (502, {"Content-Type": "text/html"}, "<html>Bad Gateway</html>"))
    with pytest.raises(jobs.JobsError, match=r"stopped answering \(its proxy said 502\)"):
        jobs.connect(url)
    assert _cli_error("jobs", "list", "--address", url) == (
        f"the job server at {url} stopped answering (its proxy said 502): a head "
        "restarting behind it answers again within minutes"
    )


def test_a_server_that_never_answers_times_out_in_one_line(
    serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ray's client sends no timeout: connect(), then wait/logs/stop, hung for good
    monkeypatch.setattr(jobs, "JOB_SERVER_READ_TIMEOUT_S", 0.5)
    listener = socket.socket()  # takes connections (the kernel's backlog), never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(jobs.JobServerLost, match="connected, no answer within 0 s"):
            jobs.connect(url)
        assert time.monotonic() - started < 5
    finally:
        listener.close()

    # a head that answers the version check, then hangs: every later call ends too
    def hangs_on_jobs(method: str, path: str, headers: dict[str, str]) -> Answer:
        return _ray(method, path, headers) if path == "/api/version" else (0, {}, "")

    client = jobs.connect(serve(hangs_on_jobs))
    started = time.monotonic()
    for call in (jobs.list_jobs, lambda c: jobs.logs(c, "raysubmit_x")):
        with pytest.raises(jobs.JobServerLost, match="no answer within"):
            call(client)
    with pytest.raises(jobs.JobServerLost, match="may still be running"):
        jobs.wait(client, "raysubmit_x", poll_s=0.05, lost_grace_s=0.2)
    # a submission that got no answer may have started all the same: not "failed"
    with pytest.raises(jobs.JobServerLost, match="may have been submitted.*radjepa jobs list"):
        jobs.submit(client, jobs.Submission("python -m pipelines.cli version", {}))
    assert time.monotonic() - started < 12


def test_a_401_or_403_says_whose_it_is(serve) -> None:
    # Ray's own token check: plain text naming the token, no challenge
    ray_401 = serve(lambda m, p, h: (401, {}, "Unauthorized: Missing authentication token"))
    with pytest.raises(jobs.JobsError, match="requires a token: set RAY_AUTH_MODE=token"):
        jobs.connect(ray_401)
    ray_403 = serve(lambda m, p, h: (403, {}, "Forbidden: Invalid authentication token"))
    with pytest.raises(jobs.JobsError, match="refused the token it was sent"):
        jobs.connect(ray_403)

    # an ingress with Basic auth (or single sign-on) in front of the head: no Ray token helps
    basic = serve(lambda m, p, h: (401, {"WWW-Authenticate": 'Basic realm="dash"'}, "no"))
    with pytest.raises(jobs.JobsError) as refused:
        jobs.connect(basic)
    assert str(refused.value).startswith(
        f"an authenticating proxy in front of the job server at {basic} answered (401, "
        'WWW-Authenticate: Basic realm="dash"): put its credentials in RAY_JOB_HEADERS'
    )
    assert "RAY_AUTH_MODE" not in str(refused.value)
    forbidden = serve(lambda m, p, h: (403, {"Content-Type": "text/html"}, "<h1>denied</h1>"))
    with pytest.raises(jobs.JobsError, match=r"authenticating proxy .* answered \(403\)"):
        jobs.connect(forbidden)


def test_headers_from_ray_job_headers_reach_the_server(
    serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, str]] = []

    def behind_basic_auth(method: str, path: str, headers: dict[str, str]) -> Answer:
        seen.append(headers)
        if headers.get("Authorization") != "Basic dXNlcjpwYXNz":
            return 401, {"WWW-Authenticate": 'Basic realm="dash"'}, "no"
        return _ray(method, path, headers)

    url = serve(behind_basic_auth)
    monkeypatch.setenv("RAY_JOB_HEADERS", '{"Authorization": "Basic dXNlcjpwYXNz"}')
    assert jobs.list_jobs(jobs.connect(url)) == []
    assert len(seen) >= 2 and all(h.get("Authorization") for h in seen)

    # a value that is no JSON object of strings is named, never printed (it holds credentials)
    for bad in ("Authorization: Basic dXNlcjpwYXNz", '["Basic dXNlcjpwYXNz"]', '{"X": 1}'):
        monkeypatch.setenv("RAY_JOB_HEADERS", bad)
        with pytest.raises(jobs.JobsError, match="RAY_JOB_HEADERS must be a JSON object") as err:
            jobs.connect(url)
        assert "dXNlcjpwYXNz" not in str(err.value)


def test_an_answer_that_is_not_rays_says_so(serve) -> None:
    # a single sign-on page (after the proxy's redirect): "Expecting value: line 1 column 1"
    login = serve(lambda m, p, h: (200, {"Content-Type": "text/html"}, "<html>Sign in</html>"))
    with pytest.raises(jobs.JobsError, match="not a Ray job server at .*: it answered HTML \\("):
        jobs.connect(login)
    sso = serve(lambda m, p, h: (302, {"Location": f"{login}/oauth2/start?state=s3cr3t"}, ""))
    with pytest.raises(jobs.JobsError) as err:
        jobs.connect(sso)
    assert f"it answered HTML from {login}/oauth2/start (" in str(err.value)
    assert "s3cr3t" not in str(err.value)  # a query may carry a state or token

    # another service's JSON or plain text on the port
    for answer in (_json({"status": "ok"}), (200, {"Content-Type": "text/plain"}, "hello")):
        url = serve(lambda m, p, h, a=answer: a)
        with pytest.raises(jobs.JobsError, match="not a Ray job server at .*/api/version"):
            jobs.connect(url)
    teapot = serve(lambda m, p, h: (418, {"Content-Type": "text/plain"}, "teapot"))
    with pytest.raises(jobs.JobsError, match="/api/version answered HTTP 418"):
        jobs.connect(teapot)


def test_glued_and_equals_spellings_of_config_and_set_are_read(tmp_path: Path) -> None:
    # click takes `-cFILE` and `-sKEY=V`: the checks before the upload read the defaults
    # instead of the job's config, and missed the variable a glued --set names
    args = ["pretrain", "-cA.yaml", "--config=B.yaml", "-c", "C.yaml", "-sa.x=1", "--set=a.y=2"]
    assert jobs._option_values(args, ("-c", "--config")) == ["A.yaml", "B.yaml", "C.yaml"]
    got = jobs._option_values([*args, "-s", "a.z=3"], ("-s", "--set"))
    assert got == ["a.x=1", "a.y=2", "a.z=3"]
    assert jobs._option_values(["sweep", "--set-x", "--setting=1"], ("-s", "--set")) == []

    (tmp_path / "bad.yaml").write_text("masks:\n  num_targetz: 3\n")
    for args in (["pretrain", "-cbad.yaml"], ["pretrain", "-strain.nope=1"]):
        with pytest.raises(jobs.JobsError, match="unknown key"):
            jobs.build_submission(args, working_dir=tmp_path, environ={})
    assert jobs._config_location(["pretrain", "-cbad.yaml"], tmp_path) == str(tmp_path / "bad.yaml")
    # the key's variable a glued --set names is refused like RADJEPA_DEID_SECRET
    with pytest.raises(jobs.JobsError, match="SITE_A would be stored with the job"):
        jobs.build_submission(
            ["ingest", "s3://a/raw", "s3://a/shards", "-singest.secret_env=SITE_A"],
            working_dir=tmp_path,
            env={"SITE_A": "k"},
            environ={},
        )


def test_a_submission_left_unanswered_exits_4_not_as_a_failed_job(
    serve, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # exit 2 read as the job's bad config, and a script submitted it again: a second driver
    from pipelines.cli import app

    monkeypatch.setattr(jobs, "JOB_SERVER_READ_TIMEOUT_S", 0.5)

    def hangs_on_submit(method: str, path: str, headers: dict[str, str]) -> Answer:
        if path.startswith("/api/packages/"):  # the working dir's upload
            return (404, {}, "") if method == "GET" else (200, {}, "")
        return (0, {}, "") if path == "/api/jobs/" else _ray(method, path, headers)

    url = serve(hangs_on_submit)
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "cli.py").write_text("")
    argv = ["submit", "--no-wait", "--address", url, "--working-dir", str(tmp_path), "version"]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == jobs.EXIT_SERVER_LOST == 4, (res.output, res.exception)
    assert "may have been submitted all the same: radjepa jobs list" in res.output


def test_an_upload_slower_than_the_connect_timeout_still_goes_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the package went up as one sendall under the 10 s connect timeout, which then bounded the
    # whole upload: a 6 MB checkout needed 5 Mbit/s, and a slower link ended in a traceback
    import os

    rate, size = 4_000_000, 12_000_000  # bytes/s the server reads; the upload: ~3 s
    monkeypatch.setattr(jobs, "JOB_SERVER_CONNECT_TIMEOUT_S", 1.0)
    received: list[int] = []

    class Slow(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # the version, and "no such package yet"
            self._send(200, RAY_VERSION) if self.path == "/api/version" else self._send(404, {})

        def do_PUT(self) -> None:
            left = int(self.headers["Content-Length"])
            while left:
                left -= len(self.rfile.read(min(rate // 20, left)))
                time.sleep(0.05)
            received.append(int(self.headers["Content-Length"]))
            self._send(200, {})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._send(200, {"submission_id": "raysubmit_slow", "job_id": None})

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def server_bind(self) -> None:  # a small window: the client waits on the reader
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            super().server_bind()

    server = Server(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wd = tmp_path / "checkout"
        (wd / "pipelines").mkdir(parents=True)
        (wd / "pipelines" / "cli.py").write_text("")
        (wd / "weights.bin").write_bytes(b"RJ" + os.urandom(size))  # random: the zip keeps it
        submission = jobs.build_submission(["version"], working_dir=wd, environ={})
        client = jobs.connect(f"http://127.0.0.1:{server.server_address[1]}")
        started = time.monotonic()
        assert jobs.submit(client, submission) == "raysubmit_slow"
        assert time.monotonic() - started > 1.5 and received and received[0] > size
    finally:
        server.shutdown()
        server.server_close()


def test_a_proxy_refusing_while_a_job_is_followed_exits_as_for_a_lost_server(serve) -> None:
    # an SSO login expiring an hour into a pretrain ended `submit`/`logs --follow` with exit 2,
    # which says the job failed on a bad config: the job, still running, is not known to have
    # failed
    import typer

    from pipelines.cli_jobs import _follow_and_exit

    def expired(method: str, path: str, headers: dict[str, str]) -> Answer:
        if path == "/api/version":
            return _ray(method, path, headers)
        return 401, {"WWW-Authenticate": 'Bearer realm="sso"'}, "login required"

    client = jobs.connect(serve(expired))
    with pytest.raises(typer.Exit) as ended:
        _follow_and_exit(client, "raysubmit_followed")
    assert ended.value.exit_code == jobs.EXIT_SERVER_LOST

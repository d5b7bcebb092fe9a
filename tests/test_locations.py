"""Google Cloud Storage locations: pyarrow's real GCS client against a loopback stand-in for the
service (tests/fake_gcs.py), and against a machine without credentials."""

from __future__ import annotations

import os
import time
from contextlib import ExitStack

import pyarrow.fs as pafs
import pytest
from fake_gcs import FakeGcs, fake_gcs

from radjepa import locations


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch):
    """What a new process knows of buckets: nothing (the module keeps it per process)."""
    monkeypatch.setattr(locations, "_gcs_reached", set(), raising=False)
    monkeypatch.setattr(locations, "_gcs_failed", {}, raising=False)


@pytest.fixture
def gcs_service(tmp_path, monkeypatch):
    """Starts a fake GCS answering with a status (and message), whose credentials this process
    uses; it stops when the test ends."""
    with ExitStack() as stack:

        def start(status: int, message: str = "") -> FakeGcs:
            gcs = stack.enter_context(fake_gcs(status, tmp_path, message))
            monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(gcs.credentials))
            return gcs

        yield start


def test_a_bucket_that_does_not_answer_is_named_within_the_first_touch_limit(tmp_path):
    # google-cloud-cpp retries an unavailable service for 15 minutes by default: every gs://
    # command sat silent that long before its error (a 503 here stands for any outage). In a
    # process of its own: a test cannot interrupt the client's wait, its own process can.
    import subprocess
    import sys

    from serve_helpers import REPO

    script = (
        "import sys\n"
        "from radjepa import locations\n"
        "locations.GCS_FIRST_TOUCH_S = 2\n"
        "try:\n"
        "    locations.read_text(sys.argv[1])\n"
        "except OSError as err:\n"
        "    print(err)\n"
    )
    with fake_gcs(503, tmp_path) as gcs:
        env = {**os.environ, "GOOGLE_APPLICATION_CREDENTIALS": str(gcs.credentials)}
        started = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-c", script, gcs.uri("bkt/runs/best.yaml")],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - started
    said = res.stdout.strip()
    assert said.startswith("no usable answer from Google Cloud Storage within 2 s ("), res
    assert "fake status 503" in said and "error_info" not in said, said
    assert said.endswith("or allow it longer with ?retry_limit_seconds=SECONDS in the URI")
    assert took < 30, took


def test_a_failed_first_touch_is_remembered_a_while(gcs_service, monkeypatch):
    # a command that reads one location twice (a head, then its files) waited twice
    gcs = gcs_service(503)
    unusable = "^no usable answer from Google Cloud Storage within 1 s"
    with pytest.raises(OSError, match=unusable):
        locations.filesystem(gcs.uri("bkt/runs", retry_limit_seconds="1"))
    asked = len(gcs.storage_requests())
    started = time.monotonic()
    with pytest.raises(OSError, match=unusable):
        locations.filesystem(gcs.uri("bkt/runs/head", retry_limit_seconds="1"))
    assert time.monotonic() - started < 0.5 and len(gcs.storage_requests()) == asked
    # ... a while: past it, the bucket is asked again
    monkeypatch.setattr(locations, "_GCS_FAILURE_KEPT_S", 0.0)
    with pytest.raises(OSError, match=unusable):
        locations.filesystem(gcs.uri("bkt/runs/head", retry_limit_seconds="1"))
    assert len(gcs.storage_requests()) > asked


def test_the_uris_own_retry_limit_is_the_first_touch_limit(gcs_service):
    gcs = gcs_service(503)
    started = time.monotonic()
    with pytest.raises(OSError, match="^no usable answer from Google Cloud Storage within 1 s"):
        # pyarrow reads the first of a repeated option, and so does the check
        locations.filesystem(gcs.uri("bkt/x", retry_limit_seconds="1") + "&retry_limit_seconds=9")
    assert time.monotonic() - started < 8  # not the default 20 s, nor 9


def test_a_connection_that_never_answers_is_given_up_on_too(gcs_service):
    # the client checks its limit between attempts only: one attempt on a stalled connection
    # (a firewall that drops packets) ran for curl's two minutes whatever the limit
    import socket

    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(16)  # accepted by the kernel, never read or answered
    port = stalled.getsockname()[1]
    gcs_service(404)  # its token endpoint only
    try:
        uri = f"gs://bkt/x?endpoint_override=127.0.0.1:{port}&scheme=http&retry_limit_seconds=1"
        started = time.monotonic()
        with pytest.raises(OSError) as err:
            locations.filesystem(uri)
        took = time.monotonic() - started
    finally:
        stalled.close()
    said = str(err.value)
    waited = 1 + locations._GCS_STALL_GRACE_S
    assert said.startswith(
        f"no answer from Google Cloud Storage within {waited:g} s (a request was still waiting); "
        "check this machine's route to Google Cloud Storage"
    ), said
    assert took < waited + 5, took


@pytest.mark.parametrize(("option", "seconds"), [("5s", 5), ("0x10", 16)])
def test_a_limit_the_client_accepts_is_read_as_it_reads_it(gcs_service, option, seconds):
    # the client reads the option's leading number; float() refused `5s` (a traceback where the
    # bucket was reached before), and join() refuses an infinite wait (a day is the most)
    assert locations._limit_seconds(option) == seconds
    assert locations._limit_seconds("inf") == locations._limit_seconds("1e12") == 86400
    gcs = gcs_service(404)
    fs, path = locations.filesystem(gcs.uri("bkt/x", retry_limit_seconds=option))
    assert fs.get_file_info(path).type == pafs.FileType.NotFound


def test_a_401_is_an_answer_though_it_speaks_of_access_tokens(gcs_service):
    # Google's 401 body says "Expected OAuth 2 access token": an answer, not a token never made
    gcs = gcs_service(401, "Expected OAuth 2 access token, login cookie or other")
    fs, path = locations.filesystem(gcs.uri("bkt/x"))
    with pytest.raises(OSError, match="Expected OAuth 2 access token"):
        fs.get_file_info(path)  # the operation says it, as before


def test_a_bucket_that_answers_is_asked_once_per_process(gcs_service):
    gcs = gcs_service(404)  # "no such object": an answer
    fs, path = locations.filesystem(gcs.uri("bkt/shards"))
    assert fs.type_name == "gcs" and path == "bkt/shards"
    asked = len(gcs.storage_requests())
    assert asked >= 1
    assert locations.read_text(gcs.uri("bkt/shards/manifest.json")) is None
    later = gcs.storage_requests()[asked:]  # read_text's own only: no second probe
    assert later and all("manifest.json" in r for r in later), later


def test_a_refusal_is_an_answer_the_operation_itself_reports(gcs_service):
    # a key that may write but not read gets 403 on a metadata request: the first touch must
    # not refuse what the operation may be allowed to do
    gcs = gcs_service(403)
    fs, path = locations.filesystem(gcs.uri("bkt/out"))
    assert [k for k in locations._gcs_reached if k.startswith("gs://bkt?")]
    with pytest.raises(PermissionError, match="fake status 403"):
        fs.get_file_info(path)


def test_a_credentials_file_that_is_not_there_is_named_without_waiting(tmp_path, monkeypatch):
    # google-cloud-cpp raised this as pyarrow's ArrowException, which no caller catches as a
    # storage error: a traceback
    missing = tmp_path / "key.json"
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(missing))
    started = time.monotonic()
    with pytest.raises(OSError) as err:
        locations.filesystem("gs://bkt/x")
    said = str(err.value)
    assert said.startswith("no request could be sent to Google Cloud Storage ("), said
    assert f"Cannot open credentials file {missing}" in said, said
    assert "GOOGLE_APPLICATION_CREDENTIALS naming a service-account key file" in said
    assert "retry_limit_seconds" not in said  # waiting longer would not help
    assert time.monotonic() - started < 10


def test_other_schemes_are_not_asked_anything(tmp_path):
    fs, path = locations.filesystem(tmp_path.as_uri())
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)
    assert locations._gcs_reached == set() and locations._gcs_failed == {}


@pytest.mark.timeout(300)
def test_every_command_names_an_unanswering_bucket_in_one_line(tmp_path):
    """Each command on a gs:// location the service does not answer for: one line naming the
    location and the cause, exit 2. Before, each waited out the client's 15 minutes (the URIs
    here allow 1 s, as a user can); then `embed` and `probe` printed pyarrow's traceback,
    `probe --shards` read a URI as a local path (``./gs:/...``: "no Parquet shards"), and the
    others a 1,000-character client status."""
    import subprocess
    import sys

    from serve_helpers import REPO, TINY_CONFIG, make_checkpoint

    ckpt = str(make_checkpoint(tmp_path / "ckpt"))
    with fake_gcs(503, tmp_path) as gcs:
        uri = gcs.uri("bkt/data", retry_limit_seconds="1")
        commands = {
            "pretrain": (["pretrain", "--data", uri], "cannot read shards at"),
            "probe": (
                ["probe", ckpt, "--shards", uri, "--label", "sex=F", "--no-mlflow", "--out"]
                + [str(tmp_path / "p")],
                "cannot read shards at",
            ),
            "embed": (
                ["embed", "--model", ckpt, uri, str(tmp_path / "e")],
                "cannot read shards at",
            ),
            "ingest": (["ingest", str(tmp_path), uri], "cannot use destination"),
            "serve": (["serve", "--model", ckpt, "--head", uri], "cannot read probe head"),
        }
        env = {
            **os.environ,
            "GOOGLE_APPLICATION_CREDENTIALS": str(gcs.credentials),
            "RADJEPA_DEID_SECRET": "k" * 64,
            "RADJEPA_API_KEYS": "a-test-key-of-some-length",
            "RADJEPA_CACHE": str(tmp_path / "cache"),
        }
        for name, (args, head) in commands.items():
            res = subprocess.run(
                [sys.executable, "-m", "pipelines.cli", *args, "-c", str(TINY_CONFIG)],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            said = res.stderr.strip().splitlines()
            assert res.returncode == 2, (name, res.stderr)
            assert len(said) == 1, (name, res.stderr)
            assert said[0].startswith(
                f"error: {head} {uri}: no usable answer from Google Cloud Storage within 1 s ("
            ), (name, said[0])
            assert "fake status 503" in said[0], (name, said[0])
    assert not (tmp_path / "p").exists() and not (tmp_path / "e").exists()


def test_an_ingest_worker_that_cannot_reach_its_source_quarantines_the_file(gcs_service):
    # each Ray Data worker makes its own first touch: a failed one escaped the read task (a
    # traceback for the run) where an unreadable file is one quarantined input, re-read by the
    # next run
    from radjepa.ingest.decoding import FileDecoder
    from radjepa.ingest.sources import iter_source

    # a service's own text may name the object, and a path may carry a patient's name
    said = "The object bkt/src/DOE^JANE/a.dcm exceeded the rate limit"
    gcs = gcs_service(503, said)
    ref = {"source": gcs.uri("bkt/src", retry_limit_seconds="1"), "kind": "file"}
    rows = list(iter_source({**ref, "path": "bkt/src/DOE^JANE/a.dcm"}, 1 << 20))
    assert [r["name"] for r in rows] == ["bkt/src/DOE^JANE/a.dcm"]
    assert "DOE^JANE" not in rows[0]["read_error"], rows[0]
    # and the quarantine row says why ("could not read the file (OSError)" said nothing)
    out = FileDecoder({}, b"k" * 32, frozenset(), False)._one(rows[0])
    assert out["status"] == "quarantined" and out["reason"] == "read_error", out
    assert out["message"] == (
        "its storage did not answer this run: no usable answer from Google Cloud Storage within "
        "1 s; check this machine's route to Google Cloud Storage and the bucket's name, or allow "
        "it longer with ?retry_limit_seconds=SECONDS in the URI"
    ), out["message"]

"""Admission control: bounded decoding, immediate 503 when full, abandoned decodes stop, a
bound on the patch tokens one response may carry, and the index search off the event loop. The
app runs in-process (no Ray); the gate is exercised through real requests and real threads,
synchronised by events, not timings."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_helpers import API_KEY, make_checkpoint, nih_pngs

from serve.admission import DecodeGate, Overloaded
from serve.app import create_app
from serve.embedder import EncoderRunner, LocalEmbedder
from serve.index import EmbeddingIndex
from serve.security import ApiSettings, key_digest

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def embedder(tmp_path_factory) -> LocalEmbedder:
    ckpt = make_checkpoint(tmp_path_factory.mktemp("admission") / "ckpt")
    return LocalEmbedder(EncoderRunner.from_checkpoint(ckpt))


def _app(embedder: LocalEmbedder, **kw):
    settings = ApiSettings(env_keys={key_digest(API_KEY): ()}, allow_development_key=True, **kw)
    return create_app(embedder, settings=settings)


def _post(client: TestClient, data: bytes, **params) -> object:
    headers = {**AUTH, "content-type": "image/png"}
    return client.post("/v1/embed", content=data, headers=headers, params=params)


def test_a_full_decode_queue_answers_503_at_once_then_recovers(embedder, nih_dir) -> None:
    png = nih_pngs(nih_dir, 1)[0].read_bytes()
    app = _app(embedder, decode_workers=1, max_pending_decodes=3)
    gate: DecodeGate = app.state.decode_gate
    release = threading.Event()

    def blocked(cancelled: threading.Event) -> None:
        release.wait(timeout=60)

    with TestClient(app, raise_server_exceptions=False) as client:
        # occupy every admission slot with work that waits (1 decoding, the rest queued)
        held = [client.portal.start_task_soon(gate.run, blocked) for _ in range(gate.limit)]
        deadline = time.monotonic() + 30
        while gate.admitted < gate.limit and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gate.admitted == gate.limit
        refused = _post(client, png)
        assert refused.status_code == 503
        assert refused.json()["reason"] == "overloaded"
        assert refused.headers["retry-after"] == "1"
        release.set()
        for future in held:
            future.result(timeout=30)
        assert gate.admitted == 0
        assert _post(client, png).status_code == 200


def test_an_abandoned_decode_stops_between_files_and_queued_ones_never_run() -> None:
    gate = DecodeGate(workers=1)
    done: list[int] = []
    started = threading.Event()

    def slow_files(cancelled: threading.Event) -> None:
        started.set()
        for i in range(200):  # 200 "files" of 20 ms: 4 s if nobody stopped it
            if cancelled.is_set():
                return
            time.sleep(0.02)
            done.append(i)

    queued_ran = threading.Event()

    async def scenario() -> None:
        first = asyncio.ensure_future(gate.run(slow_files))
        second = asyncio.ensure_future(gate.run(lambda cancelled: queued_ran.set()))
        while not started.is_set():
            await asyncio.sleep(0.01)
        first.cancel()
        second.cancel()  # still queued behind the first: dropped before it starts
        for task in (first, second):
            with pytest.raises(asyncio.CancelledError):
                await task
        for _ in range(500):  # the running job notices at its next file, and frees its slot
            if gate.admitted == 0:
                break
            await asyncio.sleep(0.01)
        assert gate.admitted == 0

    asyncio.run(scenario())
    time.sleep(0.3)  # the running job notices at its next file
    stopped_at = len(done)
    time.sleep(0.3)
    assert len(done) == stopped_at < 50
    assert not queued_ran.is_set()


def test_a_request_that_gave_up_holds_its_slot_until_its_thread_is_free() -> None:
    """The slot was freed when the request gave up (its deadline, 504), while its decode ran
    on: new requests were admitted, queued behind work nobody waited for and timed out too,
    instead of the immediate 503 (reproduced through the app: a 128 KB 8192x8192 DICOM, then
    three small PNGs a second apart, all 504). Now they are refused until the thread is free."""
    gate = DecodeGate(workers=1, limit=1)
    started, release = threading.Event(), threading.Event()

    def one_file(cancelled: threading.Event) -> None:  # checks nothing until it is done
        started.set()
        release.wait(30)

    async def scenario() -> None:
        request = asyncio.ensure_future(gate.run(one_file))
        while not started.is_set():
            await asyncio.sleep(0.01)
        request.cancel()  # the request's deadline
        with pytest.raises(asyncio.CancelledError):
            await request
        assert gate.admitted == 1
        with pytest.raises(Overloaded):  # 503 at once, not a place in the queue
            await gate.run(lambda c: "queued")
        release.set()  # the decode ends
        for _ in range(100):
            if gate.admitted == 0:
                break
            await asyncio.sleep(0.01)
        assert gate.admitted == 0
        assert await gate.run(lambda c: "next") == "next"

    asyncio.run(scenario())


def test_gate_refuses_beyond_its_limit_without_running_anything() -> None:
    gate = DecodeGate(workers=2, limit=8)
    release = threading.Event()

    async def scenario() -> None:
        held = [asyncio.ensure_future(gate.run(lambda c: release.wait(30))) for _ in range(8)]
        await asyncio.sleep(0)  # let each task register
        with pytest.raises(Overloaded, match="8 requests"):
            await gate.run(lambda c: None)
        # the later step of an admitted request (a search after its decode) is not refused:
        # it waits for a thread instead
        later = asyncio.ensure_future(gate.run(lambda c: "searched", continuing=True))
        await asyncio.sleep(0)
        assert not later.done() and gate.admitted == 9
        release.set()
        await asyncio.gather(*held)
        assert await later == "searched"

    asyncio.run(scenario())


def test_patch_tokens_are_bounded_per_response(embedder, nih_dir) -> None:
    info = embedder.info
    per_image = (info.img_size // info.patch_size) ** 2 * info.embed_dim
    app = _app(embedder, max_patch_token_values=per_image)  # room for one image's tokens
    png = nih_pngs(nih_dir, 1)[0].read_bytes()
    with TestClient(app, raise_server_exceptions=False) as client:
        one = _post(client, png, patch_tokens="true")
        assert one.status_code == 200
        assert len(one.json()["results"][0]["patch_tokens"]) * info.embed_dim == per_image
        files = [("files", (f"{i}.png", png, "image/png")) for i in range(2)]
        two = client.post("/v1/embed", files=files, headers=AUTH, params={"patch_tokens": "true"})
        assert two.status_code == 422
        body = two.json()
        assert body["reason"] == "too_many_images" and "at most 1 image(s)" in body["detail"]
        assert client.post("/v1/embed", files=files, headers=AUTH).status_code == 200


class _ParkedIndex(EmbeddingIndex):
    """The real index, whose search notes where it runs and then waits for the test's word, so
    the test can look at the service while a search is under way (an index of a million rows
    spends seconds there; six rows spend microseconds)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()
        self.on_event_loop: list[bool] = []

    def scores(self, queries):
        try:
            asyncio.get_running_loop()
            self.on_event_loop.append(True)
        except RuntimeError:
            self.on_event_loop.append(False)
        self.started.set()
        self.release.wait(timeout=60)
        try:
            return super().scores(queries)
        finally:
            self.finished.set()


def test_a_similar_case_search_leaves_the_event_loop_free(embedder, nih_dir) -> None:
    """While one request searches the index, the replica still answers /healthz, and the
    response is the plain index's answer. The search ran on the event loop: every other
    request of the replica waited for it."""
    pngs = [p.read_bytes() for p in nih_pngs(nih_dir, 4)]
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((len(pngs), embedder.info.embed_dim)).astype(np.float32)
    ids = [hashlib.sha256(b).hexdigest() for b in pngs]
    index = _ParkedIndex(emb, ids)
    settings = ApiSettings(env_keys={key_digest(API_KEY): ()}, allow_development_key=True)
    app = create_app(embedder, settings=settings, index=index)
    headers = {**AUTH, "content-type": "image/png"}
    with TestClient(app) as client, ThreadPoolExecutor(1) as pool:
        try:
            asked = pool.submit(
                client.post, "/v1/similar", content=pngs[0], headers=headers, params={"k": 2}
            )
            assert index.started.wait(timeout=120), "the search never started"
            assert index.on_event_loop == [False]  # a worker thread, not the loop's
            assert client.get("/healthz").status_code == 200
            assert not index.finished.is_set()  # answered while the search was still parked
        finally:
            index.release.set()
        r = asked.result(timeout=60)
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    hits = res["neighbours"]
    assert len(hits) == 2 and ids[0] not in {h["image_id"] for h in hits}
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert res["excluded_self"] == 1 and app.state.decode_gate.admitted == 0


def test_an_api_replica_reserves_one_cpu_per_decode_thread() -> None:
    """Under Ray Serve, decode_workers 0 meant os.cpu_count() threads (each decode up to
    ~1.3 GB) inside a replica that reserved one CPU: a big node's cores, promised by Ray to
    other actors, and its memory went to one replica. 0 is now the one CPU the replica
    reserves; N threads reserve N CPUs. The replica env still travels with the options."""
    from serve.deployment import ingress_resources

    for asked, threads in ((0, 1), (1, 1), (3, 3)):
        options, settings = ingress_resources(ApiSettings(decode_workers=asked))
        assert options == {"num_cpus": threads}
        assert ApiSettings.model_validate(settings).decode_workers == threads
    options, _ = ingress_resources(ApiSettings(), {"RADJEPA_X": "1"})
    assert options == {"num_cpus": 1, "runtime_env": {"env_vars": {"RADJEPA_X": "1"}}}
    # outside Ray (plain uvicorn, bench/serve.py) 0 still means one thread per CPU
    assert DecodeGate(0).workers == (os.cpu_count() or 1)


@pytest.mark.ray
def test_a_replica_asking_more_cpus_than_any_node_has_is_said_before_deploying(
    ray_session, monkeypatch, caplog
) -> None:
    """decode_workers: N reserves N CPUs per API replica; with N above every node's CPUs,
    Serve waited for a node that never comes with only its own periodic warnings. On a Ray
    this process started that is refused in one line; on a cluster (an autoscaler may add a
    node that big) it is a warning."""
    import ray

    from serve.deployment import check_replica_fits

    largest = int(max(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    check_replica_fits(largest)  # fits
    with pytest.raises(ValueError, match=f"serve.decode_workers={largest + 1}: each API"):
        check_replica_fits(largest + 1)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # what joining a cluster looks like
    with caplog.at_level("WARNING", logger="serve.deployment"):
        check_replica_fits(largest + 1)
    assert "once the autoscaler adds a node that big" in caplog.text


def test_a_full_queue_refuses_a_request_before_taking_in_its_body(embedder) -> None:
    """An overloaded replica read each upload (up to max_body_mb) before answering 503, so
    its memory grew with the requests it refused."""
    app = _app(embedder, decode_workers=1, max_pending_decodes=1)
    gate: DecodeGate = app.state.decode_gate
    release = threading.Event()
    chunks_read: list[int] = []

    async def call() -> list[dict]:
        async def receive() -> dict:
            chunks_read.append(1)
            return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        headers = [
            (b"authorization", AUTH["Authorization"].encode()),
            (b"content-type", b"image/png"),
            (b"content-length", str(64 * 2**20).encode()),
        ]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/embed",
            "raw_path": b"/v1/embed",
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        await asyncio.wait_for(app(scope, receive, send), timeout=30)
        return sent

    with TestClient(app, raise_server_exceptions=False) as client:
        held = [client.portal.start_task_soon(gate.run, lambda c: release.wait(60))]
        deadline = time.monotonic() + 30
        while gate.admitted < gate.limit and time.monotonic() < deadline:
            time.sleep(0.01)
        sent = client.portal.call(call)
        release.set()
        held[0].result(timeout=30)
    assert sent[0]["status"] == 503
    assert len(chunks_read) <= 1  # at most the first chunk (a middleware's peek), not 64 MB


def test_an_upload_s_bytes_are_let_go_once_decoded(embedder, nih_dir) -> None:
    """Held to the answer, through the forward's queue and the search, every request in
    flight kept its whole upload."""
    from serve.app import _decode_all, _Upload

    app = _app(embedder)
    uploads = [_Upload(p.read_bytes(), p.name) for p in nih_pngs(nih_dir, 2)]
    pixels = _decode_all(uploads, app.state, None, threading.Event())
    assert len(pixels) == 2
    assert [len(up.data) for up in uploads] == [0, 0]
    assert all(len(up.image_id) == 64 for up in uploads)  # what is still used: the ids


def test_an_upload_that_crashes_or_hangs_its_codec_costs_its_own_request_only(
    embedder, nih_dir, monkeypatch
) -> None:
    """A hostile upload that crashed a codec in C (a segfault) ended the replica, and every
    request in flight with it; one a codec spun on held a decode thread for good, past the
    request's 504. Each upload is decoded in its decode thread's own process now: the crash is
    that request's 422, the hang ends with its deadline, and the next request is served."""
    import signal

    import radjepa.imaging.decode as decode

    real = decode.decode_image

    def codec(data, **options):  # inherited by the decode processes, which fork from here
        if data.startswith(b"CRASH"):
            os.kill(os.getpid(), signal.SIGSEGV)
        if data.startswith(b"HANG"):
            time.sleep(3600)
        return real(data, **options)

    monkeypatch.setattr(decode, "decode_image", codec)
    png = nih_pngs(nih_dir, 1)[0].read_bytes()
    app = _app(embedder, decode_workers=1, request_timeout_s=2.0)
    gate: DecodeGate = app.state.decode_gate
    with TestClient(app, raise_server_exceptions=False) as client:
        crashed = _post(client, b"CRASH" + png)
        assert crashed.status_code == 422, crashed.text
        assert crashed.json()["reason"] == "decoder_crashed"
        assert _post(client, png).status_code == 200
        started = time.monotonic()
        hung = _post(client, b"HANG" + png)
        assert hung.status_code == 504, hung.text
        # the one decode thread is free again: the stuck decode was ended, not waited out
        for _ in range(100):
            if gate.admitted == 0:
                break
            time.sleep(0.05)
        assert gate.admitted == 0
        assert _post(client, png).status_code == 200
        assert time.monotonic() - started < 30


def test_requests_reading_their_uploads_count_toward_the_gate() -> None:
    """Under plain uvicorn the gate is the only bound: checked on arrival but counted only once
    decoding, any number of requests read their bodies (up to max_body_mb each) at once."""
    gate = DecodeGate(workers=1, limit=2)
    with gate.reading():
        assert gate.admitted == 1
        with gate.reading():
            with pytest.raises(Overloaded, match="reading their uploads"):
                with gate.reading():
                    pass
            assert gate.admitted == 2
    assert gate.admitted == 0
    with pytest.raises(RuntimeError), gate.reading():  # a body that fails to arrive
        raise RuntimeError("client went away")
    assert gate.admitted == 0

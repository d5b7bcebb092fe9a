"""`radjepa serve` on a Ray cluster (RAY_ADDRESS names one): the cluster's Serve is shared.

Its other applications, and a production ``radjepa`` a RayService runs, are not the command's
to replace or stop; nor may it serve keyless there, where the proxies' host is not its own.
The session's local Ray stands for the cluster (RAY_ADDRESS set to its GCS address): Serve
behaves the same, and these tests leave it as they found it.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from serve_helpers import API_KEY, TINY_CONFIG, free_port

from radjepa.config import load_config
from serve.security import SecurityConfigError


def _cfg(tmp_path, **serve: object):
    direct = {"serve.model": str(tmp_path / "never-read"), "serve.port": 0}
    return load_config(TINY_CONFIG).with_overrides(
        direct | {f"serve.{k}": v for k, v in serve.items()}
    )


def test_keyless_mode_is_refused_when_ray_address_names_a_cluster(tmp_path, monkeypatch):
    """serve.start's http_options are ignored where Serve already runs: a keyless API on a
    cluster listened wherever the cluster's proxies do (0.0.0.0 under a RayService), not on
    the loopback host the keyless mode is allowed on. Refused before anything is contacted."""
    from serve.local import refuse_keyless_on_cluster, start_local

    monkeypatch.delenv("RADJEPA_API_KEYS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "192.0.2.1:6379")  # TEST-NET: would never answer
    started = time.monotonic()
    with pytest.raises(SecurityConfigError, match="refused on a Ray cluster") as err:
        start_local(_cfg(tmp_path, insecure_local=True))
    assert "\n" not in str(err.value) and "unset RAY_ADDRESS" in str(err.value)
    assert time.monotonic() - started < 5  # refused before the address was dialled

    from serve.security import ApiSettings, key_digest

    keyless = ApiSettings(insecure_local=True)
    refuse_keyless_on_cluster(keyless, on_cluster=False)  # this machine's own Ray: as before
    keyed = ApiSettings(insecure_local=True, env_keys={key_digest(API_KEY): ()})
    refuse_keyless_on_cluster(keyed, on_cluster=True)  # keys are asked for: nothing keyless


@pytest.mark.ray
def test_on_a_cluster_serve_neither_replaces_nor_stops_applications_not_its_own(
    ray_session, tmp_path, monkeypatch
):
    """serve.run(name="radjepa") replaced, without a word, an application of that name running
    on the cluster (a RayService's production API), and the stop's serve.shutdown deleted
    every application there and stopped Serve's own actors. Now the start refuses in one line,
    the stop after it leaves the cluster as it was, and a stop deletes the application this
    process deployed, and nothing else."""
    from ray import serve

    import serve.local as local

    @serve.deployment(name="Up")
    class Up:
        def ready(self) -> bool:
            return True

    monkeypatch.setattr(local, "_deployed_here", False)  # whatever an earlier test left
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        serve.run(Up.bind(), name="neighbour", route_prefix=None)
        serve.run(Up.bind(), name=local.APP_NAME, route_prefix=None)  # someone else's
        monkeypatch.setenv("RAY_ADDRESS", ray_session.get_runtime_context().gcs_address)
        monkeypatch.setenv("RADJEPA_API_KEYS", API_KEY)

        with pytest.raises(local.AppAlreadyRunning) as err:
            local.start_local(_cfg(tmp_path))
        said = str(err.value)
        assert "\n" not in said and "already runs a Serve application named 'radjepa'" in said
        assert "serve delete radjepa" in said
        assert local.stop_local() is True  # the caller's stop after the refusal
        apps = serve.status().applications
        assert set(apps) == {"neighbour", local.APP_NAME}
        assert apps[local.APP_NAME].status == "RUNNING"

        serve.delete(local.APP_NAME)  # its owner removed it: our own deploys, then stops
        local._deploy(Up.bind())
        assert serve.status().applications[local.APP_NAME].status == "RUNNING"
        assert local.stop_local() is True
        apps = serve.status().applications
        assert set(apps) == {"neighbour"} and apps["neighbour"].status == "RUNNING"
    finally:
        serve.shutdown()  # this session's Ray goes on


@pytest.mark.parametrize(
    ("address", "remote"),
    [
        ("", False),
        ("local", False),
        ("auto", False),  # this machine's own `ray start`, as the README suggests
        ("127.0.0.1:6379", False),
        ("localhost:6379", False),
        ("[::1]:6379", False),
        ("10.0.0.7:6379", True),
        ("ray://head.example:10001", True),
    ],
)
def test_keyless_mode_is_refused_up_front_only_on_other_machines(monkeypatch, address, remote):
    from serve.local import remote_cluster

    monkeypatch.setenv("RAY_ADDRESS", address)
    assert remote_cluster() is remote


@pytest.mark.ray
def test_a_serve_this_process_started_on_a_shared_ray_goes_once_its_last_application_does(
    ray_session, tmp_path, monkeypatch
):
    """On a `ray start` instance (RAY_ADDRESS=auto) the stop deleted only our application and
    left the Serve it had started: its proxies kept the first run's port, and the next run's
    serve.start had its own host and port ignored (the demo then called a port nobody held).
    Serve started here now goes with our application when nothing else runs on it; a Serve
    that already ran is used where it listens, and keyless mode is refused there when that is
    not loopback."""
    from ray import serve

    import serve.local as local
    from serve.security import ApiSettings

    @serve.deployment(name="Up")
    class Up:
        def ready(self) -> bool:
            return True

    monkeypatch.setenv("RAY_ADDRESS", ray_session.get_runtime_context().gcs_address)
    monkeypatch.setattr(local, "_deployed_here", False)
    try:
        # started here, with a neighbour: left running for it, then stopped with the last one
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        monkeypatch.setattr(local, "_serve_started_here", True)
        serve.run(Up.bind(), name="neighbour", route_prefix=None)
        local._deploy(Up.bind())
        assert local.stop_local() is True
        assert set(serve.status().applications) == {"neighbour"}
        assert local._running_serve() is not None
        serve.delete("neighbour")
        local._deploy(Up.bind())
        assert local.stop_local() is True
        assert local._running_serve() is None  # Serve itself is gone: nothing else ran on it

        # a Serve that already runs: where it listens is what counts
        port = free_port()
        serve.start(http_options={"host": "0.0.0.0", "port": port})
        running = local._running_serve()
        keyed = ApiSettings(env_keys={"d" * 64: ()})
        assert local._listening(running, keyed, "127.0.0.1", 0) == ("0.0.0.0", port)
        with pytest.raises(SecurityConfigError, match="not a loopback address"):
            local._listening(running, ApiSettings(insecure_local=True), "127.0.0.1", 0)
    finally:
        serve.shutdown()  # this session's Ray goes on


@pytest.mark.ray
def test_a_request_that_fails_or_gives_up_cancels_its_pending_encoder_calls(ray_session):
    """Each image is its own call to the encoder; when one failed (the encoder's queue full)
    or the request's deadline passed, the other calls went on holding the encoder for a caller
    long gone: cancelling the task awaiting a Serve response does not cancel the call."""
    from ray import serve

    from serve.deployment import RemoteEmbedder

    @serve.deployment(name="HeldEncoder", max_ongoing_requests=16)
    class HeldEncoder:
        """Holds each image's call until cancelled; one named ``fail`` fails once the two
        others are held."""

        def __init__(self) -> None:
            self.running = 0

        async def embed_one(self, image: str, want_tokens: bool = False) -> None:
            if image == "fail":
                while self.running < 2:
                    await asyncio.sleep(0.01)
                raise ValueError("undecodable")
            self.running += 1
            try:
                await asyncio.sleep(600)
            finally:
                self.running -= 1

        def running_now(self) -> int:
            return self.running

    def running_after(handle, expected: int, wait_s: float = 20.0) -> int:
        deadline = time.monotonic() + wait_s
        while True:
            now = handle.running_now.remote().result(timeout_s=30)
            if now == expected or time.monotonic() > deadline:
                return now
            time.sleep(0.2)

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        handle = serve.run(HeldEncoder.bind(), name="held", route_prefix=None)
        embedder = RemoteEmbedder(handle, info=None, preprocess=None)  # type: ignore[arg-type]

        async def past_deadline_while_held() -> None:
            work = asyncio.ensure_future(embedder.embed(["a", "b", "c"]))  # type: ignore[list-item]
            async with asyncio.timeout(30):
                while await handle.running_now.remote() < 3:
                    await asyncio.sleep(0.05)
            work.cancel()  # what the request's deadline (serve.app) does to it
            with pytest.raises(asyncio.CancelledError):
                await work

        asyncio.run(past_deadline_while_held())
        assert running_after(handle, 0) == 0, "calls of a request past its deadline ran on"

        async def one_fails() -> None:
            await embedder.embed(["a", "b", "fail"])  # type: ignore[list-item]

        with pytest.raises(ValueError, match="undecodable"):
            asyncio.run(one_fails())
        assert running_after(handle, 0) == 0, "calls of a failed request ran on"
    finally:
        serve.shutdown()  # this session's Ray goes on

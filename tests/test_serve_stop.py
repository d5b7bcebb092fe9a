"""Ray Serve's shutdown is bounded: `radjepa serve` must stop within a pod's grace period.

Left to itself serve.shutdown waited up to 30 s for its controller, which waited up to each
replica's graceful_shutdown_timeout_s (20 s) for requests in flight, whose callers the proxies
it stopped first had already cut off: 42 s from Ctrl-C to exit on a loaded 2-core box, and
once over 60 s in CI, where a Kubernetes pod gets 30 s before its SIGKILL.
"""

from __future__ import annotations

import time

import pytest
from serve_helpers import free_port


@pytest.mark.slow
def test_stop_local_gives_up_on_a_replica_holding_a_request_at_its_timeout(ray_session):
    from ray import serve

    from serve.local import SERVE_STOP_TIMEOUT_S, stop_local

    @serve.deployment(name="Busy")
    class Busy:
        def ready(self) -> bool:
            return True

        async def hold(self) -> None:  # a request that outlasts every grace period
            import asyncio

            await asyncio.sleep(600)

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    handle = serve.run(Busy.bind(), name="busy", route_prefix=None)
    assert handle.ready.remote().result(timeout_s=60)
    held = handle.hold.remote()
    time.sleep(1.0)  # the replica has it
    started = time.monotonic()
    try:
        finished = stop_local()
        took = time.monotonic() - started
    finally:
        held.cancel()
        serve.shutdown()  # this session's Ray goes on: let the controller finish
    assert not finished
    # the controller is asked whether it lives (5 s at most) within the same wait
    assert took < SERVE_STOP_TIMEOUT_S + 5, f"stop_local took {took:.1f} s"

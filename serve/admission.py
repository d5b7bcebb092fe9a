"""Admission control for the CPU work of a request: decoding uploads and searching the index.

Decoding is the API replica's own CPU cost (the forward runs in the encoder deployment), and a
few hundred KB of upload can be seconds of it; so is a similar-case search, a pass over the
whole index per upload (3 GiB at a million rows), which on the event loop stalled every other
request, /healthz included. Without a bound, every concurrent request got a thread of the
event loop's shared pool, the request deadline (504) abandoned the await but not
the thread, and ordinary requests queued behind work nobody was waiting for. Here that work
runs on a pool of fixed size, a request that finds too many others waiting is refused at once
(503, ``overloaded``, so a load balancer retries elsewhere), and a request that gave up stops
its decode between files (its search between uploads).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["Cancelled", "DecodeGate", "Overloaded"]

T = TypeVar("T")


class Overloaded(RuntimeError):
    """The service is at capacity for this request; the client should retry shortly."""


class Cancelled(RuntimeError):
    """The request that wanted this work has gone (deadline passed or client left)."""


class DecodeGate:
    """A fixed pool for decode and search jobs plus a bound on how many requests may wait for it.

    ``limit`` is the replica's share of concurrent requests (``serve.max_ongoing_requests``):
    under Ray Serve no more arrive, so the gate never refuses what Ray admitted; under plain
    uvicorn it is the only bound there is.
    """

    def __init__(self, workers: int = 0, limit: int = 32) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.limit = max(limit, self.workers)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="radjepa-decode")
        self._admitted = 0

    @property
    def admitted(self) -> int:
        """Requests currently decoding or waiting to."""
        return self._admitted

    async def run(self, job: Callable[[threading.Event], T], *, continuing: bool = False) -> T:
        """Run ``job(cancelled)`` on the pool; ``job`` should return early once ``cancelled``
        is set (checked between files). Raises :class:`Overloaded` when the queue is full,
        unless ``continuing``: a later step of a request the gate already admitted (the search
        after its decode and forward) is never refused, which would throw away work already
        paid for and answer 503 to a request that was let in."""
        if not continuing:
            self.check()
        cancelled = threading.Event()
        loop = asyncio.get_running_loop()
        work = self._pool.submit(job, cancelled)  # the release below is queued on this loop,
        self._admitted += 1  # so it runs after this count however soon the job ends
        # the slot is freed when the thread is, not when the request gives up: a job already
        # running (one file's decode, seconds for a large image) goes on to its next check,
        # and a slot freed at the deadline let new requests in to queue behind it and time
        # out (504) where the gate promises an immediate 503 with Retry-After
        work.add_done_callback(lambda _: _call_soon(loop, self._release))
        try:
            return await asyncio.wrap_future(work)
        except asyncio.CancelledError:
            # a job not started yet is dropped; a running one stops at its next file
            cancelled.set()
            raise

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Count a request while it reads its body (up to ``max_body_mb``, twice that for a
        moment while a raw body is joined): checked on arrival and counted only once decoding,
        any number of requests read their bodies at once under plain uvicorn, where the gate is
        the only bound. Released where :meth:`run` takes the request over, with no await
        between the two."""
        self.check()
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    def check(self) -> None:
        """Raise :class:`Overloaded` when the queue is full. Also called before a request's
        body is read (:meth:`reading`): an overloaded replica then refuses it without taking in
        its upload (up to ``max_body_mb`` each) first."""
        if self._admitted >= self.limit:
            raise Overloaded(
                f"{self._admitted} requests are already reading their uploads, decoding, "
                f"searching or waiting ({self.workers} worker threads)"
            )

    def _release(self) -> None:
        self._admitted -= 1


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    """``fn`` on ``loop`` from a pool thread; nothing once the loop is closed (a server that
    stopped counts no more requests)."""
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:
        pass

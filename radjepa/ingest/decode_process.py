"""One file's decode in a child process of its decoder, so that a file costs itself only.

A codec that crashes in C on a file (a segfault in a JPEG 2000 or JPEG-LS library) or spins on
it without end cannot be caught or interrupted from Python: in the decoder's own process it
ended that process, its whole batch was retried, and the batch that kept doing it stopped a run
of millions of files over one. Here the decoder hands each file to a forked child and waits for
its answer: a child that dies or runs past the time limit is ended and replaced, and the decoder
names the file that did it. The HTTP API decodes uploads the same way: a hostile upload that
crashes a codec is a 422 for its request, not a replica lost with every request in flight.

The child is forked (not spawned) so that it runs the decoder's own method, overrides and all,
on state it already holds, and starts in milliseconds after a crash; it touches nothing the
parent's other threads own (no Ray, no sockets), only the bytes it is sent.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import logging
import mmap
import multiprocessing
import multiprocessing.connection
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["DecodeCancelled", "DecodeCrashed", "DecodeProcess", "DecodeTimedOut"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


class DecodeCrashed(RuntimeError):
    """The child died on the call it was given (a signal, an exit) or let an exception out;
    ``how`` says which: ``signal 11 (SIGSEGV)``, ``exit code 3``, ``it raised SystemExit``."""

    def __init__(self, how: str) -> None:
        self.how = how
        super().__init__(f"the decode process ended ({how})")


class DecodeTimedOut(TimeoutError):
    """The child ran past the time limit on the file it was given, and was killed."""


class DecodeCancelled(RuntimeError):
    """The caller gave up while the child decoded (its ``cancelled`` event set): killed."""


_CANCEL_POLL_S = 0.1  # how soon a cancelled call ends its child
_FORKING = threading.Lock()  # one fork at a time in a process (see DecodeProcess._started)


def describe_exit(exitcode: int | None) -> str:
    """``-11`` -> ``signal 11 (SIGSEGV)``; ``70`` -> ``exit code 70``."""
    if exitcode is None:
        return "no exit status"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
        return f"signal {-exitcode} ({name})"
    return f"exit code {exitcode}"


class DecodeProcess:
    """Runs ``work(data, *args)`` in a forked child, one call at a time.

    ``data`` (a file's bytes: megabytes) reaches the child through a buffer the two processes
    share, one copy each way in memory; through the pipe it cost a median 3-8 ms a 5 MB file on
    2 cores, against 0.7 ms (bench/decode_isolation.py measures what isolation costs in all).
    ``args`` and ``work``'s result cross the pipe, so they must pickle; an exception ``work``
    lets out is :class:`DecodeCrashed`, named by its type (exceptions do not all pickle), and
    the child is replaced. ``timeout_s`` 0 waits as long as the child lives. The child is
    started on the first call, again after one that crashed or timed out, and with a larger
    buffer for data that outgrows it."""

    def __init__(
        self, work: Callable[..., Any], timeout_s: float = 0.0, buffer_bytes: int = 64 << 20
    ) -> None:
        if timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0, got {timeout_s}")
        self._work = work
        self._timeout_s = timeout_s
        self._buffer_bytes = buffer_bytes
        self._buffer: mmap.mmap | None = None
        self._child: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._forked_by = 0  # the thread that forked the child
        self.restarts = 0  # children replaced after a crash or a timeout

    def __call__(self, data: bytes, *args: Any) -> Any:
        return self.call(data, args)

    def call(
        self, data: bytes, args: tuple[Any, ...] = (), cancelled: threading.Event | None = None
    ) -> Any:
        """``work(data, *args)`` in the child; ``cancelled`` set while it runs (a caller that
        gave up: an HTTP request past its deadline) kills the child and raises
        :class:`DecodeCancelled`, so a codec stuck in C no longer holds the caller's thread."""
        for attempt in (1, 2):
            conn, buffer = self._started(len(data))
            buffer[: len(data)] = data  # the child is idle: it wrote its last answer, or is new
            try:
                conn.send((len(data), args))
                break
            except OSError:  # it died idle, before it was given the file: not the file's doing
                exitcode = self._stop()
                if attempt == 2:
                    raise DecodeCrashed(describe_exit(exitcode)) from None
        self._wait(conn, cancelled)
        try:
            ok, value = conn.recv()
        except (EOFError, OSError):  # the pipe closed: the child is gone
            raise DecodeCrashed(describe_exit(self._stop())) from None
        if not ok:  # the child may be in any state after that: a fresh one for the next call
            self._stop(kill=True)
            raise DecodeCrashed(f"it raised {value}")
        return value

    def _wait(self, conn: Connection, cancelled: threading.Event | None) -> None:
        """Until the child answers or dies (its exit, not only its pipe's end: another process
        holding a copy of the pipe kept a crash unseen until the deadline); ends it at the
        time limit or once cancelled."""
        assert self._child is not None
        sentinel = self._child.sentinel
        deadline = time.monotonic() + self._timeout_s if self._timeout_s else None
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            step = left if cancelled is None else min(_CANCEL_POLL_S, left or _CANCEL_POLL_S)
            ready = multiprocessing.connection.wait([conn, sentinel], step)
            if conn in ready or (ready and conn.poll(0)):  # an answer, maybe its last act
                return
            if ready:  # it exited without an answer
                raise DecodeCrashed(describe_exit(self._stop()))
            if cancelled is not None and cancelled.is_set():
                self._stop(kill=True)
                raise DecodeCancelled("the caller gave up")
            if deadline is not None and time.monotonic() >= deadline:
                self._stop(kill=True)
                raise DecodeTimedOut(f"no answer within {self._timeout_s:g} s")

    def close(self) -> None:
        """End the child (the decoder is done); the next call starts another."""
        self._stop(kill=False)
        self._buffer = None

    def _started(self, need: int) -> tuple[Connection, mmap.mmap]:
        if self._child is not None and self._conn is not None and self._buffer is not None:
            if need <= len(self._buffer) and self._forked_by == threading.get_ident():
                return self._conn, self._buffer
            # a child only sees the buffer it was forked with, and dies with the thread that
            # forked it (_die_with_parent): another thread's call could meet it killed mid-way
            self._stop(kill=False)
        if self._buffer is None or need > len(self._buffer):
            self._buffer_bytes = max(self._buffer_bytes, 1 << max(need - 1, 1).bit_length())
            self._buffer = mmap.mmap(-1, self._buffer_bytes)  # anonymous, shared with a fork
        ctx = multiprocessing.get_context("fork")
        with _FORKING:  # no sibling forks while this child's end is open here (it would keep a
            # copy, and this parent never saw its pipe close)
            parent_end, child_end = ctx.Pipe(duplex=True)
            child = ctx.Process(
                target=_serve,
                args=(child_end, parent_end, self._buffer, self._work),
                name="radjepa-decode",
                daemon=True,
            )
            child.start()
            child_end.close()
        self._child, self._conn = child, parent_end
        self._forked_by = threading.get_ident()
        return parent_end, self._buffer

    def _stop(self, kill: bool = True) -> int | None:
        """End the child and return its exit code; counts a restart when it was killed or had
        died."""
        child, conn = self._child, self._conn
        self._child = self._conn = None
        if child is None:
            return None
        if conn is not None:
            conn.close()  # a healthy child reads EOF and exits
        if not kill:
            child.join(timeout=5)
        if child.is_alive():
            child.kill()
            child.join(timeout=10)
        if child.is_alive():  # not even SIGKILL ended it in time (a process in D state)
            log.warning("a decode process (pid %s) did not end when killed", child.pid)
        if kill:
            self.restarts += 1
        return child.exitcode

    def __del__(self) -> None:
        try:
            self._stop(kill=True)
        except Exception:  # interpreter shutdown: nothing left to report to
            pass


def _serve(
    conn: Connection, parents_end: Connection, buffer: mmap.mmap, work: Callable[..., Any]
) -> None:
    """The child: answer each call until the parent closes the pipe (or dies: the kernel then
    kills the child, which may be stuck and never read the pipe again)."""
    parents_end.close()  # forked open: held here, the parent's close would never read as EOF
    _close_inherited_sockets(keep=conn.fileno())
    _die_with_parent()
    # the crash is said once, as the file's quarantine row: Python's fatal-error dump (the
    # stack and a hundred extension modules) reached the console of the run through Ray
    faulthandler.disable()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when a decode stops
    # the parent's handler (Ray's, the CLI's) would run its shutdown here: a SIGTERM to the
    # process group (a pod stopping) just ends the child
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        try:
            size, args = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        try:
            answer = (True, work(buffer[:size], *args))
        except BaseException as err:  # noqa: BLE001 - said as a crash, named by its type
            answer = (False, type(err).__name__)
        conn.send(answer)


def _close_inherited_sockets(keep: int) -> None:
    """Close the sockets the fork copied from the parent, but this child's own pipe: a
    socket closes for its peer only once every copy is closed, so a child holding a server's
    copies kept a closed keep-alive connection open for its client (its next request hung)
    and the listening port bound after the server stopped; and a sibling's decode pipe kept
    that sibling's crash from reading as end-of-file (the pipes are socket pairs). Files
    (logs) and pipes stay open. Linux only."""
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd <= 2 or fd == keep:
            continue
        try:
            mode = os.fstat(fd).st_mode
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if stat.S_ISSOCK(mode):  # not pipes: the write end of this child's own exit sentinel
            with contextlib.suppress(OSError):
                os.close(fd)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the decoder that forked it dies (a child stuck in C
    never reads the pipe's end-of-file). The kernel sends it when the *thread* that forked the
    child ends, so a call from another thread forks a child of its own (DecodeProcess._started).
    Elsewhere the pipe alone ends an idle child."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass

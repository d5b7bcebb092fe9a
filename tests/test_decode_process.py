"""A file that crashes or hangs its codec costs that file only: the decode runs in a child
process that is replaced, not in the decoder (whose whole batch was retried until the run
stopped). No Ray here: the library decoder on real DICOM bytes."""

from __future__ import annotations

import os
import signal
import time

import pytest
from dicom_factory import gradient, make_dicom

from radjepa.ingest.decode_process import DecodeCrashed, DecodeProcess, DecodeTimedOut
from radjepa.ingest.decoding import DECODE_TIMEOUT, DECODER_CRASHED, FileDecoder

SETTINGS = {"size": 32, "dtype": "uint8", "window_percentiles": (0.5, 99.5), "max_bytes": 1 << 24}


def _work(data: bytes, value: int) -> tuple[str, int, int]:
    kind = data.decode()
    if kind == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind == "hang":
        time.sleep(3600)
    if kind == "exit":
        os._exit(3)
    if kind == "raise":
        raise SystemExit("a codec calling exit()")
    return kind, value * 2, os.getpid()


def test_answers_come_from_one_child_until_a_call_crashes_it():
    proc = DecodeProcess(_work)
    try:
        first, again = proc(b"ok", 2), proc(b"ok", 5)
        assert first[:2] == ("ok", 4) and again[:2] == ("ok", 10)
        assert first[2] == again[2] != os.getpid()
        for kind, how in (
            ("segfault", "signal 11 (SIGSEGV)"),
            ("exit", "exit code 3"),
            ("raise", "it raised SystemExit"),
        ):
            with pytest.raises(DecodeCrashed) as err:
                proc(kind.encode(), 1)
            assert err.value.how == how
        after = proc(b"ok", 1)  # a new child, and the caller goes on
        assert after[:2] == ("ok", 2) and after[2] != first[2]
        assert proc.restarts == 3
    finally:
        proc.close()


def test_a_hung_call_is_ended_at_the_time_limit():
    proc = DecodeProcess(_work, timeout_s=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(DecodeTimedOut):
            proc(b"hang", 1)
        assert time.monotonic() - started < 10
        assert proc(b"ok", 3)[:2] == ("ok", 6)
        assert proc.restarts == 1
    finally:
        proc.close()


def _size(data: bytes) -> tuple[int, bytes, int]:
    return len(data), data[-3:], os.getpid()


def test_data_larger_than_the_buffer_gets_a_child_with_a_larger_one():
    proc = DecodeProcess(_size, buffer_bytes=1024)
    try:
        small = proc(b"x" * 1000)
        big = proc(b"y" * 5000 + b"end")
        assert small[:2] == (1000, b"xxx") and big[:2] == (5003, b"end")
        assert big[2] != small[2] and proc.restarts == 0  # outgrown, not crashed
        assert proc(b"z" * 10)[:2] == (10, b"zzz")
    finally:
        proc.close()


def test_a_child_that_died_between_files_is_replaced_without_blaming_the_next():
    proc = DecodeProcess(_size)
    try:
        pid = proc(b"abc")[2]
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        assert proc(b"next")[:2] == (4, b"ext")
    finally:
        proc.close()


def test_close_ends_the_child():
    proc = DecodeProcess(_work)
    pid = proc(b"ok", 1)[2]
    proc.close()
    with pytest.raises(ProcessLookupError):
        for _ in range(100):  # reaped by close(); the pid may take a moment to go
            os.kill(pid, 0)
            time.sleep(0.05)


class _Codec(FileDecoder):
    """A decoder whose codec crashes or spins on the files that say so in their name."""

    def _decode(self, data, name):
        if "crash" in name:
            os.kill(os.getpid(), signal.SIGSEGV)
        if "stuck" in name:
            time.sleep(3600)
        return super()._decode(data, name)


def _row(name: str, seed: int) -> dict:
    data = make_dicom(gradient(40, 40, seed=seed))
    return {"name": name, "data": data, "size_bytes": len(data), "read_error": None}


def test_an_isolated_decoder_quarantines_the_file_that_crashed_or_hung_and_goes_on():
    import pyarrow as pa

    dec = _Codec(SETTINGS, b"k" * 32, frozenset(), keep_paths=True, isolate=True, timeout_s=2)
    try:
        rows = [_row("a.dcm", 1), _row("crash.dcm", 2), _row("stuck.dcm", 3), _row("b.dcm", 4)]
        out = dec(pa.Table.from_pylist(rows)).to_pylist()
    finally:
        dec.close()
    got = {r["source_path"]: (r["status"], r["reason"]) for r in out}
    assert got == {
        "a.dcm": ("ok", None),
        "crash.dcm": ("quarantined", DECODER_CRASHED),
        "stuck.dcm": ("quarantined", DECODE_TIMEOUT),
        "b.dcm": ("ok", None),
    }
    crashed = next(r for r in out if r["reason"] == DECODER_CRASHED)
    assert "signal 11 (SIGSEGV)" in crashed["message"]
    # the same bytes decoded in-process give the same stored row (isolation changes nothing)
    plain = FileDecoder(SETTINGS, b"k" * 32, frozenset(), keep_paths=True)
    same = plain(pa.Table.from_pylist(rows[:1])).to_pylist()[0]
    assert same == out[0]


def test_a_time_limit_without_a_child_to_end_is_refused():
    with pytest.raises(ValueError, match="isolate=True"):
        FileDecoder(SETTINGS, b"k" * 32, frozenset(), keep_paths=True, timeout_s=5)


def test_a_caller_that_gives_up_ends_the_decode_it_waits_for():
    import threading

    from radjepa.ingest.decode_process import DecodeCancelled

    proc = DecodeProcess(_work)
    cancelled = threading.Event()
    try:
        threading.Timer(0.3, cancelled.set).start()
        started = time.monotonic()
        with pytest.raises(DecodeCancelled):
            proc.call(b"hang", (1,), cancelled=cancelled)
        assert time.monotonic() - started < 10
        assert proc.call(b"ok", (2,), cancelled=threading.Event())[:2] == ("ok", 4)
    finally:
        proc.close()


def test_a_call_from_another_thread_gets_a_child_of_its_own():
    """The kernel kills a child when the thread that forked it ends (PR_SET_PDEATHSIG): a
    child forked by a thread that has since ended could be met dead, or killed mid-call."""
    import threading

    proc = DecodeProcess(_work)
    try:
        first: list = []
        worker = threading.Thread(target=lambda: first.append(proc(b"ok", 1)))
        worker.start()
        worker.join()
        here = proc(b"ok", 2)
        assert here[:2] == ("ok", 4) and here[2] != first[0][2]
        assert proc(b"ok", 3)[2] == here[2]  # the same thread keeps its child
        assert proc.restarts == 0
    finally:
        proc.close()


def test_a_decode_process_that_cannot_start_leaves_the_file_to_this_one(monkeypatch, caplog):
    """A pod at its process limit (fork: EAGAIN) or out of memory for the fork: the node's
    state, not the file's. The OSError left the decoder, and Ray printed its traceback."""
    import errno
    import logging

    import pyarrow as pa

    def no_fork(self, need):
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(DecodeProcess, "_started", no_fork)
    dec = FileDecoder(SETTINGS, b"k" * 32, frozenset(), keep_paths=True, isolate=True, timeout_s=5)
    with caplog.at_level(logging.WARNING, logger="radjepa.ingest.decoding"):
        (row,) = dec(pa.Table.from_pylist([_row("a.dcm", 1)])).to_pylist()
    assert row["status"] == "ok"
    assert "cannot start a decode process" in caplog.text


def _sockets(data: bytes) -> list[int]:
    import stat

    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(fd))
        except OSError:
            continue
        if stat.S_ISSOCK(st.st_mode):
            found.append(st.st_ino)
    return found


def test_a_child_keeps_none_of_its_parent_s_sockets():
    """A child holding a server's copies kept a closed keep-alive connection open for its
    client (the client's next request hung) and the port listening after the server stopped."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    proc = DecodeProcess(_sockets)
    try:
        held = proc(b"")
        assert os.fstat(server.fileno()).st_ino not in held
        assert len(held) == 1  # its own end of the pipe
    finally:
        proc.close()
        server.close()


def _crash_with_a_copy_of_the_pipe_left_behind(data: bytes) -> None:
    import stat

    if os.fork() == 0:  # a process still holding this child's end of the (socket) pipe, as a
        # sibling forked meanwhile did; not the exit sentinel (a plain pipe)
        for fd in os.listdir("/proc/self/fd"):
            try:
                if stat.S_ISFIFO(os.fstat(int(fd)).st_mode):
                    os.close(int(fd))
            except OSError:
                pass
        time.sleep(20)
        os._exit(0)
    os.kill(os.getpid(), signal.SIGSEGV)


def test_a_crash_is_seen_by_the_child_s_exit_not_only_by_its_pipe_closing():
    """Another process holding a copy of the pipe (a sibling forked meanwhile) kept the pipe
    from closing: the crash went unseen until the caller's deadline."""
    proc = DecodeProcess(_crash_with_a_copy_of_the_pipe_left_behind)
    try:
        started = time.monotonic()
        with pytest.raises(DecodeCrashed, match="SIGSEGV"):
            proc(b"")
        assert time.monotonic() - started < 5
    finally:
        proc.close()

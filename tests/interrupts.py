"""Interrupting a running job as a user (Ctrl-C) or a supervisor (SIGTERM) would."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def ctrl_c_once(ready: Callable[[], bool], timeout_s: float = 600) -> Iterator[None]:
    """Send this process SIGINT once ``ready()`` holds (polled every second) while the body
    runs. Waiting for a sign of training (a logged loss) puts the signal where a user's would
    land, inside Ray Train's or Tune's run. The job puts the handlers it found back itself (the
    autouse fixture in conftest.py fails a test whose job left them changed)."""
    stop = threading.Event()

    def press() -> None:
        deadline = time.monotonic() + timeout_s
        while not stop.is_set() and time.monotonic() < deadline:
            if ready():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(1)

    presser = threading.Thread(target=press, daemon=True)
    presser.start()
    try:
        yield
    finally:
        stop.set()
        presser.join()


def signal_after_line(
    proc: subprocess.Popen[str],
    marker: str,
    sig: int,
    timeout_s: float,
    *,
    again_after_s: float | None = None,
    took: list[float] | None = None,
) -> tuple[str, str]:
    """Send ``sig`` to the child ``proc`` once a line of its stderr holds ``marker`` (where a
    user's Ctrl-C or a pod's SIGTERM would land in the run), then wait for it to end: (its
    stdout, everything it wrote to stderr). ``again_after_s``: send it once more that long
    after, while the child is still running (a supervisor or a user repeating it). ``took``:
    the seconds from the (first) signal to the child's end are appended to it (a pod gets 30 s
    before SIGKILL)."""
    assert proc.stderr is not None
    said = []
    sent = None
    for line in proc.stderr:
        said.append(line)
        if marker in line:
            sent = time.monotonic()
            proc.send_signal(sig)
            if again_after_s is not None:
                time.sleep(again_after_s)
                if proc.poll() is None:
                    proc.send_signal(sig)
            break
    out, rest = proc.communicate(timeout=timeout_s)
    if took is not None and sent is not None:
        took.append(time.monotonic() - sent)
    return out, "".join(said) + rest


def signal_once_run_is_made(
    proc: subprocess.Popen,
    db: Path,
    run_name: str,
    fifo: Path,
    signum: signal.Signals,
    timeout_s: float = 240,
    params: int = 0,
) -> tuple[str, str]:
    """Send ``signum`` to ``proc`` once its sqlite MLflow store ``db`` holds a run named
    ``run_name`` (with ``params`` params logged: the command logs them after creating the run,
    and a signal among those writes is not the window meant), then let through the write
    ``proc`` is blocked in: a named pipe ``fifo`` standing for the id file the command writes
    right after (a reader's open ends the writer's wait). So the signal lands in the window
    between a run's set-up and its id file. Returns the run's id and the process's stderr, once
    it has exited."""
    import sqlite3

    try:
        deadline = time.monotonic() + timeout_s
        made: list[tuple[str]] = []
        while not made and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            if db.is_file():
                con = None
                try:
                    con = sqlite3.connect(db)
                    query = "select run_uuid from runs where name=?"
                    made = con.execute(query, (run_name,)).fetchall()
                    if made and params:
                        query = "select count(*) from params where run_uuid=?"
                        if con.execute(query, made[0]).fetchone()[0] < params:
                            made = []
                except sqlite3.Error:  # the store is still being created
                    made = []
                finally:
                    if con is not None:
                        con.close()
        assert made, proc.communicate(timeout=60)[1][-3000:]
        proc.send_signal(signum)
        time.sleep(1)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            _, err = proc.communicate(timeout=120)
        finally:
            os.close(reader)
    finally:
        if proc.poll() is None:
            proc.kill()
    return made[0][0], err


def foreground_process(
    args: list[str], *, env: dict[str, str], cwd: Path, stderr: int = subprocess.PIPE
) -> subprocess.Popen:
    """``args`` started as a user's foreground command (text pipes): with SIGINT at its default.
    A shell's background job, CI's pytest among them, ignores SIGINT, a child inherits that, and
    Python then installs no Ctrl-C handler: the command would never see the Ctrl-C a test
    sends."""
    return subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

"""One ingest run per DST at a time: the lock file ``DST/.ingest.lock``.

Two runs into one DST (two Ray Jobs, an overlapping cron) each snapshot the ids already
stored, so both stored the same new files; and each rewrote the manifest as "the runs it read
at its start + itself", so the later one dropped the other's record and the counts no longer
reconciled. A run therefore holds this lock from before its first write to DST until it ends.

The lock is a small JSON record (run_id, host, pid, started_at, heartbeat) that a thread
rewrites every :data:`HEARTBEAT_S` seconds. A run killed without cleaning up (``kill -9``, an
evicted pod) leaves it behind; the next run takes it over, with a warning naming the dead run,
when its heartbeat is older than :data:`STALE_S` or its owner is a dead process on this host.
A live lock is refused in one line before anything is written.

Atomicity: on a local filesystem the lock is created with ``O_CREAT | O_EXCL``, so of two runs
exactly one gets it. Object stores have no exclusive create: there the lock is written, then
read back and kept only when it is still ours, which catches all but two runs that start within
the same moment (best effort). Taking over a stale lock is best effort on any filesystem: it
is read again just before it is removed, so only two runs taking it over at the same instant
could both proceed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from radjepa.ingest.errors import IngestError
from radjepa.locations import filesystem, join_location

__all__ = ["HEARTBEAT_S", "LOCK", "STALE_S", "DstLock"]

log = logging.getLogger(__name__)

LOCK = ".ingest.lock"
HEARTBEAT_S = 30.0
# a lock not refreshed for this long belongs to a dead run: ten missed heartbeats, far above
# any clock skew between hosts and any pause of a busy driver
STALE_S = 300.0


def _now() -> datetime:
    return datetime.now(UTC)


def _pid_namespace() -> str | None:
    """This process's pid namespace (Linux): two containers sharing a hostname (host
    networking) see different processes, so a pid is only judged where it means the same."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or an odd value): do not call it dead
    return True


class DstLock:
    """``with DstLock(dst, run_id):`` holds ``DST/.ingest.lock`` for one run (see module
    docstring); ``stale_s`` and ``heartbeat_s`` are parameters so tests need not wait minutes."""

    def __init__(
        self,
        dst: str,
        run_id: str,
        *,
        stale_s: float = STALE_S,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.uri = dst
        try:
            self.fs, root = filesystem(dst)
        except (OSError, pa.ArrowException) as err:
            raise IngestError(f"cannot use destination {dst}: {err}") from None
        self.path = f"{root.rstrip('/')}/{LOCK}"
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        started = _now().isoformat(timespec="seconds")
        self.record = {
            "run_id": run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_namespace": _pid_namespace(),
            "started_at": started,
            "heartbeat": started,
        }
        self._root = root
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the context manager ------------------------------------------------------------------

    def __enter__(self) -> DstLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise :class:`IngestError` naming the run that holds it."""
        try:
            self.fs.create_dir(self._root, recursive=True)
            taken = self._take()
        except (OSError, pa.ArrowException) as err:  # not a folder, no permission to write
            raise IngestError(f"cannot use destination {self.uri}: {err}") from None
        if not taken:
            raise IngestError(
                f"cannot take the lock {join_location(self.uri, LOCK)}: other runs keep "
                "taking it; make sure only one ingest into this destination runs at a time"
            )
        self._thread = threading.Thread(target=self._beat, name="ingest-lock", daemon=True)
        self._thread.start()

    def _take(self) -> bool:
        """Create the lock, taking it over from a dead run; False after three lost races."""
        for _ in range(3):  # a stale lock taken over, then lost to a third run: re-read it
            if self._create():
                return True
            held = self._read()
            if held is None:
                continue  # released between our attempt and our read: try again
            why = self._dead(held)
            if why is None:
                raise IngestError(self._refusal(held))
            if self._read() != held:  # refreshed or replaced meanwhile: judge it again
                continue
            log.warning(
                "taking over %s from run %s (host %s, pid %s, started %s): %s",
                join_location(self.uri, LOCK),
                held.get("run_id", "?"),
                held.get("host", "?"),
                held.get("pid", "?"),
                held.get("started_at", "?"),
                why,
            )
            self._delete()
        return False

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, unless another run has taken it over."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)  # a beat stuck on slow storage must not hang Ctrl-C
            self._thread = None
        try:
            held = self._read()
            if held is not None and held.get("run_id") == self.record["run_id"]:
                self._delete()
        except (OSError, pa.ArrowException) as err:  # never hide the error that ended the run
            log.warning(
                "cannot remove %s (%s): delete it by hand, or the next run waits %.0f s for it",
                join_location(self.uri, LOCK),
                err,
                self.stale_s,
            )

    # -- the file -----------------------------------------------------------------------------

    def _payload(self) -> bytes:
        return json.dumps(self.record, sort_keys=True).encode("utf-8")

    def _create(self) -> bool:
        """Create the lock holding our record; False when one exists already."""
        if self.local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._payload())
            return True
        if self.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
            return False
        self._write()
        held = self._read()  # best effort on object stores: the last writer won
        return held is not None and held.get("run_id") == self.record["run_id"]

    def _write(self) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write(self._payload())

    def _read(self) -> dict[str, Any] | None:
        """The lock's record; None when there is no lock. A lock being written or cut short
        reads as an unknown owner whose heartbeat is the file's modification time."""
        try:
            info = self.fs.get_file_info(self.path)
            if info.type == pafs.FileType.NotFound:
                return None
            with self.fs.open_input_stream(self.path, compression=None) as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(raw.decode("utf-8"))
            if isinstance(record, dict) and "heartbeat" in record:
                return record
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        mtime = info.mtime.astimezone(UTC) if info.mtime else _now()
        return {"heartbeat": mtime.isoformat(timespec="seconds"), "unreadable": True}

    def _delete(self) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass

    # -- liveness -----------------------------------------------------------------------------

    def _dead(self, held: dict[str, Any]) -> str | None:
        """Why the run holding ``held`` is gone, or None when it may be alive."""
        try:
            beat = datetime.fromisoformat(str(held["heartbeat"]))
            age = (_now() - (beat if beat.tzinfo else beat.replace(tzinfo=UTC))).total_seconds()
        except ValueError:
            return "its heartbeat is unreadable"
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s (stale after {self.stale_s:.0f} s)"
        pid = held.get("pid")
        here = all(held.get(k) == self.record[k] for k in ("host", "pid_namespace"))
        if here and isinstance(pid, int):
            if not _pid_alive(pid):
                return f"process {pid} no longer runs on this host"
        return None

    def _refusal(self, held: dict[str, Any]) -> str:
        who = (
            "a run whose lock is being written or is damaged"
            if held.get("unreadable")
            else f"run {held.get('run_id')} (host {held.get('host')}, pid {held.get('pid')}, "
            f"since {held.get('started_at')})"
        )
        return (
            f"{self.uri} is being ingested by {who}, last heartbeat {held.get('heartbeat')}: "
            "one ingest per destination at a time. Wait for it to finish, or delete "
            f"{join_location(self.uri, LOCK)} if that run is truly gone"
        )

    def _beat(self) -> None:
        """Refresh the heartbeat until released; stop (loudly) when another run took over."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                held = self._read()
                if held is None or held.get("run_id") != self.record["run_id"]:
                    log.error(
                        "lost %s to another run (%s); this run's manifest may drop that "
                        "run's record",
                        join_location(self.uri, LOCK),
                        (held or {}).get("run_id", "none"),
                    )
                    return
                self.record["heartbeat"] = _now().isoformat(timespec="seconds")
                self._write()
            except (OSError, pa.ArrowException) as err:  # a storage hiccup: try next beat
                log.warning("cannot refresh %s: %s", join_location(self.uri, LOCK), err)

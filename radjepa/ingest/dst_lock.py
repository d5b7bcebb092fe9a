"""One ingest run per DST at a time: the lock file ``DST/.ingest.lock``.

Two runs into one DST (two Ray Jobs, an overlapping cron) each snapshot the ids already
stored, so both stored the same new files; and each rewrote the manifest as "the runs it read
at its start + itself", so the later one dropped the other's record and the counts no longer
reconciled. A run therefore holds this lock from before its first write to DST until it ends.

The lock is a small JSON record (run_id, host, pid, boot_id, started_at, heartbeat) that a
thread rewrites every :data:`HEARTBEAT_S` seconds. A run killed without cleaning up (``kill -9``, an
evicted pod) leaves it behind; the next run takes it over, with a warning naming the dead run,
when its heartbeat is older than :data:`STALE_S` or its owner is a dead process on this host.
A live lock is refused in one line before anything is written.

Atomicity: on a local filesystem the lock is created with ``O_CREAT | O_EXCL``, so of two runs
exactly one gets it. Object stores have no exclusive create: there the lock is written, then
read back and kept only when it is still ours, which catches all but two runs that start within
the same moment (best effort). Taking over a stale lock is best effort on any filesystem: it
is read again just before it is removed, so only two runs taking it over at the same instant
could both proceed.

Heartbeats: each beat writes the whole record to a temporary file beside the lock
(``.ingest.lock.<run_id>.tmp``) and renames it over the lock, so a reader never sees a record
cut short (rewriting in place showed an empty file between truncate and write). The beat reads
the lock right before the rename and writes nothing when the record is not its own: a run
paused past :data:`STALE_S` that wakes while another takes the lock over stops instead of
writing over the new owner. What remains is the gap between that read and the rename
(microseconds, no I/O but the rename): a takeover landing exactly there is overwritten by the
old run's whole record, and the new owner's next beat logs that it lost the lock. Closing it
needs a compare-and-swap that neither POSIX renames nor object stores offer. On object stores
a write is already whole (an object appears on close), so the record is written directly.
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

__all__ = ["HEARTBEAT_S", "LOCK", "STALE_S", "DstLock", "is_lock_temporary"]

log = logging.getLogger(__name__)

LOCK = ".ingest.lock"
HEARTBEAT_S = 30.0
# a lock not refreshed for this long belongs to a dead run: ten missed heartbeats, far above
# any clock skew between hosts and any pause of a busy driver
STALE_S = 300.0


def is_lock_temporary(name: str) -> bool:
    """Whether a file name in DST is a heartbeat's temporary record (``.ingest.lock.<run>.tmp``)."""
    return name.startswith(f"{LOCK}.") and name.endswith(".tmp")


def _now() -> datetime:
    return datetime.now(UTC)


def _pid_namespace() -> str | None:
    """This process's pid namespace (Linux): two containers sharing a hostname (host
    networking) see different processes, so a pid is only judged where it means the same."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _boot_id() -> str | None:
    """This boot of this host (Linux): unlike the hostname (cloned VMs, ``localhost``, one
    ``--hostname`` given to containers on several nodes) and the init pid namespace (the same
    number on every host), it tells two machines apart; containers on one host share it."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
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
            "boot_id": _boot_id(),
            "started_at": started,
            "heartbeat": started,
        }
        self._root = root
        self._stop = threading.Event()
        self.lost = threading.Event()  # another run took the lock over (check_held)
        self._lost_to = ""
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
        self._remove_temporaries()
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
        self._delete_path(self.path)

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
        # a lock written before the boot was recorded is judged by host and namespace alone
        here = here and held.get("boot_id", self.record["boot_id"]) == self.record["boot_id"]
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
                if not self._refresh():
                    return
            except (OSError, pa.ArrowException) as err:  # a storage hiccup: try next beat
                log.warning("cannot refresh %s: %s", join_location(self.uri, LOCK), err)

    def _refresh(self) -> bool:
        """One beat: the record rewritten whole with a new heartbeat while it is still ours;
        False (logged) once another run holds the lock, which is then left as it is."""
        if not self._ours():
            return False
        self.record["heartbeat"] = _now().isoformat(timespec="seconds")
        if not self.local:
            self._write()
            return True
        tmp = self._write_temporary()
        try:
            if not self._ours():  # taken over while we wrote: never rename over its record
                return False
            os.replace(tmp, self.path)
            return True
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)

    def _ours(self) -> bool:
        held = self._read()
        if held is not None and held.get("run_id") == self.record["run_id"]:
            return True
        if held is None:  # deleted by hand (the refusal says to, for a run truly gone): no
            # other run holds DST, so this beat writes the lock again and the run goes on
            log.warning(
                "%s was deleted while this run held it: written again",
                join_location(self.uri, LOCK),
            )
            return True
        self._lost_to = str((held or {}).get("run_id", "none"))
        self.lost.set()
        log.error(
            "lost %s to another run (%s): this run stops before its next write",
            join_location(self.uri, LOCK),
            self._lost_to,
        )
        return False

    def check_held(self) -> None:
        """Raise :class:`IngestError` once another run took the lock over (this one was paused
        past ``stale_s``: a laptop asleep, a VM suspended). It kept writing shards and its
        manifest beside the new owner's, storing the same new files twice."""
        if self.lost.is_set():
            raise IngestError(
                f"this run lost {join_location(self.uri, LOCK)} to run {self._lost_to} (no "
                f"heartbeat for over {self.stale_s:.0f} s: was the machine asleep?) and stopped "
                "before writing more; what it stored before is kept: run it again once the "
                "other run has ended"
            )

    def _remove_temporaries(self) -> None:
        """Delete the beat temporaries of other runs (one killed mid-beat, or a paused one that
        lost the lock: its rename then fails and its next beat stops). Before our own first
        beat, so never ours."""
        if not self.local:
            return
        try:
            for info in self.fs.get_file_info(pafs.FileSelector(self._root)):
                if is_lock_temporary(info.base_name) and info.path != self._temporary():
                    self._delete_path(info.path)
        except OSError as err:  # harmless leftovers: never a reason to refuse the run
            log.warning("cannot remove old lock temporaries in %s: %s", self.uri, err)

    def _delete_path(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass

    def _temporary(self) -> str:
        return f"{self.path}.{self.record['run_id']}.tmp"

    def _write_temporary(self) -> str:
        """Our record in a file of its own beside the lock (local filesystems), to rename."""
        tmp = self._temporary()
        with open(tmp, "wb") as f:
            f.write(self._payload())
        return tmp

"""A training run that met a full (or over-quota, or read-only) storage: found in Ray Train's
error, stopped without retries, and said in one line.

Ray Train retries a failed worker group ``train.max_failures`` times from the last checkpoint.
A full disk is not transient: every retry replayed the steps since that checkpoint, met the
same full disk at the next save and left one more checkpoint folder cut short (seen: two
retries, 86 s, three folders cut short instead of one). :mod:`pipelines.failure_policy` makes
Ray stop at the first one; :func:`storage_message` says which folder, what it needs, and what to
do. No Ray import here: the driver reads errors with it before Ray starts.

A shard whose bytes are damaged (:func:`damaged_shard`, named by the training stream's reader,
:mod:`pipelines.shard_source`) is not transient either: every retry read it again.
"""

from __future__ import annotations

import errno
import os
import shutil

from radjepa import locations
from radjepa.error_text import error_line
from radjepa.shards import DamagedShardError

# a worker's write refused by the storage: what it says about the storage
STORAGE_ERRNOS = {
    errno.ENOSPC: "is full",
    errno.EDQUOT: "is over its quota",
    errno.EFBIG: "cannot hold a file this large",
    errno.EROFS: "is read-only",
    errno.EACCES: "cannot be written",
    errno.EPERM: "cannot be written",
}
# a retry fails the same way until someone frees space, raises the quota or remounts: these stop
# a run at once. A refused permission may be a credential about to be refreshed: retried
NOT_RETRYABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def storage_error(err: BaseException) -> OSError | None:
    """The OSError of a full, read-only or forbidden storage behind a failed run, if that is
    what failed: Ray Train wraps it in a WorkerGroupError whose text is each rank's traceback,
    which the user got as the error message, 40 lines ending in pyarrow's copy_files."""
    # a rank's write (WorkerGroupError) or the controller's own record of the checkpoints
    # (ControllerError), whichever met the full storage first
    pending: list[BaseException] = [err, *getattr(err, "worker_failures", {}).values()]
    if isinstance(getattr(err, "controller_failure", None), BaseException):
        pending.append(err.controller_failure)
    seen: set[int] = set()
    while pending:
        e = pending.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return e
        pending += [c for c in (e.__cause__, e.__context__) if c is not None]
    return None


def damaged_shard(err: BaseException) -> DamagedShardError | None:
    """The error naming a damaged shard behind a failed run (a rank's read of the training
    stream: Ray's task error, which is a :class:`DamagedShardError` too), if that is what
    failed."""
    failures = getattr(err, "worker_failures", None) or {}
    for e in (err, *(failures[rank] for rank in sorted(failures))):
        if isinstance(e, DamagedShardError):
            return e
    return None


def is_not_retryable(err: BaseException) -> bool:
    """Whether ``err`` (a worker group's or the controller's failure) is a storage that a retry
    would find just as full, over quota or read-only, or a shard a retry would read damaged."""
    found = storage_error(err)
    if found is not None and found.errno in NOT_RETRYABLE:
        return True
    return damaged_shard(err) is not None


def storage_message(err: OSError, run_dir: str, keep_checkpoints: int | None = None) -> str:
    """One line for a run stopped by the storage error ``err``: the folder it was writing (the
    checkpoint cut short in ``run_dir``, or a worker's local folder the checkpoint is saved to
    first), the newest intact checkpoint, the room a run needs, and what to do."""
    what = STORAGE_ERRNOS[err.errno]
    first = error_line(err)
    stopped = (
        "so training stopped at once (a retry would meet it again)"
        if err.errno in NOT_RETRYABLE
        else "so training stopped"
    )
    local_run = locations.local_path(run_dir)
    written = os.path.dirname(err.filename) if isinstance(err.filename, str) else None
    if written and (local_run is None or not _is_under(written, local_run)):
        # the worker's own disk: rank 0 saves a checkpoint into a temporary folder first
        reason = f"[Errno {err.errno}] {err.strerror}"  # the folder is named next
        return (
            f"a worker's local disk {what} ({reason}) saving a checkpoint into {written} before "
            f"its copy to {run_dir}, {stopped}; the checkpoints in {run_dir} are intact. Free "
            "space there (or set TMPDIR for the Ray workers to a larger disk), then re-run the "
            "same command: it resumes from its newest checkpoint"
        )
    try:
        cut, newest, size = _checkpoints(run_dir)
    except Exception:  # noqa: BLE001 - the storage that failed may fail this too: say less
        cut, newest, size = None, None, None
    writing = f" writing checkpoint {cut}" if cut else ""
    intact = (
        f"the checkpoints before it in {run_dir} are intact (the newest: {newest})"
        if newest
        else f"the checkpoints already in {run_dir} are intact"
    )
    room = ""
    if size and err.errno in (errno.ENOSPC, errno.EDQUOT):
        room = f" A checkpoint takes {_mb(size)}"
        if keep_checkpoints:
            n = keep_checkpoints + 1
            room += (
                f"; the run needs room for {n} (train.keep_checkpoints={keep_checkpoints}, and "
                f"Ray writes the next before it removes the oldest): {_mb(n * size)}"
            )
        free = _free_bytes(local_run)
        if free is not None:
            room += f"; {_mb(free)} are free there"
        room += "."
    fix = {
        errno.ENOSPC: "Free space (or lower train.keep_checkpoints)",
        errno.EDQUOT: "Free space or raise the quota",
        errno.EROFS: "Make the storage writable",
    }.get(err.errno, "Fix the storage")
    return (
        f"the output storage {what} ({first}){writing}, {stopped}; {intact}.{room} {fix}, then "
        "re-run the same command: it resumes from the newest checkpoint that reads cleanly "
        "(one cut short is skipped with a warning)"
    )


def _checkpoints(run_dir: str) -> tuple[str | None, str | None, int | None]:
    """(the newest checkpoint folder of ``run_dir`` if it is cut short, the newest whole one
    with its step, the bytes of that whole one)."""
    import pyarrow.fs as pafs

    from radjepa.checkpoint import check_resumable, is_cut_short
    from radjepa.resume import checkpoint_dirs

    cut = None
    for i, (name, location) in enumerate(checkpoint_dirs(run_dir)):  # newest first
        if is_cut_short(location):
            cut = cut or (location if i == 0 else None)
            continue
        step, _ = check_resumable(location)
        fs, path = locations.filesystem(location)
        files = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        size = sum(f.size or 0 for f in files if f.type == pafs.FileType.File)
        return cut, f"{name}, step {step}", size
    return cut, None, None


def _is_under(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _free_bytes(local: str | None) -> int | None:
    if local is None:
        return None
    try:
        return shutil.disk_usage(local).free
    except OSError:
        return None


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"

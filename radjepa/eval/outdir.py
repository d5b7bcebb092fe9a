"""The probe's output folder is replaced whole, and only by a run that finished.

Written straight into ``--out``, a re-run left the earlier run's files beside its own (a
``head/`` or a ROC plot that the new ``report.json`` does not mention, which ``radjepa serve
--head`` would still load), and an error half-way through the writes left a mix of both runs.
So every file goes into a fresh folder first, and that folder takes the place of ``--out``
only once all of it is written: a failed run leaves ``--out`` exactly as it was, a finished one
leaves only its own files. A folder holding anything a probe does not write is refused, never
deleted: it is somebody's data, not an earlier report.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from radjepa.eval.features import DatasetError

log = logging.getLogger(__name__)

__all__ = ["check_out_dir", "staged_out_dir"]

# everything run_probe writes, relative to --out; a folder holding only these is an earlier run
_OWN_FILES = {"report.json", "report.md", "head/head.json", "head/head.safetensors"}
_OWN_DIRS = {"plots", "head"}
_OWN_PLOT = re.compile(r"roc_[A-Za-z0-9_.-]+\.png|pca_patch_features\.png")
# staging folders inside --out (see staged_out_dir): left behind only if the process was killed
_STAGING = re.compile(r"\.probe-(new|old)-[0-9a-f]{12}")


def _is_own(rel: str, path: Path) -> bool:
    if path.is_symlink():
        return False
    if rel in _OWN_DIRS:
        return path.is_dir()
    if rel in _OWN_FILES:
        return path.is_file()
    head, _, name = rel.partition("/")
    return head == "plots" and bool(_OWN_PLOT.fullmatch(name)) and path.is_file()


def check_out_dir(out: str | os.PathLike[str]) -> None:
    """Refuse an ``out`` the probe may not replace; read-only, so it can run before any work.

    Missing and empty folders are fine, and so is the output of an earlier probe (a
    ``report.json`` and nothing the probe would not write itself). A file at or above
    ``out``, or a folder holding other files, is a DatasetError naming what is there.
    """
    out = Path(out)
    above = out
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise DatasetError(
            f"cannot write the report to {out}: a file is in the way ({above}); "
            "choose another --out"
        )
    if above != out:
        return
    try:
        entries = sorted(
            rel
            for rel in (p.relative_to(out).as_posix() for p in out.rglob("*"))
            if not _STAGING.fullmatch(rel.split("/")[0])  # an interrupted probe's, replaced too
        )
    except OSError as err:
        raise DatasetError(
            f"cannot read {out}: {err.strerror or err}; choose another --out"
        ) from None
    if not entries:
        return
    foreign = [rel for rel in entries if not _is_own(rel, out / rel)]
    if foreign or "report.json" not in entries:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if foreign[3:] else "")
        what = f"holds files a probe does not write ({shown})" if foreign else "has no report.json"
        raise DatasetError(
            f"{out} {what}, so it is not the output of an earlier `radjepa probe` and is left "
            "alone: choose another --out, or empty it"
        )


def _new_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def _in_place(target: Path) -> bool:
    """Whether ``target`` itself cannot be renamed: a mount point (EBUSY) or the folder the
    process works in (renaming it away would leave the process in a deleted folder)."""
    if not target.is_dir():
        return False
    cwd = Path.cwd()
    return os.path.ismount(target) or cwd == target or target in cwd.parents


def _created_parents(target: Path) -> list[Path]:
    """The missing folders above ``target``, deepest first: a failed run removes them again."""
    missing = []
    for parent in target.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _swap_folder(tmp: Path, target: Path) -> None:
    """Put ``tmp`` at ``target``: the old folder is moved aside first, deleted last."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.parent / _new_name(f".{target.name}.probe-old-")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _swap_entries(tmp: Path, target: Path) -> None:
    """Put ``tmp``'s entries in ``target`` (which holds ``tmp``) when ``target`` cannot be
    renamed: its own entries are moved aside first (one rename each), deleted last."""
    old = target / _new_name(".probe-old-")
    old.mkdir()
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for entry in sorted(target.iterdir()):
            if entry.name not in (tmp.name, old.name):
                os.replace(entry, old / entry.name)
                moved_out.append(entry.name)
        for entry in sorted(tmp.iterdir()):
            os.replace(entry, target / entry.name)
            moved_in.append(entry.name)
    except BaseException:  # undo: the new entries back into tmp, the old ones back in place
        for name in moved_in:
            os.replace(target / name, tmp / name)
        for name in moved_out:
            os.replace(old / name, target / name)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)
    tmp.rmdir()


@contextmanager
def staged_out_dir(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty folder to write the probe's files into; on a clean exit it replaces
    ``out``, on any error it is deleted and ``out`` is left as it was.

    The folder is a sibling of ``out`` (same file system, so the swap is two renames), or,
    where ``out`` cannot be renamed (a mount point, the working folder) or its parent is not
    writable, a hidden folder inside ``out``. An OSError while writing (a full disk) becomes
    a one-line DatasetError.
    """
    given = Path(out)
    target = Path(os.path.realpath(given))  # a symlinked --out: replace what it points to
    check_out_dir(target)
    made = _created_parents(target)
    inside = _in_place(target)
    try:
        if not inside:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.parent / _new_name(f".{target.name}.probe-new-")
                tmp.mkdir()
            except OSError as err:
                if not (target.is_dir() and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
                    raise
                inside = True
        if inside:
            tmp = target / _new_name(".probe-new-")
            tmp.mkdir()
    except OSError as err:
        _remove_empty(made)
        raise DatasetError(
            f"cannot write the report to {given}: {err.strerror or err}; choose another --out"
        ) from None
    try:
        yield tmp
        check_out_dir(target)  # again: something else may have written there meanwhile
        (_swap_entries if inside else _swap_folder)(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        if isinstance(err, OSError):
            raise DatasetError(
                f"cannot write the report to {given}: {err.strerror or err}; "
                f"{given} is as it was before this run"
            ) from None
        raise
    log.info("probe output written to %s", given)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break

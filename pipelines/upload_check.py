"""Patient files a job's working-dir upload would carry to the cluster.

`radjepa submit` zips the checkout into the job's package, which Ray unpacks on every node that
runs the job, readable by everyone there. The default excludes name the usual suffixes, but
patient exports rarely keep to them: DICOM media and PACS CD exports name their files
``IM000001`` with no suffix, or ``.DCM`` (the excludes match case by case), archives come as
``.tgz`` or ``.tar.bz2``, and a probe's plots show radiographs. So the files the upload would
carry are listed the way Ray lists them (its own walk, with the excludes, ``.gitignore`` and
``.rayignore``), and each is judged by its name in any case and by its first bytes. The repo's
bundled sample (public NIH images, synthetic DICOMs) is uploaded on purpose.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BUNDLED_DATA", "looks_like_patient_data", "patient_files"]

# the project's own sample data, which jobs (the demo, tests on a cluster) read
BUNDLED_DATA = ("data/sample",)

_SUFFIXES = (
    ".dcm",
    ".dicom",
    ".ima",
    ".zip",
    ".tar",
    ".tgz",
    ".tbz2",
    ".txz",
    ".gz",
    ".bz2",
    ".xz",
    ".7z",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".nii",
)
# (offset, bytes) of the formats patient images and their archives come in
_MAGIC = (
    (128, b"DICM"),
    (0, b"PK\x03\x04"),
    (0, b"\x1f\x8b"),
    (0, b"BZh"),
    (0, b"\xfd7zXZ\x00"),
    (0, b"7z\xbc\xaf\x27\x1c"),
    (257, b"ustar"),
    (0, b"\x89PNG"),
    (0, b"\xff\xd8\xff"),
    (0, b"II*\x00"),
    (0, b"MM\x00*"),
)
_HEAD = 264  # enough bytes for every magic above
# Ray's walk says at INFO which ignore files it read, a line per folder, and at ERROR "Issue
# with path: <file>" when the walk is ended on purpose (_Enough), naming a patient file: not
# for this check, which says what it found itself. A filter, not `disabled`: a logging
# dictConfig (Ray's and MLflow's own) enables every existing logger again.
_WALK_LOG = logging.getLogger(f"{__name__}.walk")
_WALK_LOG.addFilter(lambda _record: False)


def looks_like_patient_data(path: Path) -> bool:
    """Whether the file at ``path`` is named or begins like a medical image or an archive."""
    if path.name.lower().endswith(_SUFFIXES):
        return True
    try:
        with path.open("rb") as f:
            head = f.read(_HEAD)
    except OSError:  # unreadable here: Ray's own upload says so
        return False
    return any(head[at : at + len(magic)] == magic for at, magic in _MAGIC)


class _Enough(Exception):
    """Ends the walk: enough files were found to refuse the upload."""


def patient_files(working_dir: Path, excludes: Sequence[str], most: int = 20) -> list[Path]:
    """The files Ray would upload from ``working_dir`` with ``excludes`` (and the folder's
    ``.gitignore``/``.rayignore``, as Ray reads them) that look like patient data, outside
    :data:`BUNDLED_DATA`; paths relative to ``working_dir``, in walk order, ``most`` at most:
    the walk stops there (a link into a mounted archive would have every header of it read)."""
    # Ray-private (pinned 2.60): the walk its working-dir upload makes, so that what is judged
    # here is exactly what would be uploaded
    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = working_dir.absolute()
    bundled = [root / b for b in BUNDLED_DATA]
    found: list[Path] = []

    def judge(path: Path) -> None:
        if not path.is_file() or any(path.is_relative_to(b) for b in bundled):
            return
        if looks_like_patient_data(path):
            found.append(path.relative_to(root))
            if len(found) >= most:
                raise _Enough

    try:
        _dir_travel(
            root,
            [_get_excludes(root, list(excludes))],
            judge,
            include_gitignore=os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1",
            logger=_WALK_LOG,
        )
    except _Enough:
        pass
    return found

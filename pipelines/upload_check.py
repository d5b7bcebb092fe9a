"""Patient files a job's upload would carry to the cluster.

`radjepa submit` zips the checkout into the job's package (and each local folder of the runtime
env's ``py_modules`` into one of its own), which Ray unpacks on every node that runs the job,
readable by everyone there. The default excludes name the usual suffixes, but patient exports
rarely keep to them: DICOM media and PACS CD exports name their files ``IM000001`` with no
suffix, or ``.DCM`` (the excludes match case by case), old archives write data sets with no
preamble at all, archives come as ``.tgz``, ``.tar.zst`` or ``.rar``, and a probe's plots show
radiographs. So the files the upload would carry are listed the way Ray lists them (its own
walk, with the excludes, ``.gitignore`` and ``.rayignore``), and each is judged by its name in
any case and by its first bytes. The repo's bundled sample (public NIH images, synthetic DICOMs)
is uploaded on purpose: the files its manifest lists with their content, nothing dropped beside
them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
import zlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BUNDLED_DATA",
    "SAMPLE_MANIFEST",
    "UploadScan",
    "bundled_files",
    "looks_like_patient_data",
    "patient_members",
    "scan_upload",
]

# the folder of the project's own sample data, which jobs (the demo, tests on a cluster) read
BUNDLED_DATA = "data/sample"
# `sha256sum` lines (relative to BUNDLED_DATA) of the sample files: only those pass
SAMPLE_MANIFEST = "SHA256SUMS"

_SUFFIXES = (
    ".dcm",
    ".dicom",
    ".ima",
    ".zip",
    ".tar",
    ".tgz",
    ".tbz2",
    ".txz",
    ".tzst",
    ".gz",
    ".bz2",
    ".xz",
    ".zst",
    ".zstd",
    ".lz4",
    ".7z",
    ".rar",
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
    (0, b"\x28\xb5\x2f\xfd"),  # zstd
    (0, b"\x04\x22\x4d\x18"),  # lz4 frame
    (0, b"Rar!\x1a\x07"),  # RAR 4 and 5
    (257, b"ustar"),
    (0, b"\x89PNG"),
    (0, b"\xff\xd8\xff"),
    (0, b"II*\x00"),
    (0, b"MM\x00*"),
)
_HEAD = 264  # enough bytes for every magic above (a raw data set needs 8)
# Ray's walk says at INFO which ignore files it read, a line per folder, and at ERROR "Issue
# with path: <file>" when the walk is ended on purpose (_Enough), naming a patient file: not
# for this check, which says what it found itself. A filter, not `disabled`: a logging
# dictConfig (Ray's and MLflow's own) enables every existing logger again.
_WALK_LOG = logging.getLogger(f"{__name__}.walk")
_WALK_LOG.addFilter(lambda _record: False)


def _begins_like_patient_data(head: bytes) -> bool:
    """Whether a file's first bytes are those of a medical image or an archive."""
    # the ingest's own test: it reads a data set without preamble (ACR-NEMA, a bare
    # implicit-VR export) as DICOM, so the upload takes one for a DICOM too
    from radjepa.imaging.dicom import looks_like_raw_dataset

    return any(head[at : at + len(magic)] == magic for at, magic in _MAGIC) or (
        looks_like_raw_dataset(head)
    )


def looks_like_patient_data(path: Path) -> bool:
    """Whether the file at ``path`` is named or begins like a medical image or an archive."""
    if path.name.lower().endswith(_SUFFIXES):
        return True
    try:
        with path.open("rb") as f:
            head = f.read(_HEAD)
    except OSError:  # unreadable here: Ray's own upload says so
        return False
    return _begins_like_patient_data(head)


def patient_members(archive: Path, most: int = 20) -> list[str]:
    """The members of a wheel (a zip) that look like patient data, ``most`` at most: a local
    ``.whl`` in ``py_modules`` is uploaded as it is, whatever it packs. A file that is no zip
    lists nothing (Ray's own upload says what is wrong with it)."""
    found: list[str] = []
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                if not info.filename.lower().endswith(_SUFFIXES):
                    with zf.open(info) as member:
                        if not _begins_like_patient_data(member.read(_HEAD)):
                            continue
                found.append(info.filename)
                if len(found) >= most:
                    break
    # a broken or encrypted (RuntimeError) member, a compression zipfile cannot read
    except (OSError, EOFError, zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error):
        return found
    return found


def bundled_files(root: Path) -> frozenset[Path]:
    """The files of :data:`BUNDLED_DATA` under ``root`` that :data:`SAMPLE_MANIFEST` lists with
    the SHA-256 they have, as absolute paths under ``root.absolute()``.

    By file, not by folder: an export dropped in ``data/sample/mine/`` would be uploaded with the
    sample. By content, not by what git tracks: the cluster image's checkout, an archive of the
    repo and a clone another user owns have no git that answers, and a mode change (a Windows
    or FAT copy) is no change of content. ``tests/test_submit_patient_files.py`` keeps the
    manifest in step with the sample git tracks."""
    root = root.absolute()
    folder = root / BUNDLED_DATA
    try:
        lines = (folder / SAMPLE_MANIFEST).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return frozenset()
    listed: set[Path] = set()
    for line in lines:
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            continue
        path = folder / name
        try:
            if path.is_file() and not path.is_symlink() and _sha256(path) == digest:
                listed.add(path)
        except OSError:
            continue
    return frozenset(listed)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class UploadScan:
    """What one walk of an upload found: the files that look like patient data (relative to
    the folder, in walk order, ``most`` at most) and, of the files asked about, those the upload
    carries (resolved paths). ``complete`` is False when the walk stopped at ``most``: then the
    upload is refused anyway, and ``carried`` may miss files the rest of the walk would have
    seen."""

    patient: list[Path]
    carried: frozenset[Path]
    complete: bool


class _Enough(Exception):
    """Ends the walk: enough files were found to refuse the upload."""


def scan_upload(
    root: Path,
    excludes: Sequence[str],
    *,
    wanted: Collection[Path] = (),
    exempt: Collection[Path] = (),
    most: int = 20,
) -> UploadScan:
    """Walk what Ray would upload from ``root`` with ``excludes`` (and the folders'
    ``.gitignore``/``.rayignore``, as Ray reads them): judge each file but those in ``exempt``
    (absolute paths under ``root.absolute()``), and say which of ``wanted`` (resolved paths) it
    carries. One walk for both: a checkout is walked once per submit.

    The walk stops after ``most`` patient files: a link into a mounted archive would have every
    header of it read."""
    # Ray-private (pinned 2.60): the walk its working-dir and py_modules uploads make, so that
    # what is judged here is exactly what would be uploaded
    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = root.absolute()
    exempt = frozenset(exempt)
    wanted = frozenset(wanted)
    wanted_names = {p.name for p in wanted}
    found: list[Path] = []
    carried: set[Path] = set()

    def judge(path: Path) -> None:
        if not path.is_file():
            return
        # a link is uploaded as what it points at (configs/site.yaml -> a shared file)
        if (path.name in wanted_names or path.is_symlink()) and path.resolve() in wanted:
            carried.add(path.resolve())
        if path in exempt:
            return
        if looks_like_patient_data(path):
            found.append(path.relative_to(root))
            if len(found) >= most:
                raise _Enough

    complete = True
    try:
        _dir_travel(
            root,
            [_get_excludes(root, list(excludes))],
            judge,
            include_gitignore=os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1",
            logger=_WALK_LOG,
        )
    except _Enough:
        complete = False
    return UploadScan(found, frozenset(carried), complete)

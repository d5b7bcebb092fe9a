"""Where the benches that need real radiographs find their PNGs.

The figures in docs/PERFORMANCE.md come from the 621-image NIH sample that sits beside the
development checkout (``../shared/data/nih-cxr14-621/images``); a fresh clone has no such folder
but carries the 8 PNGs of the bundled demo archive (``data/sample/archive/export``, 256x256,
8-bit, the NIH sample's format). So a bench takes the folder it is given (``--images``), else the
NIH sample when it is there, else the bundled PNGs, and says in one line what to pass when there
are none, instead of failing later on an empty list. Only the standard library is imported here:
the GPU suite runs on machines without the project's environment.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NIH_IMAGES = REPO.parent / "shared" / "data" / "nih-cxr14-621" / "images"
BUNDLED_IMAGES = REPO / "data" / "sample" / "archive" / "export"


class NoImagesError(SystemExit):
    """No PNGs where the bench looked: a ``SystemExit`` so a bench run ends on the message alone
    (status 1, no traceback), and a test can still catch it by name."""


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


def image_folder(
    images: Path | None = None,
    *,
    nih: Path = NIH_IMAGES,
    bundled: Path = BUNDLED_IMAGES,
    flag: str = "--images",
) -> Path:
    """The folder of PNGs a bench reads: ``images`` when given (a folder the user named that
    holds no PNGs is an error, never silently replaced by another set), else ``nih``, else
    ``bundled``. ``flag`` is the bench's option for the folder, named in the messages.

    Falling back to the bundled set is said on stderr: its 8 images give the same kind of figure
    but not the recorded one, and a reader comparing numbers has to know which set they came from.
    """
    if images is not None:
        if not _pngs(images):
            raise NoImagesError(f"error: no PNG files in {images} (the folder {flag} names)")
        return images
    if _pngs(nih):
        return nih
    if _pngs(bundled):
        print(
            f"note: {nih} not found: using the {len(_pngs(bundled))} bundled PNGs of {bundled} "
            f"(pass {flag} DIR for another set)",
            file=sys.stderr,
        )
        return bundled
    raise NoImagesError(
        f"error: no PNG images to benchmark with: neither {nih} nor {bundled} holds any; "
        f"pass {flag} DIR (a folder of same-size grayscale PNGs)"
    )


def find_pngs(
    images: Path | None = None,
    *,
    nih: Path = NIH_IMAGES,
    bundled: Path = BUNDLED_IMAGES,
    flag: str = "--images",
) -> list[Path]:
    """The PNG files of :func:`image_folder`'s choice, sorted so every run reads the same ones."""
    return _pngs(image_folder(images, nih=nih, bundled=bundled, flag=flag))

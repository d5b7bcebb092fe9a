"""Small files beside a run or sweep (MLflow run ids, ``best.yaml``) on a local folder or on
object storage, so ``train.output_dir: s3://...`` behaves like a local folder for resume."""

from __future__ import annotations

import pyarrow.fs as pafs

from radjepa.shards import filesystem, join_location, local_path, spell_like

__all__ = [
    "StorageError",
    "check_writable",
    "join",
    "spelled_like",
    "local_path",
    "read_text",
    "write_text",
    "has_entries",
]


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a path or a URI."""
    return join_location(root, *parts)


def spelled_like(root: str, fs_path: str) -> str:
    """A filesystem path (what Ray reports for a checkpoint) spelled as a URI when ``root`` is
    one, so users can hand it to ``radjepa probe`` or ``aws s3 ls`` as is."""
    return spell_like(root, fs_path)


def read_text(location: str) -> str | None:
    """The file's text, or None when there is no such file."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(location: str, text: str) -> None:
    """Write (or replace) a small text file, creating its folder."""
    fs, path = filesystem(location)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def has_entries(location: str) -> bool:
    """True when ``location`` is a folder with something in it."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return False
    return bool(fs.get_file_info(pafs.FileSelector(path, recursive=False)))


class StorageError(RuntimeError):
    """An output location that cannot be used (unknown scheme, no permission, no bucket)."""


def check_writable(root: str) -> None:
    """Fail before any work when the output root cannot be reached or created (object stores
    report most permission problems only at the first write, which this does not replace)."""
    try:
        fs, path = filesystem(root)
        fs.create_dir(path, recursive=True)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise StorageError(f"cannot use {root} for outputs: {err}") from None

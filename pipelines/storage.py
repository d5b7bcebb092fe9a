"""Small files beside a run or sweep (MLflow run ids, ``best.yaml``) on a local folder or on
object storage, so ``train.output_dir: s3://...`` behaves like a local folder for resume."""

from __future__ import annotations

import pyarrow.fs as pafs

from radjepa.shards import filesystem


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a path or a URI (``Path`` would fold ``s3://`` into ``s3:/``)."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def spelled_like(root: str, fs_path: str) -> str:
    """A filesystem path (what Ray reports for a checkpoint) spelled as a URI when ``root`` is
    one, so users can hand it to ``radjepa probe`` or ``aws s3 ls`` as is."""
    if "://" not in root or "://" in fs_path:
        return fs_path
    return f"{root.split('://', 1)[0]}://{fs_path}"


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

"""Where outputs live: a local folder or any pyarrow filesystem URI (``s3://``, ``gs://``,
``hdfs://``, ``file://``), spelled and read the same way everywhere, so ``train.output_dir:
s3://...`` behaves like a local folder for shards, checkpoints, run ids and ``best.yaml``."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

__all__ = [
    "LocationError",
    "check_writable",
    "filesystem",
    "has_entries",
    "join_location",
    "local_path",
    "read_text",
    "redact",
    "redact_strings",
    "spell_like",
    "write_text",
]


# scheme://user:password@host (a database store, pyarrow's s3://KEY:SECRET@bucket) and query
# credentials (?secret_key=..., &token=...)
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):[^@/\s]*@")
_QUERY_SECRET = re.compile(
    r"(?i)(?P<head>[?&][^=&\s]*(?:secret|token|password|passwd|key)[^=&\s]*=)[^&\s]*"
)
REDACTED = "***"


def redact(text: str) -> str:
    """``text`` with the credentials of any URI in it replaced by ``***``: a config may carry
    them (``tracking.uri: postgresql://user:pw@db/mlflow``, ``s3://KEY:SECRET@bucket/runs``),
    and whatever reaches MLflow or a checkpoint is readable by everyone with access to it."""
    text = _USERINFO.sub(rf"\g<head>:{REDACTED}@", text)
    return _QUERY_SECRET.sub(rf"\g<head>{REDACTED}", text)


def redact_strings(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, scalars) with :func:`redact` applied to every string."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_strings(v) for v in value]
    return value


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path for a local folder or a URI (``s3://``, ``gs://``,
    ``file://``, ...), so shards can live on object storage on a cluster."""
    text = str(location)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))


def spell_like(location: str | Path, fs_path: str) -> str:
    """``fs_path`` (a path inside ``location``'s filesystem, as pyarrow and Ray report it)
    spelled like ``location``: a local path stays a path; a URI keeps its scheme, its authority
    where the filesystem's paths leave it out (``hdfs://host:port``) and its query
    (``?endpoint_override=...`` of an S3-compatible store)."""
    text = str(location)
    if "://" not in text or "://" in fs_path:
        return fs_path
    parts = urlsplit(text)
    query = f"?{parts.query}" if parts.query else ""
    if fs_path.startswith("/"):  # file://, hdfs://host:port: the path excludes the authority
        return f"{parts.scheme}://{parts.netloc}{fs_path}{query}"
    return f"{parts.scheme}://{fs_path}{query}"  # object stores: the bucket leads the path


def join_location(root: str | Path, *names: str) -> str:
    """``root/name/...`` for a path or a URI (``Path`` would fold ``s3://`` into ``s3:/``, and
    a plain string join would put the names after a URI's query)."""
    text = str(root)
    tail = [n.strip("/") for n in names]
    if "://" not in text:
        return "/".join([text.rstrip("/"), *tail])
    parts = urlsplit(text)
    query = f"?{parts.query}" if parts.query else ""
    path = "/".join([parts.path.rstrip("/"), *tail])
    return f"{parts.scheme}://{parts.netloc}{path}{query}"


def base_name(location: str | Path) -> str:
    """The last name of a folder or URI, a URI's query (``?endpoint_override=...`` of an
    S3-compatible store) left out: a plain split named an S3 checkpoint
    ``checkpoint_...?scheme=http&endpoint_override=...``, which no record holds."""
    text = str(location)
    path = urlsplit(text).path if "://" in text else text
    return path.rstrip("/").rsplit("/", 1)[-1]


def local_path(location: str | Path) -> str | None:
    """The local folder behind ``location`` (a path or a ``file://`` URI); None for remote
    storage, where nothing can be written with plain file APIs."""
    text = str(location)
    if "://" not in text:
        return os.path.abspath(os.path.expanduser(text))
    parts = urlsplit(text)
    return unquote(parts.path) if parts.scheme == "file" else None


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


class LocationError(RuntimeError):
    """An output location that cannot be used (unknown scheme, no permission, no bucket)."""


def check_writable(root: str) -> None:
    """Fail before any work when the output root cannot be reached or created (object stores
    report most permission problems only at the first write, which this does not replace)."""
    try:
        fs, path = filesystem(root)
        fs.create_dir(path, recursive=True)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise LocationError(f"cannot use {root} for outputs: {err}") from None

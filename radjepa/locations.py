"""Where outputs live: a local folder or any pyarrow filesystem URI (``s3://``, ``gs://``,
``hdfs://``, ``file://``), spelled and read the same way everywhere, so ``train.output_dir:
s3://...`` behaves like a local folder for shards, checkpoints, run ids and ``best.yaml``."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

__all__ = [
    "LocationError",
    "StorageUnreachable",
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
    ``file://``, ...), so shards can live on object storage on a cluster. The first use of a
    Google Cloud Storage bucket in a process is checked (:func:`_check_gcs`): an OSError
    saying why when it cannot be reached."""
    text = str(location)
    if "://" in text:
        fs, path = pafs.FileSystem.from_uri(text)
        if fs.type_name == "gcs":
            _check_gcs(text, path)
        return fs, path
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))


# pyarrow leaves GCS errors to google-cloud-cpp's retry policy, 15 minutes by default: on a
# machine without credentials (or without a route to Google) every gs:// command, `radjepa
# serve --head gs://...` included, sat silent for 15 minutes before its error. Each process's
# first request to a bucket is retried for this long instead; its later requests keep the long
# policy, which rides out a transient outage. S3 fails in seconds already.
GCS_FIRST_TOUCH_S = 20
# the client checks its limit between attempts only: one attempt on a connection that stalls
# (a firewall that drops packets) ran for curl's two minutes, so the wait is bounded here too
_GCS_STALL_GRACE_S = 5.0
_DAY_S = 86400.0  # the longest first-touch wait: a thread's join refuses far longer ones
# a failed first touch is remembered this long: a command that reads one location twice (a
# head, then its checkpoint files) waited the whole limit again for the same answer
_GCS_FAILURE_KEPT_S = 60.0
_GCS_RETRY = "retry_limit_seconds"
_GCS_GAVE_UP = "Retry policy exhausted"  # google-cloud-cpp's status: no usable answer in time
# ... and its status when no token could be made (no credentials, an unreadable key file),
# before any request; a 401's own body ("Expected OAuth 2 access token") is an answer
_GCS_NO_TOKEN = "Could not create a OAuth2 access token"
_gcs_reached: set[str] = set()  # scheme://bucket?query: answered once in this process
_gcs_failed: dict[str, tuple[float, StorageUnreachable]] = {}  # the same key: when, and why


def _check_gcs(uri: str, path: str) -> None:
    """One metadata request for ``path`` under a retry limit (the URI's own
    ``?retry_limit_seconds=`` or :data:`GCS_FIRST_TOUCH_S`); OSError naming the cause and
    what to do (credentials, network) when no token could be made or the limit passed without
    a usable answer. Any answer, an error included, counts as reached: a key that may write but
    not read gets a 403 here, and the operation itself decides. Once per bucket per process."""
    parts = urlsplit(uri)
    bucket = f"{parts.scheme}://{parts.netloc}?{parts.query}"
    if bucket in _gcs_reached:
        return
    failed = _gcs_failed.get(bucket)
    if failed is not None and time.monotonic() - failed[0] < _GCS_FAILURE_KEPT_S:
        raise StorageUnreachable(str(failed[1]), failed[1].summary)
    query: dict[str, str] = {}
    for item in filter(None, parts.query.split("&")):
        key, _, value = item.partition("=")
        query.setdefault(key, value)  # pyarrow reads the first of a repeated option
    limit = _limit_seconds(unquote(query.setdefault(_GCS_RETRY, str(GCS_FIRST_TOUCH_S))))
    probe_uri = parts._replace(query="&".join(f"{k}={v}" for k, v in query.items())).geturl()
    probe = pafs.FileSystem.from_uri(probe_uri)[0]
    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            probe.get_file_info(path)
            outcome.append(None)
        except BaseException as err:  # handed to the caller's thread
            outcome.append(err)

    asker = threading.Thread(target=ask, name="radjepa-gcs-first-touch", daemon=True)
    asker.start()
    asker.join(limit + _GCS_STALL_GRACE_S)
    if not outcome:  # still waiting on a stalled connection: left to finish in the background
        error: StorageUnreachable | None = _gcs_unreachable(limit, "")
    else:
        err = outcome[0]
        if err is not None and not isinstance(err, OSError | pa.ArrowException):
            raise err  # a missing key file is an ArrowException, a status an OSError
        text = "" if err is None else str(err)
        failed_here = _GCS_GAVE_UP in text or _GCS_NO_TOKEN in text
        error = _gcs_unreachable(limit, text) if failed_here else None
    if error is not None:  # the callers name the location
        _gcs_failed[bucket] = (time.monotonic(), error)
        raise error
    _gcs_reached.add(bucket)
    _gcs_failed.pop(bucket, None)


class StorageUnreachable(OSError):
    """A storage that gave no usable answer in time, or to which no request could be sent (no
    credentials): the message says which, the client's cause, and what to do. ``summary`` says
    the same without the cause, whose text comes from the service and may name an object (a
    rate limit's "The object <bucket>/<path> exceeded ..."): for records that must not hold
    paths, which may carry patient names (ingest's quarantine rows)."""

    def __init__(self, message: str, summary: str = "") -> None:
        super().__init__(message)
        self.summary = summary or message


def _limit_seconds(option: str) -> float:
    """The option's seconds as the client reads them (its leading number: ``5s`` is 5, ``0x10``
    16), at most a day: a thread's join refuses far larger waits (``inf``, ``1e12``)."""
    text = option.strip()
    found = re.match(r"0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", text)
    if found is None:
        return _DAY_S if text.lower().startswith("inf") else float(GCS_FIRST_TOUCH_S)
    number = found.group(0)
    value = float(int(number, 16)) if number[:2].lower() == "0x" else float(number)
    return min(value, _DAY_S)


def _gcs_unreachable(limit: float, status: str) -> StorageUnreachable:
    """google-cloud-cpp's ~1,000-character status cut to its cause and a next step ("" for a
    request that got no answer at all)."""
    found = re.search(r"last message of (.*?)(?: error_info=|$)", status, re.S)
    cause = found.group(1) if found else status
    for noise in (
        r" ?Learn more about .*? at \S+?\.(?=\s|$)",
        r" ?The request was not sent[^.]*\.",
    ):
        cause = re.sub(noise, "", cause)
    cause = cause.strip() or "a request was still waiting"
    sent = _GCS_GAVE_UP in status or not status  # else no token: nothing was sent
    if not status:  # its wait: the client's limit, then the grace for the attempt under way
        what = f"no answer from Google Cloud Storage within {limit + _GCS_STALL_GRACE_S:g} s"
    elif sent:
        what = f"no usable answer from Google Cloud Storage within {limit:g} s"
    else:
        what = "no request could be sent to Google Cloud Storage"
    if _GCS_NO_TOKEN in cause:
        step = (
            "give this machine working Google Cloud credentials (GOOGLE_APPLICATION_CREDENTIALS "
            "naming a service-account key file, `gcloud auth application-default login`, or the "
            "VM's or pod's service account)"
        )
    else:
        step = "check this machine's route to Google Cloud Storage and the bucket's name"
    if sent:  # waiting longer may help
        step += f", or allow it longer with ?{_GCS_RETRY}=SECONDS in the URI"
    return StorageUnreachable(f"{what} ({cause}); {step}", f"{what}; {step}")


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


def absolute(location: str) -> str:
    """A local path made absolute (``~`` expanded, links resolved), a URI as given: the one
    spelling of a location a later command, run from another folder, finds the same files by."""
    return location if "://" in location else str(Path(location).expanduser().resolve())


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

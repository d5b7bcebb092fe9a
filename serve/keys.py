"""API keys: their format, the keys file's permissions, and re-reading it when it changes.

A key line is ``KEY [SCOPE ...]`` (one per line in the keys file, comma-separated entries in
the env var; ``#`` starts a comment line). A bare key, the only form older files hold, may call
every route; a scope grants what a bare key may not. Today the one scope is
``patient_linkage``: ``/v1/similar?exclude_same_patient=true`` may then pseudonymise a DICOM
upload's own PatientID and leave that patient's archive images out. Without it a key holder
could upload a DICOM carrying a guessed PatientID and learn from the counts whether that
patient is in the archive.

The file is re-read when it changes (:class:`KeyRing`), so revoking a key needs no restart: a
Kubernetes Secret volume updates by swapping a ``..data`` symlink, which changes the inode the
path resolves to. A new file that cannot be used keeps the keys already loaded and logs why:
a bad edit never opens the API to everyone nor silently locks everyone out.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from pathlib import Path

__all__ = [
    "PATIENT_LINKAGE",
    "SCOPES",
    "KeyRing",
    "KeysError",
    "key_digest",
    "parse_entries",
    "read_keys_file",
]

log = logging.getLogger("serve.app")  # the service's one logger name, as operators filter it

PATIENT_LINKAGE = "patient_linkage"
SCOPES = frozenset({PATIENT_LINKAGE})
MIN_KEY_CHARS = 16

# digest -> scopes granted to the key
Keys = dict[str, frozenset[str]]


class KeysError(RuntimeError):
    """The keys cannot be used as given (bad format, unsafe file permissions, unreadable)."""


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_entries(entries: list[tuple[str, str]]) -> Keys:
    """``[(where, "KEY [SCOPE ...]"), ...]`` -> {digest: scopes}; raises KeysError naming the
    place of an unknown scope (a typo would silently withhold a permission) or short keys."""
    keys: Keys = {}
    short = 0
    for where, entry in entries:
        key, *scopes = entry.split()
        unknown = sorted(set(scopes) - SCOPES)
        if unknown:
            # never quoted: the commonest unknown "scope" is a second key on the same line (a
            # rotation written "old new", keys separated by a space), which this message would
            # put into the server's log and the operator's terminal
            raise KeysError(
                f"{where}: an unknown API key scope of {len(unknown[0])} characters (not shown: "
                "is it a second key? one key per line in a file, comma-separated in the "
                f"environment variable); known scopes: {', '.join(sorted(SCOPES))}"
            )
        if not key.isascii():
            # HTTP headers arrive as Latin-1 and are compared as UTF-8 digests: such a key
            # could never match, and every client holding it would get 401
            odd = next(c for c in key if not c.isascii())
            raise KeysError(
                f"{where}: an API key must be ASCII characters only (it holds U+{ord(odd):04X})"
            )
        if len(key) < MIN_KEY_CHARS:
            short += 1
            continue
        digest = key_digest(key)
        keys[digest] = keys.get(digest, frozenset()) | frozenset(scopes)
    if short:
        raise KeysError(
            f"{short} API key(s) shorter than {MIN_KEY_CHARS} characters: use long random keys "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return keys


def check_file_mode(path: Path, st: os.stat_result) -> None:
    """Refuse a keys file others may write; warn when every user may read it.

    Whoever can write the file can add a key of their own, so group or world write is refused
    (as ssh refuses such a private key). Group read is allowed: a Kubernetes Secret volume with
    ``fsGroup`` makes its files 0440, group-owned. World read only warns: it is the default
    of a Secret volume without ``defaultMode`` (0644), where no other user usually exists."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KeysError(
            f"API keys file {path} is writable by others (mode {mode:04o}): anyone who can "
            f"write it can add a key; run `chmod 600 {path}` (Kubernetes: defaultMode: 0400)"
        )
    if mode & stat.S_IROTH:
        log.warning(
            "API keys file %s is readable by every user (mode %04o): run `chmod 600 %s` "
            "(Kubernetes: defaultMode: 0400)",
            path,
            mode,
            path,
        )


def check_file_owner(path: Path, st: os.stat_result) -> None:
    """Refuse a keys file owned by another user than the service's or root, or lying in a
    folder others may write, as ssh refuses such a private key.

    The file's owner can make it writable, or write it, whatever its mode says; whoever may
    write its folder can replace it with a file of their own keys (a rename, needing no right
    on the file). A sticky folder (``/tmp``) lets each user replace only their own files, so
    it is safe when root or the service owns it: a Kubernetes Secret volume is such a
    folder, root-owned, and its files are root's. Both the folder of the path as given and
    that of the file it resolves to (a Secret volume's ``..data`` links) are checked."""
    uid = os.geteuid()
    if st.st_uid not in (uid, 0):
        raise KeysError(
            f"API keys file {path} is owned by uid {st.st_uid}, neither this service's user "
            f"(uid {uid}) nor root: its owner can add a key; `chown {uid} {path}` or copy it "
            "to a file of the service's own"
        )
    folders = dict.fromkeys([path.absolute().parent, Path(os.path.realpath(path)).parent])
    for folder in folders:
        try:
            fst = folder.stat()
        except OSError as err:
            raise KeysError(f"cannot check the folder of API keys file {path}: {err}") from None
        mode = stat.S_IMODE(fst.st_mode)
        owned = fst.st_uid in (uid, 0)
        sticky = bool(mode & stat.S_ISVTX)
        if not owned:
            raise KeysError(
                f"API keys file {path} lies in {folder}, owned by uid {fst.st_uid} (neither "
                f"this service's user, uid {uid}, nor root): its owner can replace the file; "
                "keep it in a folder of the service's own"
            )
        if mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky:
            raise KeysError(
                f"API keys file {path} lies in {folder}, which others may write (mode "
                f"{mode:04o}): anyone who can write it can replace the file with keys of their "
                f"own; run `chmod go-w {folder}` or move the file to a folder only its owner "
                "may write"
            )


def read_keys_file(path: str | os.PathLike[str]) -> Keys:
    """The keys of ``path`` (one ``KEY [SCOPE ...]`` per line), after its permission, owner
    and folder checks."""
    path = Path(path)
    try:
        # -sig: an editor's byte-order mark (Notepad, PowerShell 5's utf8) is no part of the
        # first key, which was refused as not ASCII (a rotation file: the old keys kept)
        with path.open(encoding="utf-8-sig") as fh:
            st = os.fstat(fh.fileno())  # the file read, not a later one
            check_file_mode(path, st)
            check_file_owner(path, st)
            text = fh.read()
    except (OSError, UnicodeDecodeError) as err:
        raise KeysError(f"cannot read API keys file {path}: {err}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "," in line:
            raise KeysError(
                f"{path} line {number}: one key per line (`KEY [SCOPE ...]`), not "
                "comma-separated keys"
            )
        entries.append((f"{path} line {number}", line))
    return parse_entries(entries)


def _signature(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class KeyRing:
    """The keys a replica accepts now: fixed ones (from the env var) plus the keys file's,
    re-read when the file the path resolves to changes (checked at most every
    ``recheck_s`` seconds, by ``stat``: cheap enough for the request path)."""

    def __init__(
        self, fixed: Keys, file_keys: Keys, path: str | None, recheck_s: float = 1.0
    ) -> None:
        self._fixed = dict(fixed)
        self._path = Path(path) if path else None
        self._recheck_s = recheck_s
        self._keys: Keys = {**file_keys, **self._merge_scopes(file_keys)}
        self._seen: tuple[int, ...] | None = None  # None: read once more at the first request
        self._checked = float("-inf")
        self._lock = threading.Lock()

    def _merge_scopes(self, file_keys: Keys) -> Keys:
        return {d: s | file_keys.get(d, frozenset()) for d, s in self._fixed.items()}

    def current(self) -> Keys:
        """The keys in force, after re-reading the file if it changed."""
        if self._path is None:
            return self._keys
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self._recheck_s:
                self._checked = now
                self._refresh()
            return self._keys

    def _refresh(self) -> None:
        assert self._path is not None
        try:
            signature = _signature(self._path.stat())
        except OSError as err:
            signature = ()
            problem: str | None = f"cannot read API keys file {self._path}: {err.strerror}"
        else:
            problem = None
        if signature == self._seen:
            return
        self._seen = signature  # one log record per change, not one per request
        if problem is None:
            try:
                file_keys = read_keys_file(self._path)
            except KeysError as err:
                problem = str(err)
            else:
                keys = {**file_keys, **self._merge_scopes(file_keys)}
                if keys:
                    if keys != self._keys:
                        log.info(
                            "API keys file %s changed: %d key(s) in force (were %d)",
                            self._path,
                            len(keys),
                            len(self._keys),
                        )
                    self._keys = keys
                    return
                problem = f"API keys file {self._path} holds no keys"
        log.error("%s; keeping the %d key(s) loaded before", problem, len(self._keys))

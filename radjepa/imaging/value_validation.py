"""pydicom's value validation, kept off while this package reads a DICOM.

pydicom checks each value against its VR when it converts it and, in its default mode, warns
and logs the value it found wrong: ``Invalid value for VR DA: '2019-04-02'``, a lower-case
Patient Sex, a malformed UID, or, in a file whose element length was damaged, the next
kilobyte of the header with the patient's name and ID in it. Those lines reach worker logs, Ray
Job logs, the driver's terminal and the API's server logs, though the shards and responses hold
only pseudonyms and vocabulary codes. Nothing here relies on the check: every value read is
parsed and bounded by the code that uses it, and a value that cannot be used is refused or
dropped with a message that quotes only standard codes.

pydicom keeps its mode in one process-wide setting. Threads decoding at once (the API's
request threads) share one switch: it is turned off by the first to enter, and the mode found
then is put back by the last to leave, so no read in between validates and the caller's own
setting is restored once no decode runs.

pydicom's look-up of the Specific Character Set (0008,0005) warns and logs the value it could
not use (``Unknown encoding 'ISO_IR 100 DOE^JOHN'``, three times per file) whatever the mode:
a damaged length or a tool that writes free text there puts the patient's name in the line.
Those lines are dropped while this package reads, on the reading thread only (the caller's
own reads elsewhere keep them), and one line without the value is logged at DEBUG instead.
They go through one function of pydicom's ``charset`` module, to the ``pydicom`` logger and to
Python's warnings at once: a logging filter would leave the warning, and a warnings filter is
process-wide and undone by any ``catch_warnings``/``simplefilter("always")`` above it, so that
function is wrapped, once, by a gate that reads a thread-local flag.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import ParamSpec, TypeVar

__all__ = ["unvalidated_values", "without_value_validation"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_depth = 0
_saved: int | None = None
# per thread: how deep in unvalidated_values, and whether a charset line was dropped meanwhile
_local = threading.local()

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def unvalidated_values() -> Iterator[None]:
    """Read DICOM values without pydicom's validation (and so without its quoting warnings).
    Re-entrant and safe across threads; the mode found on first entry comes back on last exit."""
    global _depth, _saved
    from pydicom import config  # here: importing this module costs no pydicom import

    with _lock:
        _gate_charset_lines()
        if _depth == 0:
            _saved = config.settings._reading_validation_mode  # None: pydicom's default
            config.settings.reading_validation_mode = config.IGNORE
        _depth += 1
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
        if _local.depth == 0 and getattr(_local, "dropped", False):
            _local.dropped = False
            log.debug(
                "a DICOM's Specific Character Set, as written, is one pydicom cannot use (or "
                "its text does not decode with it): text read with pydicom's fallback; pydicom's "
                "own lines, which quote the value, not logged"
            )
        with _lock:
            _depth -= 1
            if _depth == 0:
                config.settings._reading_validation_mode = _saved


def _gate_charset_lines() -> None:
    """Wrap pydicom's charset warner (once per process; the caller holds ``_lock``) so that a
    thread inside :func:`unvalidated_values` says nothing through it."""
    from pydicom import charset

    original = charset.warn_and_log
    if getattr(original, "_radjepa_gate", False):
        return

    @wraps(original)
    def gated(msg: str, category: type[Warning] | None = None, stacklevel: int = 1) -> None:
        if getattr(_local, "depth", 0):
            _local.dropped = True
            return
        original(msg, category, stacklevel + 1)  # +1: the warning names pydicom's line

    gated._radjepa_gate = True  # type: ignore[attr-defined]
    charset.warn_and_log = gated


def without_value_validation(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run inside :func:`unvalidated_values`: for functions that read a dataset's values."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with unvalidated_values():
            return fn(*args, **kwargs)

    return wrapper

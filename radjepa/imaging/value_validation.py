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
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import ParamSpec, TypeVar

__all__ = ["unvalidated_values", "without_value_validation"]

_lock = threading.Lock()
_depth = 0
_saved: int | None = None

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def unvalidated_values() -> Iterator[None]:
    """Read DICOM values without pydicom's validation (and so without its quoting warnings).
    Re-entrant and safe across threads; the mode found on first entry comes back on last exit."""
    global _depth, _saved
    from pydicom import config  # here: importing this module costs no pydicom import

    with _lock:
        if _depth == 0:
            _saved = config.settings._reading_validation_mode  # None: pydicom's default
            config.settings.reading_validation_mode = config.IGNORE
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                config.settings._reading_validation_mode = _saved


def without_value_validation(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run inside :func:`unvalidated_values`: for functions that read a dataset's values."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with unvalidated_values():
            return fn(*args, **kwargs)

    return wrapper

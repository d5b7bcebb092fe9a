"""Dropping a library's log lines that only mislead the person reading a command's output,
and keeping credentials out of all of them.

Ray logs advice meant for its Python API users (``Tuner.restore(...)`` after an interrupted
sweep, "new http_options ... will not be applied" when ``serve.run`` finds the Serve instance
the command itself just started with them) and warnings it repeats every second. The commands
here drop those few lines by their start, on the logger that emits them, and nothing else.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["DropPrefix", "HideErrors", "lines_dropped", "redact_console", "redact_log_records"]


class DropPrefix(logging.Filter):
    """A filter that drops the records whose message starts with ``prefix``; ``dropped``
    counts them (a dropped line may be the only sign of what the library did)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(self.prefix):
            self.dropped += 1
            return False
        return True


class HideErrors(logging.Filter):
    """A filter that marks ``hide`` (the attribute Ray Data's console handler drops records
    by; its log file keeps them) the records about an error of one of ``kinds``: the one the
    record carries, or, for a warning or error logged while an error is handled, that
    error; it, or what it was raised from (a Ray task error holds the task's own). Ray Data
    takes an error a datasource raises for an internal one of its own: "please open an issue
    on the Ray project", then its whole stack trace, printed above the one line the command
    says it in. ``drop``: drop them instead, for loggers without that handler (Ray Train's
    report of a training function's error, whose message already says all). ``hidden``
    counts them."""

    def __init__(self, *kinds: type[BaseException], drop: bool = False) -> None:
        super().__init__()
        self.kinds = kinds
        self.drop = drop
        self.hidden = 0

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if err is None and record.levelno >= logging.WARNING:  # said while it is handled
            err = sys.exc_info()[1]
        if err is None or not self._carries(err):
            return True
        self.hidden += 1
        record.hide = True
        return not self.drop

    def _carries(self, err: BaseException) -> bool:
        seen: set[int] = set()
        pending: list[BaseException | None] = [err]
        while pending:
            e = pending.pop()
            if e is None or id(e) in seen:
                continue
            if isinstance(e, self.kinds):
                return True
            seen.add(id(e))
            # what it was raised from, or a Ray task error's own: not an error met while one
            # of ours was handled (a teardown's, an unrelated bug's), which would be hidden
            cause = getattr(e, "cause", None)
            pending += [e.__cause__, cause if isinstance(cause, BaseException) else None]
        return False


@contextmanager
def lines_dropped(logger: str, prefix: str) -> Iterator[DropPrefix]:
    """Within the block, ``logger``'s records whose message starts with ``prefix`` are dropped;
    the filter is removed however the block ends. Yields the filter."""
    drop = DropPrefix(prefix)
    logging.getLogger(logger).addFilter(drop)
    try:
        yield drop
    finally:
        logging.getLogger(logger).removeFilter(drop)


def redact_log_records() -> None:
    """From now on, every log record this process makes has the credentials of any URI in its
    message replaced by ``***`` (:func:`radjepa.locations.redact`): a location in a config may
    carry them (``s3://KEY:SECRET@bucket/runs``, ``postgresql://user:pw@db/mlflow``), and the
    messages that name a location (a damaged checkpoint skipped, a stray folder removed, a
    store that did not answer) reached consoles, job logs and CI logs as typed. Done where the
    record is made, so it holds whichever handler prints it; the entry points call it once."""
    from radjepa.locations import redact

    previous = logging.getLogRecordFactory()
    if getattr(previous, "redacts_credentials", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging reports it where it formats the record
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return record

    factory.redacts_credentials = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


class _RedactingStream(io.TextIOBase):
    """A text stream that writes through to ``stream`` with :func:`radjepa.locations.redact`
    applied to each write (a whole line, or a whole rendered message: what ``print``,
    ``click.echo``, logging handlers and Rich write at once)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream

    def write(self, text: str) -> int:
        from radjepa.locations import redact

        self._stream.write(redact(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    # io.TextIOBase answers None for these: click then found the stream "incompatible" and
    # wrote to the raw stream's buffer under it, past the redaction
    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._stream.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self._stream.errors

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name: str) -> Any:  # encoding, errors, buffer, ...
        return getattr(self._stream, name)


def redact_console() -> None:
    """From now on, what this process prints to stdout and stderr has the credentials of any
    URI in it replaced by ``***``: the lines a command prints on success (its run folder, its
    checkpoint, a sweep's best config, a failed trial's error), the lines of Ray's workers and
    trials it forwards, and the tracebacks logging attaches, none of which a log record factory
    sees. Entry points call it once (with :func:`redact_log_records`)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _RedactingStream):
            setattr(sys, name, _RedactingStream(stream))

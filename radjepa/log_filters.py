"""Dropping a library's log lines that only mislead the person reading a command's output,
and keeping credentials out of all of them.

Ray logs advice meant for its Python API users (``Tuner.restore(...)`` after an interrupted
sweep, "new http_options ... will not be applied" when ``serve.run`` finds the Serve instance
the command itself just started with them) and warnings it repeats every second. The commands
here drop those few lines by their start, on the logger that emits them, and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DropPrefix", "lines_dropped", "redact_log_records"]


class DropPrefix(logging.Filter):
    """A filter that drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextmanager
def lines_dropped(logger: str, prefix: str) -> Iterator[None]:
    """Within the block, ``logger``'s records whose message starts with ``prefix`` are dropped;
    the filter is removed however the block ends."""
    drop = DropPrefix(prefix)
    logging.getLogger(logger).addFilter(drop)
    try:
        yield
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

"""Dropping a library's log lines that only mislead the person reading a command's output.

Ray logs advice meant for its Python API users (``Tuner.restore(...)`` after an interrupted
sweep, "new http_options ... will not be applied" when ``serve.run`` finds the Serve instance
the command itself just started with them) and warnings it repeats every second. The commands
here drop those few lines by their start, on the logger that emits them, and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DropPrefix", "lines_dropped"]


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

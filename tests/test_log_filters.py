"""Log filters that keep a library's misleading lines off the user's terminal."""

from __future__ import annotations

import logging

from radjepa.log_filters import HideErrors
from radjepa.shards import DamagedShardError, ShardError


class _Wrapped(Exception):
    """Like a Ray task error: the task's own error in ``cause``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("task failed")
        self.cause = cause


def _record(
    logger: logging.Logger,
    message: str,
    exc: BaseException | None = None,
    level: int = logging.ERROR,
):
    kept: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record)

    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.log(level, message, exc_info=exc)
    finally:
        logger.removeHandler(handler)
    return kept[0]


def test_records_about_the_errors_named_are_marked_hidden_and_kept():
    logger = logging.getLogger("test.hide_errors")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    hide = HideErrors(ShardError)
    logger.addFilter(hide)
    try:
        damaged = DamagedShardError("DST/images/part-1.parquet is damaged")
        assert _record(logger, "Full stack trace:", _Wrapped(damaged)).hide is True
        chained = RuntimeError("read failed")
        chained.__cause__ = damaged
        assert _record(logger, "aborting", chained).hide is True
        try:  # a line logged while the error is handled, without it attached
            raise _Wrapped(damaged)
        except _Wrapped:
            assert _record(logger, "Exception occurred in internal code").hide is True
        # anything else is left as it was: shown
        assert not hasattr(_record(logger, "other", ValueError("x")), "hide")
        assert not hasattr(_record(logger, "no error"), "hide")
        looped = ValueError("a")
        looped.__cause__ = looped  # a cycle ends the search
        assert not hasattr(_record(logger, "cycle", looped), "hide")
        # an error met while one of ours was handled (a teardown's) is not ours: shown
        teardown = ValueError("executor shutdown failed")
        teardown.__context__ = damaged
        assert not hasattr(_record(logger, "shutdown failed", teardown), "hide")
        try:  # nor is a routine line logged while ours is handled
            raise damaged
        except DamagedShardError:
            routine = _record(logger, "Shutting down executor", level=logging.INFO)
        assert not hasattr(routine, "hide")
        assert hide.hidden == 3
    finally:
        logger.removeFilter(hide)


def test_a_dropping_filter_drops_only_those_records():
    logger = logging.getLogger("test.hide_errors.drop")
    logger.propagate = False
    drop = HideErrors(ShardError, drop=True)
    logger.addFilter(drop)
    try:
        kept: list[str] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                kept.append(record.getMessage())

        logger.addHandler(Keep())
        try:
            raise _Wrapped(DamagedShardError("part-1.parquet is damaged"))
        except _Wrapped:
            logger.error("Error in training function:\nTraceback ...")
        logger.error("Error in training function: other", exc_info=ValueError("x"))
        assert kept == ["Error in training function: other"] and drop.hidden == 1
    finally:
        logger.removeFilter(drop)
        logger.handlers.clear()

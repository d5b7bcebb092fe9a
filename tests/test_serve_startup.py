"""A replica's start-up error found in Serve's status message (serve.startup): no Ray needed."""

from __future__ import annotations

import traceback

import pytest

from serve.index import IndexLoadError
from serve.startup import ReplicaStartupError, replica_startup, startup_message


def _formatted(err: BaseException) -> str:
    """As Serve keeps it: the replica's traceback inside its own RuntimeError's text."""
    try:
        raise err
    except BaseException as raised:  # noqa: BLE001
        inner = "".join(traceback.format_exception(raised))
    return (
        "The deployment failed to start 1 times in a row. See controller logs for details. "
        "Error:\nray::ServeReplica:radjepa:RadjepaAPI.initialize_and_get_metadata() (pid=1)\n"
        f"RuntimeError: {inner}"
    )


def _wrapped(err: Exception) -> ReplicaStartupError:
    with pytest.raises(ReplicaStartupError) as caught, replica_startup():
        raise err
    return caught.value


def test_our_error_is_said_in_its_own_words_and_found_in_the_status_message():
    err = _wrapped(IndexLoadError("/x/part-1.parquet: unreadable: Corrupt snappy compressed data."))
    assert str(err) == "/x/part-1.parquet: unreadable: Corrupt snappy compressed data."
    assert isinstance(err.__cause__, IndexLoadError)  # the traceback in Ray's logs keeps it
    said = startup_message(_formatted(err))
    assert said == "/x/part-1.parquet: unreadable: Corrupt snappy compressed data."


def test_another_error_is_named_by_its_type_and_cut_to_its_first_line():
    err = _wrapped(KeyError("meta"))
    assert str(err) == "KeyError: 'meta'"
    assert startup_message(_formatted(_wrapped(OSError("disk gone\nmore detail")))) == (
        "OSError: disk gone"
    )


def test_a_status_message_without_our_error_gives_none():
    assert startup_message("The actor died unexpectedly before finishing this task.") is None
    assert startup_message("") is None

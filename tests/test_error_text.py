"""One-line errors: what commands print and API answers carry."""

from __future__ import annotations

from radjepa.error_text import error_line, first_line


def test_a_failed_trial_s_reason_keeps_the_keys_its_error_lists():
    # a sweep trial ended by a ConfigError was said as "invalid configuration:", the key and
    # the reason on the lines after it
    text = "invalid configuration:\n  ema: ema.start must be <= ema.end\n"
    assert first_line(text) == "invalid configuration: ema: ema.start must be <= ema.end"
    many = "bad:\n" + "\n".join(f"  k{i}: no" for i in range(8))
    assert first_line(many) == "bad: k0: no; k1: no; k2: no; k3: no; k4: no (and 3 more)"
    assert first_line("Traceback (most recent call last):\n  File x") == (
        "Traceback (most recent call last):"
    )
    assert first_line("one line\nsecond") == "one line"


def test_blank_leading_lines_are_skipped_and_nothing_says_nothing():
    assert first_line("\n\n   \n  Couldn't deserialize thrift: TProtocolException\nmore") == (
        "Couldn't deserialize thrift: TProtocolException"
    )
    assert first_line("") == "" and first_line(" \n\t\n") == ""


def test_an_error_without_text_is_said_by_its_type():
    # pyarrow and the OS raise some errors bare: an empty reason read as a sentence cut off
    assert error_line(OSError()) == "OSError"
    assert error_line(ValueError("\n")) == "ValueError"
    assert error_line(OSError("Parquet magic bytes not found\n  at footer")) == (
        "Parquet magic bytes not found"
    )

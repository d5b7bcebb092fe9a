"""Errors said in one line: what every command prints and every API answer carries.

Tracebacks, Ray's renderings of remote errors and pyarrow's messages run to many lines; the
user reads the first (or, where it introduces a list, the first few joined).
"""

from __future__ import annotations

_LISTED = 5


def first_line(message: str) -> str:
    """An error's text in one line: its first line, stripped (tracebacks and Ray's renderings
    are long). A first line that ends in ':' introduces what follows, as a ConfigError's
    "invalid configuration:" does its keys: up to five following lines are joined to it with
    '; ' (said alone, a failed sweep trial's reason was "invalid configuration:")."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    head, listed = lines[0], lines[1 : 1 + _LISTED]
    if not head.endswith(":") or not listed or head.startswith("Traceback"):
        return head
    more = len(lines) - 1 - len(listed)
    return f"{head} {'; '.join(listed)}" + (f" (and {more} more)" if more else "")


def error_line(err: BaseException) -> str:
    """``err``'s text in one line, or its type's name when it has no text (pyarrow and the OS
    raise some bare: an empty reason would read as a sentence cut off)."""
    return first_line(str(err)) or type(err).__name__

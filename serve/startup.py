"""A replica's start-up failure, said in one line on the driver.

A replica that cannot start (an index whose pages are damaged, a model its node cannot fetch
or read) fails inside Ray Serve: its controller logs the traceback, retries the replica, marks
the deployment DEPLOY_FAILED and ``serve.run`` raises ``RuntimeError("Deploying application
... failed: Failed to update the deployments [...]")``, which names neither the replica's
error nor its cause. The deployment's status message holds the replica's traceback as Ray
formats it. So the replicas raise :class:`ReplicaStartupError` with the first line of their
own error, and :func:`startup_message` finds that line in the status message by the
exception's qualified name, whatever Ray wraps around it (its own RuntimeError, a
RayTaskError, the chained traceback of the cause).

No Ray here: the driver's side reads the message it is given, and the replicas' side wraps an
exception.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from radjepa.error_text import first_line

__all__ = ["ReplicaStartupError", "replica_startup", "startup_message"]

# a message is cut there: the line is for a terminal, the whole traceback stays in Ray's logs
MAX_CHARS = 500


class ReplicaStartupError(RuntimeError):
    """A replica could not start; its message is one line, the cause's own first line."""


# Python's traceback ends with "<module>.<qualname>: <message>" for the raised exception
_MARKER = re.compile(
    rf"^{re.escape(ReplicaStartupError.__module__)}\.{ReplicaStartupError.__qualname__}: (.*)$",
    re.MULTILINE,
)


def one_line(err: BaseException) -> str:
    """``err`` in one line: its first line, after its type's name unless it is one of ours
    (their messages say what failed; a bare KeyError's ``'x'`` does not)."""
    first = first_line(str(err))
    ours = type(err).__module__.split(".")[0] in ("serve", "radjepa")
    if ours and first:
        return first[:MAX_CHARS]
    return f"{type(err).__name__}: {first}"[:MAX_CHARS] if first else type(err).__name__


@contextmanager
def replica_startup() -> Iterator[None]:
    """Re-raise an error of a replica's start-up as :class:`ReplicaStartupError`, the original
    chained as its cause (Ray's logs keep both tracebacks)."""
    try:
        yield
    except ReplicaStartupError:
        raise
    except Exception as err:
        raise ReplicaStartupError(one_line(err)) from err


def startup_message(status_message: str) -> str | None:
    """The replica's own one-line error in a deployment's status message, or None when the
    message holds none (Serve's own failure, a replica killed before it could raise)."""
    found = _MARKER.findall(status_message or "")
    return found[-1].strip()[:MAX_CHARS] if found else None

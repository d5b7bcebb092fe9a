"""The one error type of ingest's library parts: a problem the user can fix."""

from __future__ import annotations

__all__ = ["IngestError"]


class IngestError(RuntimeError):
    """A problem with the sources or destination the user can fix (reported in one line)."""

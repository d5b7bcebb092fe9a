"""The outermost layer of the API: request ids, body size limits and the error body.

Kept apart from the routes (``serve.app``) because every answer passes through it, under plain
uvicorn and under Ray Serve alike: one place decides which request id a request carries, and
the one helper :func:`error_response` writes every error body with it, so a client holding a
500's ``request_id`` and an operator reading the server log see the same value.
"""

from __future__ import annotations

import logging
import re
import uuid

from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.schemas import ErrorOut

__all__ = [
    "ApiError",
    "GuardMiddleware",
    "REQUEST_ID_HEADER",
    "accept_request_id",
    "error_response",
    "request_id",
    "shown",
    "shown_filename",
]

log = logging.getLogger("serve.app")  # the service's one logger name, as operators filter it

REQUEST_ID_HEADER = "x-request-id"
# what a caller may choose as its id: a UUID, a trace id, "ris-42:7"; anything else (a 16 KB
# header, quotes, spaces, non-ASCII) would be copied into every log line and error body
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# the most of an uploaded file's name an error body repeats (shown_filename)
FILENAME_CHARS = 120
# how much of a client's header or parameter name an error message repeats: the whole of it let
# a client have a 16 KB Content-Type echoed back (and into any log that records error bodies)
SHOWN_CHARS = 64
UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


class ApiError(Exception):
    """A client-facing error: status, message, optional machine reason and file name."""

    def __init__(
        self,
        status: int,
        detail: str,
        reason: str | None = None,
        *,
        filename: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.reason = reason
        self.filename = filename
        self.headers = headers


def accept_request_id(value: str | None) -> str | None:
    """The caller's ``X-Request-ID`` when it is safe to log and echo, else None."""
    if value is not None and _REQUEST_ID.match(value):
        return value
    return None


def request_id(request: Request | Scope) -> str | None:
    """The id :class:`GuardMiddleware` gave this request (None outside it)."""
    scope = request.scope if isinstance(request, Request) else request
    return scope.get("state", {}).get("request_id")


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """A client-supplied value as an error message may quote it: printable ASCII only (control
    characters, newlines and other bytes become ``?``), at most ``limit`` characters (then
    ``...`` and the full length), quoted."""
    clean = UNPRINTABLE.sub("?", value)
    if len(clean) > limit:
        return f"'{clean[:limit]}...' ({len(value)} characters)"
    return f"'{clean}'"


def shown_filename(filename: str | None) -> str | None:
    """A multipart file name as a response names it (a result's ``filename``, an error body's):
    the last part of a path, its printable characters only, at most :data:`FILENAME_CHARS` of
    them (the last three then ``...``).

    The name is the client's text: responses repeated it whole, up to the ~4 KB a part header
    may hold, with control characters (an ANSI escape, a bidi override that reverses what a
    viewer shows) and a client's full path (``/archive/DOE^JANE/<study UID>/IMG0001.dcm``),
    into any log or viewer that records responses. Enough of it stays to tell which file of a
    multi-file request a result or an error is about."""
    if filename is None:
        return None
    parts = [p for p in filename.replace("\\", "/").split("/") if p]
    base = parts[-1] if parts else ""
    # str.isprintable also refuses line and paragraph separators (U+2028/9) and other spaces
    clean = "".join(c for c in base if c.isprintable())
    if len(clean) > FILENAME_CHARS:
        return clean[: FILENAME_CHARS - 3] + "..."
    return clean


def error_response(
    scope_or_request: Request | Scope,
    status: int,
    detail: str,
    reason: str | None = None,
    filename: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Every error body of the API: ``ErrorOut`` with the request's id (and the file's name
    bounded, :func:`shown_filename`)."""
    body = ErrorOut(
        detail=detail,
        reason=reason,
        filename=shown_filename(filename),
        request_id=request_id(scope_or_request),
    ).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


class _BodyTooLarge(Exception):
    pass


def _has_body(scope: Scope) -> bool:
    """Whether the request says a body follows (a non-zero Content-Length, or chunks)."""
    for name, value in scope.get("headers", []):
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            try:
                return int(value) > 0
            except ValueError:
                return True  # refused with a 400 before the app runs
    return False


class GuardMiddleware:
    """Outermost guard: request id, body size (declared AND streamed), detail-free 500.

    Content-Length alone is not enough (chunked uploads have none, and it can lie), so the
    receive channel is wrapped and counts the bytes that actually arrive.

    ``echo_request_id``: put ``X-Request-ID`` on every response. Under Ray Serve the proxy
    already does (it takes the caller's header as is, or makes one up, and puts it on the
    request the app sees): the ingress turns this off, or every answer carried the header twice.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, echo_request_id: bool = True) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.echo_request_id = echo_request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = self._assign_request_id(scope)
        limit = self.max_body_bytes
        seen = 0
        started = False
        # whether the body has arrived whole: a request without one has; one with one once the
        # app read its last part
        body_done = not _has_body(scope)

        async def counted_receive() -> Message:
            nonlocal seen, body_done
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge
                body_done = body_done or not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                if self.echo_request_id:
                    headers[REQUEST_ID_HEADER] = rid
                if not body_done:
                    # answered before the body arrived (a 401, a 504 of a client that trickles
                    # it): left open, the server read and discarded the rest for as long as the
                    # client kept sending, past every deadline; a 413 has said this since
                    headers["connection"] = "close"
            await send(message)

        # and close the connection: left open, the server went on reading (and discarding) the
        # rest of the body for as long as the client kept sending, past every deadline
        too_large = error_response(
            scope,
            413,
            f"request body exceeds the {limit} byte limit",
            "too_large",
            headers={"Connection": "close"},
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await error_response(scope, 400, "invalid Content-Length header")(
                        scope, receive, tracking_send
                    )
                    return
                if declared > limit:
                    await too_large(scope, receive, tracking_send)
                    return
        try:
            await self.app(scope, counted_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await too_large(scope, receive, tracking_send)
        except ClientDisconnect:
            # the client went away before its body arrived: nobody to answer, and no server
            # fault (logged at ERROR with a traceback, any client could flood the log)
            log.info(
                "client disconnected during %s %s (request %s)",
                scope.get("method"),
                scope.get("path"),
                rid,
            )
        except Exception:
            # the traceback and the id go to the log, the id alone to the client: an operator
            # finds this record by the request_id a caller reports
            log.exception(
                "unhandled error on %s %s (request %s)", scope.get("method"), scope.get("path"), rid
            )
            if not started:
                await error_response(scope, 500, "internal server error")(
                    scope, receive, tracking_send
                )

    def _assign_request_id(self, scope: Scope) -> str:
        """The caller's valid ``X-Request-ID``, or a fresh one; recorded on the request (its
        ``state``) and, when replaced, on the request's headers for whatever reads them."""
        supplied = None
        for name, value in scope.get("headers", []):
            if name == REQUEST_ID_HEADER.encode():
                supplied = value.decode("latin-1")
                break
        rid = accept_request_id(supplied)
        if rid is None:
            rid = uuid.uuid4().hex
            if supplied is not None:
                log.info("ignored an invalid X-Request-ID (%d chars); using %s", len(supplied), rid)
            headers = MutableHeaders(scope=scope)
            headers[REQUEST_ID_HEADER] = rid
        scope.setdefault("state", {})["request_id"] = rid
        return rid

"""A loopback stand-in for Google Cloud Storage's JSON API (the real service is out of reach of
tests), answering every object request with one fixed HTTP status, and the OAuth token endpoint
its credentials file names. pyarrow's real GCS client talks to it through ``endpoint_override``
and an ``authorized_user`` credentials file whose ``token_uri`` is this server."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FakeGcs:
    port: int
    credentials: Path  # for GOOGLE_APPLICATION_CREDENTIALS
    requests: list[str] = field(default_factory=list)  # "GET /storage/v1/b/...", in order

    def uri(self, path: str, **query: str) -> str:
        """``gs://path`` routed to this server (plain HTTP), with extra query options."""
        options = {"endpoint_override": f"127.0.0.1:{self.port}", "scheme": "http", **query}
        return f"gs://{path}?" + "&".join(f"{k}={v}" for k, v in options.items())

    def storage_requests(self) -> list[str]:
        return [r for r in self.requests if "/storage/" in r]


@contextmanager
def fake_gcs(status: int, folder: Path, message: str = "") -> Iterator[FakeGcs]:
    """A server answering storage requests with ``status`` (404: "no such object", an answer;
    503: unavailable, which the client retries) and ``message`` (default: ``fake status N``),
    and any token request with a token."""
    said = message or f"fake status {status}"
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # the OAuth token exchange
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append(f"POST {self.path}")
            self._answer(200, {"access_token": "t", "expires_in": 3600, "token_type": "Bearer"})

        def do_GET(self) -> None:
            seen.append(f"GET {self.path}")
            self._answer(status, {"error": {"code": status, "message": said}})

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    credentials = folder / "gcs-credentials.json"
    credentials.write_text(
        json.dumps(
            {
                "type": "authorized_user",
                "client_id": "c",
                "client_secret": "s",
                "refresh_token": "r",
                "token_uri": f"http://127.0.0.1:{port}/token",
            }
        )
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield FakeGcs(port, credentials, seen)
    finally:
        server.shutdown()
        server.server_close()

"""API-key authentication and the service's runtime settings.

Keys come from an env var (comma-separated) or a secrets file (one per line). The settings
hold only SHA-256 digests of the keys: the raw keys never travel through Ray (deployment
arguments are pickled and stored by the Serve controller). Comparison is constant-time
(``hmac.compare_digest``) over every configured key, so timing reveals nothing.
Settings are built by entry points (the app builder, the CLI), never at import time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from pathlib import Path

from fastapi import HTTPException, Request, status
from pydantic import BaseModel, ConfigDict, Field

from radjepa.config import ServeConfig

__all__ = [
    "ApiSettings",
    "SecurityConfigError",
    "load_api_keys",
    "settings_from_config",
    "key_digest",
    "require_api_key",
]

log = logging.getLogger(__name__)

# Guards against a request carrying hundreds of tiny files, each costing a decode.
MAX_IMAGES_PER_REQUEST = 64


class SecurityConfigError(RuntimeError):
    """The service would start without protection (or with unreadable keys): refuse."""


class ApiSettings(BaseModel):
    """What the HTTP layer needs at runtime, validated once."""

    model_config = ConfigDict(frozen=True)

    key_digests: tuple[str, ...] = Field(default=(), description="sha256 hex of each API key")
    insecure_local: bool = False
    max_body_bytes: int = Field(64 * 1024**2, gt=0)
    request_timeout_s: float = Field(30.0, gt=0)
    max_images_per_request: int = Field(MAX_IMAGES_PER_REQUEST, ge=1)
    decode_workers: int = Field(
        0, ge=0, description="decoding and index-search threads; 0 = one per CPU"
    )
    max_pending_decodes: int = Field(
        32, ge=1, description="requests decoding or waiting to at once; more get 503"
    )
    max_patch_token_values: int = Field(
        2_000_000, ge=1, description="patch-token floats one response may hold (~40 MB of JSON)"
    )
    secret_env: str = Field("RADJEPA_DEID_SECRET", description="decode HMAC key env var")

    def check_startable(self, keys_env: str | None = None) -> None:
        """Refuse an unprotected service unless insecure local mode was asked for.

        ``keys_env`` is the variable ``serve.api_keys_env`` names: the message spells it out,
        since a newcomer cannot act on "the serve.api_keys_env variable" without the config."""
        if not self.key_digests and not self.insecure_local:
            where = f"{keys_env} (serve.api_keys_env)" if keys_env else "serve.api_keys_env"
            raise SecurityConfigError(
                f"no API keys configured: set {where} to comma-separated keys of 16+ "
                "characters or serve.api_keys_file (one key per line); for a local-only "
                "service pass --insecure-local (serve.insecure_local=true)"
            )
        if self.insecure_local and not self.key_digests:
            log.warning("insecure local mode: the API accepts requests without a key")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_api_keys(env_name: str, file: str | os.PathLike[str] | None) -> list[str]:
    """Keys from ``$env_name`` (comma-separated) and ``file`` (one per line, # comments)."""
    keys = [k.strip() for k in os.environ.get(env_name, "").split(",") if k.strip()]
    if file is not None:
        path = Path(file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise SecurityConfigError(f"cannot read API keys file {path}: {err}") from None
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    short = [k for k in keys if len(k) < 16]
    if short:
        raise SecurityConfigError(
            f"{len(short)} API key(s) shorter than 16 characters: use long random keys "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return keys


def settings_from_config(serve_cfg: ServeConfig, *, secret_env: str) -> ApiSettings:
    """Build and check the runtime settings from ``cfg.serve`` (raises SecurityConfigError)."""
    keys = load_api_keys(serve_cfg.api_keys_env, serve_cfg.api_keys_file)
    settings = ApiSettings(
        key_digests=tuple(sorted({key_digest(k) for k in keys})),
        insecure_local=serve_cfg.insecure_local,
        max_body_bytes=int(serve_cfg.max_body_mb * 1024**2),
        request_timeout_s=serve_cfg.request_timeout_s,
        decode_workers=serve_cfg.decode_workers,
        max_pending_decodes=serve_cfg.max_ongoing_requests,
        secret_env=secret_env,
    )
    if settings.insecure_local and not settings.key_digests and not _loopback(serve_cfg.host):
        # "local only" was a promise nothing kept: with serve.host=0.0.0.0 the keyless API
        # answered every machine that could reach the port
        raise SecurityConfigError(
            f"insecure local mode (no API keys) refuses serve.host={serve_cfg.host}: every "
            "machine that reaches it could call the API; listen on 127.0.0.1, ::1 or "
            "localhost, or configure API keys"
        )
    settings.check_startable(serve_cfg.api_keys_env)
    return settings


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: what it resolves to can change, so it is not loopback
        return False


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=message,
        headers={"WWW-Authenticate": 'Bearer realm="radjepa"'},
    )


def require_api_key(request: Request) -> None:
    """FastAPI dependency: a valid ``Authorization: Bearer <key>`` or 401."""
    settings: ApiSettings = request.app.state.settings
    if not settings.key_digests:  # insecure local mode, checked at startup
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    presented = key_digest(token.strip())
    ok = False
    for digest in settings.key_digests:  # no early exit: constant work per request
        ok |= hmac.compare_digest(presented, digest)
    if not ok:
        raise _unauthorized("invalid API key")

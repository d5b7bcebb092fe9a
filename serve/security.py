"""API-key authentication and the service's runtime settings.

Keys come from an env var (comma-separated) or a secrets file (one per line), each optionally
followed by the scopes it is granted (``serve.keys``). The settings hold only SHA-256 digests
of the keys: the raw keys never travel through Ray (deployment arguments are pickled and
stored by the Serve controller). Comparison is constant-time (``hmac.compare_digest``) over
every configured key, so timing reveals nothing. The keys file is re-read by each replica when
it changes (``serve.keys.KeyRing``), so a revoked key stops working without a redeploy.
Settings are built by entry points (the app builder, the CLI), never at import time.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from pathlib import Path

from fastapi import HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from radjepa.config import ServeConfig
from serve.keys import SCOPES, KeyRing, Keys, KeysError, key_digest, parse_entries, read_keys_file

__all__ = [
    "ApiSettings",
    "SecurityConfigError",
    "load_api_keys",
    "settings_from_config",
    "key_digest",
    "require_api_key",
    "request_scopes",
]

log = logging.getLogger(__name__)

# Guards against a request carrying hundreds of tiny files, each costing a decode.
MAX_IMAGES_PER_REQUEST = 64


class SecurityConfigError(KeysError):
    """The service would start without protection (or with unreadable keys): refuse."""


class ApiSettings(BaseModel):
    """What the HTTP layer needs at runtime, validated once."""

    model_config = ConfigDict(frozen=True)

    env_keys: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="digest -> scopes of the keys from the env var: fixed for the process, "
        "whatever later happens to the keys file",
    )
    file_keys: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="digest -> scopes read from keys_file at start (each replica re-reads it "
        "when it changes)",
    )
    keys_file: str | None = Field(None, description="re-read by each replica when it changes")
    keys_recheck_s: float = Field(1.0, ge=0, description="how often the keys file is stat'ed")
    insecure_local: bool = False
    docs_page: bool = Field(True, description="/docs (serve.docs_page)")
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
    allow_development_key: bool = Field(
        False,
        description="with secret_env unset, use the PUBLIC development key instead of refusing "
        "to start (ingest.allow_development_key: the sample and tests only)",
    )
    start_warnings_said: bool = Field(
        False,
        description="the command that started the service said its start-up warnings (keyless "
        "mode, the public or a weak pseudonymisation key) where its operator reads them: the "
        "API replicas, whose log lines `radjepa serve` forwards to the same terminal, do not "
        "repeat them",
    )

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
        if self.insecure_local and not self.key_digests and not self.start_warnings_said:
            log.warning("insecure local mode: the API accepts requests without a key")

    @property
    def key_digests(self) -> tuple[str, ...]:
        """Every key accepted at start (sha256 hex), from the env var and the keys file."""
        return tuple(sorted(self.env_keys.keys() | self.file_keys.keys()))

    def keyring(self) -> KeyRing:
        """The keys a replica checks requests against, re-reading ``keys_file`` as it changes.

        A key in both places keeps the scopes of both, and stays (with the env var's own
        scopes) when the file drops it."""
        return KeyRing(
            _frozen(self.env_keys), _frozen(self.file_keys), self.keys_file, self.keys_recheck_s
        )


def _frozen(keys: dict[str, tuple[str, ...]]) -> Keys:
    return {d: frozenset(s) for d, s in keys.items()}


def _tuples(keys: Keys) -> dict[str, tuple[str, ...]]:
    return {d: tuple(sorted(s)) for d, s in sorted(keys.items())}


def load_api_keys(env_name: str, file: str | os.PathLike[str] | None) -> tuple[Keys, Keys]:
    """Keys from ``$env_name`` (comma-separated) and from ``file`` (one per line, # comments),
    each ``KEY [SCOPE ...]``: ({digest: scopes} of the env var, {digest: scopes} of the file).
    Raises SecurityConfigError for a bad entry or a file others may write."""
    entries = [e.strip() for e in os.environ.get(env_name, "").split(",") if e.strip()]
    try:
        from_env = parse_entries([(f"${env_name} entry {i}", e) for i, e in enumerate(entries, 1)])
        from_file = read_keys_file(file) if file is not None else {}
    except KeysError as err:
        raise SecurityConfigError(str(err)) from None
    return from_env, from_file


def settings_from_config(
    serve_cfg: ServeConfig, *, secret_env: str, allow_development_key: bool
) -> ApiSettings:
    """Build and check the runtime settings from ``cfg.serve`` (raises SecurityConfigError).

    ``secret_env`` and ``allow_development_key`` come from ``cfg.ingest``: the server keys
    uploads' pseudonyms and image ids as ingest did, and refuses the public key as ingest does.
    The key itself is resolved where it is used (a replica's environment may hold it when
    this process's does not)."""
    from_env, from_file = load_api_keys(serve_cfg.api_keys_env, serve_cfg.api_keys_file)
    settings = ApiSettings(
        env_keys=_tuples(from_env),
        file_keys=_tuples(from_file),
        keys_file=str(Path(serve_cfg.api_keys_file).absolute())
        if serve_cfg.api_keys_file
        else None,
        insecure_local=serve_cfg.insecure_local,
        docs_page=serve_cfg.docs_page,
        max_body_bytes=int(serve_cfg.max_body_mb * 1024**2),
        request_timeout_s=serve_cfg.request_timeout_s,
        decode_workers=serve_cfg.decode_workers,
        max_pending_decodes=serve_cfg.max_ongoing_requests,
        secret_env=secret_env,
        allow_development_key=allow_development_key,
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


# declares the scheme in /openapi.json (a generated client then sends the key, the docs page
# offers "Authorize"); it decides nothing: require_api_key reads the header itself, so a missing
# or malformed one is this module's 401 with its message, not FastAPI's 403
_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    description="An API key from the service's keys file: `Authorization: Bearer <key>`.",
)


def require_api_key(
    request: Request,
    _declared: HTTPAuthorizationCredentials | None = Security(_BEARER),  # noqa: B008
) -> None:
    """FastAPI dependency: a valid ``Authorization: Bearer <key>`` or 401; records the key's
    scopes on the request (:func:`request_scopes`)."""
    settings: ApiSettings = request.app.state.settings
    keys = request.app.state.keyring.current()
    if not keys:
        if settings.insecure_local:  # keyless on loopback (checked at startup): all scopes
            request.state.scopes = SCOPES
            return
        raise _unauthorized("invalid API key")  # unreachable: start and reloads refuse no keys
    given = request.headers.getlist("authorization")
    if len(given) > 1:
        # a proxy or audit layer in front may read another of them than this first one
        raise _unauthorized("several Authorization headers: send one")
    header = given[0] if given else ""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    presented = key_digest(token.strip())
    matched: frozenset[str] | None = None
    for digest, scopes in keys.items():  # no early exit: constant work per request
        if hmac.compare_digest(presented, digest):
            matched = scopes
    if matched is None:
        raise _unauthorized("invalid API key")
    request.state.scopes = matched


def request_scopes(request: Request) -> frozenset[str]:
    """The scopes of the key that authenticated ``request`` (none outside ``require_api_key``)."""
    return getattr(request.state, "scopes", frozenset())

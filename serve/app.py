"""The FastAPI service: an app factory that RECEIVES its model.

``create_app(embedder, settings=...)`` builds the routes around any :class:`Embedder` (an
in-process encoder in tests and benchmarks, a Ray Serve handle in production), so every route
is testable without Ray and the Serve deployment stays a thin wrapper.

Request path: size guard (413) -> auth (401) -> media type (415) -> read body -> decode with
``radjepa.imaging.decode.decode_image`` (the exact function ingest uses; 422 with its reason)
-> embedder (batched in Serve) -> head / index. The whole request runs under a deadline (504).
Bad input never yields a 500; an unexpected failure yields a generic 500 body while the
traceback goes to the server log only.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from serve.admission import Cancelled, DecodeGate, Overloaded
from serve.embedder import Embedder, ImageEmbedding, ModelInfo
from serve.guard import (
    UNPRINTABLE,
    ApiError,
    GuardMiddleware,
    error_response,
    request_id,
    shown,
    shown_filename,
)
from serve.index import EmbeddingIndex, UploadPseudonyms
from serve.keys import PATIENT_LINKAGE
from serve.query_params import known_query
from serve.schemas import (
    ClassificationOut,
    ClassifyResponse,
    EmbeddingOut,
    EmbedResponse,
    ErrorOut,
    Health,
    ModelInfoOut,
    ModelsResponse,
    Neighbour,
    PatientPseudonym,
    Readiness,
    SamePatientOut,
    SimilarOut,
    SimilarResponse,
    embed_response_json,
)
from serve.security import ApiSettings, SecurityConfigError, request_scopes, require_api_key

__all__ = ["create_app", "ApiError", "IMAGE_MEDIA_TYPES"]

log = logging.getLogger(__name__)

IMAGE_MEDIA_TYPES = ("application/dicom", "image/png", "image/jpeg")
# multipart parts from `curl -F file=@x.dcm` arrive as octet-stream: the decoder sniffs them
PART_MEDIA_TYPES = (*IMAGE_MEDIA_TYPES, "application/octet-stream")
MULTIPART = "multipart/form-data"
# what a result says (same_patient.patient_id, image_id_match) for a start-up status: an
# UploadPseudonyms.status, or the index's serve.index.upload_image_ids
_ANSWERED = {
    "verified": "used",
    "unverified": "used_unverified",
    "key_mismatch": "key_mismatch",
}
# bounds the query string (each pseudonym is ~50 bytes there) well under common URL limits
MAX_EXCLUDED_PATIENTS = 100
# uploads whose similar-case searches share one pass over the index matrix; the [block, N]
# scores of a million-row index take 64 MB
SEARCH_BLOCK = 16


@dataclass
class _Upload:
    data: bytes
    filename: str | None
    patient_pid: str | None = None  # set by the decoder: the upload's own keyed pseudonym
    # set by the decoder: its SOP Instance UID's keyed pseudonym, as ingest identifies instances
    instance_pid: str | None = None
    # set by the decoder: the id ingest would give these bytes, under the index's id scheme
    image_id: str = ""


@dataclass(frozen=True)
class _Exclusions:
    """The index rows one upload's search leaves out, and why (for its result)."""

    own: np.ndarray  # its own archive row(s), unless include_self
    patients: np.ndarray  # rows of the patients asked to be left out
    same: SamePatientOut | None  # set with exclude_same_patient
    archived: np.ndarray  # its own archive row(s), left out or not: never counted as a patient's

    @property
    def excluded_patient(self) -> int:
        """Rows left out for their patient, other than the upload's own: with include_self
        and its patient left out, its own row was counted there, one more than the other
        images of that patient."""
        return len(np.setdiff1d(self.patients, self.archived))


def _media_type(request: Request) -> str:
    given = request.headers.getlist("content-type")
    if len(given) > 1:  # which one a proxy in front inspected is not known here
        raise ApiError(
            415, "several Content-Type headers: send one", reason="unsupported_media_type"
        )
    return given[0].split(";")[0].strip().lower() if given else ""


try:  # the multipart parser's limits on each part's headers (python-multipart's defaults)
    from python_multipart.multipart import DEFAULT_MAX_HEADER_COUNT as _PART_HEADERS
    from python_multipart.multipart import DEFAULT_MAX_HEADER_SIZE as _PART_HEADER_BYTES
except ImportError:  # an older python-multipart: its limits as of 0.0.22
    _PART_HEADERS, _PART_HEADER_BYTES = 8, 4096 + 128


# python-multipart logs a WARNING ("Did not find CR at end of boundary (4)", ...) for each body
# that breaks its grammar, then raises the error _multipart_error answers with a 400 naming the
# same fault: a client or a scanner sending junk wrote one line to the replica's log per request.
# Its ERROR records (a temporary file it cannot open) are the server's own and still pass.
MULTIPART_PARSER_LOGGERS = ("python_multipart.multipart", "multipart.multipart")


class _ParserErrorsOnly(logging.Filter):
    """Passes python-multipart's ERROR records; drops its per-request parse complaints."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def quiet_multipart_parser() -> None:
    """Keep python-multipart's per-request WARNINGs out of the service log (idempotent: each
    app built in a process, e.g. a Serve replica, installs the filter once)."""
    for name in MULTIPART_PARSER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ParserErrorsOnly) for f in logger.filters):
            logger.addFilter(_ParserErrorsOnly())


def _multipart_error(err: MultiPartException, max_parts: int) -> ApiError:
    """A multipart body the parser refused, as a JSON error saying what to fix.

    Starlette answered each with a bare 400 whose message, for a part header over the parser's
    line limit or a body that does not follow its boundary, was only "Invalid multipart data."
    and whose reason was empty."""
    cause = UNPRINTABLE.sub("?", str(err.__cause__ or ""))
    message = err.message
    if cause.startswith("Maximum header size"):
        return ApiError(
            400,
            f"a multipart part header is longer than {_PART_HEADER_BYTES} bytes: keep each "
            "part's headers (Content-Disposition, Content-Type) short, e.g. a shorter filename",
            reason="multipart_header_too_large",
        )
    if cause.startswith("Maximum header count"):
        return ApiError(
            400,
            f"a multipart part has more than {_PART_HEADERS} headers: send Content-Disposition and "
            "Content-Type only",
            reason="invalid_multipart",
        )
    if cause:  # the body does not follow the multipart grammar
        return ApiError(
            400,
            f"malformed multipart body ({cause[:120]}): parts must be delimited by "
            "--BOUNDARY lines, BOUNDARY being the boundary parameter of the Content-Type "
            "header, as curl -F or an HTTP library's files= option writes them",
            reason="invalid_multipart",
        )
    if message.startswith("Missing boundary"):
        return ApiError(
            400,
            f"{MULTIPART} without a boundary parameter: send Content-Type: {MULTIPART}; "
            "boundary=... matching the body's delimiters (curl -F and HTTP libraries set it; "
            "do not set Content-Type by hand)",
            reason="invalid_multipart",
        )
    if "Content-Disposition" in message:
        return ApiError(
            400,
            "a multipart part has no Content-Disposition: form-data header with a name: send "
            'each image as a file part (Content-Disposition: form-data; name="files"; '
            'filename="a.dcm"), e.g. curl -F files=@a.dcm',
            reason="invalid_multipart",
        )
    if message.startswith(("Too many files", "Too many fields")):
        return ApiError(
            422,
            f"more than {max_parts} multipart parts: send at most {max_parts} images per request",
            reason="too_many_images",
        )
    if message.startswith("Part exceeded"):  # the body limit (413) is met first
        return ApiError(413, "a multipart part exceeds the body size limit", reason="too_large")
    return ApiError(400, f"invalid multipart body: {message[:200]}", reason="invalid_multipart")


class _WholeBodyParser(MultiPartParser):
    """Starlette's multipart parser, noting whether the body reached its closing delimiter.

    Neither it nor python-multipart checks that at the end of the stream: a body cut short
    after its first file (an upload interrupted, a proxy's limit) was answered 200 for the
    files before the cut, the rest dropped without a word. ``began``: a part began (an empty
    body, or one with no part at all, holds no files: said as such, not as cut short)."""

    ended = False
    began = False

    def on_part_begin(self) -> None:
        self.began = True
        super().on_part_begin()

    def on_end(self) -> None:
        self.ended = True


def _refuse_content_coding(request: Request) -> None:
    """415 for a body sent with a Content-Encoding other than identity (gzip, ...), before any
    of it is read: its compressed bytes went to the decoder as the image (422 not_an_image)
    or to the multipart parser (400 malformed), neither saying what was wrong."""
    codings = [
        c.strip().lower()
        for header in request.headers.getlist("content-encoding")
        for c in header.split(",")
        if c.strip()
    ]
    refused = [c for c in codings if c != "identity"]
    if refused:
        raise ApiError(
            415,
            f"unsupported Content-Encoding {shown(', '.join(refused))}: send the image bytes "
            "as they are, without compression (DICOM, PNG and JPEG carry their own)",
            reason="unsupported_content_encoding",
        )


async def _read_uploads(request: Request, settings: ApiSettings) -> list[_Upload]:
    """Raw image body or multipart files -> bytes; 415 for anything else."""
    _refuse_content_coding(request)
    media = _media_type(request)
    if media in IMAGE_MEDIA_TYPES:
        # read here, not by request.body(), which keeps the bytes on the request until its
        # answer is written: the upload is let go once decoded
        data = b"".join([chunk async for chunk in request.stream()])
        if not data:
            raise ApiError(422, "empty request body", reason="empty")
        return [_Upload(data, None)]
    if media != MULTIPART:
        raise ApiError(
            415,
            f"unsupported media type {shown(media) if media else '(none)'}: send one of "
            f"{', '.join(IMAGE_MEDIA_TYPES)} or {MULTIPART}",
            reason="unsupported_media_type",
        )
    parser = _WholeBodyParser(
        request.headers,
        request.stream(),
        max_files=settings.max_images_per_request,
        max_fields=settings.max_images_per_request,
        max_part_size=settings.max_body_bytes,
    )
    try:
        form = await parser.parse()
    except MultiPartException as err:
        refused = _multipart_error(err, settings.max_images_per_request)
        # the status and request id are in the access log; the reason only at DEBUG, so junk
        # bodies cost the log nothing by default
        log.debug("refused a multipart body (request %s): %s", request_id(request), refused.reason)
        raise refused from None
    if parser.began and not parser.ended:
        await form.close()
        log.debug("refused a multipart body (request %s): cut short", request_id(request))
        raise ApiError(
            400,
            "the multipart body ends before its closing --BOUNDARY-- line: it was cut short "
            "(an interrupted upload?); send the whole body again",
            reason="invalid_multipart",
        )
    uploads: list[_Upload] = []
    try:
        for name, value in form.multi_items():
            if not isinstance(value, UploadFile):
                # a part without a filename is a text field to the parser, its bytes and type
                # gone: skipping it answered for fewer images than were sent
                raise ApiError(
                    422,
                    f"multipart part {shown(name)} is not a file (its Content-Disposition has "
                    "no filename): send each image as a file part, e.g. curl -F files=@a.dcm",
                    reason="not_a_file",
                )
            part = (value.content_type or "application/octet-stream").split(";")[0].lower()
            if part not in PART_MEDIA_TYPES:
                raise ApiError(
                    415,
                    f"file part has unsupported media type {shown(part)}: use one of "
                    f"{', '.join(PART_MEDIA_TYPES)}",
                    reason="unsupported_media_type",
                    filename=value.filename,
                )
            data = await value.read()
            if not data:
                raise ApiError(422, "empty file part", reason="empty", filename=value.filename)
            uploads.append(_Upload(data, value.filename))
    finally:
        await form.close()
    if not uploads:
        raise ApiError(422, "multipart body holds no files", reason="no_files")
    return uploads


class UploadDecoders:
    """One decode process (:class:`radjepa.ingest.decode_process.DecodeProcess`) per decode
    thread: a codec that crashes in C on a hostile upload (a segfault) ended the replica, and
    every request in flight with it; one stuck on it held a decode thread for good. Now the
    upload is a 422 (``decoder_crashed``), and a request past its deadline kills its decode."""

    def __init__(self) -> None:
        self._local = threading.local()

    def decode(
        self, data: bytes, options: dict[str, Any], rid: str | None, cancelled: threading.Event
    ) -> Any:
        from radjepa.ingest.decode_process import DecodeProcess

        proc = getattr(self._local, "proc", None)
        if proc is None:
            proc = self._local.proc = DecodeProcess(_decode_upload)
        return proc.call(data, (options, rid), cancelled=cancelled)


def _decode_upload(data: bytes, options: dict[str, Any], rid: str | None) -> tuple[Any, ...]:
    """In the decode process: ``("ok", pixels, meta)``, ``("rejected", reason, message)``, or
    ``("failed",)`` (plain values: they cross a pipe)."""
    from radjepa.imaging.decode import ImageRejected, decode_image

    try:
        decoded = decode_image(data, **options)
    except ImageRejected as err:
        return "rejected", err.reason, err.message
    except Exception:  # a decoder bug on hostile bytes is still bad input, not a 500
        log.exception("decoder failed on an upload (%d bytes, request %s)", len(data), rid)
        return ("failed",)
    return "ok", decoded.pixels, decoded.meta


def _decode_all(
    uploads: list[_Upload], app_state: Any, rid: str | None, cancelled: threading.Event
) -> list[np.ndarray]:
    """Decode every upload with the ingest decoder; the first rejection becomes a 422.

    Runs on the decode pool, each file in the thread's decode process; stops between files
    once the request has given up, and ends a decode still running then."""
    from radjepa.ingest.decode_process import DecodeCancelled, DecodeCrashed

    pre = app_state.embedder.preprocess
    out = []
    for up in uploads:
        if cancelled.is_set():
            raise Cancelled("request abandoned")
        options = {
            "size": pre.image_size,
            "dtype": pre.dtype,
            "window_percentiles": pre.window_percentiles,
            "secret": app_state.decode_secret,
            "source_name": up.filename,
            "max_bytes": app_state.settings.max_body_bytes,
            "patient_identity": app_state.upload_pseudonyms.scheme,
            "id_scheme": app_state.image_id_scheme,
        }
        try:
            outcome = app_state.upload_decoders.decode(up.data, options, rid, cancelled)
        except DecodeCancelled:
            raise Cancelled("request abandoned") from None
        except DecodeCrashed as err:
            log.warning(
                "decoding an upload (%d bytes, request %s) ended its decode process (%s)",
                len(up.data),
                rid,
                err.how,
            )
            raise ApiError(
                422,
                "the image could not be decoded: it ended the decoder",
                reason="decoder_crashed",
                filename=up.filename,
            ) from None
        if outcome[0] == "rejected":
            raise ApiError(422, outcome[2], reason=outcome[1], filename=up.filename)
        if outcome[0] == "failed":
            raise ApiError(
                422, "the image could not be decoded", reason="decode_error", filename=up.filename
            )
        _, pixels, meta = outcome
        up.patient_pid = meta.get("patient_pid")
        up.instance_pid = meta.get("instance_pid")
        up.image_id = str(meta["image_id"])
        # decoded, its bytes are not used again: held to the answer, through the forward's
        # queue and the search, a replica's memory grew with every request in flight
        up.data = b""
        out.append(pixels)
    return out


def public_model(info: ModelInfo, fingerprint: str | None) -> ModelInfoOut:
    """What callers learn of the served weights: which they are, never where they lie.

    ``info.source`` is what the operator gave (a checkpoint folder, a bucket URI, a registry
    reference): a path there told every key holder the server's layout (user names, mounts,
    bucket names). It stays in the server log; callers get the pinned registry reference when
    there is one and the checkpoint's content fingerprint."""
    fields = info.as_dict()
    source = str(fields.pop("source"))
    reference = f"models:/{info.name}/{info.version}" if source.startswith("models:/") else None
    return ModelInfoOut(**fields, reference=reference, sha256=fingerprint)


def _short_hash(*parts: bytes) -> str:
    return _short_hash_of_digests(*(hashlib.sha256(part).digest() for part in parts))


def _short_hash_of_digests(*digests: bytes) -> str:
    """:func:`_short_hash` of parts given by their SHA-256 digests (a part too large to build
    as one bytes object is hashed as it is read)."""
    h = hashlib.sha256()
    for digest in digests:
        h.update(digest)  # framed: parts cannot run into each other
    return f"sha256:{h.hexdigest()[:16]}"


def public_head(head: Any, head_source: str | None) -> str:
    """A probe head's public identity: its registry reference, or a hash of its parameters and
    labels (stable across copies and restarts; never the folder it was loaded from)."""
    if head_source and head_source.startswith("models:/"):
        return head_source
    tensors = [getattr(head, name, None) for name in ("weight", "bias", "mean", "scale")]
    if all(t is None for t in tensors):
        return type(head).__name__
    return _short_hash(
        *(np.ascontiguousarray(t, np.float64).tobytes() for t in tensors if t is not None),
        "\n".join(str(x) for x in head.label_names).encode(),
    )


def public_index(index: EmbeddingIndex) -> str:
    """A similar-case index's public identity: a hash of which images it holds, in which order
    (it changes when the archive is re-embedded with other images; never the index's path)."""
    # the hash of "\n".join(image_ids), a block of ids at a time: joined at once, a million
    # ids would be a few hundred MB of str objects beside the compact column
    ids = hashlib.sha256()
    for i, block in enumerate(index.image_ids.blocks()):
        ids.update((("\n" if i else "") + "\n".join(block)).encode())
    return _short_hash_of_digests(hashlib.sha256(str(index.dim).encode()).digest(), ids.digest())


def _resolve_decode_secret(settings: ApiSettings) -> bytes:
    """The HMAC key uploads' image ids and PatientID pseudonyms are made with, as ingest made
    the archive's; refused (SecurityConfigError) when unset, unless the config allows the
    public development key, as ingest does."""
    from radjepa.imaging.decode import resolve_secret
    from radjepa.imaging.deid import SecretRefused

    try:
        return resolve_secret(
            settings.secret_env,
            allow_development_key=settings.allow_development_key,
            warn=not settings.start_warnings_said,
        )
    except SecretRefused as err:
        raise SecurityConfigError(str(err)) from None


def _upload_pseudonyms(
    index: EmbeddingIndex | None, secret: bytes, settings: ApiSettings
) -> UploadPseudonyms:
    """How uploads' own PatientIDs are pseudonymised: with the index's scheme, and usable for
    ``exclude_same_patient`` only when the server's key is the index's (checked, and any doubt
    logged, once at start-up)."""
    from radjepa.imaging.deid import PATIENT_ID, key_fingerprint

    if index is None:  # nothing to match against: the pseudonym is never used
        return UploadPseudonyms("verified", PATIENT_ID)
    return index.upload_pseudonyms(key_fingerprint(secret), settings.secret_env)


def _upload_image_ids(
    index: EmbeddingIndex | None, secret: bytes, settings: ApiSettings
) -> tuple[str, str]:
    """How uploads' image ids are made (the index's scheme, so that an archived upload equals
    its row's id; keyed for a server without an index, as a new ingest would) and whether
    they can match the archive's (:func:`serve.index.upload_image_ids`, checked at start-up)."""
    from radjepa.imaging.deid import ID_SCHEME_KEYED, key_fingerprint

    if index is None:
        return ID_SCHEME_KEYED, "verified"
    status = index.upload_image_ids(key_fingerprint(secret), settings.secret_env)
    return index.image_id_scheme, status


def create_app(
    embedder: Embedder,
    *,
    settings: ApiSettings,
    head: Any | None = None,
    index: EmbeddingIndex | None = None,
    head_source: str | None = None,
    encoder_fingerprint: str | None = None,
    echo_request_id: bool = True,
) -> FastAPI:
    """Build the API around ``embedder``; ``head`` enables /v1/classify, ``index`` /v1/similar.

    Refuses (SecurityConfigError) to build an unprotected app unless ``insecure_local``; raises
    ValueError when the head or index does not fit the model's embedding size, or when either
    was made with another encoder (``encoder_fingerprint`` vs their records; a head must also
    be fitted on the target encoder the server runs). Without ``encoder_fingerprint`` the
    embedder's own ``fingerprint`` is used when it has one (an in-process checkpoint); a Ray
    handle cannot answer synchronously, so the Serve ingress passes it in. The fingerprint is
    also what responses tell of the weights (``model.sha256``): paths are never in a response.
    ``echo_request_id=False`` under Ray Serve, whose proxy already sends ``X-Request-ID``.
    """
    settings.check_startable()
    quiet_multipart_parser()
    info = embedder.info
    if encoder_fingerprint is None:  # also the public identity of the weights (public_model)
        encoder_fingerprint = getattr(embedder, "fingerprint", None)
    labels: list[str] = []
    if head is not None:
        labels = [str(x) for x in head.label_names]
        head_dim = getattr(head, "feature_dim", info.embed_dim)
        if head_dim != info.embed_dim:
            raise ValueError(
                f"probe head expects {head_dim}-dim features but the model produces "
                f"{info.embed_dim}: train a head on this encoder (`radjepa probe`)"
            )
        from radjepa.eval.heads import check_encoder

        check_encoder(head, encoder_fingerprint)
        probe = np.asarray(head.predict_proba(np.zeros((1, info.embed_dim), np.float32)))
        if probe.shape != (1, len(labels)):
            raise ValueError(
                f"probe head output {probe.shape} does not match its {len(labels)} labels"
            )
    if index is not None:
        if index.dim != info.embed_dim:
            raise ValueError(
                f"index {index.source} holds {index.dim}-dim embeddings but the model "
                f"produces {info.embed_dim}: rebuild it with `radjepa embed` for this model"
            )
        index.check_encoder(encoder_fingerprint)

    app = FastAPI(
        title="RadJEPA API",
        version="1",
        description="Chest X-ray embeddings, probe classification and similar-case search. "
        "Send `Authorization: Bearer <key>` on every /v1 route.",
        # a path with a stray trailing slash was a 307 to a Location built from the Host header
        # and the scheme uvicorn saw (http behind a TLS-terminating ingress), which a client
        # follows by sending the image again, before any key check: paths are exact instead
        redirect_slashes=False,
        # the Swagger UI's scripts, and ReDoc's with Google's fonts, come from public CDNs:
        # /docs only where the operator wants it (serve.docs_page), ReDoc never
        docs_url="/docs" if settings.docs_page else None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,  # no OAuth2 here: the bearer key is typed in
    )
    app.state.settings = settings
    app.state.keyring = settings.keyring()
    app.state.embedder = embedder
    app.state.head = head
    app.state.index = index
    app.state.decode_secret = _resolve_decode_secret(settings)
    app.state.upload_pseudonyms = _upload_pseudonyms(index, app.state.decode_secret, settings)
    app.state.image_id_scheme, app.state.image_id_status = _upload_image_ids(
        index, app.state.decode_secret, settings
    )
    gate = app.state.decode_gate = DecodeGate(settings.decode_workers, settings.max_pending_decodes)
    app.state.upload_decoders = UploadDecoders()
    tokens_per_image = (info.img_size // info.patch_size) ** 2 * info.embed_dim
    app.add_middleware(
        GuardMiddleware, max_body_bytes=settings.max_body_bytes, echo_request_id=echo_request_id
    )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(
            request, exc.status, exc.detail, exc.reason, exc.filename, exc.headers
        )

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return error_response(
            request,
            503,
            f"service overloaded: {exc}; retry shortly",
            "overloaded",
            None,
            {"Retry-After": "1"},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
            for e in exc.errors()
        ]
        return error_response(
            request, 422, "; ".join(parts) or "invalid request", "invalid_parameter"
        )

    model_out = public_model(info, encoder_fingerprint)
    head_id = public_head(head, head_source) if head is not None else None
    index_id = public_index(index) if index is not None else None
    log.info(
        "serving %s %s from %s (sha256 %s); head %s from %s; index %s from %s",
        info.name,
        info.version,
        info.source,
        encoder_fingerprint,
        head_id,
        head_source,
        index_id,
        index.source if index is not None else None,
    )
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorOut, "description": text}
        for code, text in {
            401: "missing or invalid API key",
            403: "the API key lacks the scope the request needs",
            413: "body too large",
            415: "unsupported media type or content encoding",
            422: "undecodable image or invalid parameter",
            503: "feature not configured or service overloaded",
            504: "request timed out",
        }.items()
    }
    image_errors = {
        **errors,
        400: {"model": ErrorOut, "description": "malformed or cut-short multipart body"},
    }
    image_body = {
        "requestBody": {
            "required": True,
            "description": "one image as the raw body, or several as multipart files",
            "content": {
                **{
                    m: {"schema": {"type": "string", "format": "binary"}} for m in IMAGE_MEDIA_TYPES
                },
                MULTIPART: {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "files": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                            }
                        },
                    }
                },
            },
        }
    }
    auth = [Depends(require_api_key), Depends(known_query)]  # the key first: 401 before 422

    async def images_and_embeddings(
        request: Request, patch_tokens: bool = False, check: Any = None
    ) -> tuple[list[_Upload], list[ImageEmbedding]]:
        """Read, decode and embed the uploads; ``check(uploads)`` runs between decoding and
        the forward (a refusal that depends on what the files hold costs no encoder time)."""
        with gate.reading():  # counted while the body comes in, not only once decoding
            uploads = await _read_uploads(request, settings)
        if patch_tokens and len(uploads) * tokens_per_image > settings.max_patch_token_values:
            most = max(1, settings.max_patch_token_values // tokens_per_image)
            raise ApiError(
                422,
                f"patch tokens of {len(uploads)} images would be "
                f"{len(uploads) * tokens_per_image} values, over the limit of "
                f"{settings.max_patch_token_values}: send at most {most} image(s) per request "
                "with patch_tokens=true",
                "too_many_images",
            )
        pixels = await gate.run(
            partial(_decode_all, uploads, request.app.state, request_id(request))
        )
        if check is not None:
            check(uploads)
        return uploads, await embedder.embed(pixels, patch_tokens=patch_tokens)

    async def deadline(coro: Any) -> Any:
        try:
            async with asyncio.timeout(settings.request_timeout_s):
                return await coro
        except TimeoutError:
            raise ApiError(
                504, f"request exceeded the {settings.request_timeout_s:g} s limit", "timeout"
            ) from None

    @app.get("/healthz", response_model=Health, tags=["ops"])
    async def healthz() -> Health:
        """Liveness: the process answers (no auth, no model call)."""
        return Health()

    @app.get(
        "/readyz", response_model=Readiness, tags=["ops"], responses={503: {"model": Readiness}}
    )
    async def readyz() -> Readiness | JSONResponse:
        """Readiness: the model answers within a few seconds. Open without a key, so it says
        nothing of what is served (``/v1/models`` does, to key holders)."""
        try:
            async with asyncio.timeout(5.0):
                ok = await embedder.ready()
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            log.warning("readiness check failed", exc_info=True)
            ok = False
        out = Readiness(ready=ok)
        return out if ok else JSONResponse(out.model_dump(), status_code=503)

    @app.get(
        "/v1/models",
        response_model=ModelsResponse,
        tags=["v1"],
        responses=errors,
        dependencies=auth,
    )
    async def models() -> ModelsResponse:
        """The served model, probe head labels and index size."""
        return ModelsResponse(
            model=model_out,
            head=head_id,
            labels=labels,
            index=index_id,
            index_size=index.images if index is not None else 0,
        )

    # HEAD of every GET route (a load balancer's or uptime monitor's probe, `curl -I`): FastAPI
    # routes answer only the methods they list, so these were 405 while /docs answered 200
    for path, endpoint, model, deps in (
        ("/healthz", healthz, Health, None),
        ("/readyz", readyz, Readiness, None),
        ("/v1/models", models, ModelsResponse, auth),
    ):
        app.add_api_route(
            path,
            endpoint,
            methods=["HEAD"],
            response_model=model,
            dependencies=deps,
            include_in_schema=False,
        )

    @app.post(
        "/v1/embed",
        response_model=EmbedResponse,
        tags=["v1"],
        responses=image_errors,
        openapi_extra=image_body,
        dependencies=auth,
    )
    async def embed(
        request: Request,
        patch_tokens: Annotated[bool, Query(description="also return patch tokens")] = False,
    ) -> Response:
        """Pooled embedding per image (DICOM, PNG or JPEG)."""

        async def work() -> Response:
            uploads, results = await images_and_embeddings(request, patch_tokens)

            def body() -> Response:
                outs = [
                    (
                        EmbeddingOut(
                            image_id=up.image_id,
                            filename=shown_filename(up.filename),
                            dim=int(r.embedding.shape[0]),
                            embedding=r.embedding.tolist(),
                            batch_size=r.batch_size,
                        ),
                        r.patch_tokens,
                    )
                    for up, r in zip(uploads, results, strict=True)
                ]
                return Response(embed_response_json(model_out, outs), media_type="application/json")

            # written in a thread, a token row per call: patch tokens at the response limit
            # (2M floats, ~40 MB) held the event loop 0.3 s when FastAPI validated and encoded
            # them in one go there, and every other request of the replica, /healthz too, waited
            return await asyncio.to_thread(body)

        return await deadline(work())

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        tags=["v1"],
        responses=image_errors,
        openapi_extra=image_body,
        dependencies=auth,
    )
    async def classify(request: Request) -> ClassifyResponse:
        """Per-label probabilities from the configured probe head."""
        if head is None:
            raise ApiError(
                503, "no probe head is configured on this server (serve.head)", "no_head"
            )

        async def work() -> ClassifyResponse:
            uploads, results = await images_and_embeddings(request)
            feats = np.stack([r.embedding for r in results]).astype(np.float32)  # [B, D]
            probs = np.asarray(head.predict_proba(feats))  # [B, L]
            return ClassifyResponse(
                model=model_out,
                head=head_id,
                results=[
                    ClassificationOut(
                        image_id=up.image_id,
                        filename=shown_filename(up.filename),
                        probabilities={lab: float(p) for lab, p in zip(labels, row, strict=True)},
                    )
                    for up, row in zip(uploads, probs, strict=True)
                ],
            )

        return await deadline(work())

    @app.post(
        "/v1/similar",
        response_model=SimilarResponse,
        tags=["v1"],
        responses=image_errors,
        openapi_extra=image_body,
        dependencies=auth,
    )
    async def similar(
        request: Request,
        k: Annotated[int, Query(ge=1, le=100, description="neighbours per image")] = 5,
        include_self: Annotated[
            bool,
            Query(
                description="also return archive images that are the uploaded file itself "
                "(same image_id: the uploaded bytes hashed as ingest hashed the archive's); "
                "left out by default"
            ),
        ] = False,
        exclude_patient_pid: Annotated[
            list[PatientPseudonym] | None,
            Query(
                max_length=MAX_EXCLUDED_PATIENTS,
                description="leave out every archive image of this patient pseudonym (a "
                "neighbour's patient_pid); repeat the parameter for several patients",
            ),
        ] = None,
        exclude_same_patient: Annotated[
            bool,
            Query(
                description="leave out every archive image of the uploaded image's own patient: "
                "the patient of its archive row when it is archived, and the pseudonym of a "
                "DICOM upload's PatientID when the server's key is the one the index records "
                "for its shards; each result's same_patient says which applied; takes "
                "precedence over include_self"
            ),
        ] = False,
    ) -> SimilarResponse:
        """Top-k archive images by cosine similarity, with pseudonymised identifiers.

        An archived upload would otherwise be its own first hit at score 1.0, which tells a
        radiologist nothing: it is left out and the next best image takes its place."""
        if index is None:
            raise ApiError(
                503, "no similar-case index is configured on this server (serve.index)", "no_index"
            )
        upload_pids: UploadPseudonyms = request.app.state.upload_pseudonyms
        id_match = _ANSWERED[request.app.state.image_id_status]
        # instance pseudonyms are keyed like the PatientID's: comparable only under that key
        by_instance = _ANSWERED[upload_pids.status].startswith("used")

        def exclusions(up: _Upload, patient_rows: np.ndarray, scores: np.ndarray) -> _Exclusions:
            archived = index.rows_with_image_id(up.image_id)
            if up.instance_pid is not None and by_instance:
                # the archived DICOM instance in other bytes: found by its SOP Instance UID's
                # pseudonym, as ingest found it, when its embedding is the archived one's (from
                # the search's own scores: no second pass over the matrix)
                same = index.rows_of_instance(up.instance_pid, scores=scores)
                archived = np.union1d(archived, same)
            own = np.empty(0, np.int64) if include_self else archived
            patients = patient_rows
            same = None
            if exclude_same_patient:
                row_pids = {index.pids["patient_pid"][r] for r in archived} - {None}
                by_id = "absent" if up.patient_pid is None else _ANSWERED[upload_pids.status]
                pids = row_pids | ({up.patient_pid} if by_id.startswith("used") else set())
                same = SamePatientOut(archive_row=bool(row_pids), patient_id=by_id)
                patients = np.union1d(patients, index.rows_of_patients(pids))
            return _Exclusions(own, patients, same, archived)

        def search_all(
            uploads: list[_Upload], results: list[ImageEmbedding], cancelled: threading.Event
        ) -> list[SimilarOut]:
            # A pass over the whole index (3 GiB at a million rows) on the event loop stalled
            # every other request of the replica, /healthz included: it runs on the gate's
            # pool like decoding. Up to SEARCH_BLOCK uploads share one pass, and the search
            # stops between passes once nobody waits.
            patient_rows = index.rows_of_patients(p.lower() for p in exclude_patient_pid or ())
            found = []
            for start in range(0, len(uploads), SEARCH_BLOCK):
                if cancelled.is_set():
                    raise Cancelled("request abandoned")
                block = uploads[start : start + SEARCH_BLOCK]
                queries = np.stack([r.embedding for r in results[start : start + SEARCH_BLOCK]])
                scores = index.scores(queries)  # the one pass over the matrix for the block
                ex = [exclusions(up, patient_rows, s) for up, s in zip(block, scores, strict=True)]
                hits = [
                    index.top(s, k, np.union1d(e.own, e.patients))
                    for s, e in zip(scores, ex, strict=True)
                ]
                found += [
                    SimilarOut(
                        image_id=up.image_id,
                        filename=shown_filename(up.filename),
                        neighbours=[
                            Neighbour(image_id=h.image_id, score=h.score, **h.pids) for h in hs
                        ],
                        excluded_self=len(e.own),
                        excluded_patient=e.excluded_patient,
                        same_patient=e.same,
                        image_id_match=id_match,
                    )
                    for up, e, hs in zip(block, ex, hits, strict=True)
                ]
            return found

        def check_linkage(uploads: list[_Upload]) -> None:
            # A DICOM the archive does not hold, carrying a PatientID the server would use:
            # leaving its patient out tells the caller, by the count (or by comparing answers
            # with and without the option), whether that patient is in the archive, whatever
            # PatientID the caller wrote into the file. An archived upload reveals nothing
            # more than include_self already does (its own row names its patient), so it
            # stays open to every key. Archived means the same bytes here: a copy of an
            # archived instance in other bytes (recognised for include_self) may carry any
            # PatientID its sender wrote, which would be looked up.
            if not exclude_same_patient or PATIENT_LINKAGE in request_scopes(request):
                return
            if not _ANSWERED[upload_pids.status].startswith("used"):
                return  # the server does not use uploads' PatientIDs at all
            for up in uploads:
                if up.patient_pid is not None and not len(index.rows_with_image_id(up.image_id)):
                    raise ApiError(
                        403,
                        "exclude_same_patient=true with a DICOM the archive does not hold "
                        f"looks its patient up by PatientID, which this API key may not do "
                        f"(scope {PATIENT_LINKAGE!r}); leave the option out or use a key "
                        "granted that scope",
                        "patient_linkage_not_permitted",
                        filename=up.filename,
                    )

        async def work() -> SimilarResponse:
            uploads, results = await images_and_embeddings(request, check=check_linkage)
            found = await gate.run(partial(search_all, uploads, results), continuing=True)
            return SimilarResponse(model=model_out, index_size=index.images, results=found)

        return await deadline(work())

    return app

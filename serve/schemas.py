"""Request/response models of the HTTP API: one pydantic class per resource.

Every route declares ``response_model=`` with these, so the OpenAPI document at
``/openapi.json`` is the exact contract callers (and schemathesis) check against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints
from pydantic_core import to_json

if TYPE_CHECKING:
    import numpy as np

from radjepa.imaging.contract import PSEUDONYM_HEX_CHARS

__all__ = [
    "PatientPseudonym",
    "ModelInfoOut",
    "EmbeddingOut",
    "EmbedResponse",
    "embed_response_json",
    "ClassificationOut",
    "ClassifyResponse",
    "Neighbour",
    "SamePatientOut",
    "SimilarOut",
    "SimilarResponse",
    "ModelsResponse",
    "Health",
    "Readiness",
    "ErrorOut",
]


# what ingest writes (keyed HMAC, hex): anything else cannot match an archive row, so a typo or a
# raw PatientID is refused rather than silently filtering nothing
PatientPseudonym = Annotated[
    str, StringConstraints(pattern=f"^[0-9a-fA-F]{{{PSEUDONYM_HEX_CHARS}}}$")
]


class ModelInfoOut(BaseModel):
    """Which weights produced an answer: enough to reproduce it later."""

    name: str = Field(description="model name (registry name or training run name)")
    version: str = Field(description="registry version, or 'step-N' for a checkpoint folder")
    step: int | None = Field(None, description="training step of the checkpoint")
    arch: str = Field(description="encoder architecture, e.g. vit_base")
    patch_size: int
    img_size: int = Field(description="model input size in pixels")
    embed_dim: int
    # never a path: where the weights lie on the server is for its log, not for callers
    reference: str | None = Field(
        None,
        description="models:/<name>/<version> when the weights are a registered model version "
        "(pinned, even when the server was given an alias); null for a checkpoint folder",
    )
    sha256: str | None = Field(
        None,
        description="the checkpoint's content fingerprint (sha256 of its weights and metadata): "
        "the encoder_sha256 that probe heads and indexes made with it record",
    )


class EmbeddingOut(BaseModel):
    """The pooled embedding of one image (and optionally its patch tokens)."""

    image_id: str = Field(
        description="the id ingest gives these bytes in the archive this server searches: "
        "HMAC-SHA256 of the uploaded bytes under the pseudonymisation key (the plain SHA-256 "
        "for an index of a destination made before ids were keyed), 64 hex characters"
    )
    filename: str | None = Field(None, description="multipart file name, when given")
    dim: int
    embedding: list[float] = Field(description="target encoder, average-pooled over patches")
    patch_tokens: list[list[float]] | None = Field(
        None, description="[num_patches][dim] token embeddings, only with ?patch_tokens=true"
    )
    batch_size: int = Field(
        description="images in the encoder forward pass that computed this embedding "
        "(> 1 when concurrent requests were batched together)"
    )


class EmbedResponse(BaseModel):
    model: ModelInfoOut
    results: list[EmbeddingOut]


def embed_response_json(
    model: ModelInfoOut, results: Sequence[tuple[EmbeddingOut, np.ndarray | None]]
) -> bytes:
    """An :class:`EmbedResponse` as JSON, each result's ``patch_tokens`` (a [tokens, dim] array,
    or None) written one token row per call.

    One call that writes 2M floats holds the GIL, and with it the replica's event loop, from
    start to end, even in a worker thread; between rows the loop runs. A non-finite value is
    ``null``, as the model writes it (``NaN`` is not JSON)."""
    parts = [b'{"model":', model.model_dump_json().encode(), b',"results":[']
    for i, (out, tokens) in enumerate(results):
        parts.append(b"," if i else b"")
        parts.append(out.model_dump_json(exclude={"patch_tokens"}).encode()[:-1])
        if tokens is None:
            parts.append(b',"patch_tokens":null}')
        else:
            parts += [
                b',"patch_tokens":[',
                b",".join(to_json(row.tolist(), inf_nan_mode="null") for row in tokens),
            ]
            parts.append(b"]}")
    parts.append(b"]}")
    return b"".join(parts)


class ClassificationOut(BaseModel):
    image_id: str
    filename: str | None = None
    probabilities: dict[str, float] = Field(description="label -> probability from the probe head")


class ClassifyResponse(BaseModel):
    model: ModelInfoOut
    head: str = Field(description="probe head the probabilities came from (as in /v1/models)")
    results: list[ClassificationOut]


class Neighbour(BaseModel):
    """One archive image; identifiers are keyed pseudonyms, never raw DICOM identifiers."""

    image_id: str
    score: float = Field(description="cosine similarity in [-1, 1]")
    patient_pid: str | None = None
    study_pid: str | None = None
    series_pid: str | None = None
    instance_pid: str | None = None


class SamePatientOut(BaseModel):
    """How ``exclude_same_patient=true`` found the upload's own patient, so a client can tell
    "no other image of this patient in the archive" from "the patient could not be identified"."""

    archive_row: bool = Field(
        description="the upload is archived and its archive row names a patient, whose images "
        "were left out"
    )
    patient_id: Literal["used", "used_unverified", "key_mismatch", "absent"] = Field(
        description="the upload's own DICOM PatientID: 'used' (pseudonymised with the key and "
        "patient identity scheme the index's shards were ingested with, and its patient's "
        "images left out); 'used_unverified' (used, but the index does not record one key and "
        "one scheme for all its shards, so it may match nothing or only some of them); "
        "'key_mismatch' (the server's key is not the ingest key: it could match no archive "
        "patient and was not used, so only archive_row applies); 'absent' (a PNG/JPEG, or a "
        "DICOM without PatientID)"
    )


class SimilarOut(BaseModel):
    image_id: str = Field(description="as in /v1/embed: comparable with neighbours' image_id")
    filename: str | None = None
    neighbours: list[Neighbour]
    excluded_self: int = Field(
        0,
        description="archive images left out because they are the uploaded file itself (same "
        "image_id); 0 with include_self=true. Above 0 also says the upload is archived",
    )
    excluded_patient: int = Field(
        0,
        description="other archive images left out because their patient was excluded "
        "(exclude_patient_pid, or the upload's own with exclude_same_patient); the upload's own "
        "archive rows are never counted here (excluded_self counts them, 0 with "
        "include_self=true)",
    )
    same_patient: SamePatientOut | None = Field(
        None,
        description="with exclude_same_patient=true: how the upload's patient was identified; "
        "null otherwise",
    )
    image_id_match: Literal["used", "used_unverified", "key_mismatch"] = Field(
        "used",
        description="whether image_id can equal the archive row of the same file, on which "
        "include_self, excluded_self and same_patient.archive_row rest: 'used' (made as ingest "
        "made the index's ids); 'used_unverified' (keyed ids, but the index does not record one "
        "key for all its rows, so an archived upload may go unrecognised); 'key_mismatch' (the "
        "index's ids are keyed with another key than the server's: no archived upload can be "
        "recognised, so it may come back as its own first hit at score 1.0)",
    )


class SimilarResponse(BaseModel):
    model: ModelInfoOut
    index_size: int
    results: list[SimilarOut]


class ModelsResponse(BaseModel):
    model: ModelInfoOut
    head: str | None = Field(
        None,
        description="probe head identity, when /v1/classify is enabled: its models:/ reference, "
        "or sha256:<16 hex> of its parameters and labels",
    )
    labels: list[str] = Field(default_factory=list)
    index: str | None = Field(
        None,
        description="index identity, when /v1/similar is enabled: sha256:<16 hex> of the image "
        "ids it holds",
    )
    index_size: int = 0


class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    ready: bool


class ErrorOut(BaseModel):
    """Every error body: a human-readable message and, for rejected images, a machine reason."""

    detail: str
    reason: str | None = Field(None, description="machine-readable cause, e.g. 'not_an_image'")
    filename: str | None = Field(
        None,
        description="the multipart file part the error is about: its printable characters, "
        "at most 120",
    )
    request_id: str | None = Field(
        None,
        description="the request's id, also in the X-Request-ID response header and in the "
        "server log: quote it when reporting a problem",
    )

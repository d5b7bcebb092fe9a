"""De-identification by allow-list: only the fields named here ever leave the decoder.

Identifiers become keyed HMAC-SHA256 pseudonyms (stable for one secret, so studies still group
by patient across runs, but not reversible or linkable without the key). Free-text fields are
kept only when they come from a closed vocabulary; age comes from PatientAge, never from a birth
date; names, dates, accession numbers, institutions and paths are never read into the output.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any, Final

from radjepa.imaging.contract import AGE_CAP_YEARS, PSEUDONYM_HEX_CHARS
from radjepa.imaging.value_validation import without_value_validation

__all__ = [
    "DEV_SECRET",
    "ID_SCHEMES",
    "ID_SCHEME_KEYED",
    "ID_SCHEME_UNKEYED",
    "DevelopmentKeyRefused",
    "SecretRefused",
    "ISSUER_AND_PATIENT_ID",
    "PATIENT_ID",
    "PATIENT_IDENTITIES",
    "PHOTOMETRICS",
    "age_years",
    "check_patient_identity",
    "dicom_meta",
    "check_id_scheme",
    "content_id",
    "keyed_hash",
    "patient_issuer",
    "patient_pseudonym",
    "pseudonym",
    "resolve_secret",
    "key_fingerprint",
]

log = logging.getLogger(__name__)

# Documented, deliberately non-secret key. Ingest must be stable across re-runs (the same
# patient gets the same pseudonym, so idempotent re-runs and patient-grouped splits work), so a
# per-run random key would be wrong; it is used only when a config opts in
# (``ingest.allow_development_key``: the bundled sample, tests), because anyone holding this
# key can test guesses of IDs and link any file to its row.
DEV_SECRET = b"radjepa-development-key-NOT-A-SECRET"
# the shortest pseudonymisation key taken for real data (openssl rand -hex 32 gives 64)
MIN_SECRET_CHARS = 16

# How an image's id (``image_id``, the quarantine's ``sha256``) is made from the file's bytes.
# The unkeyed SHA-256 was the only scheme before ids were keyed: whoever holds the original
# file (or guesses a small quarantined one) can compute it and find the row, so it is a
# re-identification code derived from the individual's data (HIPAA 164.514(c)). New
# destinations use an HMAC under the pseudonymisation key; a destination keeps the scheme it
# was started with, or re-runs would no longer recognise the files it holds.
ID_SCHEME_UNKEYED: Final = "sha256"
ID_SCHEME_KEYED: Final = "hmac-sha256"
ID_SCHEMES: Final = (ID_SCHEME_KEYED, ID_SCHEME_UNKEYED)

# What names a patient (``ingest.patient_identity``). A DICOM PatientID is unique only within
# the authority that issued it: in an archive pooled from several sites, two sites' "12345"
# are two people, so the pseudonym must cover the issuer too. PatientID alone stays the
# default because it is what every existing destination was pseudonymised with.
PATIENT_ID: Final = "patient_id"
ISSUER_AND_PATIENT_ID: Final = "issuer_and_patient_id"
PATIENT_IDENTITIES: Final = (PATIENT_ID, ISSUER_AND_PATIENT_ID)

_VIEW_POSITIONS = frozenset(
    {
        "AP",
        "PA",
        "LL",
        "RL",
        "LAT",
        "LATERAL",
        "LLD",
        "RLD",
        "LPO",
        "RPO",
        "LAO",
        "RAO",
        "AP_SUPINE",
    }
)
_MODALITIES = frozenset(
    {"CR", "DX", "DR", "RG", "MG", "CT", "MR", "US", "XA", "RF", "PX", "IO", "NM", "PT", "OT", "SC"}
)
PHOTOMETRICS = frozenset(
    {
        "MONOCHROME1",
        "MONOCHROME2",
        "RGB",
        "PALETTE COLOR",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_ICT",
        "YBR_RCT",
        "YBR_PARTIAL_420",
    }
)
_SEX = frozenset({"M", "F", "O"})
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_AGE = re.compile(r"^(\d{1,3})([DWMY])$")


class SecretRefused(ValueError):
    """The pseudonymisation key cannot be used (the message says why, never the key)."""


class DevelopmentKeyRefused(SecretRefused):
    """No pseudonymisation key is set and the config does not opt in to the public one."""


def resolve_secret(
    env_name: str = "RADJEPA_DEID_SECRET", *, allow_development_key: bool = False, warn: bool = True
) -> bytes:
    """The pseudonymisation key from ``env_name``.

    Unset, it is refused (:class:`DevelopmentKeyRefused`) unless ``allow_development_key``
    (``ingest.allow_development_key``): falling back to the public key with only a warning let
    a forgotten variable pseudonymise real patients with a key anyone can read, and the warning
    scrolls by in a Ray Job log. With the opt-in it is used, still with a loud warning. A value
    that is not UTF-8 text is refused too (:class:`SecretRefused`, the base of both); one
    shorter than ``MIN_SECRET_CHARS`` is warned about.
    ``warn=False``: the same key, its warnings (public key, short, whitespace) left unsaid, for
    a process whose caller said them already for this environment (refusals still raise).
    """
    value = os.environ.get(env_name, "")
    if value:
        try:
            key = value.encode("utf-8")
        except UnicodeEncodeError:
            # bytes that are not UTF-8 reach Python as surrogates; encoding them raised a
            # traceback in whichever process read the key first (a Ray task, for serve)
            raise SecretRefused(
                f"{env_name} is not UTF-8 text: set it to printable characters, e.g. "
                f"`export {env_name}=$(openssl rand -hex 32)`"
            ) from None
        if len(value) < MIN_SECRET_CHARS and warn:
            # a short key is guessed offline from the key fingerprint every destination and
            # index records (a site name and a year: 137 guesses), and every pseudonym with it.
            # Said, not refused: a new key re-keys every archive already pseudonymised with it.
            log.warning(
                "%s is shorter than %d characters: pseudonyms are weakly keyed (the key "
                "fingerprint a destination records confirms a guessed key). For new archives, "
                "use a long random value, e.g. `openssl rand -hex 32`",
                env_name,
                MIN_SECRET_CHARS,
            )
        if value != value.strip() and warn:
            # used as is (trimming would re-key existing archives), but a key read from a mounted
            # file on one machine and typed on another differ by that newline: every patient gets
            # a second pseudonym, and only ingest into the same destination would notice
            log.warning(
                "%s starts or ends with whitespace (a newline from a mounted file?): it is used "
                "exactly as is, so set it the same way everywhere",
                env_name,
            )
        return key
    if not allow_development_key:
        raise DevelopmentKeyRefused(
            f"{env_name} is not set: set it to a long random value and keep it (e.g. "
            f"`export {env_name}=$(openssl rand -hex 32)`), or, for the bundled sample and "
            "tests only, opt in to the PUBLIC development key with "
            "ingest.allow_development_key=true"
        )
    if warn:
        log.warning(
            "%s is not set: pseudonymising with the PUBLIC development key. Pseudonyms are stable "
            "but NOT secret; set %s to a long random value for real patient data.",
            env_name,
            env_name,
        )
    return DEV_SECRET


# modalities whose images routinely carry identifying text in their pixels (PS3.15 E.3.1,
# Note 1: "Ultrasound images routinely do"), and screen or film captures
_BURNS_IN = frozenset({"US", "IVUS", "XA", "RF", "ES", "XC", "OT", "SC"})
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame family (.7.1 ...)
# a secondary capture saying it holds a radiograph (a digitised film, the public CXR sets
# stored as SC with Modality CR) is judged as a radiograph
_RADIOGRAPHS = frozenset({"CR", "DX", "RG"})


def burned_in_text(ds: Any) -> str | None:
    """Why a DICOM's pixels may hold identifying text header de-identification cannot remove,
    or None.

    Flagged ``YES`` (in any value of a multi-valued flag: ``YES\\NO`` was read as a list and
    stored); or unflagged (absent, empty, or neither YES nor NO) on a modality or a secondary
    capture that routinely burns text in. Cleaned data carries ``NO`` (PS3.15 E.3.1), which
    passes. A DX or CR without the flag passes, a secondary capture of one too: radiographs are
    not where text is burned in.
    """
    raw = ds.get("BurnedInAnnotation")
    many = isinstance(raw, Sequence) and not isinstance(raw, (str, bytes))  # pydicom MultiValue
    values = [str(v).strip().upper() for v in (raw if many else [raw])]
    if "YES" in values:
        return "Burned In Annotation is YES: the pixels carry identifying text"
    if "NO" in values:
        return None
    modality = str(ds.get("Modality") or "").strip().upper()
    sop_class = str(ds.get("SOPClassUID") or "").strip()
    capture = sop_class == _SECONDARY_CAPTURE or sop_class.startswith(_SECONDARY_CAPTURE + ".")
    if modality in _BURNS_IN or (capture and modality not in _RADIOGRAPHS):
        kind = "a secondary capture" if modality not in _BURNS_IN else f"modality {modality}"
        return (
            f"Burned In Annotation is not NO on {kind}, whose pixels routinely carry identifying "
            "text"
        )
    return None


def key_fingerprint(secret: bytes) -> str:
    """A short, non-reversible tag of the key, kept in an ingest manifest: a later run into the
    same destination with another key would give the same patient a second pseudonym and
    silently split patient-grouped evaluation, so ingest compares tags before writing."""
    return keyed_hash(secret, "key-fingerprint", "radjepa")[:16]


def check_id_scheme(scheme: str) -> str:
    """``scheme`` if it is one of :data:`ID_SCHEMES`, else ValueError naming them."""
    if scheme not in ID_SCHEMES:
        raise ValueError(f"unknown image id scheme {scheme!r}; expected one of {ID_SCHEMES}")
    return scheme


def content_id(data: bytes, secret: bytes, scheme: str = ID_SCHEME_KEYED) -> str:
    """An image's id from its file's bytes, 64 hex characters (the dedup key of ingest, and how
    the API recognises an upload that is archived).

    ``hmac-sha256``: HMAC-SHA256 under ``secret`` in a domain of its own (no patient pseudonym
    can equal an image id), so only a key holder can link a file to its row. ``sha256``: the
    unkeyed hash of destinations made before ids were keyed (:data:`ID_SCHEME_UNKEYED`).
    """
    if check_id_scheme(scheme) == ID_SCHEME_UNKEYED:
        return hashlib.sha256(data).hexdigest()
    mac = hmac.new(secret, b"image-id\x00", hashlib.sha256)
    mac.update(data)
    return mac.hexdigest()


def keyed_hash(secret: bytes, domain: str, value: str) -> str:
    """HMAC-SHA256 of ``value`` under ``secret``, domain-separated, as 32 hex characters."""
    msg = domain.encode("utf-8") + b"\x00" + value.encode("utf-8", "surrogatepass")
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()[:PSEUDONYM_HEX_CHARS]


def pseudonym(secret: bytes, domain: str, value: Any) -> str | None:
    """Keyed pseudonym of an identifier, None when the identifier is absent or blank."""
    if value is None:
        return None
    text = str(value).strip()
    return keyed_hash(secret, domain, text) if text else None


def check_patient_identity(scheme: str) -> str:
    """``scheme`` if it is one of :data:`PATIENT_IDENTITIES`; raised as ValueError before any
    file is decoded (inside the decoder it would quarantine every file as a decode error)."""
    if scheme not in PATIENT_IDENTITIES:
        raise ValueError(
            f"unknown patient identity scheme {scheme!r}; expected one of {PATIENT_IDENTITIES}"
        )
    return scheme


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


@without_value_validation
def patient_issuer(ds: Any) -> tuple[str, str, str] | None:
    """The assigning authority of ``PatientID`` (HL7 CX.4): IssuerOfPatientID (its namespace)
    and, from the first IssuerOfPatientIDQualifiersSequence item, UniversalEntityID and
    UniversalEntityIDType; None when all three are blank (the file does not say).

    A qualifiers element that is not a sequence of items (written with another VR by a broken
    exporter) is read as absent: under the issuer scheme it had quarantined the whole image as
    a decode error, though it only refines an issuer the file may still name.
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    namespace = _text(ds.get("IssuerOfPatientID"))
    universal, universal_type = "", ""
    qualifiers = ds.get("IssuerOfPatientIDQualifiersSequence")
    item = qualifiers[0] if isinstance(qualifiers, Sequence) and len(qualifiers) else None
    if isinstance(item, Dataset):
        universal = _text(item.get("UniversalEntityID"))
        universal_type = _text(item.get("UniversalEntityIDType")).upper()  # a CS: case-free
    issuer = (namespace, universal, universal_type)
    return issuer if any(issuer) else None


@without_value_validation
def patient_pseudonym(secret: bytes, ds: Any, scheme: str = PATIENT_ID) -> str | None:
    """The patient's keyed pseudonym under ``scheme`` (None without a PatientID).

    With ``issuer_and_patient_id`` the HMAC covers the issuer and the id as a JSON array, in a
    domain of its own: the encoding is injective, so no split of the same characters between
    issuer and id ("12"+"345" vs "123"+"45") can collide. A file whose issuer is blank gets
    the plain PatientID pseudonym: it carries no more information than under the plain scheme,
    so the "same patient" relation is the same, and a site that never filled the issuer keeps
    the pseudonyms its images had before the archive was pooled (its probe label files and
    exclusion lists stay valid). Such patients are still told apart from every patient whose
    file names an issuer; two sites that both leave it blank cannot be told apart by anyone.
    """
    patient_id = _text(ds.get("PatientID"))
    if not patient_id:
        return None
    issuer = patient_issuer(ds) if check_patient_identity(scheme) == ISSUER_AND_PATIENT_ID else None
    if issuer is None:
        return keyed_hash(secret, "patient", patient_id)
    return keyed_hash(secret, "patient-issuer", json.dumps([*issuer, patient_id]))


def age_years(patient_age: Any) -> int | None:
    """Whole years from a DICOM AS string ('045Y', '006M', '010W', '003D'), capped at 90."""
    if patient_age is None:
        return None
    m = _AGE.match(str(patient_age).strip().upper())
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2)
    days = {"D": 1.0, "W": 7.0, "M": 365.25 / 12.0, "Y": 365.25}[unit]
    years = int(n * days // 365.25) if unit != "Y" else n
    return min(years, AGE_CAP_YEARS)


def _vocab(value: Any, allowed: frozenset[str]) -> str | None:
    if value is None:
        return None
    text = str(value).strip().upper()
    if not text:
        return None
    return text if text in allowed else "OTHER"


# Manufacturer (LO) is free text: some writers (secondary capture, scanning software, a site's
# own tools) put the site's or PACS's name there, or worse. Only a vendor of this closed list
# leaves the decoder, as its canonical name; anything else is OTHER. Each vendor's names are
# whole words, or runs of them (GENERAL ELECTRIC), in the value's words; a name ending in *
# is a prefix of a word (FUJIFILM, Fuji Photo Film). GE alone is a word too common in other
# text, so it counts only as the first word.
_VENDORS: Final = (
    ("GE", ("GENERAL ELECTRIC", "GEHC")),
    ("KONICA MINOLTA", ("KONICAMINOLTA",)),
    ("IMAGING DYNAMICS", ("IMAGING DYNAMICS",)),
    ("UNITED IMAGING", ("UNITED IMAGING",)),
    ("SIEMENS", ("SIEMENS",)),
    ("PHILIPS", ("PHILIPS",)),
    ("CARESTREAM", ("CARESTREAM", "KODAK")),
    ("FUJIFILM", ("FUJI*",)),
    ("AGFA", ("AGFA",)),
    ("CANON", ("CANON", "TOSHIBA")),
    ("KONICA MINOLTA", ("KONICA", "MINOLTA")),
    ("SAMSUNG", ("SAMSUNG",)),
    ("HOLOGIC", ("HOLOGIC",)),
    ("SHIMADZU", ("SHIMADZU",)),
    ("HITACHI", ("HITACHI",)),
    ("DRGEM", ("DRGEM",)),
    ("VIEWORKS", ("VIEWORKS",)),
    ("RAYENCE", ("RAYENCE",)),
    ("SWISSRAY", ("SWISSRAY",)),
    ("MINDRAY", ("MINDRAY",)),
    ("VAREX", ("VAREX", "VARIAN")),
    ("TRIXELL", ("TRIXELL", "THALES")),
    ("DRTECH", ("DRTECH",)),
    ("ICRCO", ("ICRCO",)),
    ("SEDECAL", ("SEDECAL",)),
    ("IMAGING DYNAMICS", ("IDC",)),
    ("UNITED IMAGING", ("UIH",)),
    ("PERLOVE", ("PERLOVE",)),
    ("WANDONG", ("WANDONG",)),
)


def _manufacturer(value: Any) -> str | None:
    """The vendor ``value`` names, from :data:`_VENDORS`, else ``OTHER``; None when absent."""
    if value is None:
        return None
    words = re.findall(r"[A-Z0-9]+", str(value).upper())
    if not words:
        return None
    if words[0] in ("GE", "GEMS", "GEHC"):
        return "GE"
    said = f" {' '.join(words)} "

    def named(name: str) -> bool:
        if name.endswith("*"):
            return any(w.startswith(name[:-1]) for w in words)
        return f" {name} " in said

    return next((vendor for vendor, names in _VENDORS if any(map(named, names))), "OTHER")


def _spacing(ds: Any) -> float | None:
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        pair = positive_pair(ds.get(key))
        if pair is not None and pair[0] < 100.0:
            return pair[0]
    return None


def positive_pair(value: Any) -> tuple[float, float] | None:
    """Two positive finite numbers from a two-valued element (a spacing: row, then column),
    else None (absent, one value, which says neither axis, an unparsable or non-positive
    one)."""
    if isinstance(value, (str, bytes)):  # one value under a text VR: '12' is not (1, 2)
        return None
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError, OverflowError):  # absent, a single value, not numbers
        return None
    if len(numbers) != 2 or not all(math.isfinite(v) and v > 0 for v in numbers):
        return None
    return numbers[0], numbers[1]


@without_value_validation
def dicom_meta(
    ds: Any, secret: bytes, transfer_syntax: str | None, patient_identity: str = PATIENT_ID
) -> dict[str, Any]:
    """The allow-listed metadata of a pydicom dataset (identifiers pseudonymised; the patient
    by ``patient_identity``, see :func:`patient_pseudonym`)."""
    ts = str(transfer_syntax) if transfer_syntax else None
    return {
        "patient_pid": patient_pseudonym(secret, ds, patient_identity),
        "study_pid": pseudonym(secret, "study", ds.get("StudyInstanceUID")),
        "series_pid": pseudonym(secret, "series", ds.get("SeriesInstanceUID")),
        "instance_pid": pseudonym(secret, "instance", ds.get("SOPInstanceUID")),
        "sex": _vocab(ds.get("PatientSex"), _SEX),
        "age_years": age_years(ds.get("PatientAge")),
        "view_position": _vocab(ds.get("ViewPosition"), _VIEW_POSITIONS),
        "modality": _vocab(ds.get("Modality"), _MODALITIES),
        "manufacturer": _manufacturer(ds.get("Manufacturer")),
        "photometric": _vocab(ds.get("PhotometricInterpretation"), PHOTOMETRICS),
        "transfer_syntax": ts if ts and _UID.match(ts) else None,
        "pixel_spacing_mm": _spacing(ds),
    }

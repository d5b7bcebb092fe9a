"""The similar-case index: archive embeddings (written by ``radjepa embed``) searched by cosine.

The archive is small enough to hold as one normalised float32 matrix per replica (1M x 768 is
3 GiB; a typical department archive is far smaller), so exact search is a single matrix-vector
product and needs no approximate-search dependency. The ids and pseudonyms beside it are held
as fixed-width bytes (:class:`serve.ids.IdColumn`, under 200 bytes a row against the matrix's
3 KB), so the matrix is what a replica's memory is spent on.

A query image that is itself archived would be its own best hit (cosine 1.0): callers exclude
rows by image id (made from the original file bytes as ingest made it: the index records how,
``image_id_scheme``, keyed ``hmac-sha256`` or the unkeyed ``sha256`` of older destinations;
one scheme per index) or by patient pseudonym, and the excluded rows are masked before the
top-k is taken, so a search still returns ``k`` hits when the index holds that many others.

Embeddings are only comparable with queries embedded by the same weights: the index records
its encoder's checkpoint fingerprint (``encoder_sha256``) and the server refuses an index built
with another checkpoint (:meth:`EmbeddingIndex.check_encoder`).

Patient pseudonyms are only comparable under the key and the patient identity scheme that made
them: the index records both for its shards (``pseudonym_key_fingerprint``,
``patient_identity``), so a server pseudonymising an upload's own PatientID can tell whether
the result can match an archive row (:meth:`EmbeddingIndex.upload_pseudonyms`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from radjepa.imaging.contract import PID_FIELDS
from radjepa.imaging.deid import (
    ID_SCHEME_UNKEYED,
    ID_SCHEMES,
    PATIENT_ID,
    PATIENT_IDENTITIES,
)
from serve.ids import IdColumn

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

__all__ = [
    "ENCODER_COLUMN",
    "IMAGE_ID_SCHEME_COLUMN",
    "INCOMPLETE_MARKER",
    "PARTS_RECORD",
    "PATIENT_IDENTITY_COLUMN",
    "PID_COLUMNS",
    "PSEUDONYM_KEY_COLUMN",
    "SAME_INSTANCE_MIN_COSINE",
    "SAME_INSTANCE_MIN_MARGIN",
    "EmbeddingIndex",
    "Hit",
    "IndexLoadError",
    "UploadPseudonyms",
    "upload_image_ids",
    "upload_pseudonyms",
]

log = logging.getLogger(__name__)

PID_COLUMNS = PID_FIELDS
PATIENT_PID = "patient_pid"  # the pseudonym column exclusions look patients up in
INSTANCE_PID = "instance_pid"  # the one an archived DICOM is also recognised by
# searchable pseudonym columns (each keeps an 8-byte-a-row sort order)
_SEARCHED_PIDS = (PATIENT_PID, INSTANCE_PID)
# When an archive row of an upload's DICOM instance counts as the upload itself. A copy of the
# instance in another lossless transfer syntax or with a re-written header decodes to the same
# pixels and embeds to the same vector (cosine 1 up to float rounding), so the row must be that
# close, and closer than every row of another image by a clear margin. A file that only carries
# an archived instance's SOP Instance UID (a UID reused by an editing tool, or copied into a
# crafted file) is not taken for it, so knowing a UID without the image tells a caller nothing
# of the archive: the margin keeps that so for an encoder that embeds many radiographs almost
# alike (an uncentred mean-pooled embedding of one modality can put two images above 0.99, and
# a barely trained or collapsed encoder puts them all there). A lossy re-export falls below:
# it is then treated as a file the archive does not hold, as before instances were compared.
SAME_INSTANCE_MIN_COSINE = 0.9999
SAME_INSTANCE_MIN_MARGIN = 0.001
# the checkpoint fingerprint (radjepa.eval.heads.checkpoint_fingerprint) of the embedding model
ENCODER_COLUMN = "encoder_sha256"
# radjepa.imaging.deid.key_fingerprint of the key that made the shards' pseudonyms, and the
# ingest.patient_identity scheme they follow (both from the ingest key record)
PSEUDONYM_KEY_COLUMN = "pseudonym_key_fingerprint"
PATIENT_IDENTITY_COLUMN = "patient_identity"
# how the shards' image ids were made from the file bytes (radjepa.imaging.deid.content_id):
# null in parts embedded before it was recorded, whose ids are the unkeyed SHA-256
IMAGE_ID_SCHEME_COLUMN = "image_id_scheme"
# written into the index folder by `radjepa embed` before its first part and removed once the
# last one is written: Ray Data writes each part straight into the folder, so an interrupted run
# leaves a folder of valid Parquet that holds only some of the archive
INCOMPLETE_MARKER = "_EMBED_INCOMPLETE"
# written by `radjepa embed` once every part is in the folder: each part's name (relative to the
# folder) and rows. A copy of the folder that lost a part (a sync cut short, a part deleted by
# hand) or gained one (a file of another index dropped in) loaded as another archive, and
# searches missed or invented rows without a word; such a folder is refused. Folders embedded
# before the record existed hold none and are read as before.
PARTS_RECORD = "_index.json"
_BATCH_ROWS = 16384  # rows decoded at once while loading (~50 MB of 768-d embeddings)
# columns holding one value for the whole index (each part records it on every row)
_RECORD_COLUMNS = (
    ENCODER_COLUMN,
    "model",
    PSEUDONYM_KEY_COLUMN,
    PATIENT_IDENTITY_COLUMN,
    IMAGE_ID_SCHEME_COLUMN,
)
_LOADED_COLUMNS = ("image_id", "embedding", *PID_COLUMNS, *_RECORD_COLUMNS)


class IndexLoadError(ValueError):
    """The index file is missing, empty or does not fit the served model."""


@dataclass(frozen=True)
class UploadPseudonyms:
    """How the server pseudonymises an upload's own PatientID for ``exclude_same_patient``.

    ``status``: ``verified`` (the server's key is the one the index's shards were ingested
    with), ``unverified`` (the index records no key, or its parts disagree on the key or the
    scheme: the pseudonym is used, but may match nothing), ``key_mismatch`` (another key: the
    pseudonym could match no archive row and is not used). ``scheme`` is the index's patient
    identity scheme (``patient_id`` when it records none: the only scheme before there was a
    choice).
    """

    status: str
    scheme: str


@dataclass
class Hit:
    image_id: str
    score: float
    pids: dict[str, str | None]


class EmbeddingIndex:
    """Row-normalised embeddings with their image ids and pseudonymised identifiers.

    ``image_ids`` and each ``pids[column]`` are :class:`serve.ids.IdColumn`: read-only
    sequences of ``str`` or None (one per row) that compare equal to lists of the same values."""

    def __init__(
        self,
        embeddings: np.ndarray,
        image_ids: Sequence[str | None] | IdColumn | pa.Array | pa.ChunkedArray,
        pids: dict[str, Sequence[str | None] | IdColumn | pa.Array | None] | None = None,
        *,
        source: str = "<memory>",
        encoder_fingerprint: str | None = None,
        model: str | None = None,
        pseudonym_key: str | None = None,
        patient_identity: str | None = None,
        image_id_scheme: str = ID_SCHEME_UNKEYED,
        copy: bool = True,
    ) -> None:
        """``copy=False`` lets the index normalise ``embeddings`` in place and keep it (a
        float32 array nothing else uses): an archive's matrix is the replica's largest object.
        ``image_ids`` and ``pids`` may be lists, Arrow string arrays or columns already built; a
        pseudonym column left out holds nulls."""
        if embeddings.ndim != 2 or embeddings.shape[0] != len(image_ids):
            raise IndexLoadError(
                f"embeddings {embeddings.shape} do not match {len(image_ids)} image ids"
            )
        if embeddings.shape[0] == 0:
            raise IndexLoadError(f"index {source} holds no embeddings")
        n = len(image_ids)
        # searchable columns keep a sort order, built once so that each request's exclusions
        # cost a binary search, not a scan of every row
        try:
            self.image_ids = IdColumn.of(image_ids, n, searchable=True)
            self.pids = {
                # an empty or missing column holds nulls, as the lists it replaced did
                c: IdColumn.of((pids or {}).get(c) or None, n, searchable=c in _SEARCHED_PIDS)
                for c in PID_COLUMNS
            }
        except ValueError as err:  # a pseudonym column of another length than the ids
            raise IndexLoadError(f"index {source}: {err}") from None
        self.matrix = _unit_rows(np.array(embeddings, dtype=np.float32, copy=copy))  # [N, D]
        # runs over one DST each embed all of it: served under one parent, every image they
        # share took two places in a neighbour list, the same case shown twice
        self._repeats = self.image_ids.repeated_rows()
        self._is_repeat = np.zeros(n, bool)
        self._is_repeat[self._repeats] = True
        if len(self._repeats):
            log.warning(
                "index %s holds %d row(s) whose image another row holds (embed runs over the "
                "same shards under one folder?): each image is answered once; serve the newest "
                "run's folder alone to save their memory",
                source,
                len(self._repeats),
            )
        self.source = source
        self.encoder_fingerprint = encoder_fingerprint  # None: built before it was recorded
        self.model = model
        self.pseudonym_key = pseudonym_key  # None: the shards' key is not recorded
        self.patient_identity = patient_identity
        self.image_id_scheme = image_id_scheme  # how an upload is hashed to find its own row

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def images(self) -> int:
        """The images the index answers: its rows, a row whose image another row holds (two
        embed runs under one parent) counted once, as a search counts it."""
        return len(self) - len(self._repeats)

    @property
    def ids_nbytes(self) -> int:
        """Bytes held by the ids and pseudonyms with their lookups (the matrix aside)."""
        return self.image_ids.nbytes + sum(c.nbytes for c in self.pids.values())

    @classmethod
    def from_parquet(cls, path: str | Path) -> EmbeddingIndex:
        """Read one Parquet file or a folder of them (Ray Data writes a folder).

        The embeddings are decoded a batch of rows at a time and copied once into the one
        matrix the index keeps, then normalised there. Reading all parts as one table and
        converting it held the decoded pages and four more copies of the matrix at once
        (``bench/index.py`` measures both ways)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        p, files, expected = _index_parts(path)
        if expected is None and p.is_dir():
            # a copy that left out the underscore files (`cp *.parquet`, a sync of *.parquet)
            # and a part is served as a smaller archive without a word
            log.warning(
                "index %s has no %s: that no part is missing cannot be checked; serve the "
                "folder `radjepa embed` wrote, copied whole",
                p,
                PARTS_RECORD,
            )
        counts = [_part_rows(f) for f in files]
        for f, n in zip(files, counts, strict=True):
            _check_part_rows(f, n, expected)
        parts = _Parts(p, sum(counts))
        for f in files:
            try:
                # pre_buffer off: it fetched a whole part's column chunks before the first batch
                with pq.ParquetFile(f, pre_buffer=False) as pf:
                    names = pf.schema_arrow.names
                    _check_index_columns(f, names)
                    columns = [c for c in _LOADED_COLUMNS if c in names]
                    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
                        parts.add(batch, f)
            except (pa.ArrowException, OSError) as err:  # a damaged or truncated part
                raise IndexLoadError(f"{f}: unreadable: {err}") from None
        matrix = parts.matrix()
        image_ids, pids = parts.columns()
        pa.default_memory_pool().release_unused()  # the batches' buffers, not needed again
        log.info("loaded index %s: %d embeddings of dim %d", p, *matrix.shape)
        seen = parts.seen
        models = seen["model"]
        return cls(
            matrix,
            image_ids,
            pids,
            source=str(p),
            encoder_fingerprint=_one_encoder(p, sorted(seen[ENCODER_COLUMN], key=_nulls_first)),
            model=next(iter(models)) if len(models) == 1 else None,
            pseudonym_key=_one_record(p, PSEUDONYM_KEY_COLUMN, seen[PSEUDONYM_KEY_COLUMN]),
            patient_identity=_one_record(p, PATIENT_IDENTITY_COLUMN, seen[PATIENT_IDENTITY_COLUMN]),
            image_id_scheme=_one_id_scheme(p, seen[IMAGE_ID_SCHEME_COLUMN]),
            copy=False,
        )

    @staticmethod
    def check_parts(path: str | Path) -> tuple[int, int | None]:
        """Refuse an index whose parts cannot all be served, reading only their footers (a few
        kilobytes each, not a page of the matrix): (rows, dim; None when the column does not
        fix it). A part cut short (its footer is at the end) or not an index, embeddings of
        another type, parts of fixed-size embeddings of different sizes (a part of variable
        lists fixes no size in its footer: the replicas check those), or no rows at all, each
        failed every API replica (Ray's retried deployment failure, ~230 lines and exit 1) when the
        served model was not on this disk: only then were the record columns read first.

        Damage inside the pages (a block of a copy lost, bit rot) leaves the footer intact:
        only reading the pages finds it, which the replicas do at their start-up."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        p, files, expected = _index_parts(path)
        rows, dims = 0, set()
        for f in files:
            try:
                meta = pq.read_metadata(f)
                schema = meta.schema.to_arrow_schema()
            except (pa.ArrowException, OSError) as err:  # as from_parquet says it
                raise IndexLoadError(f"{f}: unreadable: {err}") from None
            _check_index_columns(f, schema.names)
            _check_image_ids(f, _footer_null_ids(meta))
            if schema.names.count("embedding") != 1:
                raise IndexLoadError(
                    f"{f}: holds {schema.names.count('embedding')} columns named embedding"
                )
            kind = schema.field("embedding").type
            listed = pa.types.is_list(kind) or pa.types.is_large_list(kind)
            fixed = pa.types.is_fixed_size_list(kind)
            if not (listed or fixed) or not pa.types.is_floating(kind.value_type):
                raise IndexLoadError(f"{f}: column embedding holds {kind}, not lists of floats")
            if fixed and meta.num_rows:
                dims.add(kind.list_size)
            _check_part_rows(f, meta.num_rows, expected)
            rows += meta.num_rows
        if len(dims) > 1:
            sizes = ", ".join(map(str, sorted(dims)))
            raise IndexLoadError(
                f"{p}: parts hold embeddings of {len(dims)} sizes ({sizes}): rebuild it with "
                "`radjepa embed` from one model"
            )
        if rows == 0:
            raise IndexLoadError(f"index {p} holds no embeddings")
        return rows, next(iter(dims), None)

    @staticmethod
    def recorded_encoder(path: str | Path) -> str | None:
        """The encoder fingerprint an index records, reading that one column only (a start-up
        check on the driver must not load a whole archive's embeddings)."""
        p, files = _index_files(path)
        seen = _distinct_in_files(files, (ENCODER_COLUMN,))[ENCODER_COLUMN]
        return _one_encoder(p, sorted(seen, key=_nulls_first))

    def check_encoder(self, fingerprint: str | None) -> None:
        """Refuse an index embedded by another checkpoint than the served one.

        Two checkpoints of one architecture give embeddings of the same size in unrelated
        directions: searching one with the other's queries runs and returns chance-level
        neighbours, so the size check alone cannot catch it. An index without the record (or
        a server that cannot fingerprint its model) is accepted with a warning.
        """
        _check_recorded(self.source, self.encoder_fingerprint, self.model, fingerprint)

    @classmethod
    def check_file(cls, path: str | Path, fingerprint: str | None) -> None:
        """:meth:`check_encoder` for an index on disk, reading only its encoder column."""
        _check_recorded(str(path), cls.recorded_encoder(path), None, fingerprint)

    def upload_pseudonyms(self, server_key: str, env: str) -> UploadPseudonyms:
        """Whether an upload's own PatientID, pseudonymised with the server's key (fingerprint
        ``server_key``, from the variable ``env``), can find its patient in this index
        (:func:`upload_pseudonyms`)."""
        return upload_pseudonyms(
            self.source, self.pseudonym_key, self.patient_identity, server_key, env
        )

    @staticmethod
    def recorded_pseudonyms(path: str | Path) -> tuple[str | None, str | None]:
        """The key fingerprint and patient identity scheme an index records for its shards,
        as :meth:`from_parquet` reads them (None: not recorded, or parts disagree), reading
        those two columns only: ``radjepa serve`` compares them with its key on the driver,
        where a whole archive's embeddings must not be loaded."""
        p, files = _index_files(path)
        seen = _distinct_in_files(files, (PSEUDONYM_KEY_COLUMN, PATIENT_IDENTITY_COLUMN))
        return (
            _one_record(p, PSEUDONYM_KEY_COLUMN, seen[PSEUDONYM_KEY_COLUMN]),
            _one_record(p, PATIENT_IDENTITY_COLUMN, seen[PATIENT_IDENTITY_COLUMN]),
        )

    @staticmethod
    def recorded_id_scheme(path: str | Path) -> str:
        """The image id scheme an index's rows record, as :meth:`from_parquet` reads it (and
        refuses a mixture), reading that column only: ``radjepa serve`` checks it on the driver
        before it deploys replicas that would each refuse the index."""
        p, files = _index_files(path)
        return _one_id_scheme(
            p, _distinct_in_files(files, (IMAGE_ID_SCHEME_COLUMN,))[IMAGE_ID_SCHEME_COLUMN]
        )

    def upload_image_ids(self, server_key: str, env: str) -> str:
        """Whether an upload's image id, made with the server's key (fingerprint
        ``server_key``, from ``env``), can equal its archive row's (:func:`upload_image_ids`)."""
        return upload_image_ids(
            self.source, self.pseudonym_key, self.image_id_scheme, server_key, env
        )

    def rows_with_image_id(self, image_id: str) -> np.ndarray:
        """Rows holding the image whose original bytes give ``image_id`` under the index's
        :attr:`image_id_scheme` (usually 0 or 1; more only when an index was assembled from
        overlapping embed runs)."""
        return self.image_ids.rows_of(image_id)

    def rows_of_instance(
        self,
        instance_pid: str | None,
        query: np.ndarray | None = None,
        *,
        scores: np.ndarray | None = None,
    ) -> np.ndarray:
        """Rows of the DICOM instance ``instance_pid`` (its keyed SOP Instance UID pseudonym,
        as ingest identifies instances) that are the upload's ``query`` ([D]) itself: the
        archived instance re-sent in other bytes (another transfer syntax, a re-written header),
        which :meth:`rows_with_image_id` cannot find. Itself means within
        :data:`SAME_INSTANCE_MIN_COSINE` of the query and :data:`SAME_INSTANCE_MIN_MARGIN`
        closer to it than any row of another instance. That reads the whole matrix: give the
        query's ``scores`` ([N], a row of :meth:`scores`) where the search made them already,
        or every archived upload read it a second time."""
        instance = self.pids[INSTANCE_PID].rows_of(instance_pid)
        if not len(instance):
            return instance
        if scores is None:
            if query is None:
                raise TypeError("rows_of_instance needs the query or its scores")
            scores = self.scores(np.asarray(query).reshape(1, -1))[0]
        own = scores[instance]
        close = own >= SAME_INSTANCE_MIN_COSINE
        if not close.any() or len(instance) == len(self):
            return instance[close]
        others = scores.copy()  # the caller's scores stay as they are, for its search
        others[instance] = -np.inf
        return instance[close & (own >= float(others.max()) + SAME_INSTANCE_MIN_MARGIN)]

    def rows_of_patients(self, patient_pids: Iterable[str]) -> np.ndarray:
        """Rows of any of these patient pseudonyms; unknown pseudonyms match nothing (a filter
        for "other patients' cases" is satisfied trivially by a patient the archive lacks)."""
        patients = self.pids[PATIENT_PID]
        rows = [patients.rows_of(p) for p in set(patient_pids)]
        return np.unique(np.concatenate([np.empty(0, np.int64), *rows]))

    def search(self, query: np.ndarray, k: int, *, exclude: np.ndarray | None = None) -> list[Hit]:
        """Top-``k`` rows by cosine similarity to ``query`` ([D]), best first, never returning
        a row listed in ``exclude``; fewer than ``k`` only when fewer rows remain."""
        return self.search_many(np.asarray(query).reshape(1, -1), k, [exclude])[0]

    def search_many(
        self, queries: np.ndarray, k: int, excludes: list[np.ndarray | None]
    ) -> list[list[Hit]]:
        """:meth:`search` for each row of ``queries`` ([Q, D]) with its own ``excludes[i]``,
        in one pass over the matrix: a search is bound by reading the matrix (3 GiB at a
        million rows), so the images of one request share that read instead of repeating it
        (``bench/index.py`` times both ways)."""
        if len(excludes) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(excludes)} exclusion lists")
        scores = self.scores(queries)
        return [self.top(row, k, exclude) for row, exclude in zip(scores, excludes, strict=True)]

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Cosine similarity of each query ([Q, D]) to every row: [Q, N], one read of the
        matrix for all of them. What a search needs of the matrix: the exclusions that depend
        on the query (:meth:`rows_of_instance`) and :meth:`top` then read these alone."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexLoadError(f"query dim {q.shape[-1]} != index dim {self.dim}")
        return _unit_rows(q.copy()) @ self.matrix.T

    def top(self, scores: np.ndarray, k: int, exclude: np.ndarray | None) -> list[Hit]:
        """The ``k`` best rows of one query's ``scores`` ([N], a row of :meth:`scores`; set to
        -inf where excluded, in place), best first, never a row of ``exclude``; fewer than
        ``k`` only when fewer rows remain."""
        asked = np.unique(np.asarray(exclude if exclude is not None else (), np.int64))
        # the repeats are many where two runs over one DST are served together: counted from
        # the mask built at load, not sorted again with each query's exclusions
        left = len(self) - len(self._repeats) - int(np.count_nonzero(~self._is_repeat[asked]))
        k = min(k, left)
        if k <= 0:
            return []
        scores[self._repeats] = -np.inf  # below every real cosine, so never among the top k
        scores[asked] = -np.inf
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [
            Hit(
                image_id=self.image_ids[i],
                score=float(scores[i]),
                pids={c: self.pids[c][i] for c in PID_COLUMNS},
            )
            for i in top
        ]


def upload_pseudonyms(
    source: str, index_key: str | None, index_scheme: str | None, server_key: str, env: str
) -> UploadPseudonyms:
    """Whether an upload's own PatientID, pseudonymised with the server's key (fingerprint
    ``server_key``, from the variable ``env``), can find its patient in index ``source``, whose
    shards' key fingerprint and scheme are ``index_key`` and ``index_scheme``.

    Another key gives every patient another pseudonym, so the upload would match no row
    and ``exclude_same_patient`` would silently leave its patient's other images in: said
    once at start-up (by each replica, and by ``radjepa serve`` before it deploys) and in
    every answer that option changes.
    """
    scheme = index_scheme or PATIENT_ID
    if scheme not in PATIENT_IDENTITIES:
        raise IndexLoadError(
            f"index {source} records patient identity scheme {scheme!r}, which this "
            f"version does not know ({', '.join(PATIENT_IDENTITIES)}): serve it with the "
            "version that built it"
        )
    if index_key is None:
        log.warning(
            "index %s does not record one pseudonymisation key for its shards (built by an "
            "older `radjepa embed`, from an older ingest, or assembled from parts with "
            "different keys): the key in %s cannot be checked against it, so "
            "exclude_same_patient matches an upload's own PatientID without knowing whether "
            "it can match (answers say 'used_unverified'); rebuild the index with `radjepa "
            "embed` to have it checked",
            source,
            env,
        )
        return UploadPseudonyms("unverified", scheme)
    if index_key != server_key:
        log.warning(
            "the pseudonymisation key in %s (fingerprint %s) is not the key index %s's "
            "shards were ingested with (%s): exclude_same_patient can find an upload's "
            "patient only through the upload's own archive row (answers say "
            "'key_mismatch'); set %s to the ingest key to match uploads by PatientID",
            env,
            server_key,
            source,
            index_key,
            env,
        )
        return UploadPseudonyms("key_mismatch", scheme)
    if index_scheme is None:
        # embed records the key and the scheme together, so one key without one scheme is
        # an index assembled from DSTs ingested under different schemes: an upload's
        # pseudonym under either one cannot match the other parts' patients
        log.warning(
            "index %s's parts were ingested under different patient identity schemes: an "
            "upload's own PatientID, pseudonymised under %s, can match only the parts made "
            "under it (answers say 'used_unverified'); build one index per scheme",
            source,
            scheme,
        )
        return UploadPseudonyms("unverified", scheme)
    return UploadPseudonyms("verified", scheme)


def upload_image_ids(
    source: str, index_key: str | None, id_scheme: str, server_key: str, env: str
) -> str:
    """Whether the server can make an upload's image id the way ingest made the ids of index
    ``source`` (scheme ``id_scheme``, key fingerprint ``index_key``), so that an archived upload
    finds its own row (``include_self``, ``excluded_self``, ``same_patient.archive_row``):
    ``verified`` (unkeyed ids, or keyed under the server's key), ``unverified`` (keyed, but the
    index records no one key: its parts may differ), ``key_mismatch`` (keyed under another key:
    no upload can match, so an archived one would come back as its own first hit). Said once at
    start-up, and in every /v1/similar answer (``image_id_match``).
    """
    if id_scheme == ID_SCHEME_UNKEYED:
        return "verified"
    if index_key is None:
        log.warning(
            "index %s does not record one pseudonymisation key for its keyed image ids: an "
            "archived upload is recognised only when its row was ingested with the key in %s "
            "(answers say image_id_match 'used_unverified')",
            source,
            env,
        )
        return "unverified"
    if index_key != server_key:
        log.warning(
            "index %s's image ids are keyed with the ingest key (%s), not the key in %s (%s): "
            "an archived upload cannot be recognised, so include_self=false cannot leave it "
            "out (answers say image_id_match 'key_mismatch'); set %s to the ingest key",
            source,
            index_key,
            env,
            server_key,
            env,
        )
        return "key_mismatch"
    return "verified"


def _one_id_scheme(p: Path, seen: set[str | None]) -> str:
    """The one image id scheme of an index's rows (null: parts embedded before it was recorded,
    i.e. unkeyed). A mixture is refused: an upload can be hashed only one way, so rows under
    the other scheme could never be recognised as the upload itself."""
    schemes = {s or ID_SCHEME_UNKEYED for s in seen} or {ID_SCHEME_UNKEYED}
    if len(schemes) > 1:
        raise IndexLoadError(
            f"{p}: rows use {len(schemes)} image id schemes ({', '.join(sorted(schemes))}): "
            "an upload can be matched to only one; build one index per scheme, or re-ingest "
            "the older destinations into a new DST (keyed ids) and embed again"
        )
    scheme = schemes.pop()
    if scheme not in ID_SCHEMES:
        raise IndexLoadError(
            f"{p}: image id scheme {scheme!r} is unknown to this version ({', '.join(ID_SCHEMES)})"
            ": serve it with the version that built it"
        )
    return scheme


def _distinct(table: pa.Table | pa.RecordBatch, column: str) -> set[str | None]:
    """The values rows record in ``column``; a table without it counts as one None (parts
    embedded before the record existed: nulls once parts are concatenated)."""
    if column not in table.column_names:
        return {None}
    return set(table.column(column).unique().to_pylist())


def _distinct_in_files(files: list[Path], columns: tuple[str, ...]) -> dict[str, set[str | None]]:
    """:func:`_distinct` over an index's files, reading only ``columns`` (start-up checks on
    the driver must not load a whole archive's embeddings)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    seen: dict[str, set[str | None]] = {c: set() for c in columns}
    for f in files:
        try:
            names = pq.read_schema(f).names
            _check_index_columns(f, names)
            table = pq.read_table(f, columns=[c for c in columns if c in names])
        except (pa.ArrowException, OSError) as err:
            # what from_parquet says in the replicas; Arrow's own words named no file ("Parquet
            # magic bytes not found in footer...": which part of a folder of them?)
            raise IndexLoadError(f"{f}: unreadable: {err}") from None
        for c in columns:
            seen[c] |= _distinct(table, c)
    return seen


def _check_index_columns(f: Path, names: list[str]) -> None:
    """Refuse a part that is not an index (the ingest shards given as ``--index``: they are
    Parquet too) on the driver's start-up checks as well as in the replicas: those checks read
    only record columns, and every replica then failed on it (~220 lines and exit 1)."""
    missing = {"image_id", "embedding"} - set(names)
    if missing:
        raise IndexLoadError(
            f"{f}: missing column(s) {sorted(missing)}: not an index `radjepa embed` wrote"
        )


def _nulls_first(value: str | None) -> str:
    return value or ""


def _one_record(p: Path, column: str, seen: set[str | None]) -> str | None:
    """The one value an index records in ``column``; None when it has none, or when parts
    disagree (assembled from several embed runs): such pseudonyms cannot be vouched for."""
    if len(seen) > 1:
        log.warning("%s: parts record %d different %s values: unknown", p, len(seen), column)
        return None
    return next(iter(seen), None)


class _Parts:
    """An index's rows gathered a batch at a time: the embeddings into one preallocated
    matrix, the ids and pseudonyms as the batches' Arrow arrays (encoded into compact columns
    once all are read: whether a column is hex is known only then), the record columns'
    distinct values."""

    def __init__(self, source: Path, rows: int) -> None:
        self.source = source
        self.rows = rows
        self.filled = 0
        self._matrix: np.ndarray | None = None
        self.image_ids: list[pa.Array] = []
        self.pids: dict[str, list[pa.Array]] = {c: [] for c in PID_COLUMNS}
        # a part without a record column counts as nulls, as when parts were concatenated
        self.seen: dict[str, set[str | None]] = {c: set() for c in _RECORD_COLUMNS}

    def add(self, batch: pa.RecordBatch, part: Path) -> None:
        n = batch.num_rows
        if n == 0:  # an empty part or row group says nothing about the dimension
            return
        _check_image_ids(part, batch.column("image_id").null_count)
        values = _embedding_values(self.source, batch.column("embedding"))
        if self._matrix is None:  # the first rows set the dimension the others must have
            self._matrix = np.empty((self.rows, values.size // n), dtype=np.float32)
        dim = self._matrix.shape[1]
        if values.size != n * dim or dim == 0 or self.filled + n > self.rows:
            raise IndexLoadError(f"{self.source}: embeddings are empty or ragged")
        _check_list_lengths(part, batch.column("embedding"), dim)
        self._matrix[self.filled : self.filled + n] = values.reshape(n, dim)
        self.filled += n
        names = batch.schema.names
        self.image_ids.append(batch.column("image_id"))
        for c in PID_COLUMNS:
            if c in names:
                self.pids[c].append(batch.column(c))
            else:
                self.pids[c].append(_nulls(n))
        for c in _RECORD_COLUMNS:
            self.seen[c] |= _distinct(batch, c)

    def columns(self) -> tuple[IdColumn, dict[str, IdColumn]]:
        """The ids and pseudonyms as compact columns, dropping the batches' arrays (one column
        at a time, so their Arrow copies and the compact ones are not all held at once)."""
        image_ids = _column(self.source, "image_id", self.image_ids, searchable=True)
        self.image_ids = []
        pids = {}
        for c in PID_COLUMNS:
            pids[c] = _column(self.source, c, self.pids[c], searchable=c in _SEARCHED_PIDS)
            self.pids[c] = []
        return image_ids, pids

    def matrix(self) -> np.ndarray:
        if self._matrix is None or self.filled != self.rows:
            raise IndexLoadError(f"{self.source}: embeddings are empty or ragged")
        # a NaN row scored null for every query (a response that breaks the API's float
        # schema) and sorted anywhere: an encoder that diverged, or a part written apart
        bad = sum(
            int((~np.isfinite(self._matrix[start : start + 65536])).any(axis=1).sum())
            for start in range(0, self.rows, 65536)
        )
        if bad:
            raise IndexLoadError(
                f"{self.source}: {bad} of {self.rows} embeddings hold NaN or infinite values: "
                "embed the shards again with a checkpoint that trained without diverging"
            )
        return self._matrix


def _unit_rows(matrix: np.ndarray, block: int = 65536) -> np.ndarray:
    """Scale each row to unit length in place, a block of rows at a time (no temporary the
    size of the matrix); an all-zero row stays zero."""
    for start in range(0, matrix.shape[0], block):
        rows = matrix[start : start + block]
        norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
        rows /= np.maximum(norms, 1e-12)[:, None]
    return matrix


def _part_rows(f: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(f) as pf:
            return int(pf.metadata.num_rows)
    except (pa.ArrowException, OSError) as err:  # a damaged or truncated part
        raise IndexLoadError(f"{f}: unreadable: {err}") from None


def _check_image_ids(part: Path, nulls: int) -> None:
    """Refuse rows without an image id: a row that cannot be named in an answer nor matched to
    an upload, and the index's public identity (a hash of its ids) cannot be made: the API
    failed at start-up with a bare TypeError."""
    if nulls:
        raise IndexLoadError(
            f"{part}: {nulls} row(s) have no image_id: not an index `radjepa embed` wrote; "
            "embed the shards again"
        )


def _footer_null_ids(meta: pq.FileMetaData) -> int:
    """Null image ids the footer's statistics count (0 where a writer recorded none)."""
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    if "image_id" not in names:
        return 0
    column = names.index("image_id")
    nulls = 0
    for group in range(meta.num_row_groups):
        stats = meta.row_group(group).column(column).statistics
        if stats is not None and stats.has_null_count:
            nulls += stats.null_count
    return nulls


def _embedding_values(p: Path, chunk: pa.Array) -> np.ndarray:
    """The float values of one chunk of the (fixed-size or plain) list column, without nulls."""
    if chunk.null_count:
        raise IndexLoadError(f"{p}: {chunk.null_count} row(s) have no embedding")
    values = chunk.flatten()  # honours the chunk's offset into its child array
    if values.null_count:
        raise IndexLoadError(f"{p}: embeddings hold null values")
    return values.to_numpy(zero_copy_only=False)


def _check_list_lengths(part: Path, chunk: pa.Array, dim: int) -> None:
    """Refuse rows of a variable-list column that are not ``dim`` long: lengths 3, 5 and 4
    fill 3 rows of 4 values, each row then mixing values of its neighbours."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_fixed_size_list(chunk.type):
        return  # its footer fixes the size of every row
    lengths = pc.min_max(pc.list_value_length(chunk)).as_py()
    if (lengths["min"], lengths["max"]) != (dim, dim):
        raise IndexLoadError(
            f"{part}: embeddings of {lengths['min']} to {lengths['max']} values where the "
            f"index's are {dim}: not an index `radjepa embed` wrote; embed the shards again"
        )


def _nulls(n: int) -> pa.Array:
    import pyarrow as pa

    return pa.nulls(n, pa.string())


def _column(p: Path, name: str, chunks: list[pa.Array], *, searchable: bool) -> IdColumn:
    """One id or pseudonym column of the parts; a column of another type is refused."""
    import pyarrow as pa

    try:
        return IdColumn.from_arrow(chunks, searchable=searchable)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise IndexLoadError(f"{p}: column {name} does not hold strings: {err}") from None


def _index_files(path: str | Path) -> tuple[Path, list[Path]]:
    """The index's Parquet files; a folder an embed run has not finished writing is refused:
    its parts load as a smaller archive, and searches would miss the rest without a word."""
    p, files, _ = _index_parts(path)
    return p, files


def _index_parts(path: str | Path) -> tuple[Path, list[Path], dict[Path, int] | None]:
    """:func:`_index_files`, and the rows each file holds by the embed runs' records (read
    once, with the check of the names: None when the folder holds no record). ``~`` is the
    home folder, as for the model and head (the driver's check expanded it, then this said
    "index not found: ~/...")."""
    p = Path(path).expanduser()
    if not p.exists():
        raise IndexLoadError(f"index not found: {p}")
    if not p.is_dir():
        return p, [p], _single_part_rows(p)
    # anywhere below: several runs' folders under one parent are one index
    unfinished = next(iter(sorted(p.rglob(INCOMPLETE_MARKER))), None)
    if unfinished is not None:
        raise _incomplete(unfinished.parent)
    files = sorted(p.rglob("*.parquet"))
    expected = _recorded_rows(p, files)
    if not files:
        raise IndexLoadError(f"no .parquet files under {p}")
    return p, files, expected


def _incomplete(folder: Path) -> IndexLoadError:
    return IndexLoadError(
        f"index {folder} is incomplete: the `radjepa embed` run writing it did not finish "
        "(still running, interrupted or failed); remove the folder and run it again"
    )


def _single_part_rows(p: Path) -> dict[Path, int] | None:
    """An index given as one Parquet file: the checks a folder gets, made on the folder it lies
    in. One part of an unfinished run, or one of several parts, loaded as the whole archive,
    and searches missed every other part's rows without a word."""
    if (p.parent / INCOMPLETE_MARKER).exists():
        raise _incomplete(p.parent)
    parts = recorded_parts(p.parent)
    if parts is None:
        return None  # a file made elsewhere, or an index of one file copied alone
    if p.name not in parts:
        raise IndexLoadError(
            f"{p} is not a part the `radjepa embed` run in {p.parent} wrote: give an index "
            "folder or a part of one"
        )
    if len(parts) > 1:
        raise IndexLoadError(
            f"{p} is one of the {len(parts)} parts of the index in {p.parent}: give the folder "
            "(one part alone leaves the others' rows out of every search)"
        )
    return {p: parts[p.name]}


def _recorded_rows(p: Path, files: list[Path]) -> dict[Path, int] | None:
    """Each file's rows as recorded by the embed run whose folder holds it (the nearest folder
    above it with a :data:`PARTS_RECORD`): several runs' folders under one parent are one index.
    Refuses a recorded part that is missing and a file no record covers; None without records.
    """
    records = {r.parent: recorded_parts(r.parent) or {} for r in sorted(p.rglob(PARTS_RECORD))}
    if not records:
        return None
    expected: dict[Path, int] = {}
    owned: dict[Path, set[str]] = {folder: set() for folder in records}
    stray = []
    for f in files:
        folder = next((d for d in f.parents if d in records), None)
        if folder is None:
            stray.append(f.relative_to(p).as_posix())
            continue
        name = f.relative_to(folder).as_posix()
        if name not in records[folder]:
            stray.append(f.relative_to(p).as_posix())
            continue
        owned[folder].add(name)
        expected[f] = records[folder][name]
    for folder, parts in records.items():
        missing = sorted(set(parts) - owned[folder])
        if missing:
            raise IndexLoadError(
                f"index {folder} lacks {len(missing)} of the {len(parts)} parts its `radjepa "
                f"embed` run wrote ({_some(missing)}): copy the whole folder again, or embed "
                "again"
            )
    if stray:
        raise IndexLoadError(
            f"index {p} holds {len(stray)} Parquet file(s) no `radjepa embed` run recorded "
            f"there ({_some(stray)}): remove them, or embed again into a new folder; to serve "
            "several embed runs as one index, put each run's whole folder (with its "
            f"{PARTS_RECORD}) under one parent folder"
        )
    return expected


def recorded_parts(path: str | Path) -> dict[str, int] | None:
    """The parts (name relative to the folder: rows) ``radjepa embed`` recorded in the index
    folder ``path`` (:data:`PARTS_RECORD`); None for a single file or a folder without a record."""
    record = Path(path) / PARTS_RECORD
    if not record.is_file():
        return None
    try:
        parts = json.loads(record.read_text())["parts"]
        return {str(name): int(rows) for name, rows in parts.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise IndexLoadError(f"{record}: not a record of the index's parts ({err})") from None


def _check_part_rows(f: Path, rows: int, expected: dict[Path, int] | None) -> None:
    """Refuse a part whose footer holds other rows than its embed run wrote (a part of the same
    name from another run or index)."""
    if expected is None:
        return
    if rows != expected[f]:
        raise IndexLoadError(
            f"{f}: holds {rows} rows, but its `radjepa embed` run wrote {expected[f]}: a part "
            "of another run? copy the whole folder again, or embed again"
        )


def _some(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]}, ..."


def _one_encoder(p: Path, seen: list[str | None]) -> str | None:
    """The single encoder an index's rows record. Parts written before the record existed read
    as None: a mixture holds rows of unknown origin, so it is refused like two encoders are."""
    if len(seen) > 1:
        raise IndexLoadError(
            f"{p}: rows were embedded by {len(seen)} different encoders "
            f"({', '.join(s[:12] if s else 'unrecorded' for s in seen)}): rebuild it with "
            "`radjepa embed` from one model"
        )
    return seen[0] if seen else None


def _check_recorded(
    source: str, recorded: str | None, model: str | None, fingerprint: str | None
) -> None:
    if recorded is None:
        log.warning(
            "index %s does not record the encoder it was embedded with (built by an older "
            "`radjepa embed`): it cannot be checked against the served model; rebuild it "
            "with `radjepa embed` to have it checked",
            source,
        )
        return
    if fingerprint is None:
        log.warning(
            "the served model's checkpoint fingerprint is unknown: index %s (encoder %s) "
            "cannot be checked against it",
            source,
            recorded[:12],
        )
        return
    if fingerprint != recorded:
        built_by = f" ({model})" if model else ""
        raise IndexLoadError(
            f"index {source} was embedded by encoder {recorded[:12]}{built_by} but the served "
            f"encoder is {fingerprint[:12]}: rebuild it with `radjepa embed` for this model"
        )

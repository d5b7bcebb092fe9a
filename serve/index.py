"""The similar-case index: archive embeddings (written by ``radjepa embed``) searched by cosine.

The archive is small enough to hold as one normalised float32 matrix per replica (1M x 768 is
3 GiB; a typical department archive is far smaller), so exact search is a single matrix-vector
product and needs no approximate-search dependency.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["EmbeddingIndex", "Hit", "IndexLoadError", "PID_COLUMNS"]

log = logging.getLogger(__name__)

PID_COLUMNS = ("patient_pid", "study_pid", "series_pid", "instance_pid")


class IndexLoadError(ValueError):
    """The index file is missing, empty or does not fit the served model."""


@dataclass
class Hit:
    image_id: str
    score: float
    pids: dict[str, str | None]


class EmbeddingIndex:
    """Row-normalised embeddings with their image ids and pseudonymised identifiers."""

    def __init__(
        self,
        embeddings: np.ndarray,
        image_ids: list[str],
        pids: dict[str, list[str | None]] | None = None,
        *,
        source: str = "<memory>",
    ) -> None:
        if embeddings.ndim != 2 or embeddings.shape[0] != len(image_ids):
            raise IndexLoadError(
                f"embeddings {embeddings.shape} do not match {len(image_ids)} image ids"
            )
        if embeddings.shape[0] == 0:
            raise IndexLoadError(f"index {source} holds no embeddings")
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        self.matrix = (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)  # [N, D]
        self.image_ids = list(image_ids)
        self.pids = {c: list((pids or {}).get(c) or [None] * len(image_ids)) for c in PID_COLUMNS}
        self.source = source

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    @classmethod
    def from_parquet(cls, path: str | Path) -> EmbeddingIndex:
        """Read one Parquet file or a folder of them (Ray Data writes a folder)."""
        import pyarrow.parquet as pq

        p = Path(path)
        if not p.exists():
            raise IndexLoadError(f"index not found: {p}")
        files = sorted(p.rglob("*.parquet")) if p.is_dir() else [p]
        if not files:
            raise IndexLoadError(f"no .parquet files under {p}")
        tables = [pq.read_table(f) for f in files]
        missing = {"image_id", "embedding"} - set(tables[0].column_names)
        if missing:
            raise IndexLoadError(f"{p}: missing column(s) {sorted(missing)}")
        import pyarrow as pa

        table = pa.concat_tables(tables, promote_options="default")
        emb = table.column("embedding").combine_chunks()
        flat = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        n = len(table)
        if n == 0 or flat.size % n:
            raise IndexLoadError(f"{p}: embeddings are empty or ragged")
        matrix = flat.reshape(n, flat.size // n)  # [N, D]
        pids = {c: table.column(c).to_pylist() for c in PID_COLUMNS if c in table.column_names}
        log.info("loaded index %s: %d embeddings of dim %d", p, n, matrix.shape[1])
        return cls(matrix, table.column("image_id").to_pylist(), pids, source=str(p))

    def search(self, query: np.ndarray, k: int) -> list[Hit]:
        """Top-``k`` rows by cosine similarity to ``query`` ([D]), best first."""
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise IndexLoadError(f"query dim {q.shape[0]} != index dim {self.dim}")
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        scores = self.matrix @ q  # [N]
        k = min(k, len(self))
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

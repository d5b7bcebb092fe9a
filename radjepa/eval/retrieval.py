"""kNN retrieval on embeddings: precision@k and a kNN-classifier AUROC.

Neighbours are by cosine similarity and never include the query itself or any image of the same
patient, which would otherwise be trivially "retrieved" and flatter the encoder.
"""

from __future__ import annotations

import numpy as np

from radjepa.eval.features import require_finite
from radjepa.eval.metrics import auroc

__all__ = ["neighbours", "precision_at_k", "knn_auroc"]


def neighbours(
    features: np.ndarray, groups: np.ndarray, k: int, *, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Indices [N, k] and validity mask [N, k] of each image's k nearest other-patient images."""
    f = require_finite(features).astype(np.float32)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    g = np.unique(np.asarray(groups).astype(str), return_inverse=True)[1]
    n = len(f)
    k_eff = min(k, n)
    idx = np.zeros((n, k_eff), dtype=np.int64)
    valid = np.zeros((n, k_eff), dtype=bool)
    for s in range(0, n, chunk):
        sim = f[s : s + chunk] @ f.T  # [c, N]
        same = g[s : s + chunk, None] == g[None, :]  # same patient (self included)
        sim[same] = -np.inf
        part = np.argpartition(-sim, k_eff - 1, axis=1)[:, :k_eff]
        order = np.argsort(-np.take_along_axis(sim, part, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(part, order, axis=1)
        idx[s : s + chunk] = top
        valid[s : s + chunk] = np.isfinite(np.take_along_axis(sim, top, axis=1))
    return idx, valid


def precision_at_k(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int) -> float:
    """Mean share of a query's k neighbours (other patients) that carry the query's label value."""
    y = np.asarray(labels)
    idx, valid = neighbours(features, groups, k)
    hits = (y[idx] == y[:, None]) & valid
    counts = valid.sum(1)
    ok = counts > 0
    if not ok.any():
        raise ValueError("no query has a neighbour from another patient")
    return float((hits.sum(1)[ok] / counts[ok]).mean())


def knn_auroc(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int) -> float:
    """AUROC of a leave-one-patient-out kNN classifier (score = positive share of neighbours).

    Label-light and fit-free, so a sweep can rank trials by it cheaply. Needs 0/1 labels with
    both classes present.
    """
    y = np.asarray(labels)
    if not np.isin(y, (0, 1)).all():
        raise ValueError("knn_auroc needs 0/1 labels")
    if len(np.unique(y)) < 2:
        raise ValueError("knn_auroc needs both classes among the labels")
    idx, valid = neighbours(features, groups, k)
    score = (y[idx] * valid).sum(1) / np.maximum(valid.sum(1), 1)
    return auroc(y, score)

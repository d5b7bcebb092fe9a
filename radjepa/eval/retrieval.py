"""kNN retrieval on embeddings: precision@k and a kNN-classifier AUROC.

Neighbours are by cosine similarity and never include the query itself or any image of the same
patient, which would otherwise be trivially "retrieved" and flatter the encoder.
"""

from __future__ import annotations

import numpy as np

from radjepa.eval.features import require_finite
from radjepa.eval.metrics import auroc

__all__ = ["neighbours", "retrieval_ok", "precision_at_k", "knn_auroc"]


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


def retrieval_ok(labels: np.ndarray, groups: np.ndarray) -> bool:
    """Whether both classes occur in at least 2 patients each, as the linear probe requires.

    Below that, retrieval numbers exist but measure nothing: precision@k of a one-class label
    is 1 for any features, and a class held by one patient never finds itself among
    other-patient neighbours.
    """
    y = np.asarray(labels)
    g = np.asarray(groups).astype(str)
    return all(len(np.unique(g[y == c])) >= 2 for c in (0, 1))


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
    each class in at least 2 patients: a class held by one patient has no same-class
    neighbour left once that patient is excluded, so its images score lowest whatever the
    features and the AUROC sits at or below 0.5 by construction.
    """
    y = np.asarray(labels)
    if not np.isin(y, (0, 1)).all():
        raise ValueError("knn_auroc needs 0/1 labels")
    if len(np.unique(y)) < 2:
        raise ValueError("knn_auroc needs both classes among the labels")
    if not retrieval_ok(y, groups):
        raise ValueError("knn_auroc needs each class in at least 2 patients")
    idx, valid = neighbours(features, groups, k)
    score = (y[idx] * valid).sum(1) / np.maximum(valid.sum(1), 1)
    return auroc(y, score)

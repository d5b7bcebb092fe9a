"""kNN retrieval on embeddings: precision@k, mean average precision and a kNN-classifier AUROC.

Neighbours are by cosine similarity and never include the query itself or any image of the same
patient, which would otherwise be trivially "retrieved" and flatter the encoder. Images tied
at the k-th similarity (a collapsed encoder, duplicated images) count as a random pick among
them (in expectation for precision@k, by a seeded draw over patients for kNN AUROC): picking
by row order made the scores depend on how the CSV was sorted.
"""

from __future__ import annotations

import numpy as np

from radjepa.eval.features import require_finite
from radjepa.eval.metrics import auroc

__all__ = [
    "neighbours",
    "neighbour_shares",
    "retrieval_ok",
    "precision_at_k",
    "query_average_precision",
    "mean_average_precision",
    "knn_auroc",
    "retrieval_chance",
]


def _unit_rows(features: np.ndarray) -> np.ndarray:
    # float64: float32 GEMM rounding noise is ~1e-7, which _similarities would not merge
    f = require_finite(features)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def _similarities(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Cosine similarities of unit rows, rounded to 12 decimals: equal vectors must tie, and a
    GEMM kernel sums the edge columns of a block in another order than the rest, so at 384 or
    768 dimensions equal vectors differed in the last bits, a tie was split by rounding noise
    and the input's row order moved a collapsed encoder's scores again."""
    return np.round(rows @ cols.T, 12)


def neighbours(
    features: np.ndarray, groups: np.ndarray, k: int, *, chunk: int = 1024, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices [N, k] and validity mask [N, k] of each image's k nearest other-patient images.

    Images tied in similarity are taken in a seeded random order of their patients (drawn over
    the sorted patient ids, so it does not depend on the row order of the input); row order
    decided before, so sorting a CSV by label moved the scores of a collapsed encoder.
    """
    f = _unit_rows(features)
    patients, g = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n = len(f)
    k_eff = min(k, n)
    rank = np.random.default_rng(seed).permutation(len(patients))[g]
    cols = np.lexsort((np.arange(n), rank))  # tie-break order: patient rank, then row
    fc, gc = f[cols], g[cols]
    idx = np.zeros((n, k_eff), dtype=np.int64)
    valid = np.zeros((n, k_eff), dtype=bool)
    for s in range(0, n, chunk):
        sim = _similarities(f[s : s + chunk], fc)  # [c, N], columns in tie-break order
        sim[g[s : s + chunk, None] == gc[None, :]] = -np.inf  # self and same patient
        top = np.argsort(-sim, axis=1, kind="stable")[:, :k_eff]  # stable: ties keep cols order
        idx[s : s + chunk] = cols[top]
        valid[s : s + chunk] = np.isfinite(np.take_along_axis(sim, top, axis=1))
    return idx, valid


def neighbour_shares(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int, *, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Per query: usable neighbours (at most k other-patient images) and the expected share of
    them carrying the query's label value, images tied at the k-th similarity counted as a
    uniformly random pick among them ([N] each; the share is NaN without neighbours).

    precision@k is linear in the picks, so its expectation is exact and needs no seed: a
    collapsed encoder (every similarity equal) scores the chance level, not the majority
    class's share that a row-order pick gave.
    """
    f = _unit_rows(features)
    y = np.asarray(labels)
    g = np.unique(np.asarray(groups).astype(str), return_inverse=True)[1]
    n = len(f)
    k_eff = min(k, n)
    counts = np.zeros(n)
    share = np.full(n, np.nan)
    for s in range(0, n, chunk):
        sim = _similarities(f[s : s + chunk], f)  # [c, N]
        sim[g[s : s + chunk, None] == g[None, :]] = -np.inf  # self and same patient
        valid = np.isfinite(sim)
        kth = -np.partition(-sim, k_eff - 1, axis=1)[:, k_eff - 1 : k_eff]  # [c, 1]
        above, at = valid & (sim > kth), valid & (sim == kth)
        k_q = np.minimum(k_eff, valid.sum(1))
        fill = (k_q - above.sum(1)) / np.maximum(at.sum(1), 1)  # weight of each tied image
        same = y[None, :] == y[s : s + chunk, None]
        hits = (above & same).sum(1) + fill * (at & same).sum(1)
        ok = k_q > 0
        share[s : s + chunk][ok] = hits[ok] / k_q[ok]
        counts[s : s + chunk] = k_q
    return counts, share


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
    counts, same = neighbour_shares(features, labels, groups, k)
    ok = counts > 0
    if not ok.any():
        raise ValueError("no query has a neighbour from another patient")
    return float(same[ok].mean())


def query_average_precision(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, chunk: int | None = None
) -> np.ndarray:
    """[N] average precision of each query's full ranking of the other patients' images,
    relevant = carrying the query's label value; NaN where no such image exists.

    precision@k looks at k neighbours only; AP scores the whole ranking, so it still moves
    when the first k are already right (or hopelessly wrong). Images tied in similarity count
    as a uniformly random order among them, in expectation (McSherry & Najork, ECIR 2008),
    as :func:`neighbour_shares` counts a tie at the k-th place: the row order of the input
    cannot move it. A tied run of n images holding r relevant ones, after s images of which
    R are relevant, adds sum_j (r/n) (R + 1 + (j-1)(r-1)/(n-1)) / (s + j) for j = 1..n.
    """
    f = _unit_rows(features)
    y = np.asarray(labels)
    g = np.unique(np.asarray(groups).astype(str), return_inverse=True)[1]
    n = len(f)
    step = chunk or max(1, 2**22 // max(n, 1))  # a few [chunk, N] float64 arrays in memory
    pos = np.arange(n)
    out = np.full(n, np.nan)
    for s in range(0, n, step):
        sim = _similarities(f[s : s + step], f)  # [c, N]
        sim[g[s : s + step, None] == g[None, :]] = -np.inf  # self and same patient
        order = np.argsort(-sim, axis=1, kind="stable")
        ss = np.take_along_axis(sim, order, axis=1)  # [c, N] descending
        rel = (y[order] == y[s : s + step, None]) & np.isfinite(ss)  # excluded: never relevant
        # tied runs: first and last position of the run each position belongs to
        new = np.ones_like(ss, dtype=bool)
        new[:, 1:] = ss[:, 1:] != ss[:, :-1]
        last = np.ones_like(new)
        last[:, :-1] = new[:, 1:]
        start = np.maximum.accumulate(np.where(new, pos, 0), axis=1)
        end = np.minimum.accumulate(np.where(last, pos, n - 1)[:, ::-1], axis=1)[:, ::-1]
        cum = np.cumsum(rel, axis=1)  # relevant at or above each position
        before = np.take_along_axis(cum - rel, start, axis=1)  # R: relevant above the run
        r = np.take_along_axis(cum, end, axis=1) - before  # relevant within the run
        size = end - start + 1
        j = pos - start  # 0-based place within the run
        inner = j * (r - 1) / np.maximum(size - 1, 1)
        contrib = (r / size) * (before + 1 + inner) / (pos + 1)
        total = rel.sum(1)
        ok = total > 0
        out[s : s + step][ok] = contrib[ok].sum(1) / total[ok]
    return out


def mean_average_precision(features: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Mean over queries of :func:`query_average_precision` (queries with no other-patient
    image of their label value are left out: they have nothing to retrieve)."""
    ap = query_average_precision(features, labels, groups)
    ok = np.isfinite(ap)
    if not ok.any():
        raise ValueError("no query has an image of its label value from another patient")
    return float(ap[ok].mean())


def knn_auroc(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int, *, seed: int = 0
) -> float:
    """AUROC of a leave-one-patient-out kNN classifier (score = positive share of neighbours).

    Label-light and fit-free, so a sweep can rank trials by it cheaply. Needs 0/1 labels with
    each class in at least 2 patients: a class held by one patient has no same-class
    neighbour left once that patient is excluded, so its images score lowest whatever the
    features and the AUROC sits at or below 0.5 by construction. Tied neighbours are picked
    at random (``seed``, see :func:`neighbours`), not in expectation: the expected score
    removes the pick's noise but keeps leave-one-out's bias (a positive query's tied pool
    holds one positive fewer), which an AUROC turns into 0 for a collapsed encoder.
    """
    y = np.asarray(labels)
    if not np.isin(y, (0, 1)).all():
        raise ValueError("knn_auroc needs 0/1 labels")
    if len(np.unique(y)) < 2:
        raise ValueError("knn_auroc needs both classes among the labels")
    if not retrieval_ok(y, groups):
        raise ValueError("knn_auroc needs each class in at least 2 patients")
    idx, valid = neighbours(features, groups, k, seed=seed)
    score = (y[idx] * valid).sum(1) / np.maximum(valid.sum(1), 1)
    return auroc(y, score)


def retrieval_chance(labels: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """(precision@k, mAP) of a random ranking: what features that know nothing score.

    "Relevant" is the query's own label value, so for a rare finding the many negatives
    retrieve negatives and both numbers sit near 1 whatever the features; only their distance
    from this level says anything. The candidates are a query's other-patient images, as in
    :func:`neighbour_shares`: k of them picked at random hold in expectation the share r / n
    carrying the query's value (for any k), and a random order of n images with r relevant has
    the expected AP (H_n + (r - 1)(n - H_n) / (n - 1)) / n, the tied-run term of
    :func:`query_average_precision` with every candidate tied. Queries count as the metrics
    count them: precision@k needs a candidate, AP a relevant one. Exact, from label counts:
    both are what a fully collapsed encoder scores.
    """
    y = np.asarray(labels)
    g = np.unique(np.asarray(groups).astype(str), return_inverse=True)[1]
    v = np.unique(y, return_inverse=True)[1]
    joint = np.zeros((g.max() + 1, v.max() + 1))
    np.add.at(joint, (g, v), 1)  # images per patient and label value
    n = len(y) - joint.sum(1)[g]  # candidates: the other patients' images
    r = joint.sum(0)[v] - joint[g, v]  # those carrying the query's label value
    has_candidate, has_relevant = n > 0, r > 0
    if not has_candidate.any():
        raise ValueError("no query has a neighbour from another patient")
    if not has_relevant.any():
        raise ValueError("no query has an image of its label value from another patient")
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, len(y) + 1))])
    h = harmonic[n.astype(int)]
    ap = (h + (r - 1) * (n - h) / np.maximum(n - 1, 1)) / np.maximum(n, 1)
    share = r / np.maximum(n, 1)
    return float(share[has_candidate].mean()), float(ap[has_relevant].mean())

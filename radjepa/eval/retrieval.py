"""kNN retrieval on embeddings: precision@k, mean average precision and a kNN-classifier AUROC.

Neighbours are by cosine similarity and never include the query itself or any image of the same
patient, which would otherwise be trivially "retrieved" and flatter the encoder. Images tied
at the k-th similarity (a collapsed encoder, duplicated images) count as a random pick among
them (in expectation for precision@k, by a seeded draw over patients for kNN AUROC): picking
by row order made the scores depend on how the CSV was sorted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from radjepa.eval.features import require_finite
from radjepa.eval.metrics import auroc, random_ranking_ap

__all__ = [
    "RetrievalScores",
    "retrieval_scores",
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


# similarities are multiples of 1e-12 in [-1, 1] (see _similarities): as integers they need
# 41 bits, which leaves 22 for the column in a 63-bit sort key
_SIM_STEPS = 10**12
_KEY_COL_BITS = 22


def _rank_rows(
    sim: np.ndarray, *, top: int | None = None, key_sort: bool | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's first ``top`` places (all without it) by descending similarity, ties in
    column order: (order, level, finite) [c, top] each, ``level`` equal exactly where the
    similarities are (tied runs) and ``finite`` False for the excluded (-inf) images, which
    rank last.

    This is ``argsort(-sim, kind="stable")``, most of the label-free time: the rounded
    similarities are integers of 1e-12, so the descending level and the column fit one int64
    key, unique in its row, and a plain sort of the keys gives the same order at about half
    the cost (a partition first, when only the first ``top`` places matter). Rows of more
    than 2**22 columns take the stable argsort."""
    n = sim.shape[1]
    top = n if top is None else min(top, n)
    if key_sort is None:
        key_sort = n <= 1 << _KEY_COL_BITS
    if not key_sort:
        order = np.argsort(-sim, axis=1, kind="stable")[:, :top]
        level = np.take_along_axis(sim, order, axis=1)
        return order, level, np.isfinite(level)
    steps = np.rint(sim * _SIM_STEPS)
    steps[np.isneginf(steps)] = -_SIM_STEPS - 1  # below every similarity
    key = (_SIM_STEPS - steps.astype(np.int64)) << _KEY_COL_BITS  # ascending key: descending sim
    key |= np.arange(n)
    if top < n:
        key = np.partition(key, top - 1, axis=1)[:, :top]
    key.sort(axis=1)
    level = key >> _KEY_COL_BITS
    return key & ((1 << _KEY_COL_BITS) - 1), level, level <= 2 * _SIM_STEPS


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
        top, _, finite = _rank_rows(sim, top=k_eff)  # ties keep cols order
        idx[s : s + chunk] = cols[top]
        valid[s : s + chunk] = finite
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
        contrib = _run_contrib(before, r, end - start + 1, pos - start, pos)
        total = rel.sum(1)
        ok = total > 0
        out[s : s + step][ok] = contrib[ok].sum(1) / total[ok]
    return out


def _run_contrib(
    before: np.ndarray, r: np.ndarray, size: np.ndarray, j: np.ndarray, pos: np.ndarray
) -> np.ndarray:
    """AP term of ranked position ``pos``, ``j``-th (0-based) of a tied run of ``size`` images
    holding ``r`` relevant ones after ``before`` relevant ones above it (see
    :func:`query_average_precision`). One expression for both callers, so that
    :func:`retrieval_scores` repeats the per-label path's float operations and its numbers."""
    inner = j * (r - 1) / np.maximum(size - 1, 1)
    return (r / size) * (before + 1 + inner) / (pos + 1)


def mean_average_precision(features: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Mean over queries of :func:`query_average_precision` (queries with no other-patient
    image of their label value are left out: they have nothing to retrieve)."""
    ap = query_average_precision(features, labels, groups)
    ok = np.isfinite(ap)
    if not ok.any():
        raise ValueError("no query has an image of its label value from another patient")
    return float(ap[ok].mean())


def _knn_problem(y: np.ndarray, groups: np.ndarray) -> str | None:
    """Why a kNN AUROC of these labels would mean nothing (see :func:`knn_auroc`), or None."""
    if not np.isin(y, (0, 1)).all():
        return "0/1 labels"
    if len(np.unique(y)) < 2:
        return "both classes among the labels"
    if not retrieval_ok(y, groups):
        return "each class in at least 2 patients"
    return None


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
    problem = _knn_problem(y, groups)
    if problem:
        raise ValueError(f"knn_auroc needs {problem}")
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
    the expected AP of :func:`~radjepa.eval.metrics.random_ranking_ap`, the tied-run term of
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
    ap = random_ranking_ap(n.astype(int), r)
    share = r / np.maximum(n, 1)
    return float(share[has_candidate].mean()), float(ap[has_relevant].mean())


class _TiedRuns:
    """The label-free part of one block of rankings (see :func:`_rank_rows`): which places
    hold a candidate, the tied run of each place, and the run at the k-th place, from which
    each label's precision@k and AP terms are read."""

    # above this share of tied places the AP terms are computed at every place, as
    # query_average_precision does, rather than gathered at the tied places only
    DENSE_TIES = 0.125

    def __init__(self, level: np.ndarray, finite: np.ndarray, pos: np.ndarray, k: int) -> None:
        n = level.shape[1]
        self.finite = finite
        new = np.ones_like(level, dtype=bool)
        new[:, 1:] = level[:, 1:] != level[:, :-1]
        last = np.ones_like(new)
        last[:, :-1] = new[:, 1:]
        self.start = np.maximum.accumulate(np.where(new, pos, 0), axis=1)
        self.end = np.minimum.accumulate(np.where(last, pos, n - 1)[:, ::-1], axis=1)[:, ::-1]
        self.pos = pos
        self.places = (pos + 1).astype(np.float64)
        self.rows = np.arange(len(level))
        # precision@k: the k-th place's run splits the candidates into certain picks (above
        # it) and a tie from which the remaining picks are drawn, each with weight `fill`
        valid = self.finite.sum(1)
        self.k_q = np.minimum(k, valid)
        self.kth_finite = self.finite[:, k - 1]
        self.kth_start, self.kth_end = self.start[:, k - 1], self.end[:, k - 1]
        above = np.where(self.kth_finite, self.kth_start, valid)
        at = np.where(self.kth_finite, self.kth_end - self.kth_start + 1, 0)
        self.fill = (self.k_q - above) / np.maximum(at, 1)
        tied = (self.end > self.start) & self.finite
        self.dense = tied.mean() > self.DENSE_TIES
        self.tied = None if self.dense else np.nonzero(tied)

    def share_hits(self, rel: np.ndarray, cum: np.ndarray) -> np.ndarray:
        """Expected relevant images among the k picks ([c]), as :func:`neighbour_shares`."""
        r, s0 = self.rows, self.kth_start
        before = cum[r, s0] - rel[r, s0]  # relevant strictly above the k-th place's run
        above_same = np.where(self.kth_finite, before, cum[:, -1])
        at_same = np.where(self.kth_finite, cum[r, self.kth_end] - before, 0)
        return above_same + self.fill * at_same

    def contrib(self, rel: np.ndarray, cum: np.ndarray) -> np.ndarray:
        """AP term of every place ([c, N]), as :func:`query_average_precision`.

        Outside tied runs a term is rel * cum / (place + 1), bit for bit what the run formula
        gives for a run of one, and a place of a run without relevant images adds 0: only
        tied places with relevant images need the run formula."""
        if self.dense:
            before = np.take_along_axis(cum - rel, self.start, axis=1)
            r = np.take_along_axis(cum, self.end, axis=1) - before
            size, j = self.end - self.start + 1, self.pos - self.start
            return _run_contrib(before, r, size, j, self.pos)
        out = (cum * rel).astype(np.float64)
        out /= self.places  # float(cum) / float(place + 1), as int64 / int64 divides
        rows, cols = self.tied
        if len(rows):
            st, en = self.start[rows, cols], self.end[rows, cols]
            before = cum[rows, st] - rel[rows, st]
            r = cum[rows, en] - before
            out[rows, cols] = _run_contrib(before, r, en - st + 1, cols - st, cols)
        return out


@dataclass(frozen=True)
class RetrievalScores:
    """precision@k, mAP and kNN AUROC of each label column ([L] each; NaN where the
    per-label function would refuse the label)."""

    precision_at_k: np.ndarray
    mean_average_precision: np.ndarray
    knn_auroc: np.ndarray


def retrieval_scores(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    block: int = 2**21,
) -> RetrievalScores:
    """:func:`precision_at_k`, :func:`mean_average_precision` and :func:`knn_auroc` (with
    ``seed``) of every column of ``labels`` [N, L] from one ranking of the images.

    The neighbour structure (similarities, the exclusion of self and same-patient images, the
    ranking and its tied runs) does not depend on the label, and building it is most of the
    per-label functions' time: each rebuilt it for every label, so an evaluation with 14 labels
    ranked every image 42 times. Here each block of queries (about ``block`` similarities, so
    memory stays bounded at any N) is ranked once, in :func:`neighbours`' tie-break order, and
    every label is scored from it: the first k places are the kNN picks, the run tied at the
    k-th place gives precision@k's expected share, and the runs give AP, which a permutation
    within a tied run cannot move. The numbers are the per-label functions' own, ties
    included: the same float operations on the same values. A label a per-label function
    refuses (nothing to retrieve; for kNN AUROC also labels not 0/1 or a class in fewer than
    2 patients) scores NaN instead of raising, so one bad column does not lose the others.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    f = _unit_rows(features)
    y = np.asarray(labels)
    y = y[:, None] if y.ndim == 1 else y
    n, n_labels = y.shape
    if len(f) != n:
        raise ValueError(f"{len(f)} feature rows but {n} label rows")
    if n_labels == 0:
        return RetrievalScores(np.zeros(0), np.zeros(0), np.zeros(0))
    groups = np.asarray(groups)
    knn_ok = [_knn_problem(y[:, j], groups) is None for j in range(n_labels)]
    patients, g = np.unique(groups.astype(str), return_inverse=True)
    rank = np.random.default_rng(seed).permutation(len(patients))[g]
    cols = np.lexsort((np.arange(n), rank))  # as in neighbours(): patient rank, then row
    fc, gc = f[cols], g[cols]
    yc = np.ascontiguousarray(y[cols].T)  # [L, N]: one label's values, in column order
    k_eff = min(k, n)
    share = np.full((n, n_labels), np.nan)
    ap = np.full((n, n_labels), np.nan)
    knn_score = np.zeros((n, n_labels))
    counts = np.zeros(n)
    pos = np.arange(n)
    step = max(1, block // max(n, 1))
    for s in range(0, n, step):
        q = slice(s, s + step)
        sim = _similarities(f[q], fc)  # [c, N], columns in tie-break order
        sim[g[q, None] == gc[None, :]] = -np.inf  # self and same patient
        order, level, finite = _rank_rows(sim)  # ties keep the tie-break order
        del sim
        runs = _TiedRuns(level, finite, pos, k_eff)
        del level
        for j in range(n_labels):
            rel = (yc[j][order] == y[q, j, None]) & finite  # excluded: never relevant
            cum = np.cumsum(rel, axis=1)  # relevant at or above each place
            hits = runs.share_hits(rel, cum)
            ok = runs.k_q > 0
            share[q, j][ok] = hits[ok] / runs.k_q[ok]
            total = cum[:, -1]
            ok = total > 0
            ap[q, j][ok] = runs.contrib(rel, cum).sum(1)[ok] / total[ok]
            if knn_ok[j]:
                top, valid = order[:, :k_eff], finite[:, :k_eff]
                knn_score[q, j] = (yc[j][top] * valid).sum(1) / np.maximum(valid.sum(1), 1)
        counts[q] = runs.k_q
    prec, mean_ap, knn = (np.full(n_labels, np.nan) for _ in range(3))
    has_neighbour = counts > 0
    for j in range(n_labels):
        if has_neighbour.any():
            prec[j] = share[:, j][has_neighbour].mean()
        has_relevant = np.isfinite(ap[:, j])
        if has_relevant.any():
            mean_ap[j] = ap[:, j][has_relevant].mean()
        if knn_ok[j]:
            knn[j] = auroc(y[:, j], np.ascontiguousarray(knn_score[:, j]))
    return RetrievalScores(prec, mean_ap, knn)

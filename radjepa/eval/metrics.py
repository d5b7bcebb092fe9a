"""AUROC / AUPRC with patient-level (cluster) bootstrap confidence intervals.

Both metrics are computed from per-score-level weighted counts, so one sort serves every
bootstrap draw: a draw is a vector of per-image weights (how often its patient was drawn).
Resampling patients rather than images keeps correlated images of one patient together, which
is what makes the interval honest when a patient has several radiographs. Applying one draw's
weights to two methods' scores gives a paired interval for their difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MIN_CLASS_PATIENTS",
    "Difference",
    "Interval",
    "Spread",
    "auroc",
    "auprc",
    "bootstrap_ci",
    "bootstrap_draws",
    "bootstrap_p_value",
    "class_patients",
    "holm_adjust",
    "interval_reliable",
    "paired_difference",
    "paired_differences",
    "random_ranking_ap",
    "spread",
    "weighted_auroc_auprc",
]


# Below this many patients in a class the percentile patient bootstrap covers far less than
# its nominal level: a handful of positive patients make a few distinct resamples, whose spread
# understates how much another handful would move the metric (docs/EVALUATION.md gives
# simulated coverages).
MIN_CLASS_PATIENTS = 20


def class_patients(y: np.ndarray, groups: np.ndarray) -> tuple[int, int]:
    """Patients with at least one positive / at least one negative image: the units the
    bootstrap resamples, so what decides how many distinct draws a class can have."""
    y = np.asarray(y).astype(int)
    g = np.asarray(groups).astype(str)
    return len(np.unique(g[y == 1])), len(np.unique(g[y == 0]))


def interval_reliable(y: np.ndarray, groups: np.ndarray) -> bool:
    """Whether both classes have :data:`MIN_CLASS_PATIENTS` patients, below which a 95%
    bootstrap interval is too narrow to be read as one (and a difference as significant)."""
    return min(class_patients(y, groups)) >= MIN_CLASS_PATIENTS


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval (NaN bounds when not computed)."""

    estimate: float
    low: float
    high: float
    draws: int  # bootstrap draws that had both classes (the others cannot define the metric)

    def to_dict(self) -> dict[str, float | int]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "draws": self.draws}


@dataclass(frozen=True)
class Difference(Interval):
    """A paired difference's interval plus the bootstrap p-value of "no difference".

    The interval answers "how big"; the p-value is what a correction over several labels can
    adjust (an interval at a corrected level would need tails of a handful of draws).
    """

    p_value: float = float("nan")  # two-sided; NaN without draws

    def to_dict(self) -> dict[str, float | int]:
        return {**super().to_dict(), "p_value": self.p_value}


def bootstrap_p_value(d: np.ndarray) -> float:
    """Two-sided bootstrap p-value that the difference is 0, from its per-draw values.

    The share of draws on the far side of 0 (ties counted on both sides), doubled, with the
    (k + 1) / (n + 1) rule: a p-value of 0 would claim more than ``n`` draws can show, so the
    smallest attainable value is 2 / (n + 1). NaN when no draw is finite.
    """
    d = np.asarray(d, dtype=float)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return float("nan")
    k = min(int(np.sum(d <= 0)), int(np.sum(d >= 0)))
    return float(min(1.0, 2 * (k + 1) / (len(d) + 1)))


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: adjusted p-values for a family of tests.

    Controls the chance of any false claim across the family (as Bonferroni does) but
    rejects more; it assumes nothing about how the tests depend on each other, which matters
    here: every label is scored on the same patients. NaN inputs stay NaN and do not count
    towards the family's size.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(len(p), np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    running = 0.0
    for rank, i in enumerate(finite[np.argsort(p[finite], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


@dataclass(frozen=True)
class Spread:
    """A point estimate's spread over probe seeds (other patient folds, same images).

    The bootstrap interval covers which patients were sampled, not how they were split into
    folds; re-running with other fold seeds moves the estimate too, and this says how much.
    ``std`` is the sample standard deviation (ddof=1, NaN for fewer than 2 finite values).
    """

    values: tuple[float, ...]  # one per seed, in seed order (NaN where a seed could not score)
    mean: float
    std: float
    low: float  # the smallest value
    high: float  # the largest value

    def to_dict(self) -> dict[str, float | int | list[float]]:
        return {
            "values": list(self.values),
            "n": sum(1 for v in self.values if np.isfinite(v)),
            "mean": self.mean,
            "std": self.std,
            "min": self.low,
            "max": self.high,
        }


def spread(values: Sequence[float]) -> Spread:
    """Mean, sample std, min and max of the finite ``values`` (all NaN when none is)."""
    v = np.asarray(values, dtype=np.float64)
    f = v[np.isfinite(v)]
    nan = float("nan")
    if len(f) == 0:
        return Spread(tuple(v.tolist()), nan, nan, nan, nan)
    std = float(f.std(ddof=1)) if len(f) > 1 else nan
    return Spread(tuple(v.tolist()), float(f.mean()), std, float(f.min()), float(f.max()))


def _levels(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort by descending score; return order, level start offsets, and y in that order."""
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first index of each tied level
    return order, starts, y[order].astype(bool)


def weighted_auroc_auprc(
    y: np.ndarray, scores: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision for each row of ``weights`` ([B, N] or [N]).

    Ties count one half for AUROC; AP is sklearn's step-wise definition
    (sum over thresholds of recall increment x precision). Rows where a class has zero weight
    give NaN.
    """
    y = np.asarray(y).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))  # [B, N]
    order, starts, ys = _levels(y, scores)
    ws = w[:, order]
    pos = np.add.reduceat(ws * ys, starts, axis=1)  # [B, levels] positive weight per level
    neg = np.add.reduceat(ws * ~ys, starts, axis=1)
    p_tot, n_tot = pos.sum(1), neg.sum(1)
    ok = (p_tot > 0) & (n_tot > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        # levels are in descending score order: negatives strictly below level l are those
        # in later levels
        neg_below = n_tot[:, None] - np.cumsum(neg, axis=1)
        auc = (pos * (neg_below + 0.5 * neg)).sum(1) / (p_tot * n_tot)
        tp = np.cumsum(pos, axis=1)
        fp = np.cumsum(neg, axis=1)
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        ap = (pos * precision).sum(1) / p_tot
    auc[~ok] = np.nan
    ap[~ok] = np.nan
    return auc, ap


def auroc(y: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (NaN when only one class is present)."""
    return float(weighted_auroc_auprc(y, scores, np.ones(len(y)))[0][0])


def auprc(y: np.ndarray, scores: np.ndarray) -> float:
    """Average precision, the usual AUPRC estimate (NaN when only one class is present)."""
    return float(weighted_auroc_auprc(y, scores, np.ones(len(y)))[1][0])


def random_ranking_ap(n: np.ndarray | int, r: np.ndarray | int) -> np.ndarray:
    """Expected average precision of a random order of ``n`` items, ``r`` of them positive.

    AP is not the prevalence ``r / n`` by chance: the first positive's precision is 1/rank,
    whose mean over a random rank is the harmonic term, so a random ranking scores
    (H_n + (r - 1)(n - H_n) / (n - 1)) / n with H_n = 1 + 1/2 + ... + 1/n, well above r / n
    for few positives (n=16, r=1: 0.211, not 0.0625). Both the probe's AUPRC and retrieval's
    mAP are read against it. Elementwise over arrays; NaN where ``r`` is 0 (AP undefined).
    """
    n_arr = np.asarray(n, dtype=np.int64)
    r_arr = np.asarray(r, dtype=np.float64)
    top = int(n_arr.max(initial=0))
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, top + 1))])
    h = harmonic[np.maximum(n_arr, 0)]
    nf = n_arr.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (h + (r_arr - 1) * (nf - h) / np.maximum(nf - 1, 1)) / np.maximum(nf, 1)
    return np.where((r_arr > 0) & (nf > 0), ap, np.nan)


def _group_weights(groups: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """[draws, N] image weights: each draw resamples the G patients with replacement."""
    _, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    g = int(inverse.max()) + 1
    counts = rng.multinomial(g, np.full(g, 1.0 / g), size=draws)  # [draws, G]
    return counts[:, inverse].astype(np.float64)


def bootstrap_draws(
    y: np.ndarray,
    scores: Sequence[np.ndarray],
    groups: np.ndarray | None = None,
    *,
    draws: int = 1000,
    seed: int = 0,
    chunk: int = 256,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per score vector, its (AUROC, AUPRC) on each patient-bootstrap draw ([draws] each).

    Every score vector is evaluated under the *same* patient weights: that is what makes a
    difference between two methods paired. The weights depend only on ``groups`` and
    ``seed``, so one method alone (``bootstrap_ci``) sees the very draws a comparison does.
    Draws missing a class are NaN.
    """
    y = np.asarray(y)
    if groups is None:
        groups = np.arange(len(y))
    rng = np.random.default_rng(seed)
    out: list[tuple[list[np.ndarray], list[np.ndarray]]] = [([], []) for _ in scores]
    for start in range(0, draws, chunk):
        w = _group_weights(groups, min(chunk, draws - start), rng)
        for (aucs, aps), s in zip(out, scores, strict=True):
            a, p = weighted_auroc_auprc(y, np.asarray(s), w)
            aucs.append(a)
            aps.append(p)
    empty = np.zeros(0)
    return [
        (np.concatenate(aucs) if aucs else empty, np.concatenate(aps) if aps else empty)
        for aucs, aps in out
    ]


def _difference(est: float, d: np.ndarray, level: float) -> Difference:
    """The percentile interval of a difference's draws and its p-value of no difference."""
    iv = _interval(est, d, level)
    return Difference(iv.estimate, iv.low, iv.high, iv.draws, bootstrap_p_value(d))


def _interval(est: float, d: np.ndarray, level: float) -> Interval:
    """Plain percentile interval of the finite draws (NaN bounds when none is finite)."""
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return Interval(est, float("nan"), float("nan"), 0)
    lo, hi = np.percentile(d, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return Interval(est, float(lo), float(hi), int(len(d)))


def bootstrap_ci(
    y: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    draws: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    chunk: int = 256,
) -> tuple[Interval, Interval]:
    """(AUROC, AUPRC) with percentile bootstrap intervals, resampling patients (``groups``).

    Without groups every image is its own cluster. ``draws=0`` gives NaN bounds. The interval
    is the plain percentile interval of the draws: it is reported as computed, never widened
    to cover the estimate.
    """
    y = np.asarray(y)
    est_auc, est_ap = weighted_auroc_auprc(y, scores, np.ones(len(y)))
    if draws <= 0:
        nan = float("nan")
        return Interval(float(est_auc[0]), nan, nan, 0), Interval(float(est_ap[0]), nan, nan, 0)
    ((auc_d, ap_d),) = bootstrap_draws(y, [scores], groups, draws=draws, seed=seed, chunk=chunk)
    return _interval(float(est_auc[0]), auc_d, level), _interval(float(est_ap[0]), ap_d, level)


def paired_difference(
    y: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    draws: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    chunk: int = 256,
) -> tuple[Difference, Difference]:
    """(AUROC a - b, AUPRC a - b) with a paired patient-bootstrap percentile interval.

    Both methods are scored on each draw's patients, so the variation they share (which
    patients happen to be easy) cancels in the difference; two separate intervals keep it and
    overlap even when one method wins on nearly every draw. With the same ``seed`` and
    ``groups`` the draws are those ``bootstrap_ci`` gave each method.
    """
    ((auc, ap),) = paired_differences(
        y, scores_a, [scores_b], groups, draws=draws, seed=seed, level=level, chunk=chunk
    )
    return auc, ap


def paired_differences(
    y: np.ndarray,
    reference: np.ndarray,
    others: Sequence[np.ndarray],
    groups: np.ndarray | None = None,
    *,
    draws: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    chunk: int = 256,
) -> list[tuple[Difference, Difference]]:
    """``paired_difference(y, reference, other)`` for every score vector in ``others``, from
    one set of patient draws.

    The draws depend only on ``groups`` and ``seed``, so comparing the reference with each
    baseline separately drew the same weights again and re-scored the reference on them once
    per baseline; here the weights are drawn and the reference scored once, and every interval
    is the one the separate calls give.
    """
    y = np.asarray(y)
    ones = np.ones(len(y))
    ref_auc, ref_ap = weighted_auroc_auprc(y, reference, ones)
    estimates = []
    for s in others:
        o_auc, o_ap = weighted_auroc_auprc(y, s, ones)
        estimates.append((float(ref_auc[0] - o_auc[0]), float(ref_ap[0] - o_ap[0])))
    if draws <= 0:
        nan = float("nan")
        return [(Difference(a, nan, nan, 0), Difference(p, nan, nan, 0)) for a, p in estimates]
    (r_auc, r_ap), *per_other = bootstrap_draws(
        y, [reference, *others], groups, draws=draws, seed=seed, chunk=chunk
    )
    return [
        (_difference(est_auc, r_auc - o_auc, level), _difference(est_ap, r_ap - o_ap, level))
        for (est_auc, est_ap), (o_auc, o_ap) in zip(estimates, per_other, strict=True)
    ]

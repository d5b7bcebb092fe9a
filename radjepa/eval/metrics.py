"""AUROC / AUPRC with patient-level (cluster) bootstrap confidence intervals.

Both metrics are computed from per-score-level weighted counts, so one sort serves every
bootstrap draw: a draw is a vector of per-image weights (how often its patient was drawn).
Resampling patients rather than images keeps correlated images of one patient together, which
is what makes the interval honest when a patient has several radiographs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "auroc", "auprc", "bootstrap_ci", "weighted_auroc_auprc"]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval (NaN bounds when not computed)."""

    estimate: float
    low: float
    high: float
    draws: int  # bootstrap draws that had both classes (the others cannot define the metric)

    def to_dict(self) -> dict[str, float | int]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "draws": self.draws}


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


def _group_weights(groups: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """[draws, N] image weights: each draw resamples the G patients with replacement."""
    _, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    g = int(inverse.max()) + 1
    counts = rng.multinomial(g, np.full(g, 1.0 / g), size=draws)  # [draws, G]
    return counts[:, inverse].astype(np.float64)


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
    scores = np.asarray(scores)
    if groups is None:
        groups = np.arange(len(y))
    est_auc, est_ap = weighted_auroc_auprc(y, scores, np.ones(len(y)))
    if draws <= 0:
        nan = float("nan")
        return Interval(float(est_auc[0]), nan, nan, 0), Interval(float(est_ap[0]), nan, nan, 0)
    rng = np.random.default_rng(seed)
    aucs, aps = [], []
    for start in range(0, draws, chunk):
        w = _group_weights(groups, min(chunk, draws - start), rng)
        a, p = weighted_auroc_auprc(y, scores, w)
        aucs.append(a)
        aps.append(p)
    auc_d, ap_d = np.concatenate(aucs), np.concatenate(aps)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]

    def interval(est: float, d: np.ndarray) -> Interval:
        d = d[np.isfinite(d)]
        if len(d) == 0:
            return Interval(est, float("nan"), float("nan"), 0)
        lo, hi = np.percentile(d, q)
        return Interval(est, float(lo), float(hi), int(len(d)))

    return interval(float(est_auc[0]), auc_d), interval(float(est_ap[0]), ap_d)

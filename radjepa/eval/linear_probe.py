"""Linear probes: standardised logistic regression on frozen features, grouped by patient.

Every label gets its own out-of-fold predictions from folds that never split a patient
(``StratifiedGroupKFold``), or its own patient-level train/test split, stratified on that
label (so two labels' held-out patients differ). Images of one patient are
near-duplicates for a probe; letting them straddle train and test inflates AUROC.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from radjepa.eval.features import require_finite
from radjepa.eval.heads import ProbeHead
from radjepa.eval.metrics import (
    MIN_CLASS_PATIENTS,
    Interval,
    Spread,
    bootstrap_ci,
    class_patients,
    random_ranking_ap,
    spread,
    weighted_auroc_auprc,
)

log = logging.getLogger(__name__)

__all__ = [
    "LabelResult",
    "ProbeResult",
    "cross_val_probe",
    "fit_head",
    "grouped_folds",
    "one_class_fold",
]

Split = Literal["kfold", "holdout"]


@dataclass
class LabelResult:
    """One label's probe outcome; ``skipped`` holds the reason when it could not be probed."""

    name: str
    n: int
    n_pos: int
    n_patients: int
    auroc: Interval | None = None
    auprc: Interval | None = None
    folds: int = 0
    skipped: str | None = None
    # the images AUROC/AUPRC were computed on: all of them for k-fold, the held-out patients'
    # for a holdout split: AUPRC's chance level is a random ranking of these (not of the whole
    # set), see ``auprc_chance``
    n_scored: int = 0
    n_scored_pos: int = 0
    # patients with a positive / a negative among the scored images: the bootstrap resamples
    # them, and with few in a class its interval covers far less than its level
    n_scored_pos_patients: int = 0
    n_scored_neg_patients: int = 0
    # with several probe seeds: the point estimates over the seeds (the first is ``seed``,
    # whose scores give the estimate and interval above); None with one seed
    seeds: list[int] | None = None
    seed_auroc: Spread | None = None
    seed_auprc: Spread | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n": self.n,
            "n_pos": self.n_pos,
            "n_patients": self.n_patients,
            "prevalence": self.n_pos / self.n if self.n else float("nan"),
            "n_scored": self.n_scored,
            "n_scored_pos": self.n_scored_pos,
            "scored_prevalence": (
                self.n_scored_pos / self.n_scored if self.n_scored else float("nan")
            ),
            "auprc_baseline": self.auprc_chance,
            "n_scored_pos_patients": self.n_scored_pos_patients,
            "n_scored_neg_patients": self.n_scored_neg_patients,
            "interval_reliable": self.interval_reliable,
            "folds": self.folds,
            "auroc": None if self.auroc is None else self.auroc.to_dict(),
            "auprc": None if self.auprc is None else self.auprc.to_dict(),
            "skipped": self.skipped,
            "seeds": self._seeds_dict(),
        }

    @property
    def auprc_chance(self) -> float:
        """AUPRC a random ranking of the scored images would get on average: AP's chance
        level, which exceeds their prevalence by the harmonic term of the first positive's
        rank (markedly so with few positives), so prevalence alone flatters a weak probe."""
        if not self.n_scored or not self.n_scored_pos:
            return float("nan")
        return float(random_ranking_ap(self.n_scored, self.n_scored_pos))

    @property
    def interval_reliable(self) -> bool | None:
        """Whether both classes have enough scored patients for the interval to mean 95%
        (None when nothing was scored)."""
        if not self.n_scored:
            return None
        low = min(self.n_scored_pos_patients, self.n_scored_neg_patients)
        return low >= MIN_CLASS_PATIENTS

    def _seeds_dict(self) -> dict[str, Any] | None:
        if self.seeds is None or self.seed_auroc is None or self.seed_auprc is None:
            return None
        return {
            "seeds": self.seeds,
            "auroc": self.seed_auroc.to_dict(),
            "auprc": self.seed_auprc.to_dict(),
        }


@dataclass
class ProbeResult:
    """Per-label results plus the scores they came from ([N, L], NaN where not predicted)."""

    labels: list[LabelResult]
    scores: np.ndarray
    split: Split
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "labels": [r.to_dict() for r in self.labels], **self.extra}


def _logreg(c: float, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed)
    )


def grouped_folds(
    y: np.ndarray,
    groups: np.ndarray,
    *,
    folds: int = 5,
    split: Split = "kfold",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs that never put one patient on both sides.

    k-fold uses as many folds as the rarer class has patients (at most ``folds``) so every test
    fold can hold both classes. Raises ValueError when fewer than 2 patients carry a class.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y).astype(int)
    groups = np.asarray(groups).astype(str)
    pos_g, neg_g = class_patients(y, groups)
    if min(pos_g, neg_g) < 2:
        raise ValueError(
            f"needs at least 2 patients in each class, has {pos_g} positive and {neg_g} negative"
        )
    idx = np.arange(len(y))
    if split == "holdout":
        # pick whole patients for the test side, stratified by whether a patient has a positive
        uniq = np.unique(groups)
        pos_pat = set(groups[y == 1])
        strat = np.array([g in pos_pat for g in uniq])
        rng = np.random.default_rng(seed)
        test_pat: list[str] = []
        for cls in (True, False):
            members = uniq[strat == cls]
            if len(members) == 0:  # e.g. every patient has a positive image: nothing to draw
                continue
            # at least one patient of each stratum stays on the train side
            n_test = min(len(members) - 1, max(1, round(test_fraction * len(members))))
            test_pat.extend(rng.choice(members, size=n_test, replace=False).tolist())
        test = np.isin(groups, test_pat)
        return [(idx[~test], idx[test])]
    k = min(folds, pos_g, neg_g)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in splitter.split(idx, y, groups)]


def _out_of_fold(
    x: np.ndarray,
    y: np.ndarray,
    pairs: list[tuple[np.ndarray, np.ndarray]],
    c: float,
    seed: int,
) -> np.ndarray:
    """[N] probabilities from the fold that held each image out (NaN where none did, or where
    its training side holds one class: callers skip such labels, see ``one_class_fold``)."""
    scores = np.full(len(y), np.nan)
    for train, test in pairs:
        if len(np.unique(y[train])) < 2:
            continue
        model = _logreg(c, seed).fit(x[train], y[train])
        scores[test] = model.predict_proba(x[test])[:, 1]
    return scores


def one_class_fold(
    y: np.ndarray, groups: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]]
) -> str | None:
    """Why the folds cannot be probed, when a fold's training side holds one class; else None.

    No probe can be fitted on such a side, and the constant a fold could give its test images
    instead (the training side's prevalence, exactly 0 or 1) ties them at an extreme of the
    pooled out-of-fold scores, where they outrank or trail every other fold's images whatever
    the features: perfectly separable features scored an AUROC far below 0.5 that way."""
    for i, (train, _test) in enumerate(pairs):
        classes = np.unique(y[train])
        if len(classes) < 2:
            kind = "positive" if classes.size and classes[0] == 1 else "negative"
            n_pat = len(np.unique(groups[train]))
            return (
                f"a fold's training side holds one class (fold {i + 1} of {len(pairs)} trains "
                f"on {len(train)} images of {n_pat} patient{'' if n_pat == 1 else 's'}, all "
                f"{kind}): too few patients of a class for grouped folds"
            )
    return None


def cross_val_probe(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    label_names: Sequence[str],
    c: float = 0.1,
    folds: int = 5,
    split: Split = "kfold",
    test_fraction: float = 0.2,
    bootstrap: int = 1000,
    seed: int = 0,
    seeds: int = 1,
) -> ProbeResult:
    """Out-of-fold (or held-out) probabilities per label, then AUROC/AUPRC with patient CIs.

    ``labels`` is [N] or [N, L] of 0/1. A label that cannot be probed (one class, too few
    patients) is reported with ``skipped`` and NaN scores instead of failing the run.
    ``seeds > 1`` repeats the folds with seeds ``seed + 1, ...`` and records each repeat's
    point estimates (no bootstrap: the spread over fold seeds is what they are for); the
    scores, estimates and intervals stay those of ``seed``.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    x = require_finite(features)
    y_all = np.asarray(labels)
    if y_all.ndim == 1:
        y_all = y_all[:, None]
    groups = np.asarray(groups).astype(str)
    if not (len(x) == len(y_all) == len(groups)):
        raise ValueError(
            f"features ({len(x)}), labels ({len(y_all)}) and groups ({len(groups)}) differ in "
            "length"
        )
    if y_all.shape[1] != len(label_names):
        raise ValueError(f"{y_all.shape[1]} label columns but {len(label_names)} names")
    if not np.isin(y_all, (0, 1)).all():
        raise ValueError("labels must be 0/1 (binarise categorical columns first)")
    scores = np.full(y_all.shape, np.nan)
    results = []
    fold_args: dict[str, Any] = {"folds": folds, "split": split, "test_fraction": test_fraction}
    for j, name in enumerate(label_names):
        y = y_all[:, j].astype(int)
        res = LabelResult(str(name), len(y), int(y.sum()), len(np.unique(groups)))
        results.append(res)
        try:
            pairs = grouped_folds(y, groups, seed=seed, **fold_args)
        except ValueError as err:
            res.skipped = str(err)
            log.warning("label %s skipped: %s", name, err)
            continue
        one_class = one_class_fold(y, groups, pairs)
        if one_class is not None:
            res.skipped = one_class
            log.warning("label %s skipped: %s", name, one_class)
            continue
        scores[:, j] = _out_of_fold(x, y, pairs, c, seed)
        res.folds = len(pairs)
        evaluated = np.isfinite(scores[:, j])
        ye, se, ge = y[evaluated], scores[evaluated, j], groups[evaluated]
        res.n_scored, res.n_scored_pos = int(evaluated.sum()), int(ye.sum())
        res.n_scored_pos_patients, res.n_scored_neg_patients = class_patients(ye, ge)
        if len(np.unique(ye)) < 2:
            res.skipped = "the evaluated images hold only one class"
            continue
        res.auroc, res.auprc = bootstrap_ci(ye, se, ge, draws=bootstrap, seed=seed)
        if seeds > 1:
            _seed_spread(res, x, y, groups, fold_args, c, range(seed, seed + seeds))
    return ProbeResult(results, scores, split)


def _seed_spread(
    res: LabelResult,
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    fold_args: dict[str, Any],
    c: float,
    seeds: range,
) -> None:
    """Fill ``res.seeds``/``seed_auroc``/``seed_auprc`` with each fold seed's estimates; the
    first seed's are the ones ``res`` already holds, so only the others are refitted."""
    if res.auroc is None or res.auprc is None:
        return
    aucs, aps = [res.auroc.estimate], [res.auprc.estimate]
    for s in seeds[1:]:
        pairs = grouped_folds(y, groups, seed=s, **fold_args)
        if one_class_fold(y, groups, pairs) is not None:  # as the first seed's would be skipped
            aucs.append(float("nan"))
            aps.append(float("nan"))
            continue
        sc = _out_of_fold(x, y, pairs, c, s)
        ok = np.isfinite(sc)
        a, p = weighted_auroc_auprc(y[ok], sc[ok], np.ones(int(ok.sum())))
        aucs.append(float(a[0]))  # NaN when a held-out split drew one class only
        aps.append(float(p[0]))
    res.seeds = list(seeds)
    res.seed_auroc, res.seed_auprc = spread(aucs), spread(aps)


def fit_head(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    label_names: Sequence[str],
    positive: Sequence[str | None] | None = None,
    c: float = 0.1,
    seed: int = 0,
    encoder: dict[str, Any] | None = None,
) -> ProbeHead:
    """Fit the deployable head on all images (labels with one class are rejected)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = require_finite(features)
    y_all = np.asarray(labels)
    if y_all.ndim == 1:
        y_all = y_all[:, None]
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    weights, biases = [], []
    for j, name in enumerate(label_names):
        y = y_all[:, j].astype(int)
        if len(np.unique(y)) < 2:
            raise ValueError(f"label {name!r} has one class only; a head cannot be fitted")
        lr = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(z, y)
        weights.append(lr.coef_[0])
        biases.append(lr.intercept_[0])
    return ProbeHead(
        weight=np.stack(weights, axis=1),  # [D, L]
        bias=np.asarray(biases),
        label_names=list(label_names),
        mean=scaler.mean_,
        scale=scaler.scale_,
        positive=positive,
        encoder=encoder or {},
    )

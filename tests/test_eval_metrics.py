"""AUROC/AUPRC and their patient-level bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from radjepa.eval.metrics import auprc, auroc, bootstrap_ci, weighted_auroc_auprc


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rounding", [None, 0])  # 0 decimals: heavy ties
def test_weighted_metrics_match_sklearn_with_ties_and_weights(seed, rounding):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 150)
    s = rng.normal(size=150) + y
    if rounding is not None:
        s = np.round(s, rounding)
    w = rng.integers(0, 4, 150).astype(float)
    a, p = weighted_auroc_auprc(y, s, w)
    assert a[0] == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)
    assert p[0] == pytest.approx(average_precision_score(y, s, sample_weight=w), abs=1e-12)
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auprc(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_one_class_gives_nan():
    assert np.isnan(auroc(np.ones(5), np.arange(5.0)))


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = rng.normal(size=300) + 0.8 * y
    groups = rng.integers(0, 120, 300)
    a1, p1 = bootstrap_ci(y, s, groups, draws=500, seed=3)
    a2, _ = bootstrap_ci(y, s, groups, draws=500, seed=3)
    assert a1 == a2
    assert a1.low <= a1.estimate <= a1.high and p1.low <= p1.estimate <= p1.high
    assert 0.5 < a1.low < a1.high < 1.0
    assert a1.draws == 500


def test_resampling_patients_widens_interval_when_images_repeat():
    # 40 patients with 8 near-identical images each: 320 images but only 40 independent units.
    rng = np.random.default_rng(0)
    y_pat = rng.integers(0, 2, 40)
    s_pat = rng.normal(size=40) + y_pat
    y, s = np.repeat(y_pat, 8), np.repeat(s_pat, 8) + rng.normal(scale=1e-3, size=320)
    groups = np.repeat(np.arange(40), 8)
    by_patient, _ = bootstrap_ci(y, s, groups, draws=800, seed=0)
    by_image, _ = bootstrap_ci(y, s, None, draws=800, seed=0)
    assert (by_patient.high - by_patient.low) > 1.8 * (by_image.high - by_image.low)


def test_zero_draws_reports_estimate_without_bounds():
    a, p = bootstrap_ci(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8]), draws=0)
    assert a.estimate == 1.0 and np.isnan(a.low) and a.draws == 0

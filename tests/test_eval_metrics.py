"""AUROC/AUPRC and their patient-level bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from radjepa.eval.metrics import (
    auprc,
    auroc,
    bootstrap_ci,
    bootstrap_draws,
    bootstrap_p_value,
    holm_adjust,
    paired_difference,
    paired_differences,
    spread,
    weighted_auroc_auprc,
)


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


def _correlated(n_pat=80, per=2, seed=0):
    """Two methods whose scores share a strong patient-level component (as two probes on
    the same radiographs do) and differ by a little noise of their own."""
    rng = np.random.default_rng(seed)
    y_pat = rng.integers(0, 2, n_pat)
    shared = rng.normal(size=n_pat) + 1.0 * y_pat  # which patients are easy: both see it
    groups = np.repeat(np.arange(n_pat), per)
    y = np.repeat(y_pat, per)
    base = np.repeat(shared, per) + rng.normal(scale=0.3, size=len(y))
    a = base + 0.3 * y + rng.normal(scale=0.2, size=len(y))  # a little better than b
    b = base + rng.normal(scale=0.2, size=len(y))
    return y, a, b, groups


def test_paired_difference_is_narrower_than_unpaired_when_scores_are_correlated():
    """Pairing is the point: the same patient draws for both methods cancel the variation
    they share. Resampling each method on its own draws (the naive difference, and what two
    overlapping per-method intervals amount to) gives a far wider interval for the same gap."""
    y, a, b, groups = _correlated()
    auc, ap = paired_difference(y, a, b, groups, draws=1000, seed=0)
    ((da, _),) = bootstrap_draws(y, [a], groups, draws=1000, seed=1)
    ((db, _),) = bootstrap_draws(y, [b], groups, draws=1000, seed=2)
    naive_lo, naive_hi = np.percentile(da - db, [2.5, 97.5])
    assert auc.estimate == pytest.approx(auroc(y, a) - auroc(y, b))
    assert ap.estimate == pytest.approx(auprc(y, a) - auprc(y, b))
    assert (auc.high - auc.low) < 0.5 * (naive_hi - naive_lo)
    # the gap is real and the paired interval sees it; the naive one straddles 0
    assert auc.low > 0 and naive_lo < 0 < naive_hi
    a_iv, _ = bootstrap_ci(y, a, groups, draws=1000, seed=0)
    b_iv, _ = bootstrap_ci(y, b, groups, draws=1000, seed=0)
    assert a_iv.low < b_iv.high  # the per-method intervals overlap all the same


def test_paired_difference_of_a_method_with_its_monotone_transform_is_exactly_zero():
    """AUROC and AUPRC depend on the ranking only: exp(scores) ranks as scores do on every
    draw, so the paired difference is 0 on each draw and the interval is [0, 0]."""
    y, a, _, groups = _correlated(seed=3)
    auc, ap = paired_difference(y, a, np.exp(a), groups, draws=300, seed=0)
    for iv in (auc, ap):
        assert (iv.estimate, iv.low, iv.high, iv.draws) == (0.0, 0.0, 0.0, 300)


def test_paired_difference_known_answers():
    # 4 images: a ranks perfectly (AUROC 1, AP 1); b swaps the middle two (AUROC 3/4, AP
    # (1 + 2/3) / 2 = 5/6)
    y = np.array([0, 0, 1, 1])
    a, b = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.1, 0.3, 0.2, 0.4])
    auc, ap = paired_difference(y, a, b, draws=0)
    assert auc.estimate == pytest.approx(0.25) and ap.estimate == pytest.approx(1 / 6)
    assert np.isnan(auc.low) and auc.draws == 0
    # a perfect ranking minus its reverse: AUROC 1 - 0 on every draw that has both classes
    y, s, _, groups = _correlated(seed=4)
    s = s + 10 * y  # separable
    auc, _ = paired_difference(y, s, -s, groups, draws=200, seed=0)
    assert (auc.estimate, auc.low, auc.high) == (1.0, 1.0, 1.0)


def test_paired_difference_matches_a_reference_on_the_same_patient_draws():
    """Recompute every draw with scikit-learn from the patient counts the same seeded
    generator gives: the interval is the percentile interval of those per-draw differences,
    and each method's own bootstrap_ci interval comes from the very same draws."""
    y, a, b, groups = _correlated(n_pat=50, seed=5)
    auc, ap = paired_difference(y, a, b, groups, draws=200, seed=7)
    _, inverse = np.unique(groups.astype(str), return_inverse=True)
    g = inverse.max() + 1
    counts = np.random.default_rng(7).multinomial(g, np.full(g, 1 / g), size=200)
    w = counts[:, inverse].astype(float)  # [draws, N]
    ra = np.array([roc_auc_score(y, a, sample_weight=wi) for wi in w])
    rb = np.array([roc_auc_score(y, b, sample_weight=wi) for wi in w])
    pa = np.array([average_precision_score(y, a, sample_weight=wi) for wi in w])
    pb = np.array([average_precision_score(y, b, sample_weight=wi) for wi in w])
    assert (auc.low, auc.high) == pytest.approx(tuple(np.percentile(ra - rb, [2.5, 97.5])))
    assert (ap.low, ap.high) == pytest.approx(tuple(np.percentile(pa - pb, [2.5, 97.5])))
    a_iv, _ = bootstrap_ci(y, a, groups, draws=200, seed=7)
    assert (a_iv.low, a_iv.high) == pytest.approx(tuple(np.percentile(ra, [2.5, 97.5])))


def test_paired_differences_from_one_set_of_draws_equal_the_separate_comparisons():
    """Several baselines against one reference from a single set of patient draws give,
    bit for bit, the intervals of one paired_difference call per baseline (600 draws cross
    the 256-draw chunks; draws=0 gives the estimates alone)."""
    y, a, b, groups = _correlated(n_pat=60, seed=6)
    c = np.random.default_rng(3).normal(size=len(y)) + 0.5 * y
    for draws in (600, 0):
        shared = paired_differences(y, a, [b, c, -a], groups, draws=draws, seed=11)
        separate = [paired_difference(y, a, o, groups, draws=draws, seed=11) for o in (b, c, -a)]
        for (auc, ap), (auc1, ap1) in zip(shared, separate, strict=True):
            for got, want in ((auc, auc1), (ap, ap1)):
                assert np.array_equal(
                    [got.estimate, got.low, got.high, got.draws],
                    [want.estimate, want.low, want.high, want.draws],
                    equal_nan=True,
                )
    assert paired_differences(y, a, [], groups, draws=50) == []


def test_seed_spread_summarises_finite_values():
    sp = spread([0.8, 0.9, float("nan"), 0.85])
    assert sp.mean == pytest.approx(0.85) and sp.std == pytest.approx(0.05)
    assert (sp.low, sp.high) == (0.8, 0.9) and sp.to_dict()["n"] == 3
    assert np.isnan(spread([0.7]).std) and np.isnan(spread([float("nan")]).mean)


def test_bootstrap_p_value_known_answers():
    """Two-sided, (k + 1) / (n + 1): 99 draws all above 0 give 2/100, never 0; draws split
    evenly, or all exactly 0 (a method against its monotone transform), give 1."""
    assert bootstrap_p_value(np.linspace(0.01, 0.2, 99)) == pytest.approx(0.02)
    assert bootstrap_p_value(-np.linspace(0.01, 0.2, 99)) == pytest.approx(0.02)
    assert bootstrap_p_value(np.r_[-np.ones(4), np.ones(96)]) == pytest.approx(2 * 5 / 101)
    assert bootstrap_p_value(np.r_[-np.ones(50), np.ones(50)]) == 1.0
    assert bootstrap_p_value(np.zeros(300)) == 1.0
    assert bootstrap_p_value(np.r_[np.nan, np.ones(9)]) == pytest.approx(0.2)  # 9 finite
    assert np.isnan(bootstrap_p_value(np.array([np.nan])))


def test_holm_adjust_known_answers():
    """Sorted p 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 is 0.02, 0.03, 0.06, 0.04; the step
    down keeps them non-decreasing (0.04 -> 0.06). NaN neither counts nor moves."""
    got = holm_adjust([0.01, 0.04, 0.03, 0.005])
    assert got == pytest.approx([0.03, 0.06, 0.06, 0.02])
    got = holm_adjust([0.01, float("nan"), 0.02])
    assert got[0] == pytest.approx(0.02) and np.isnan(got[1]) and got[2] == pytest.approx(0.02)
    assert holm_adjust([0.5, 0.9]) == [1.0, 1.0] and holm_adjust([]) == []
    assert holm_adjust([0.003]) == [0.003]  # a family of one is not adjusted


def test_paired_difference_p_value_is_the_share_of_draws_across_zero():
    """The p-value comes from the same per-draw differences as the interval (recomputed with
    scikit-learn from the same seeded patient draws)."""
    y, a, b, groups = _correlated(n_pat=50, seed=5)
    auc, _ = paired_difference(y, a, b, groups, draws=200, seed=7)
    _, inverse = np.unique(groups.astype(str), return_inverse=True)
    g = inverse.max() + 1
    counts = np.random.default_rng(7).multinomial(g, np.full(g, 1 / g), size=200)
    w = counts[:, inverse].astype(float)
    d = np.array(
        [roc_auc_score(y, a, sample_weight=wi) - roc_auc_score(y, b, sample_weight=wi) for wi in w]
    )
    k = min((d <= 0).sum(), (d >= 0).sum())
    assert auc.p_value == pytest.approx(2 * (k + 1) / 201)
    assert np.isnan(paired_difference(y, a, b, groups, draws=0)[0].p_value)


def _retrieval_world(kind: str, seed: int = 0):
    """Features with the ties a real set has (duplicated images, blank images, a collapsed
    encoder), several images per patient, and label columns of every kind the per-label
    functions meet: common, rare, one class, a class held by one patient, three values."""
    rng = np.random.default_rng(seed)
    n = 240
    if kind == "collapsed":  # few distinct vectors: most similarities tied
        feats = rng.integers(0, 2, (n, 3)).astype(float)
    elif kind == "duplicates":  # a few exact copies and blank rows among distinct vectors
        feats = rng.normal(size=(n, 12))
        feats[rng.choice(n, 6, replace=False)] = feats[rng.choice(n, 6, replace=False)]
        feats[:2] = 0.0
    else:
        feats = rng.normal(size=(n, 12))
    groups = rng.integers(0, 90, n).astype(str)
    one_patient = (groups == groups[0]).astype(np.int8)  # positives from a single patient
    labels = np.stack(
        [
            (rng.random(n) < 0.4).astype(np.int8),
            (rng.random(n) < 0.06).astype(np.int8),
            np.zeros(n, np.int8),
            one_patient,
            rng.integers(0, 3, n).astype(np.int8),
        ],
        axis=1,
    )
    return feats, labels, groups


def _or_nan(fn, *args, **kwargs) -> float:
    try:
        return fn(*args, **kwargs)
    except ValueError:
        return float("nan")


@pytest.mark.parametrize("kind", ["collapsed", "duplicates", "distinct"])
@pytest.mark.parametrize("k", [1, 10, 500])  # 500: more than any query's candidates
def test_retrieval_scores_equal_the_per_label_functions_bit_for_bit(kind, k):
    """One ranking for all labels gives exactly the numbers of precision_at_k,
    mean_average_precision and knn_auroc called label by label (ties, same-patient exclusion
    and the seeded kNN tie-break included), whatever the block of query rows; a label a
    per-label function refuses scores NaN."""
    from radjepa.eval.retrieval import (
        knn_auroc,
        mean_average_precision,
        precision_at_k,
        retrieval_scores,
    )

    feats, labels, groups = _retrieval_world(kind)
    want = np.array(
        [
            [
                _or_nan(precision_at_k, feats, y, groups, k),
                _or_nan(mean_average_precision, feats, y, groups),
                _or_nan(knn_auroc, feats, y, groups, k, seed=5),
            ]
            for y in labels.T
        ]
    )
    assert np.isnan(want[2:, 2]).all() and np.isfinite(want[:2]).all()  # the refusals happen
    for block in (2**21, 7 * len(feats), 1):  # all rows at once, 7 rows, one row per block
        got = retrieval_scores(feats, labels, groups, k, seed=5, block=block)
        got = np.stack([got.precision_at_k, got.mean_average_precision, got.knn_auroc], 1)
        assert np.array_equal(got, want, equal_nan=True), (block, got - want)


def test_retrieval_scores_key_sort_ranks_as_the_stable_argsort():
    """The int64-key sort and the stable argsort it replaces give the same places, tie
    levels and excluded images on rounded similarities with ties and -inf exclusions."""
    from radjepa.eval.retrieval import _rank_rows, _similarities, _unit_rows

    feats, _, groups = _retrieval_world("duplicates", seed=1)
    f = _unit_rows(np.round(feats, 1))
    sim = _similarities(f, f)
    sim[groups[:, None] == groups[None, :]] = -np.inf
    order, level, finite = _rank_rows(sim, key_sort=True)
    order_ref, level_ref, finite_ref = _rank_rows(sim, key_sort=False)
    assert np.array_equal(order, order_ref) and np.array_equal(finite, finite_ref)
    assert np.array_equal(level[:, 1:] == level[:, :-1], level_ref[:, 1:] == level_ref[:, :-1])
    assert (level[:, 1:] == level[:, :-1]).any()  # the case has ties to keep in order


def test_retrieval_scores_memory_is_bounded_by_the_query_block():
    """Queries are ranked a block of rows at a time: the peak allocation stays far below one
    N x N float64 similarity matrix, which at 50k images would be 20 GB."""
    import tracemalloc

    from radjepa.eval.retrieval import retrieval_scores

    rng = np.random.default_rng(0)
    n = 2500
    feats = rng.normal(size=(n, 8))
    labels = (rng.random((n, 2)) < 0.3).astype(np.int8)
    groups = rng.integers(0, 800, n)
    tracemalloc.start()
    try:
        retrieval_scores(feats, labels, groups, 10, block=2**15)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < n * n * 8 / 8, peak / 2**20

"""Linear probes on arrays: patient-grouped folds, skipped labels, heads that round-trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from radjepa.eval.heads import HeadError, ProbeHead, load_head, save_head
from radjepa.eval.linear_probe import LabelResult, cross_val_probe, fit_head, grouped_folds
from radjepa.eval.metrics import random_ranking_ap
from radjepa.eval.retrieval import knn_auroc, precision_at_k


def _world(n_pat=60, per=3, dim=16, signal=2.0, seed=0):
    """Patients with a 0/1 label each, `per` images per patient, one informative feature."""
    rng = np.random.default_rng(seed)
    y_pat = np.arange(n_pat) % 2
    groups = np.repeat([f"p{i}" for i in range(n_pat)], per)
    y = np.repeat(y_pat, per)
    x = rng.normal(size=(n_pat * per, dim))
    x[:, 0] += signal * y
    return x, y, groups


@pytest.mark.parametrize("split", ["kfold", "holdout"])
def test_folds_never_split_a_patient_and_cover_both_classes(split):
    _, y, groups = _world()
    pairs = grouped_folds(y, groups, folds=5, split=split, seed=1)
    assert len(pairs) == (5 if split == "kfold" else 1)
    for train, test in pairs:
        assert not set(groups[train]) & set(groups[test])
        assert set(y[test]) == {0, 1}
    if split == "kfold":  # out-of-fold: every image is tested exactly once
        tested = np.concatenate([te for _, te in pairs])
        assert sorted(tested) == list(range(len(y)))


def test_holdout_works_when_every_patient_has_a_positive_image():
    # one negative and one positive image per patient: the "no positive" stratum is empty
    groups = np.repeat([f"p{i}" for i in range(20)], 2)
    y = np.tile([0, 1], 20)
    ((train, test),) = grouped_folds(y, groups, split="holdout", test_fraction=0.2, seed=3)
    assert not set(groups[train]) & set(groups[test])
    assert len(set(groups[test])) == 4 and len(train) + len(test) == len(y)
    assert set(y[train]) == set(y[test]) == {0, 1}
    x = np.random.default_rng(0).normal(size=(len(y), 5))
    (res,) = cross_val_probe(x, y, groups, label_names=["a"], split="holdout", bootstrap=10).labels
    assert res.skipped is None and res.folds == 1 and res.auroc is not None


def test_probe_finds_signal_and_not_noise():
    x, y, groups = _world()
    noise = np.random.default_rng(5).normal(size=x.shape)
    labels = np.stack([y, y], axis=1)
    res = cross_val_probe(
        np.concatenate([x[:, :1], noise], axis=1),
        labels,
        groups,
        label_names=["signal", "again"],
        bootstrap=300,
    )
    sig = res.labels[0]
    assert sig.auroc.estimate > 0.85 and sig.auroc.low <= sig.auroc.estimate <= sig.auroc.high
    assert sig.folds == 5 and sig.n_patients == 60
    res_noise = cross_val_probe(noise, y, groups, label_names=["noise"], bootstrap=300)
    iv = res_noise.labels[0].auroc
    assert iv.low < 0.5 + 0.15 and iv.low <= iv.estimate <= iv.high
    assert abs(iv.estimate - 0.5) < 0.2
    assert np.isfinite(res.scores).all()


def test_single_class_and_single_patient_labels_are_skipped_with_reason():
    x, y, groups = _world()
    one_class = np.zeros_like(y)
    one_patient = (groups == "p1").astype(int)
    res = cross_val_probe(
        x,
        np.stack([y, one_class, one_patient], 1),
        groups,
        label_names=["ok", "none", "rare"],
        bootstrap=50,
    )
    ok, none, rare = res.labels
    assert ok.skipped is None and ok.auroc is not None
    assert "0 positive" in none.skipped and none.auroc is None
    assert "1 positive" in rare.skipped
    assert np.isnan(res.scores[:, 1]).all()
    d = res.to_dict()
    json.dumps(d)
    assert d["labels"][1]["skipped"] == none.skipped


def test_a_fold_that_trains_on_one_class_skips_the_label_instead_of_scoring_it():
    """Three patients in two folds: one fold trains on a single patient. When that patient's
    images are all positive, its test images got the constant 1.0, which outranked every
    other fold's probabilities: perfectly separable features scored an AUROC of 0.29 (folds
    that each train on both classes score it above 0.5; their calibrations differ)."""
    y = np.array([1, 1, 1, 0] + [1, 1, 1] + [1, 0, 0, 0])  # patients: 3+/1-, 3+, 1+/3-
    groups = np.repeat(["a", "b", "c"], [4, 3, 4])
    x = np.c_[y + 0.01 * np.random.default_rng(0).normal(size=len(y)), np.zeros(len(y))]
    outcomes, scored = set(), []
    for seed in range(12):
        pairs = grouped_folds(y, groups, seed=seed)
        one_class = any(len(np.unique(y[train])) < 2 for train, _ in pairs)
        lab = cross_val_probe(x, y, groups, label_names=["y"], bootstrap=0, seed=seed).labels[0]
        if one_class:
            assert lab.skipped is not None and "training side holds one class" in lab.skipped
            assert lab.auroc is None and lab.n_scored == 0
        else:
            assert lab.skipped is None and lab.auroc.estimate > 0.5
            scored.append(seed)
        outcomes.add(one_class)
    assert outcomes == {True, False}  # both kinds of split were drawn
    # a later probe seed whose folds train on one class counts as no estimate, not a wrong one
    lab = cross_val_probe(x, y, groups, label_names=["y"], bootstrap=0, seed=scored[0], seeds=6)
    values = lab.labels[0].seed_auroc.values
    assert np.isnan(values).any() and all(v > 0.5 for v in values if np.isfinite(v))


def test_non_binary_labels_are_refused():
    x, y, groups = _world()
    with pytest.raises(ValueError, match="0/1"):
        cross_val_probe(x, y * 2, groups, label_names=["y"])


def test_head_round_trip_reproduces_predictions_exactly(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, groups = _world(dim=24)
    y2 = (x[:, 1] > 0).astype(int)
    labels = np.stack([y, y2], 1)
    enc = {"checkpoint": "/ckpt", "step": 7, "sha256": "ab" * 32, "which": "target"}
    head = fit_head(x, labels, label_names=["a", "b=yes"], positive=[None, "yes"], encoder=enc)
    before = head.predict_proba(x)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(x, y2)
    np.testing.assert_allclose(before[:, 1], ref.predict_proba(x)[:, 1], atol=1e-6)
    save_head(tmp_path / "head", head)
    again = load_head(tmp_path / "head")
    assert np.array_equal(again.predict_proba(x), before)
    assert again.label_names == ["a", "b=yes"] and again.positive == [None, "yes"]
    assert again.encoder["step"] == 7 and again.feature_dim == 24
    meta = json.loads((tmp_path / "head" / "head.json").read_text())
    assert meta["encoder"]["sha256"] == "ab" * 32
    with pytest.raises(HeadError, match="expected \\[N, 24\\]"):
        again.predict_proba(x[:, :10])


def test_load_head_rejects_broken_folders(tmp_path):
    with pytest.raises(HeadError, match="missing"):
        load_head(tmp_path)
    head = ProbeHead(np.ones((4, 1)), np.zeros(1), ["x"])
    save_head(tmp_path, head)
    meta = json.loads((tmp_path / "head.json").read_text())
    meta["feature_dim"] = 5
    (tmp_path / "head.json").write_text(json.dumps(meta))
    with pytest.raises(HeadError, match="dim 4"):
        load_head(tmp_path)
    with pytest.raises(HeadError, match="label names"):
        ProbeHead(np.ones((4, 2)), np.zeros(2), ["only-one"])


def test_retrieval_excludes_same_patient():
    # every patient's images share one feature vector but carry random labels per image:
    # counting same-patient neighbours would make precision@k look perfect on patient identity.
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 8))
    groups = np.repeat(np.arange(50), 4)
    feats = base[groups]
    y_pat = np.arange(50) % 2
    y = y_pat[groups]
    assert precision_at_k(feats, y, groups, k=5) < 0.75
    # separable classes (other patients carry the same class nearby) retrieve well
    sep = feats + 6.0 * y[:, None]
    assert precision_at_k(sep, y, groups, k=5) > 0.95
    assert knn_auroc(sep, y, groups, k=5) > 0.98
    assert 0.2 < knn_auroc(feats, y, groups, k=5) < 0.8
    with pytest.raises(ValueError, match="both classes"):
        knn_auroc(feats, np.zeros_like(y), groups, k=5)


def test_non_finite_features_are_refused_not_scored():
    """A diverged encoder embeds some images to NaN. kNN gave such a query no neighbours
    (score 0, still counted in the AUROC) and precision@k dropped it silently; the linear
    probe failed inside scikit-learn with advice about imputers."""
    x, y, groups = _world()
    x[3] = np.nan
    x[7, 2] = np.inf
    with pytest.raises(ValueError, match="2 of 180 feature vectors contain NaN or inf"):
        knn_auroc(x, y, groups, k=5)
    with pytest.raises(ValueError, match="2 of 180 feature vectors contain NaN or inf"):
        precision_at_k(x, y, groups, k=5)
    with pytest.raises(ValueError, match="2 of 180 feature vectors contain NaN or inf"):
        cross_val_probe(x, y, groups, label_names=["y"], bootstrap=0)
    with pytest.raises(ValueError, match="2 of 180 feature vectors contain NaN or inf"):
        fit_head(x, y, label_names=["y"])


def test_knn_auroc_refuses_a_class_held_by_one_patient():
    """With one positive patient, excluding its own images leaves its queries no positive
    neighbour: they scored 0, below every negative, so even perfect features gave <= 0.5."""
    x, y, groups = _world()
    y = (groups == "p1").astype(int)
    x[:, 0] = 10.0 * y  # perfectly separable
    with pytest.raises(ValueError, match="each class in at least 2 patients"):
        knn_auroc(x, y, groups, k=5)


def test_labels_the_probe_skips_get_no_retrieval_numbers():
    """precision@k of a one-class label was reported (and logged to MLflow) as a perfect 1.0
    beside "Not probed"; kNN AUROC of a one-patient class as a number <= 0.5."""
    from radjepa.config import load_config
    from radjepa.eval.features import Dataset
    from radjepa.eval.report import flat_metrics
    from radjepa.eval.runner import probe_features

    x, y, groups = _world()
    labels = np.stack([y, np.zeros_like(y), (groups == "p1").astype(int)], 1).astype(np.int8)
    names = ["ok", "none", "rare"]
    ds = Dataset(np.zeros((len(y), 2, 2), np.uint8), labels, names, [None] * 3, groups, [])
    cfg = load_config(None, ["probe.bootstrap=0", "probe.knn_k=5"])
    summary, _ = probe_features(x, ds, cfg)
    assert summary["precision_at_k"]["ok"] > 0.5 and summary["knn_auroc"]["ok"] > 0.5
    for name in ("none", "rare"):
        assert summary["precision_at_k"][name] is None and summary["knn_auroc"][name] is None
    logged = flat_metrics({"methods": {"ours": summary}})
    assert not [k for k in logged if "/none/" in k or "/rare/" in k]


def test_report_says_when_a_rare_label_used_fewer_folds():
    """A label whose rarer class has 3 patients is cross-validated 3-fold, but report.md only
    said "5-fold cross-validation" for every label."""
    from radjepa.config import load_config
    from radjepa.eval.features import Dataset
    from radjepa.eval.report import render_markdown
    from radjepa.eval.runner import probe_features

    x, y, groups = _world()
    rare = np.isin(groups, ["p1", "p3", "p5"]).astype(np.int8)
    labels = np.stack([y, rare], 1).astype(np.int8)
    ds = Dataset(
        np.zeros((len(y), 2, 2), np.uint8), labels, ["common", "rare"], [None] * 2, groups, []
    )
    cfg = load_config(None, ["probe.bootstrap=0", "probe.folds=5"])
    summary, _ = probe_features(x, ds, cfg)
    assert [lab["folds"] for lab in summary["labels"]] == [5, 3]
    report = {
        "checkpoint": "ckpt",
        "encoder": {},
        "data": {
            "csv": "labels.csv",
            "shards": None,
            "n_images": len(y),
            "n_patients": 60,
            "rejected": [],
            "labels": [
                {"name": n, "positive": None, "n_pos": int(labels[:, j].sum())}
                for j, n in enumerate(ds.label_names)
            ],
        },
        "protocol": {
            "pooling": "target",
            "C": 0.1,
            "split": "kfold",
            "folds": 5,
            "split_text": "5-fold cross-validation grouped by patient (stratified)",
            "bootstrap": 0,
            "knn_k": 10,
            "pixel_size": 32,
        },
        "methods": {"ours": summary},
    }
    md = render_markdown(report)
    common, rare_section = md.split("## rare")
    assert "3-fold, not 5-fold: the rarer class has only 3 patients" in rare_section
    assert "-fold, not" not in common.split("## common")[1]


def _tied_world(n=120, seed=0):
    """One image per patient; features fall into 2 exactly tied clusters unrelated to y."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.25).astype(int)
    cluster = rng.integers(0, 2, n)
    feats = np.stack([cluster, 1 - cluster], 1).astype(float)
    return feats, y, np.array([f"p{i}" for i in range(n)])


def test_retrieval_ties_do_not_depend_on_row_order():
    """Tied similarities (a collapsed encoder, duplicated images) were broken by row order:
    the same features and labels scored precision@10 0.76 in the NIH CSV's order and 0.44
    with the AP images listed first. A tie now counts as the expected value of a random pick
    among the tied images, so the row order cannot move a score."""
    feats, y, groups = _tied_world()
    scores = set()
    for order in (np.arange(len(y)), np.argsort(-y, kind="stable"), np.argsort(y, kind="stable")):
        p = precision_at_k(feats[order], y[order], groups[order], k=10)
        a = knn_auroc(feats[order], y[order], groups[order], k=10)
        scores.add((round(p, 12), round(a, 12)))
    assert len(scores) == 1, scores


def test_a_collapsed_encoder_scores_the_documented_chance_precision_at_k():
    """Every image embedded alike: all other patients tie, so precision@k must be the
    documented chance level (the share of the query's class among the other patients'
    images, averaged over queries); the row-order tie-break gave the majority class's share
    (0.81-0.83 for view=AP on the NIH sample, chance 0.72)."""
    _, y, groups = _tied_world()
    n, n_pos = len(y), int(y.sum())
    same_class = np.where(y == 1, n_pos - 1, n - n_pos - 1) / (n - 1)
    p = precision_at_k(np.ones((n, 4)), y, groups, k=10)
    assert p == pytest.approx(same_class.mean(), abs=1e-12)


def test_auprc_is_reported_beside_the_prevalence_of_the_images_it_was_computed_on():
    """A held-out split scores only the test patients' images, but the report printed the
    prevalence of every image as AUPRC's chance level: 0.26 against a true 0.35 for this
    world (positives' patients have more images), which reads as a better AUPRC than it is."""
    from radjepa.eval.report import render_markdown

    rng = np.random.default_rng(1)
    per = rng.integers(1, 8, 60)
    groups = np.repeat([f"p{i}" for i in range(60)], per)
    y = np.repeat((np.arange(60) % 4 == 0).astype(int), per)
    x = rng.normal(size=(len(y), 4))
    for split in ("holdout", "kfold"):
        res = cross_val_probe(x, y, groups, label_names=["y"], split=split, bootstrap=0)
        scored = np.isfinite(res.scores[:, 0])
        lab = res.labels[0].to_dict()
        assert lab["n_scored"] == scored.sum() and lab["n_scored_pos"] == y[scored].sum()
        assert lab["scored_prevalence"] == pytest.approx(y[scored].mean())
        want = random_ranking_ap(scored.sum(), y[scored].sum())
        assert lab["auprc_baseline"] == pytest.approx(float(want))
    assert res.labels[0].to_dict()["scored_prevalence"] == pytest.approx(y.mean())  # k-fold
    holdout = cross_val_probe(x, y, groups, label_names=["y"], split="holdout", bootstrap=0)
    lab = holdout.labels[0].to_dict()
    assert abs(lab["scored_prevalence"] - lab["prevalence"]) > 0.05  # the case that misled
    summary = {**holdout.to_dict(), "precision_at_k": {"y": None}, "knn_auroc": {"y": None}}
    report = {
        "checkpoint": "c",
        "encoder": {},
        "data": {
            "csv": "x.csv",
            "shards": None,
            "n_images": len(y),
            "n_patients": 60,
            "rejected": [],
            "labels": [{"name": "y", "positive": None, "n_pos": int(y.sum())}],
        },
        "protocol": {
            "pooling": "p",
            "C": 0.1,
            "split": "holdout",
            "folds": 5,
            "split_text": "one split",
            "bootstrap": 0,
            "knn_k": 10,
            "pixel_size": 32,
        },
        "methods": {"ours": summary},
    }
    md = render_markdown(report)
    assert f"AUPRC chance level {lab['auprc_baseline']:.3f}" in md
    assert f"their prevalence {lab['scored_prevalence']:.3f}" in md
    assert f"the {lab['n_scored']} held-out images" in md and "pooled" not in md
    report["methods"]["ours"] = {**res.to_dict(), "precision_at_k": {"y": None}}
    report["methods"]["ours"]["knn_auroc"] = {"y": None}
    report["protocol"]["split"] = "kfold"
    md = render_markdown(report)
    assert f"(a random ranking's expected AP over all {len(y)} images, as scored;" in md
    assert "pooled over all out-of-fold predictions (not a mean of per-fold values)" in md


@pytest.mark.parametrize(("n", "r"), [(16, 1), (120, 4), (9, 5)])
def test_auprc_chance_level_is_a_random_rankings_mean_average_precision(n, r):
    """The chance level printed beside AUPRC was the prevalence r/n, but AUPRC is average
    precision, which a random ranking scores above r/n: 0.211 against 0.0625 for one positive
    in 16, so a probe no better than chance read as three times chance."""
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(n * 1000 + r)
    y = np.zeros(n, dtype=int)
    y[:r] = 1
    # random rankings as shuffled labels in rank order; AP = mean over positives of the
    # precision at their rank, checked against sklearn's on the first rankings
    ranked = rng.permuted(np.tile(y, (20000, 1)), axis=1)
    ap = (ranked * np.cumsum(ranked, axis=1) / np.arange(1, n + 1)).sum(1) / r
    for row, want in zip(ranked[:50], ap[:50], strict=True):
        assert average_precision_score(row, -np.arange(n)) == pytest.approx(want, abs=1e-12)
    lab = LabelResult(name="y", n=n, n_pos=r, n_patients=n, n_scored=n, n_scored_pos=r)
    d = lab.to_dict()
    # AP's standard deviation is below 0.3 here: 20000 rankings pin the mean to ~0.002
    assert d["auprc_baseline"] == pytest.approx(ap.mean(), abs=0.008)
    assert d["scored_prevalence"] == pytest.approx(r / n)
    # the same formula as retrieval's mAP chance (one patient per image, one query's view)
    assert float(random_ranking_ap(n, r)) == pytest.approx(d["auprc_baseline"], abs=1e-12)
    none = LabelResult(name="y", n=n, n_pos=0, n_patients=n, n_scored=n, n_scored_pos=0)
    assert np.isnan(none.to_dict()["auprc_baseline"])


def _map_case():
    """Five images on angles 0/20/40/70/70 degrees; A and B are one patient, D and E identical.

    By hand (relevant = the query's label value, same patient never ranked, a tie counted as
    either order with probability 1/2):
      A (y1): C rel, {D, E} tied (E rel) -> (1 + (2/2 + 2/3) / 2) / 2 = 11/12
      B (y0): C, {D rel, E} tied         -> (1/2 + 1/3) / 2           = 5/12
      C (y1): B, {D, E rel} tied, A rel  -> ((1/2 + 1/3) / 2 + 2/4) / 2 = 11/24
      D (y0): E, C, B rel, A             -> 1/3
      E (y1): D, C rel, B, A rel         -> (1/2 + 2/4) / 2           = 1/2
    """
    deg = np.radians([0, 20, 40, 70, 70])
    feats = np.stack([np.cos(deg), np.sin(deg)], 1)
    y = np.array([1, 0, 1, 0, 1])
    groups = np.array(["p0", "p0", "p1", "p2", "p3"])
    return feats, y, groups, np.array([11 / 12, 5 / 12, 11 / 24, 1 / 3, 1 / 2])


def test_retrieval_map_on_a_hand_computed_case_with_a_tie_and_a_shared_patient():
    from radjepa.eval.retrieval import mean_average_precision, query_average_precision

    feats, y, groups, expected = _map_case()
    assert query_average_precision(feats, y, groups) == pytest.approx(expected, abs=1e-12)
    assert mean_average_precision(feats, y, groups) == pytest.approx(63 / 120, abs=1e-12)
    for chunk in (1, 2):  # the chunked path gives the same numbers
        ap = query_average_precision(feats, y, groups, chunk=chunk)
        assert ap == pytest.approx(expected, abs=1e-12)


def test_retrieval_map_ties_do_not_depend_on_row_order_and_match_random_tie_breaks():
    """Like precision@k, a tie is the expected value of a random order among the tied
    images: the mean over many random tie-breaks (jittered copies) converges to it, and no
    row order moves it."""
    from radjepa.eval.retrieval import mean_average_precision, query_average_precision

    feats, y, groups = _tied_world(n=40, seed=2)
    exact = mean_average_precision(feats, y, groups)
    for order in (np.argsort(-y, kind="stable"), np.argsort(y, kind="stable")):
        assert mean_average_precision(feats[order], y[order], groups[order]) == pytest.approx(
            exact, abs=1e-12
        )
    rng = np.random.default_rng(0)
    jittered = [
        np.nanmean(query_average_precision(feats + 1e-6 * rng.random(feats.shape), y, groups))
        for _ in range(300)
    ]
    assert np.mean(jittered) == pytest.approx(exact, abs=0.003)


def test_retrieval_map_refuses_a_set_with_nothing_to_retrieve():
    from radjepa.eval.retrieval import mean_average_precision

    with pytest.raises(ValueError, match="no query has an image of its label value"):
        mean_average_precision(np.eye(2), np.array([0, 1]), np.array(["a", "b"]))


def test_probe_seeds_report_the_spread_of_the_point_estimates():
    """With seeds=3 each label records the estimates of fold seeds 0, 1, 2 (seed 0's being
    the reported estimate, whose interval is unchanged); with the default 1 nothing changes."""
    x, y, groups = _world(n_pat=40, signal=0.8)
    one = cross_val_probe(x, y, groups, label_names=["a"], bootstrap=50).labels[0]
    three = cross_val_probe(x, y, groups, label_names=["a"], bootstrap=50, seeds=3).labels[0]
    assert one.to_dict()["seeds"] is None
    assert three.auroc == one.auroc and three.auprc == one.auprc
    d = three.to_dict()["seeds"]
    assert d["seeds"] == [0, 1, 2]
    again = [
        cross_val_probe(x, y, groups, label_names=["a"], bootstrap=0, seed=s).labels[0]
        for s in (0, 1, 2)
    ]
    for metric in ("auroc", "auprc"):
        values = [getattr(r, metric).estimate for r in again]
        assert d[metric]["values"] == pytest.approx(values, abs=1e-12)
        assert d[metric]["mean"] == pytest.approx(np.mean(values))
        assert d[metric]["std"] == pytest.approx(np.std(values, ddof=1))
        assert (d[metric]["min"], d[metric]["max"]) == (min(values), max(values))
    assert len(set(d["auroc"]["values"])) > 1  # other folds, other estimates
    with pytest.raises(ValueError, match="seeds must be at least 1"):
        cross_val_probe(x, y, groups, label_names=["a"], seeds=0)


def _summary_report(x_by_method, y, groups, overrides):
    """probe_features for each feature set on one Dataset, compared as run_probe does."""
    from radjepa.config import load_config
    from radjepa.eval.compare import compare_methods
    from radjepa.eval.features import Dataset
    from radjepa.eval.runner import probe_features

    labels = y[:, None].astype(np.int8)
    ds = Dataset(np.zeros((len(y), 2, 2), np.uint8), labels, ["y=1"], [None], groups, [])
    cfg = load_config(None, overrides)
    methods, scores = {}, {}
    for name, feats in x_by_method.items():
        methods[name], scores[name] = probe_features(feats, ds, cfg)
    comp = compare_methods(
        methods, scores, ds.labels, ds.groups, ds.label_names,
        draws=cfg.probe.bootstrap, seed=cfg.probe.seed,
    )  # fmt: skip
    data = {
        "csv": "x.csv",
        "shards": None,
        "n_images": len(y),
        "n_patients": len(set(groups)),
        "rejected": [],
        "labels": [{"name": "y=1", "positive": None, "n_pos": int(y.sum())}],
    }
    proto = {
        "pooling": "p",
        "C": 0.1,
        "split": "kfold",
        "folds": 5,
        "split_text": "5-fold",
        "bootstrap": cfg.probe.bootstrap,
        "seed": cfg.probe.seed,
        "seeds": cfg.probe.seeds,
        "knn_k": 10,
        "pixel_size": 32,
    }
    return {
        "checkpoint": "c",
        "encoder": {},
        "data": data,
        "protocol": proto,
        "methods": methods,
        "comparisons": comp,
    }


def test_report_gives_the_encoder_minus_each_baseline_with_a_paired_interval():
    """The report gave each method's interval only; a reader comparing two methods had to
    eyeball overlapping intervals. It now carries encoder minus baseline per label, its
    paired interval and whether that excludes 0: in report.json, report.md and MLflow."""
    from radjepa.eval.metrics import paired_difference
    from radjepa.eval.report import flat_metrics, render_markdown

    x, y, groups = _world(n_pat=40, signal=1.5)
    noise = np.random.default_rng(9).normal(size=x.shape)
    report = _summary_report(
        {"ours": x, "random_init": noise}, y, groups, ["probe.bootstrap=200", "probe.knn_k=5"]
    )
    row = report["comparisons"]["methods"]["random_init"]["labels"][0]
    ours, rand = (report["methods"][m]["labels"][0] for m in ("ours", "random_init"))
    assert row["auroc_diff"]["estimate"] == pytest.approx(
        ours["auroc"]["estimate"] - rand["auroc"]["estimate"]
    )
    assert row["auroc_diff"]["low"] > 0 and row["auroc_diff"]["excludes_zero"] is True
    assert row["n_scored"] == len(y) and row["seeds"] is None
    assert report["comparisons"]["reference"] == "ours"
    flat = flat_metrics(report)
    assert flat["ours_vs_random_init/y_1/auroc_diff"] == row["auroc_diff"]["estimate"]
    assert flat["ours_vs_random_init/y_1/auprc_diff_ci_low"] == row["auprc_diff"]["low"]
    assert flat["ours_vs_random_init/y_1/auroc_diff_excludes_zero"] == 1.0
    assert flat["ours/y_1/retrieval_map"] == report["methods"]["ours"]["retrieval_map"]["y=1"]
    md = render_markdown(report)
    assert "| precision@k | p@k chance | mAP | mAP chance | kNN AUROC |" in md
    assert "Paired difference, encoder (frozen) minus each baseline" in md
    d = row["auroc_diff"]
    # one label: Holm's family is that label alone, so the difference holds after it (†)
    assert d["p_holm"] == d["p_value"] < 0.05 and d["holds_adjusted"] is True
    assert f"| {d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] *† |" in md
    # a method against itself: no difference, an interval of [0, 0] that does not exclude 0
    same = _summary_report({"ours": x, "random_init": x}, y, groups, ["probe.bootstrap=50"])
    row = same["comparisons"]["methods"]["random_init"]["labels"][0]["auroc_diff"]
    assert (row["estimate"], row["low"], row["high"], row["excludes_zero"]) == (0, 0, 0, False)
    iv, _ = paired_difference(y, x[:, 0], x[:, 0], groups, draws=0)
    assert iv.estimate == 0


def test_report_shows_the_seed_spread_beside_the_interval_and_for_the_difference():
    from radjepa.eval.report import flat_metrics, render_markdown

    x, y, groups = _world(n_pat=40, signal=0.8)
    noise = np.random.default_rng(9).normal(size=x.shape)
    overrides = ["probe.bootstrap=50", "probe.seeds=3", "probe.knn_k=5"]
    report = _summary_report({"ours": x, "pixels": noise}, y, groups, overrides)
    ours = report["methods"]["ours"]["labels"][0]["seeds"]
    pix = report["methods"]["pixels"]["labels"][0]["seeds"]
    row = report["comparisons"]["methods"]["pixels"]["labels"][0]["seeds"]
    diffs = np.subtract(ours["auroc"]["values"], pix["auroc"]["values"])
    assert row["auroc_diff"]["mean"] == pytest.approx(diffs.mean())
    assert row["auroc_diff"]["std"] == pytest.approx(diffs.std(ddof=1))
    flat = flat_metrics(report)
    assert flat["ours/y_1/auroc_seed_std"] == pytest.approx(ours["auroc"]["std"])
    assert flat["ours_vs_pixels/y_1/auroc_diff_seed_mean"] == pytest.approx(diffs.mean())
    md = render_markdown(report)
    assert "fold seeds 0-2" in md and "| AUROC over 3 seeds | AUPRC over 3 seeds |" in md
    a = ours["auroc"]
    assert f"{a['mean']:.3f} ± {a['std']:.3f} (min {a['min']:.3f}, max {a['max']:.3f})" in md
    assert "ΔAUROC over 3 seeds" in md and f"{diffs.mean():+.3f} ± " in md


def _three_methods(n_pat=40):
    """Encoder, random-init and pixel stand-ins probed on two labels with the same folds."""
    x, y, groups = _world(n_pat=n_pat, signal=1.5)
    rng = np.random.default_rng(4)
    y2 = np.stack([y, (x[:, 1] > 0).astype(int)], axis=1)
    feats = {
        "ours": x,
        "random_init": rng.normal(size=x.shape),
        "pixels": x + rng.normal(size=x.shape),
    }
    methods, scores = {}, {}
    for name, f in feats.items():
        res = cross_val_probe(f, y2, groups, label_names=["a", "b"], bootstrap=0)
        methods[name], scores[name] = res.to_dict(), res.scores
    return methods, scores, y2, groups


def test_comparisons_draw_the_patients_once_per_label_and_score_the_encoder_once(monkeypatch):
    """Each baseline's comparison drew the same patient weights again and re-scored the
    encoder on them: with two baselines and two labels, 4 x 300 draws and the encoder scored
    on 2 x (300 + 1) weight rows per label. One set of draws per label now serves both
    baselines: 2 x 300 draws, the encoder scored on 300 + 1 rows per label."""
    from radjepa.eval import metrics
    from radjepa.eval.compare import compare_methods

    methods, scores, y2, groups = _three_methods()
    drawn, scored = [], {}
    real_weights, real_score = metrics._group_weights, metrics.weighted_auroc_auprc

    def counting_weights(g, draws, rng):
        drawn.append(draws)
        return real_weights(g, draws, rng)

    def counting_score(y, s, w):
        key = np.asarray(s, dtype=np.float64).tobytes()
        scored[key] = scored.get(key, 0) + np.atleast_2d(w).shape[0]
        return real_score(y, s, w)

    monkeypatch.setattr(metrics, "_group_weights", counting_weights)
    monkeypatch.setattr(metrics, "weighted_auroc_auprc", counting_score)
    compare_methods(methods, scores, y2, groups, ["a", "b"], draws=300, seed=0)
    assert sum(drawn) == 2 * 300  # one set of 300 patient draws per label
    for j in range(2):
        ours = scores["ours"][:, j].tobytes()
        assert scored[ours] == 300 + 1  # the draws + the estimate, whatever the baselines


def test_shared_draws_leave_every_paired_interval_as_a_separate_comparison_gives_it():
    """The numbers do not move: each baseline's row equals paired_difference on the images
    both methods scored, with the probe's seed, as compare_methods computed it per baseline."""
    from radjepa.eval.compare import compare_methods
    from radjepa.eval.metrics import paired_difference

    methods, scores, y2, groups = _three_methods()
    comp = compare_methods(methods, scores, y2, groups, ["a", "b"], draws=300, seed=5)
    for other in ("random_init", "pixels"):
        for j, row in enumerate(comp["methods"][other]["labels"]):
            auc, ap = paired_difference(
                y2[:, j], scores["ours"][:, j], scores[other][:, j], groups, draws=300, seed=5
            )
            for got, want in ((row["auroc_diff"], auc), (row["auprc_diff"], ap)):
                assert {k: got[k] for k in want.to_dict()} == want.to_dict()
                extra = {"excludes_zero", "p_holm", "holds_adjusted", "interval_reliable"}
                assert set(got) == {*want.to_dict(), *extra}
            assert row["auroc_diff"]["excludes_zero"] == bool(auc.low > 0 or auc.high < 0)
            assert row["n_scored"] == len(groups)


def test_differences_that_round_to_zero_print_as_zero_not_minus_zero():
    """A paired difference of -0.00036 (two nearly identical probes, a real bootstrap) printed
    as ``-0.000`` in report.md and in the CLI's summary line, and an exact 0 (a method against
    itself) as ``+0.000``: a sign with no number behind it. Both now print ``0.000``."""
    from pipelines.cli_probe import _paired_cells
    from radjepa.eval.compare import difference_dict
    from radjepa.eval.metrics import paired_difference
    from radjepa.eval.report import render_markdown

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    a = rng.normal(size=300) + y
    b = a + np.random.default_rng(6).normal(scale=0.02, size=300)
    _, ap = paired_difference(y, a, b, np.arange(300), draws=300, seed=6)
    assert -0.0005 < ap.estimate < 0 and ap.low < -0.0005  # rounds to -0.000, -0.002
    x, yw, groups = _world(n_pat=30)
    report = _summary_report({"ours": x, "random_init": x}, yw, groups, ["probe.bootstrap=50"])
    row = report["comparisons"]["methods"]["random_init"]["labels"][0]
    assert row["auroc_diff"]["estimate"] == 0  # the same features: exactly no difference
    row["auprc_diff"] = difference_dict(ap)
    md = render_markdown(report)
    assert "-0.000" not in md and "+0.000" not in md
    assert "| 0.000 [0.000, 0.000] | 0.000 [-0.002, +0.001] |" in md
    assert _paired_cells(report, "y=1") == ["ours-random_init 0.000 [0.000, 0.000]"]
    row["auroc_diff"] = difference_dict(ap)
    assert _paired_cells(report, "y=1") == ["ours-random_init 0.000 [-0.002, +0.001]"]


def test_each_baselines_differences_are_holm_adjusted_over_its_labels():
    """A report of many labels made one 95% test per label and starred every one that
    excluded 0, so stars came by chance. Each baseline's differences now carry Holm-adjusted
    p-values over its labels (one family per baseline and metric); a label with no difference
    (not probed, or no draws) is not counted."""
    from radjepa.eval.compare import compare_methods
    from radjepa.eval.metrics import holm_adjust

    methods, scores, y2, groups = _three_methods()
    comp = compare_methods(methods, scores, y2, groups, ["a", "b"], draws=300, seed=5)
    assert comp["correction"]["method"] == "holm"
    for other in ("random_init", "pixels"):
        assert comp["correction"]["sizes"][other] == {"auroc_diff": 2, "auprc_diff": 2}
        for metric in ("auroc_diff", "auprc_diff"):
            diffs = [row[metric] for row in comp["methods"][other]["labels"]]
            want = holm_adjust([d["p_value"] for d in diffs])
            assert [d["p_holm"] for d in diffs] == pytest.approx(want)
            assert all(d["p_holm"] >= d["p_value"] for d in diffs)
            assert [d["holds_adjusted"] for d in diffs] == [p < 0.05 for p in want]
    # label b not probed for ours: the family of every baseline shrinks to label a, unadjusted
    methods["ours"]["labels"][1] = {**methods["ours"]["labels"][1], "auroc": None}
    comp = compare_methods(methods, scores, y2, groups, ["a", "b"], draws=300, seed=5)
    a_row, b_row = comp["methods"]["pixels"]["labels"]
    assert comp["correction"]["sizes"]["pixels"] == {"auroc_diff": 1, "auprc_diff": 1}
    assert (
        b_row["auroc_diff"] is None
        and a_row["auroc_diff"]["p_holm"] == a_row["auroc_diff"]["p_value"]
    )
    # no draws: nothing to adjust
    comp = compare_methods(methods, scores, y2, groups, ["a", "b"], draws=0, seed=5)
    d = comp["methods"]["pixels"]["labels"][0]["auroc_diff"]
    assert (d["p_value"], d["p_holm"], d["holds_adjusted"]) == (None, None, None)


def test_the_report_says_when_too_few_draws_leave_no_difference_able_to_hold():
    """With B draws the smallest bootstrap p-value is 2 / (B + 1); Holm over m labels needs
    the best one at 0.05 / m. 20 draws cannot reach 0.05 even for one label (2/21): the
    report says so and names the draws that can (40); with 50 (2/51) the line goes."""
    from radjepa.eval.report import render_markdown

    x, y, groups = _world(n_pat=40, signal=1.5)
    noise = np.random.default_rng(9).normal(size=x.shape)
    for draws, shown in ((20, True), (50, False)):
        report = _summary_report(
            {"ours": x, "random_init": noise}, y, groups, [f"probe.bootstrap={draws}"]
        )
        md = render_markdown(report)
        line = f"with {draws} bootstrap draws no paired difference can hold after Holm's"
        assert (line in md) is shown
        assert ("over 1 label (" in md and "set probe.bootstrap=40 or more" in md) is shown
        d = report["comparisons"]["methods"]["random_init"]["labels"][0]["auroc_diff"]
        assert d["holds_adjusted"] is (not shown)  # a clear difference: p = 2/(B+1)


def _rare_world(n_pos, n_pat=40, per=2, signal=4.0, seed=0):
    """`n_pat` patients of `per` images, the first `n_pos` positive; feature 0 carries it."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"p{i}" for i in range(n_pat)], per)
    y = np.repeat((np.arange(n_pat) < n_pos).astype(int), per)
    x = rng.normal(size=(len(y), 8))
    x[:, 0] += signal * y
    return x, y, groups


def test_retrieval_chance_is_what_a_random_ranking_scores():
    """precision@k and mAP call a negative retrieving negatives a hit, so a rare label reads
    near 1 for any features; the chance level they are printed beside must be exactly a
    random ranking's: what a collapsed encoder (every candidate tied) scores, patients with
    several images and queries with nothing to retrieve included."""
    from radjepa.eval.retrieval import mean_average_precision, retrieval_chance

    rng = np.random.default_rng(3)
    for prevalence, dim in ((0.03, 3), (0.2, 384), (0.5, 768)):
        per = rng.integers(1, 4, 50)
        groups = np.repeat([f"p{i}" for i in range(50)], per)
        y = (rng.random(len(groups)) < prevalence).astype(int)
        y[:2], groups[:2] = 1, ["p0", "p1"]  # at least two positive patients
        order = np.argsort(-y, kind="stable")  # a CSV sorted by label: positives first
        y, groups = y[order], groups[order]
        # equal vectors at real embedding widths: a GEMM kernel's rounding split their ties
        # (at 768 dimensions this collapsed encoder scored p@7 0.84 where chance is 0.81)
        collapsed = np.full((len(y), dim), 0.3)
        want = (
            precision_at_k(collapsed, y, groups, k=7),
            mean_average_precision(collapsed, y, groups),
        )
        assert retrieval_chance(y, groups) == pytest.approx(want, abs=1e-12), dim
    # by hand: A, B one patient; the others alone. A (1) ranks C (1), D (0) in random order:
    # p = 1/2, AP = (1 + 1/2) / 2; B (0): p = 1/2, AP 3/4; C (1): A, B, D with one relevant:
    # p = 1/3, AP (1 + 1/2 + 1/3) / 3; D (0): B of A, B, C: the same
    y = np.array([1, 0, 1, 0])
    groups = np.array(["a", "a", "c", "d"])
    ap3 = (1 + 1 / 2 + 1 / 3) / 3
    assert retrieval_chance(y, groups) == pytest.approx(
        ((1 / 2 + 1 / 2 + 1 / 3 + 1 / 3) / 4, (3 / 4 + 3 / 4 + ap3 + ap3) / 4), abs=1e-12
    )


def test_report_prints_each_retrieval_number_beside_its_chance_level():
    """A rare label's precision@k and mAP printed 0.99 for an encoder and for a baseline
    alike, with no chance level beside them (AUPRC had one): now report.json, MLflow and a
    column of report.md carry each label's, which sits just as close to 1."""
    from radjepa.eval.report import flat_metrics, render_markdown
    from radjepa.eval.retrieval import retrieval_chance

    x, y, groups = _rare_world(3)
    noise = np.random.default_rng(9).normal(size=x.shape)
    report = _summary_report(
        {"ours": x, "random_init": noise}, y, groups, ["probe.bootstrap=0", "probe.knn_k=5"]
    )
    p_chance, map_chance = retrieval_chance(y, groups)
    assert p_chance > 0.8 and map_chance > 0.8
    flat = flat_metrics(report)
    for method in ("ours", "random_init"):
        res = report["methods"][method]
        assert res["precision_at_k_chance"]["y=1"] == p_chance
        assert res["retrieval_map_chance"]["y=1"] == map_chance
        assert flat[f"{method}/y_1/precision_at_k_chance"] == p_chance
        assert flat[f"{method}/y_1/retrieval_map_chance"] == map_chance
        assert res["precision_at_k"]["y=1"] > 0.8  # near 1 for noise features too
    md = render_markdown(report)
    row = next(line for line in md.splitlines() if line.startswith("| same architecture"))
    p_at_k = report["methods"]["random_init"]["precision_at_k"]["y=1"]
    assert f"| {p_at_k:.3f} | {p_chance:.3f} |" in row and f"| {map_chance:.3f} |" in row


def test_a_label_with_few_patients_shows_its_counted_draws_and_gets_no_dagger():
    """3 positive patients: the percentile patient bootstrap covers far less than 95%, yet
    the report printed "95% CI" and marked the difference *† (Holm) like any other, and never
    said that 13 of the 300 draws had been dropped. Now the label says how many draws counted
    and that its interval is unreliable, and neither report.md nor the CLI gives it the †."""
    from pipelines.cli_probe import _paired_cells
    from radjepa.eval.report import render_markdown

    x, y, groups = _rare_world(3)
    noise = np.random.default_rng(9).normal(size=x.shape)
    report = _summary_report(
        {"ours": x, "random_init": noise}, y, groups, ["probe.bootstrap=300", "probe.knn_k=5"]
    )
    lab = report["methods"]["ours"]["labels"][0]
    d = report["comparisons"]["methods"]["random_init"]["labels"][0]["auroc_diff"]
    assert (lab["n_scored_pos_patients"], lab["n_scored_neg_patients"]) == (3, 37)
    assert lab["interval_reliable"] is False and d["interval_reliable"] is False
    assert d["holds_adjusted"] is True and d["excludes_zero"] is True  # Holm alone would hold
    counted = lab["auroc"]["draws"]
    assert 0 < counted < 300
    md = render_markdown(report)
    assert f"{counted} of 300 bootstrap draws counted" in md
    assert "**Unreliable interval**: the scored images hold 3 positive and 37 negative" in md
    assert "*†" not in md and f"[{d['low']:+.3f}, {d['high']:+.3f}] * |" in md
    assert "*†" not in _paired_cells(report, "y=1")[0]
    # 20 patients a class: reliable, the dagger stays and no note is added
    x, y, groups = _world(n_pat=40, signal=1.5)
    noise = np.random.default_rng(9).normal(size=x.shape)
    report = _summary_report({"ours": x, "random_init": noise}, y, groups, ["probe.bootstrap=300"])
    md = render_markdown(report)
    assert report["methods"]["ours"]["labels"][0]["interval_reliable"] is True
    assert "*†" in md and "Unreliable interval" not in md


def test_the_too_few_draws_line_counts_the_draws_that_counted():
    """The Holm warning compared 2 / (requested + 1) with alpha; a draw whose patients hold
    one class is dropped, and the smallest p-value is 2 / (counted + 1). 41 draws requested
    for a label of 2 positive patients: 2/42 < 0.05 looked enough, but only 35 counted."""
    from radjepa.eval.report import render_markdown

    x, y, groups = _rare_world(2, n_pat=30, per=1)
    noise = np.random.default_rng(9).normal(size=x.shape)
    report = _summary_report({"ours": x, "random_init": noise}, y, groups, ["probe.bootstrap=41"])
    d = report["comparisons"]["methods"]["random_init"]["labels"][0]["auroc_diff"]
    assert 2 / (d["draws"] + 1) >= 0.05 > 2 / 42
    md = render_markdown(report)
    assert f"with {d['draws']} counted of 41 bootstrap draws" in md
    assert f"the smallest p-value is 2/{d['draws'] + 1}" in md


def test_a_holdout_split_is_described_as_one_per_label():
    """probe.split=holdout stratifies each label's split on that label, so two labels hold
    out different patients; the report called it "one patient-level split"."""
    from radjepa.config import load_config
    from radjepa.eval.runner import split_text

    x, y, groups = _world(n_pat=60)
    other = np.roll(y, 7)
    tests = [set(grouped_folds(lab, groups, split="holdout")[0][1]) for lab in (y, other)]
    assert tests[0] != tests[1]
    text = split_text(load_config(None, ["probe.split=holdout", "probe.test_fraction=0.2"]).probe)
    assert "one patient-level split" not in text
    assert text.startswith("a patient-level split of its own for each label") and "20%" in text
    assert split_text(load_config(None, []).probe).startswith("5-fold cross-validation")

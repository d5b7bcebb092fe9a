"""Linear probes on arrays: patient-grouped folds, skipped labels, heads that round-trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from radjepa.eval.heads import HeadError, ProbeHead, load_head, save_head
from radjepa.eval.linear_probe import cross_val_probe, fit_head, grouped_folds
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
        assert lab["auprc_baseline"] == pytest.approx(y[scored].mean())
    assert res.labels[0].to_dict()["auprc_baseline"] == pytest.approx(y.mean())  # k-fold: all
    holdout = cross_val_probe(x, y, groups, label_names=["y"], split="holdout", bootstrap=0)
    lab = holdout.labels[0].to_dict()
    assert abs(lab["auprc_baseline"] - lab["prevalence"]) > 0.05  # the case that misled
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
    assert f"the {lab['n_scored']} held-out images" in md and "pooled" not in md
    report["methods"]["ours"] = {**res.to_dict(), "precision_at_k": {"y": None}}
    report["methods"]["ours"]["knn_auroc"] = {"y": None}
    report["protocol"]["split"] = "kfold"
    md = render_markdown(report)
    assert f"(the prevalence of all {len(y)} images, as scored)" in md
    assert "pooled over all out-of-fold predictions (not a mean of per-fold values)" in md

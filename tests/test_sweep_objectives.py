"""The objectives a sweep ranks trials by, computed the way a trial computes them (no Ray)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from radjepa.config import load_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def labelled(nih_dir, tmp_path_factory) -> Path:
    """120 NIH images with a 0/1 label, as a CSV beside absolute image paths."""
    with (nih_dir / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))[:120]
    out = tmp_path_factory.mktemp("labels") / "labels.csv"
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "patient_id", "male"])
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    "image": str(nih_dir / r["image"]),
                    "patient_id": r["patient_id"],
                    "male": int(r["sex"] == "M"),
                }
            )
    return out


@pytest.mark.parametrize("metric", ["rankme", "knn_auroc", "probe_auroc"])
def test_each_sweep_metric_is_reported(labelled, metric, one_torch_thread):
    from pipelines.sweep import _probe_set
    from radjepa.engine import Pretrainer
    from radjepa.monitoring import quality_metrics

    sets = [f"tune.metric={metric}", "probe.folds=3"]
    if metric != "rankme":
        sets += [f"tune.labels_csv={labelled}", "tune.label_column=male"]
    cfg = load_config(TINY, sets)
    probe = _probe_set(cfg)
    trainer = Pretrainer(cfg, "cpu")
    images = probe["images"][:40] if probe else _images(labelled, cfg)
    out = quality_metrics(trainer, images, cfg, "cpu", probe)
    assert out["rankme"] > 1 and out["feature_std"] > 0
    if metric == "rankme":
        assert probe is None and set(out) == {"rankme", "feature_std"}
        return
    assert 0.0 <= out["knn_auroc"] <= 1.0
    if metric == "probe_auroc":
        assert 0.0 <= out["probe_auroc"] <= 1.0 and not math.isnan(out["probe_auroc"])
    else:
        assert "probe_auroc" not in out


@pytest.mark.parametrize("positive_patients", [0, 1])
def test_a_label_no_trial_could_rank_on_is_refused_before_the_sweep(
    labelled, tmp_path, positive_patients
):
    # with one class, or a class from one patient (excluded from its own neighbours), every
    # trial failed at its first report; the sweep now says so before any trial starts
    from pipelines.sweep import SweepError, _probe_set

    with labelled.open(newline="") as fh:
        rows = list(csv.DictReader(fh))[:30]
    first = rows[0]["patient_id"]
    for r in rows:
        r["male"] = int(positive_patients == 1 and r["patient_id"] == first)
    out = tmp_path / "labels.csv"
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cfg = load_config(
        TINY, ["tune.metric=knn_auroc", f"tune.labels_csv={out}", "tune.label_column=male"]
    )
    with pytest.raises(SweepError, match="tune.label_column=male") as err:
        _probe_set(cfg)
    assert f"positives come from {positive_patients} patient(s)" in str(err.value)


def _images(labelled: Path, cfg):
    from radjepa.eval.features import load_csv_dataset

    return load_csv_dataset(labelled, label_cols=["male"], size=cfg.ingest.image_size).images[:40]


def test_probe_set_decodes_with_every_ingest_setting(nih_dir, tmp_path):
    """The trial probe set must look like the training shards: dtype and window included."""
    from serve_helpers import dicom_from_png, nih_pngs

    from pipelines.sweep import _probe_set
    from radjepa.imaging.decode import decode_image

    # 8-bit DICOMs without a VOI window: the robust percentile window decides their contrast
    rows = ["image,patient_id,male"]
    for i, png in enumerate(nih_pngs(nih_dir, 6)):
        (tmp_path / f"{i}.dcm").write_bytes(dicom_from_png(png))
        rows.append(f"{i}.dcm,p{i},{i % 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    ingest = ["ingest.image_size=128", "ingest.dtype=uint16", "ingest.window_percentiles=[2,98]"]
    cfg = load_config(
        TINY,
        ["tune.metric=knn_auroc", f"tune.labels_csv={tmp_path / 'labels.csv'}"]
        + ["tune.label_column=male", *ingest],
    )
    images = _probe_set(cfg)["images"]
    assert images.dtype == np.uint16 and images.shape == (6, 128, 128)
    for i, got in enumerate(images):
        want = decode_image(
            (tmp_path / f"{i}.dcm").read_bytes(),
            size=128,
            dtype="uint16",
            window_percentiles=(2.0, 98.0),
            secret=b"k" * 32,
        ).pixels
        np.testing.assert_array_equal(got, want)

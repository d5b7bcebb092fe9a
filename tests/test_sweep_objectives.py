"""The objectives a sweep ranks trials by, computed the way a trial computes them (no Ray)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from radjepa.config import load_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def labelled(nih_dir, tmp_path_factory) -> Path:
    """120 NIH images with a 0/1 label, as a CSV beside absolute image paths."""
    rows = list(csv.DictReader((nih_dir / "labels.csv").open()))[:120]
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
    from pipelines.pretrain import _quality
    from pipelines.sweep import _probe_set
    from radjepa.engine import Pretrainer

    sets = [f"tune.metric={metric}", "probe.folds=3"]
    if metric != "rankme":
        sets += [f"tune.labels_csv={labelled}", "tune.label_column=male"]
    cfg = load_config(TINY, sets)
    probe = _probe_set(cfg)
    trainer = Pretrainer(cfg, "cpu")
    images = probe["images"][:40] if probe else _images(labelled, cfg)
    out = _quality(trainer, images, cfg, "cpu", probe)
    assert out["rankme"] > 1 and out["feature_std"] > 0
    if metric == "rankme":
        assert probe is None and set(out) == {"rankme", "feature_std"}
        return
    assert 0.0 <= out["knn_auroc"] <= 1.0
    if metric == "probe_auroc":
        assert 0.0 <= out["probe_auroc"] <= 1.0 and not math.isnan(out["probe_auroc"])
    else:
        assert "probe_auroc" not in out


def _images(labelled: Path, cfg):
    from radjepa.eval.features import load_csv_dataset

    return load_csv_dataset(labelled, label_cols=["male"], size=cfg.ingest.image_size).images[:40]

"""Paired comparisons: the encoder under test minus each baseline, label by label.

Two methods' separate bootstrap intervals answer "how sure are we of each number", not "is
one better": they share most of their variation (the same patients are hard for both), so
they overlap even when one method wins on almost every draw. The difference, computed on the
same images and the same patient draws for both, keeps only the variation that is not shared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from radjepa.eval.metrics import Interval, paired_difference, spread

__all__ = ["compare_methods", "difference_dict"]


def difference_dict(iv: Interval) -> dict[str, Any]:
    """An interval of a difference, plus whether it excludes 0 (None without an interval)."""
    excludes = None if not math.isfinite(iv.low) else bool(iv.low > 0 or iv.high < 0)
    return {**iv.to_dict(), "excludes_zero": excludes}


def _seed_difference(ref: dict[str, Any], other: dict[str, Any]) -> dict[str, Any] | None:
    """Spread of the per-seed differences: each fold seed gives both methods the same folds,
    so the difference is paired seed by seed as well."""
    a, b = ref.get("seeds"), other.get("seeds")
    if not a or not b or a["seeds"] != b["seeds"]:
        return None
    out: dict[str, Any] = {"seeds": a["seeds"]}
    for metric in ("auroc", "auprc"):
        diffs = np.asarray(a[metric]["values"], float) - np.asarray(b[metric]["values"], float)
        out[f"{metric}_diff"] = spread(diffs.tolist()).to_dict()
    return out


def compare_methods(
    methods: dict[str, dict[str, Any]],
    scores: dict[str, np.ndarray],
    labels: np.ndarray,
    groups: np.ndarray,
    label_names: Sequence[str],
    *,
    reference: str = "ours",
    draws: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """``reference`` minus every other method, per label: AUROC/AUPRC differences with paired
    patient-bootstrap intervals (``methods`` are ``probe_features`` summaries, ``scores`` their
    [N, L] out-of-fold scores, NaN where an image was not scored).

    With the probe's own ``seed`` and ``draws`` the patient draws are exactly those behind each
    method's interval in the report, so the three intervals describe the same resamples.
    """
    y_all = np.asarray(labels)
    if y_all.ndim == 1:
        y_all = y_all[:, None]
    groups = np.asarray(groups).astype(str)
    out: dict[str, Any] = {}
    for other in methods:
        if other == reference:
            continue
        rows = []
        for j, name in enumerate(label_names):
            ref_lab, oth_lab = methods[reference]["labels"][j], methods[other]["labels"][j]
            row: dict[str, Any] = {"name": name, "auroc_diff": None, "auprc_diff": None}
            row.update({"n_scored": 0, "seeds": None, "skipped": None})
            s_ref, s_oth = scores[reference][:, j], scores[other][:, j]
            ok = np.isfinite(s_ref) & np.isfinite(s_oth)
            y = y_all[ok, j].astype(int)
            if ref_lab.get("auroc") is None or oth_lab.get("auroc") is None:
                row["skipped"] = ref_lab.get("skipped") or oth_lab.get("skipped") or "not probed"
            elif len(np.unique(y)) < 2:  # only if the methods scored different images
                row["skipped"] = "the images both methods scored hold only one class"
            else:
                auc, ap = paired_difference(
                    y, s_ref[ok], s_oth[ok], groups[ok], draws=draws, seed=seed, level=level
                )
                row.update(
                    n_scored=int(ok.sum()),
                    auroc_diff=difference_dict(auc),
                    auprc_diff=difference_dict(ap),
                    seeds=_seed_difference(ref_lab, oth_lab),
                )
            rows.append(row)
        out[other] = {"labels": rows}
    return {"reference": reference, "level": level, "methods": out}

"""Paired comparisons: the encoder under test minus each baseline, label by label.

Two methods' separate bootstrap intervals answer "how sure are we of each number", not "is
one better": they share most of their variation (the same patients are hard for both), so
they overlap even when one method wins on almost every draw. The difference, computed on the
same images and the same patient draws for both, keeps only the variation that is not shared.

Each difference is one test at the report's level; a report of fourteen labels against two
baselines makes 28 such tests per metric, so some stars come by chance. Holm's adjustment over
the labels of one baseline and one metric (the claim "better than raw pixels on these labels"
is one family) says which survive. A label with fewer than ``MIN_CLASS_PATIENTS`` patients in a
class keeps its p-values, but its differences are flagged ``interval_reliable: false``: the
bootstrap behind them covers far less than 95%, so no claim across labels rests on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from radjepa.eval.metrics import (
    Difference,
    holm_adjust,
    interval_reliable,
    paired_differences,
    spread,
)

__all__ = ["compare_methods", "difference_dict"]


def difference_dict(iv: Difference) -> dict[str, Any]:
    """An interval of a difference, plus whether it excludes 0 (None without an interval) and
    its p-value of no difference (None without draws)."""
    excludes = None if not math.isfinite(iv.low) else bool(iv.low > 0 or iv.high < 0)
    p = iv.p_value if math.isfinite(iv.p_value) else None
    return {**iv.to_dict(), "excludes_zero": excludes, "p_value": p}


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
    method's interval in the report, so the three intervals describe the same resamples. Per
    label, the baselines that scored the same images (all of them, as the folds are shared)
    are compared from one set of draws, on which the reference is scored once.
    """
    y_all = np.asarray(labels)
    if y_all.ndim == 1:
        y_all = y_all[:, None]
    groups = np.asarray(groups).astype(str)
    others = [m for m in methods if m != reference]
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in others}
    for j, name in enumerate(label_names):
        ref_lab = methods[reference]["labels"][j]
        same_images: dict[bytes, list[str]] = {}  # scored-image mask -> baselines scoring them
        for other in others:
            oth_lab = methods[other]["labels"][j]
            row: dict[str, Any] = {"name": name, "auroc_diff": None, "auprc_diff": None}
            row.update({"n_scored": 0, "seeds": None, "skipped": None})
            rows[other].append(row)
            ok = np.isfinite(scores[reference][:, j]) & np.isfinite(scores[other][:, j])
            if ref_lab.get("auroc") is None or oth_lab.get("auroc") is None:
                row["skipped"] = ref_lab.get("skipped") or oth_lab.get("skipped") or "not probed"
            elif len(np.unique(y_all[ok, j])) < 2:  # only if the methods scored different images
                row["skipped"] = "the images both methods scored hold only one class"
            else:
                row.update(n_scored=int(ok.sum()), seeds=_seed_difference(ref_lab, oth_lab))
                same_images.setdefault(ok.tobytes(), []).append(other)
        for key, batch in same_images.items():
            ok = np.frombuffer(key, dtype=bool)
            diffs = paired_differences(
                y_all[ok, j].astype(int),
                scores[reference][ok, j],
                [scores[other][ok, j] for other in batch],
                groups[ok],
                draws=draws,
                seed=seed,
                level=level,
            )
            reliable = interval_reliable(y_all[ok, j], groups[ok])
            for other, (auc, ap) in zip(batch, diffs, strict=True):
                rows[other][j].update(
                    auroc_diff={**difference_dict(auc), "interval_reliable": reliable},
                    auprc_diff={**difference_dict(ap), "interval_reliable": reliable},
                )
    family = {other: _adjust(rows[other], level) for other in others}
    out = {other: {"labels": rows[other]} for other in others}
    correction = {"method": "holm", "family": "the labels of one baseline and one metric"}
    return {
        "reference": reference,
        "level": level,
        "correction": {**correction, "sizes": family},
        "methods": out,
    }


def _adjust(rows: list[dict[str, Any]], level: float) -> dict[str, int]:
    """Add ``p_holm`` and ``holds_adjusted`` to every difference of one baseline, per metric.

    ``holds_adjusted`` is None where there is nothing to adjust (no draws); the family's size
    (the differences with a p-value) is returned per metric for the report to state.
    """
    sizes = {}
    for metric in ("auroc_diff", "auprc_diff"):
        diffs = [row[metric] for row in rows if row.get(metric) is not None]
        p = [d["p_value"] if d["p_value"] is not None else math.nan for d in diffs]
        for d, adj in zip(diffs, holm_adjust(p), strict=True):
            ok = math.isfinite(adj)
            d["p_holm"] = adj if ok else None
            d["holds_adjusted"] = bool(adj < 1 - level) if ok else None
        sizes[metric] = sum(math.isfinite(v) for v in p)
    return sizes

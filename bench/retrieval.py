"""Retrieval metrics for every label: one ranking for all labels vs the per-label functions.

    python bench/retrieval.py [--images 2000] [--dim 192] [--labels 14] [--k 10] [--per-patient 3]

``probe_features`` reports precision@k, mAP and a kNN AUROC for each label of each feature
set. ``baseline`` is how it did it: ``precision_at_k``, ``mean_average_precision`` and
``knn_auroc`` called label by label, each building the N x N similarities and ranking every
row again. ``ours`` is ``retrieval_scores``: every label scored from one ranking, a block of
query rows at a time. Both run on the same synthetic set: ``--per-patient`` images per patient
around a patient's own point, labels read from the features with prevalences from 2% to 50%,
and 1% of the images exact copies of others, so tied similarities occur as with real
duplicates. Prints one JSON line: seconds of each, the speedup, and whether the numbers are
identical (they must be, bit for bit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from radjepa.eval.retrieval import (  # noqa: E402
    knn_auroc,
    mean_average_precision,
    precision_at_k,
    retrieval_scores,
)


def synthetic(
    images: int, dim: int, labels: int, per_patient: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features [N, dim] float32, 0/1 labels [N, L] and patient ids [N]."""
    rng = np.random.default_rng(seed)
    patients = max(2, images // per_patient)
    groups = rng.permutation(np.arange(images) % patients)
    centre = rng.normal(size=(patients, dim))
    feats = centre[groups] + 0.7 * rng.normal(size=(images, dim))
    copies = rng.choice(images, max(1, images // 100), replace=False)
    feats[copies] = feats[rng.choice(images, len(copies), replace=False)]
    direction = rng.normal(size=(dim, labels)) / np.sqrt(dim)
    signal = feats @ direction + rng.normal(size=(images, labels))
    prevalence = np.linspace(0.02, 0.5, labels)
    cut = [np.quantile(signal[:, j], 1 - prevalence[j]) for j in range(labels)]
    y = (signal > np.array(cut)).astype(np.int8)
    return feats.astype(np.float32), y, groups.astype(str)


def per_label(
    feats: np.ndarray, y: np.ndarray, groups: np.ndarray, k: int, seed: int
) -> np.ndarray:
    """[L, 3]: the three metrics of each label, one label at a time."""
    return np.array(
        [
            [
                precision_at_k(feats, col, groups, k),
                mean_average_precision(feats, col, groups),
                knn_auroc(feats, col, groups, k, seed=seed),
            ]
            for col in y.T
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--labels", type=int, default=14)
    ap.add_argument("--k", type=int, default=10, help="probe.knn_k")
    ap.add_argument("--per-patient", type=int, default=3, help="images per patient")
    ap.add_argument("--seed", type=int, default=0, help="probe.seed (kNN tie-break)")
    args = ap.parse_args()

    feats, y, groups = synthetic(args.images, args.dim, args.labels, args.per_patient)
    t0 = time.perf_counter()
    got = retrieval_scores(feats, y, groups, args.k, seed=args.seed)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    want = per_label(feats, y, groups, args.k, args.seed)
    baseline = time.perf_counter() - t0
    ours_all = np.stack([got.precision_at_k, got.mean_average_precision, got.knn_auroc], 1)
    print(
        json.dumps(
            {
                "bench": "retrieval",
                "images": args.images,
                "dim": args.dim,
                "labels": args.labels,
                "k": args.k,
                "patients": len(np.unique(groups)),
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "ours_s": round(ours, 3),
                "baseline_s": round(baseline, 3),
                "baseline_s_per_label": round(baseline / args.labels, 3),
                "speedup": round(baseline / ours, 2),
                "identical": bool(np.array_equal(ours_all, want, equal_nan=True)),
            }
        )
    )


if __name__ == "__main__":
    main()

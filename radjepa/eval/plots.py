"""PNG plots for the report: ROC curves per label and a PCA map of patch features.

Uses matplotlib's object API with the Agg canvas directly, so no global backend is switched and
no display is needed (Ray workers, CI, servers).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["roc_curve_points", "plot_roc", "pca_rgb", "plot_pca_map"]


def roc_curve_points(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0)."""
    y = np.asarray(y).astype(bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    s, ys = np.asarray(scores)[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]  # last index of each tied level
    tp = np.cumsum(ys)[last]
    fp = np.cumsum(~ys)[last]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def _save(fig: object, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches itself to the figure
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    return path


def plot_roc(
    label: str,
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    path: str | os.PathLike[str],
) -> Path:
    """One axes per label: a ROC curve per method ``{method: (y, scores, auroc)}``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    for method, (y, scores, auc) in curves.items():
        fpr, tpr = roc_curve_points(y, scores)
        ax.plot(fpr, tpr, lw=1.8, label=f"{method} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(f"ROC: {label}")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, Path(path))


def pca_rgb(tokens: np.ndarray) -> np.ndarray:
    """First three principal components of patch tokens [n, g, g, D] as RGB in [0, 1].

    One PCA over all images' tokens, so the same colour means the same direction in feature
    space across radiographs; each component is min-max scaled over all tokens.
    """
    t = np.asarray(tokens, dtype=np.float64)
    n, gh, gw, d = t.shape
    flat = t.reshape(-1, d)
    flat = flat - flat.mean(0)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    comps = flat @ vt[:3].T  # [n*g*g, <=3]
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = comps.min(0), comps.max(0)
    rgb = (comps - lo) / np.where(hi > lo, hi - lo, 1.0)
    return rgb.reshape(n, gh, gw, 3)


def plot_pca_map(images: np.ndarray, tokens: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Each radiograph next to its patch features' first 3 PCs shown as RGB (PNG)."""
    from matplotlib.figure import Figure

    rgb = pca_rgb(tokens)
    n = len(images)
    fig = Figure(figsize=(5.0, 2.5 * n))
    for i in range(n):
        ax = fig.add_subplot(n, 2, 2 * i + 1)
        ax.imshow(images[i], cmap="gray")
        ax.set_axis_off()
        ax = fig.add_subplot(n, 2, 2 * i + 2)
        ax.imshow(rgb[i], interpolation="bilinear")
        ax.set_axis_off()
        if i == 0:
            fig.axes[0].set_title("radiograph", fontsize=9)
            ax.set_title("patch features, PCA 1-3 as RGB", fontsize=9)
    return _save(fig, Path(path))

"""Segmentation probe: a 1x1-conv head on frozen patch tokens, upsampled bilinearly.

Frozen tokens are extracted once; only C x (D + 1) weights are trained, so the probe reads
what the encoder already localises rather than learning a decoder of its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

__all__ = [
    "SegHead",
    "SegResult",
    "dice",
    "fit_seg_head",
    "held_out_split",
    "load_seg_csv",
    "predict_masks",
    "seg_probe",
    "tokens_to_grid",
]


class SegHead(nn.Module):
    """Per-patch linear classifier (1x1 conv) + bilinear upsampling to the mask size."""

    def __init__(self, dim: int, structures: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, structures, kernel_size=1)

    def forward(self, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # grid: [B, D, g, g] -> logits [B, C, H, W]
        return F.interpolate(self.proj(grid), size=size, mode="bilinear", align_corners=False)


@dataclass
class SegResult:
    """Dice per structure on held-out images, and the trivial all-foreground Dice beside it.

    ``n_test_present`` counts the held-out images showing each structure: with none, there is
    nothing to score, and the Dice is NaN rather than the 0 (or 1) a prediction happens to give.
    """

    structures: list[str]
    dice: dict[str, float]
    trivial_dice: dict[str, float]
    n_train: int
    n_test: int
    n_test_present: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "structures": self.structures,
            "dice": self.dice,
            "trivial_dice": self.trivial_dice,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "n_test_present": self.n_test_present,
        }


def tokens_to_grid(tokens: np.ndarray) -> np.ndarray:
    """Patch tokens [N, T, D] (row-major square grid) -> [N, g, g, D]."""
    n, t, d = tokens.shape
    g = int(round(t**0.5))
    if g * g != t:
        raise ValueError(f"{t} patch tokens do not form a square grid")
    return tokens.reshape(n, g, g, d)


def dice(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Dice per structure over all images: pred/target [N, C, H, W] bool -> [C].

    Pooled over images (sum of overlaps / sum of sizes) so tiny structures in single images do
    not dominate; 1.0 when a structure is absent in both.
    """
    p, t = np.asarray(pred, bool), np.asarray(target, bool)
    inter = (p & t).sum(axis=(0, 2, 3))
    size = p.sum(axis=(0, 2, 3)) + t.sum(axis=(0, 2, 3))
    return np.where(size > 0, 2 * inter / np.maximum(size, 1), 1.0)


def _as_masks(masks: np.ndarray) -> np.ndarray:
    m = np.asarray(masks)
    if m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4:
        raise ValueError(f"masks must be [N, H, W] or [N, C, H, W], got shape {m.shape}")
    return m.astype(bool)


def fit_seg_head(
    grid_tokens: np.ndarray,
    masks: np.ndarray,
    *,
    epochs: int = 200,
    lr: float = 0.05,
    seed: int = 0,
) -> SegHead:
    """Train the head with per-pixel BCE (full batch, Adam) on tokens [N, g, g, D]."""
    m = _as_masks(masks)
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(grid_tokens, dtype=torch.float32).permute(0, 3, 1, 2)  # [N, D, g, g]
    # standardise channels so one learning rate fits encoders of any scale
    mu = x.mean(dim=(0, 2, 3), keepdim=True)
    sd = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    y = torch.as_tensor(m, dtype=torch.float32)
    # train against area-averaged (soft) targets at 4x the token grid: the head cannot
    # resolve finer detail anyway, and full-size targets would only cost time
    train_res = min(y.shape[-1], 4 * x.shape[-1])
    y = F.adaptive_avg_pool2d(y, train_res)
    head = SegHead(x.shape[1], y.shape[1])
    with torch.no_grad():
        head.proj.weight.normal_(0.0, 0.01, generator=gen)
        head.proj.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    z = (x - mu) / sd
    pos = y.mean(dim=(0, 2, 3)).clamp(1e-3, 1 - 1e-3)
    pos_weight = ((1 - pos) / pos).sqrt()[None, :, None, None]  # mild rebalancing
    for _ in range(epochs):
        opt.zero_grad()
        logits = head(z, y.shape[-2:])
        loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
        loss.backward()
        opt.step()
    with torch.no_grad():  # fold standardisation in: w' = w / sd, b' = b - sum(w * mu / sd)
        w = head.proj.weight / sd.view(1, -1, 1, 1)
        head.proj.bias -= (w * mu.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
        head.proj.weight.copy_(w)
    log.debug("seg head trained %d epochs, final loss %.4f", epochs, float(loss.detach()))
    return head


def predict_masks(head: SegHead, grid_tokens: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Boolean masks [N, C, H, W] (logit > 0) for tokens [N, g, g, D]."""
    x = torch.as_tensor(grid_tokens, dtype=torch.float32).permute(0, 3, 1, 2)
    with torch.no_grad():
        return (head(x, size) > 0).numpy()


# seeded splits tried for one that puts each structure on both sides: a structure few
# patients show was often held out nowhere (no Dice) or only (a head that never saw it)
_SPLIT_DRAWS = 200


def held_out_split(
    n: int,
    groups: np.ndarray | None,
    test_fraction: float,
    seed: int,
    shows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) image indices of a seeded split; with ``groups`` whole patients go to
    one side, since a patient's other radiograph in training flatters the held-out Dice.

    ``shows`` ([N, C] bool, whether each image shows each structure): of up to
    ``_SPLIT_DRAWS`` seeded draws, the first that has every structure on both sides (where
    two patients show it), else the one closest; a structure only one patient shows stays in
    training where it can."""
    if groups is None:
        units = np.arange(n)
        n_test = max(1, int(round(test_fraction * n)))
        if n - n_test < 1:
            raise ValueError(f"need at least 2 image/mask pairs, got {n}")
    else:
        units = np.asarray(groups).astype(str)
        if len(units) != n:
            raise ValueError(f"{len(units)} patient ids for {n} masks")
        n_units = len(np.unique(units))
        if n_units < 2:
            raise ValueError(f"need images of at least 2 patients, got {n_units}")
        n_test = min(n_units - 1, max(1, int(round(test_fraction * n_units))))
    uniq, unit_of = np.unique(units, return_inverse=True)
    rng = np.random.default_rng(seed)
    idx = np.arange(n)
    if shows is None:
        test = np.isin(units, rng.permutation(uniq)[:n_test])
        return idx[~test], idx[test]
    shows = np.asarray(shows, bool).reshape(n, -1)
    # per structure, how many patients show it: what a split can put on both sides
    by_unit = np.zeros((len(uniq), shows.shape[1]), bool)
    np.logical_or.at(by_unit, unit_of, shows)
    patients = by_unit.sum(axis=0)
    two_sided, one_sided = patients >= 2, patients == 1
    best: tuple[tuple[int, int], np.ndarray] | None = None
    for _ in range(_SPLIT_DRAWS):
        test = np.isin(units, rng.permutation(uniq)[:n_test])
        in_test, in_train = shows[test].any(axis=0), shows[~test].any(axis=0)
        score = (int((in_test & in_train).sum()), int(in_train.sum()))
        if best is None or score > best[0]:
            best = score, test
        if score[0] == int(two_sided.sum()) and in_train[one_sided].all():
            break
    assert best is not None
    test = best[1]
    return idx[~test], idx[test]


def seg_probe(
    grid_tokens: np.ndarray,
    masks: np.ndarray,
    *,
    structures: Sequence[str] | None = None,
    groups: np.ndarray | None = None,
    test_fraction: float = 0.25,
    epochs: int = 200,
    lr: float = 0.05,
    seed: int = 0,
) -> SegResult:
    """Train on a seeded split and report held-out Dice per structure.

    ``groups`` (patient ids) holds out ``test_fraction`` of the patients with all their
    images; without it each image is its own patient. The split puts each structure on both
    sides where two patients show it (:func:`held_out_split`). A structure no held-out image shows
    gets NaN Dice (and trivial Dice): a score there would only say whether the head predicted
    any pixel.
    """
    m = _as_masks(masks)
    n, c = m.shape[:2]
    if len(grid_tokens) != n:
        raise ValueError(f"{len(grid_tokens)} token maps for {n} masks")
    names = list(structures) if structures is not None else [f"structure_{i}" for i in range(c)]
    if len(names) != c:
        raise ValueError(f"{len(names)} structure names for {c} mask channels")
    train, test = held_out_split(n, groups, test_fraction, seed, shows=m.any(axis=(2, 3)))
    head = fit_seg_head(grid_tokens[train], m[train], epochs=epochs, lr=lr, seed=seed)
    pred = predict_masks(head, grid_tokens[test], m.shape[-2:])
    present = m[test].any(axis=(2, 3)).sum(axis=0)  # [C] held-out images showing each
    d = np.where(present > 0, dice(pred, m[test]), np.nan)
    trivial = np.where(present > 0, dice(np.ones_like(m[test]), m[test]), np.nan)
    absent = [k for k, n_img in zip(names, present, strict=True) if n_img == 0]
    if absent:
        log.warning("no held-out image shows %s: no Dice for it", ", ".join(absent))
    return SegResult(
        names,
        {k: float(v) for k, v in zip(names, d, strict=True)},
        {k: float(v) for k, v in zip(names, trivial, strict=True)},
        len(train),
        len(test),
        {k: int(v) for k, v in zip(names, present, strict=True)},
    )


def _same_aspect(mask: tuple[int, ...], image: tuple[int, int]) -> bool:
    """Whether resize + centre crop cuts the same region from both (a mask may be stored at
    another resolution, but with other proportions the crops differ and the masks shift)."""
    return abs(mask[0] * image[1] - mask[1] * image[0]) <= 0.01 * mask[1] * image[0]


def load_seg_csv(
    csv_path: str | os.PathLike[str],
    structures: Sequence[str],
    *,
    image_col: str = "image",
    group_col: str | None = "patient_id",
    size: int = 256,
    dtype: str = "uint8",
    window_percentiles: tuple[float, float] = (0.5, 99.5),
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Images [N, S, S], masks [N, C, S, S] and patient ids [N] from a CSV: ``image`` plus one
    mask-path column per structure (paths relative to the CSV; mask pixels > 0 are
    foreground), and optionally ``group_col`` (None when the CSV has no such column: each
    image is then its own patient).

    Images go through ingest's ``decode_image``; masks (drawn on the image's pixel grid, at its
    resolution or another with the same proportions) get the same shorter-side resize and
    centre crop, oblong pixels included, so both stay aligned.
    """
    from PIL import Image

    from radjepa.eval.features import (
        DatasetError,
        check_repeats,
        listed_file_exists,
        patient_ids,
        read_csv_rows,
        read_image_bytes,
        resolve_listed,
    )
    from radjepa.imaging.decode import decode_image
    from radjepa.imaging.errors import ImageRejected
    from radjepa.imaging.resize import resize_center_crop

    path = Path(csv_path)
    rows = read_csv_rows(path, "segmentation CSV")
    absent = [c for c in [image_col, *structures] if c not in rows[0]]
    if absent:
        raise DatasetError(f"{path}: missing column(s) {absent}; has {list(rows[0])}")
    if not structures:
        raise DatasetError("name at least one structure (a mask column)")
    # an image listed twice could be trained on and scored as held out: refused as the labels
    # CSV refuses it, and also with the same cells where each row is its own patient
    has_group = bool(group_col) and group_col in rows[0]
    check_repeats(
        rows,
        resolve_listed(rows, image_col, path),
        path,
        [(group_col or "") if has_group else "", *structures],
        what="masks",
        same_ok=has_group,
    )
    key = os.urandom(32)  # pseudonyms are not used here
    images, masks = [], []
    for i, row in enumerate(rows):
        columns = [image_col, *structures]
        files = [path.parent / row[c] for c in columns]
        # by row and column, not path: file names often carry patient names
        where = f"{path} row {i + 1}"
        missing = [
            c for c, f in zip(columns, files, strict=True) if not listed_file_exists(f, where)
        ]
        if missing:
            raise DatasetError(
                f"{path} row {i + 1}: the file(s) of column(s) {missing} not found (paths are "
                "relative to the CSV)"
            )
        data = read_image_bytes(files[0], where)
        try:
            dec = decode_image(
                data,
                size=size,
                dtype=dtype,
                window_percentiles=tuple(window_percentiles),
                secret=key,
            )
        except ImageRejected as err:
            raise DatasetError(f"{path} row {i + 1}: image rejected: {err}") from None
        chans = []
        shape = (int(dec.meta["orig_height"]), int(dec.meta["orig_width"]))
        for structure, f in zip(structures, files[1:], strict=True):
            try:
                with Image.open(f) as im:
                    fg = (np.asarray(im.convert("L")) > 0).astype(np.float32)
            except OSError:  # PIL names the file: its name may carry the patient's
                raise DatasetError(
                    f"{path} row {i + 1}: the {structure} mask is not a readable image"
                ) from None
            if not _same_aspect(fg.shape, shape):
                raise DatasetError(
                    f"{path} row {i + 1}: the {structure} mask is {fg.shape[1]}x{fg.shape[0]} "
                    f"but the image is {shape[1]}x{shape[0]}: other proportions cannot be aligned"
                )
            chans.append(resize_center_crop(fg, size, dec.pixel_aspect) > 0.5)
        images.append(dec.pixels)
        masks.append(np.stack(chans))
    groups = None
    if has_group:
        groups = patient_ids(rows, image_col, group_col, path)
    elif group_col:  # a patient's other radiograph in training then flatters the held-out Dice
        log.warning(
            "%s has no %s column: each image counts as its own patient, so the held-out "
            "images are not split by patient",
            path,
            group_col,
        )
    else:
        log.info("%s: no patient column given, each image counts as its own patient", path)
    return np.stack(images), np.stack(masks), groups

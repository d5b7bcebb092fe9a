"""What a pretraining run measures about its own representation at each checkpoint.

JEPA losses fall whether or not the encoder is learning anything useful (a collapsed encoder
predicts its own constant target perfectly), so each checkpoint also scores a fixed image set:
label-free collapse signals always, and when a sweep supplies labels a kNN and a linear-probe
AUROC to rank trials by.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radjepa.config import Config
from radjepa.locations import spell_like
from radjepa.shards import ShardError, corrupted_shard, is_damage_error, pixel_batch
from radjepa.training_data import (
    TRAINING_COLUMNS,
    TrainingDataError,
    is_holdout,
    training_files,
)

if TYPE_CHECKING:
    from radjepa.engine import Pretrainer

__all__ = ["MONITOR_IMAGES", "monitor_images", "quality_metrics"]

MONITOR_IMAGES = 256  # images for RankMe / feature std; enough rows for a stable spectrum
_EMBED_BATCH = 64


def monitor_images(
    data: str, cfg: Config, limit: int = MONITOR_IMAGES, files: Sequence[str] = ()
) -> np.ndarray:
    """A fixed image set for the quality metrics: the hold-out, else the first images.

    Hold-out images are preferred (they are never trained on); with a tiny archive there may be
    too few, and the training images still give a meaningful collapse signal. The set is the
    first ``limit`` hold-out images in shard order. Only the ``image_id`` column is read to find
    them, row group by row group and only until they are found; then pixels are read from the
    row groups that hold them alone. Streaming every shard's pixels to keep a few hundred was a
    download of the whole archive at every pretrain start and every sweep trial.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    fs, listed = training_files(data, files)
    groups = _id_groups(data, fs, listed, cfg.data.holdout_fraction, limit)
    ids = [i for _, _, group in groups for i in group]
    held = [i for i, x in enumerate(ids) if is_holdout(x, cfg.data.holdout_fraction)]
    pick = held if len(held) >= _MIN_HOLDOUT else list(range(len(ids)))
    chosen = {ids[i] for i in pick[:limit]}
    wanted: dict[str, list[int]] = {}  # file -> its row groups holding chosen images, in order
    for path, index, group in groups:
        if not chosen.isdisjoint(group):
            wanted.setdefault(path, []).append(index)
    value_set = pa.array(sorted(chosen), pa.string())
    parts = []
    for path, indices in wanted.items():
        for rows in _read_row_groups(data, fs, path, indices, TRAINING_COLUMNS):
            keep = pc.is_in(rows.column("image_id"), value_set=value_set)
            try:
                parts.append(np.array(pixel_batch(rows.filter(keep))))  # [k, H, W], owned
            except ShardError as err:
                raise ShardError(f"{spell_like(data, path)}: {err}") from None
    if not parts:
        raise TrainingDataError(f"no images to monitor quality with under {data}")
    return np.concatenate(parts)  # [n, H, W]


# fewer hold-out images than this give no stable spectrum: the first images are taken instead
_MIN_HOLDOUT = 32


def _id_groups(
    data: str, fs: Any, files: list[str], fraction: float, limit: int
) -> list[tuple[str, int, list[str]]]:
    """(file, row group, the image ids it may give the set) in shard order, up to the row group
    that settles the pick: ``max(limit, _MIN_HOLDOUT)`` hold-out images (the first ``limit`` of
    them, and enough not to fall back to the first images); short of that, every row group.
    Without a hold-out (``fraction <= 0``, as the demo runs) the first ``limit`` images settle
    it: reading on opened every shard of the archive for nothing.

    Past the first ``limit`` ids only hold-out ids can be picked, so only they are kept: a
    hold-out too small to use kept every id of the archive as a Python string."""
    need = max(limit, _MIN_HOLDOUT)
    groups: list[tuple[str, int, list[str]]] = []
    found = seen = 0
    for path in files:
        for index, rows in enumerate(_read_row_groups(data, fs, path, None, ["image_id"])):
            group = rows.column(0).to_pylist()
            first = max(0, limit - seen)  # how many of them are among the first ``limit``
            held = [x for x in group[first:] if is_holdout(x, fraction)]
            groups.append((path, index, group[:first] + held))
            seen += len(group)
            found += len(held) + sum(is_holdout(x, fraction) for x in group[:first])
            if found >= need or (fraction <= 0 and seen >= limit):
                return groups
    return groups


def _read_row_groups(
    data: str, fs: Any, path: str, indices: list[int] | None, columns: list[str]
) -> Iterator[Any]:
    """``columns`` of the row groups ``indices`` (None: all, lazily) of the shard at ``path``
    (of the shards at ``data``), one table each, through one open file: the row group is the
    unit the monitor set is read in, so what it costs is the row groups it holds. Pages are
    checked against their checksums, and one that fails, or no longer decodes, names its
    shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        shard = pq.ParquetFile(f, pre_buffer=False, page_checksum_verification=True)
        for index in range(shard.num_row_groups) if indices is None else indices:
            try:
                rows = shard.read_row_group(index, columns=columns)
            except (pa.ArrowException, OSError) as err:
                if not is_damage_error(fs, err):
                    raise
                raise TrainingDataError(corrupted_shard(spell_like(data, path), str(err))) from None
            yield rows


def _embed(trainer: Pretrainer, images: np.ndarray, cfg: Config, device: Any) -> torch.Tensor:
    from radjepa.transforms import prepare_images

    embs = []
    with torch.no_grad():
        for i in range(0, len(images), _EMBED_BATCH):
            x = prepare_images(list(images[i : i + _EMBED_BATCH]), cfg.model.img_size).to(device)
            embs.append(trainer.target_embeddings(x).float().cpu())
    return torch.cat(embs)


def quality_metrics(
    trainer: Pretrainer,
    images: np.ndarray,
    cfg: Config,
    device: Any,
    probe: dict[str, Any] | None = None,
) -> dict[str, float]:
    """RankMe and feature std of the target encoder on ``images``; with a labelled ``probe``
    set (``images``, ``labels``, ``groups`` = patient ids) also the patient-grouped kNN AUROC,
    and with ``tune.metric=probe_auroc`` the cross-validated linear-probe AUROC."""
    from radjepa.metrics import feature_std, rankme

    emb = _embed(trainer, images, cfg, device)
    out = {"rankme": rankme(emb), "feature_std": feature_std(emb)}
    if probe:
        from radjepa.eval.retrieval import knn_auroc

        feats = _embed(trainer, probe["images"], cfg, device).numpy()
        out["knn_auroc"] = float(
            knn_auroc(
                feats, probe["labels"], probe["groups"], k=cfg.probe.knn_k, seed=cfg.probe.seed
            )
        )
        if cfg.tune.metric == "probe_auroc":
            from radjepa.eval.linear_probe import cross_val_probe

            res = cross_val_probe(
                feats,
                probe["labels"],
                probe["groups"],
                label_names=[cfg.tune.label_column or "label"],
                c=cfg.probe.logreg_c,
                folds=cfg.probe.folds,
                bootstrap=0,  # a ranking signal per report: the point estimate is enough
                seed=cfg.probe.seed,
            ).labels[0]
            out["probe_auroc"] = float(res.auroc.estimate) if res.auroc else float("nan")
    return out

"""What a pretraining run measures about its own representation at each checkpoint.

JEPA losses fall whether or not the encoder is learning anything useful (a collapsed encoder
predicts its own constant target perfectly), so each checkpoint also scores a fixed image set:
label-free collapse signals always, and when a sweep supplies labels a kNN and a linear-probe
AUROC to rank trials by.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radjepa.config import Config
from radjepa.training_data import TRAINING_COLUMNS, TrainingDataError, is_holdout, shard_dataset

if TYPE_CHECKING:
    from radjepa.engine import Pretrainer

__all__ = ["MONITOR_IMAGES", "monitor_images", "quality_metrics"]

MONITOR_IMAGES = 256  # images for RankMe / feature std; enough rows for a stable spectrum
_EMBED_BATCH = 64


def monitor_images(data: str, cfg: Config, limit: int = MONITOR_IMAGES) -> np.ndarray:
    """A fixed image set for the quality metrics: the hold-out, else the first images.

    Hold-out images are preferred (they are never trained on); with a tiny archive there may be
    too few, and the training images still give a meaningful collapse signal. The ids are read
    first, then the shards are streamed in small batches keeping only the chosen rows: decoding
    a block of the archive to pick from it held 16x the set in the driver (a GiB for 256 px
    uint16) and missed hold-out images beyond the block.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from radjepa.shards import pixel_batch

    ds = shard_dataset(data)
    ids = ds.to_table(columns=["image_id"]).column("image_id").to_pylist()
    held = [i for i, x in enumerate(ids) if is_holdout(x, cfg.data.holdout_fraction)]
    pick = held if len(held) >= 32 else list(range(len(ids)))
    chosen = pa.array([ids[i] for i in pick[:limit]], pa.string())
    parts = []
    for path in ds.files:
        with ds.filesystem.open_input_file(path) as f:
            batches = pq.ParquetFile(f, pre_buffer=False).iter_batches(
                batch_size=64, columns=TRAINING_COLUMNS
            )
            for rb in batches:
                keep = pc.is_in(rb.column("image_id"), value_set=chosen)
                if pc.any(keep).as_py():
                    parts.append(np.array(pixel_batch(rb.filter(keep))))  # [k, H, W], owned
    if not parts:
        raise TrainingDataError(f"no images to monitor quality with under {data}")
    return np.concatenate(parts)  # [n, H, W]


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

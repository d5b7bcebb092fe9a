"""The two baselines every probe run reports beside the encoder under test.

A randomly initialised encoder of the same architecture says how much of a probe score the
architecture and input statistics give for free; logistic regression on downsampled raw pixels
says whether a deep encoder is needed at all (view AP/PA is largely readable from pixels).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["random_init_encoder", "pixel_features"]


def random_init_encoder(cfg: Any, seed: int = 0) -> Any:
    """``build_encoder(cfg.model)`` with seeded weights, leaving the global RNG untouched."""
    import torch

    from radjepa.models.encoder import build_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_encoder(cfg.model).eval()


def pixel_features(images: np.ndarray, size: int = 32) -> np.ndarray:
    """Area-downsampled images [N, size*size] in [0, 1] (the raw-pixel baseline's features)."""
    import torch
    from torch.nn import functional as F

    imgs = np.asarray(images)
    if imgs.ndim != 3:
        raise ValueError(f"images must be [N, H, W], got shape {imgs.shape}")
    vmax = 65535.0 if imgs.dtype == np.uint16 else 255.0
    x = torch.as_tensor(imgs.astype(np.float32) / vmax)[:, None]  # [N, 1, H, W]
    small = F.interpolate(x, size=(size, size), mode="area")  # [N, 1, size, size]
    return small.reshape(len(imgs), -1).numpy()

"""The I-JEPA model: context encoder, EMA target encoder, predictor, and the loss.

Loss for one batch (images ``[B, 1, S, S]``, masks from ``radjepa.masks``):
1. target encoder on the full image (no grad), LayerNorm without affine over the feature dim,
   gather the target blocks' tokens -> ``[B, T, Kt, D]``;
2. context encoder on the context tokens only (dropped before the blocks);
3. predictor from context tokens to the target positions -> ``[B, T, Kt, D]``;
4. smooth-L1 (beta 1) or MSE between the two, averaged over all elements.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from radjepa.config import Config
from radjepa.masks import MaskBatch
from radjepa.models.encoder import VisionEncoder, build_encoder
from radjepa.models.predictor import Predictor, build_predictor

__all__ = ["JEPA"]


class JEPA(nn.Module):
    """Holds the three networks; the target encoder is never trained by gradients."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.loss_kind = cfg.optim.loss
        self.encoder: VisionEncoder = build_encoder(cfg.model)
        self.target_encoder: VisionEncoder = copy.deepcopy(self.encoder)
        self.target_encoder.requires_grad_(False)
        self.target_encoder.eval()
        self.predictor: Predictor = build_predictor(cfg.model)

    def train(self, mode: bool = True) -> JEPA:
        super().train(mode)
        self.target_encoder.eval()  # no drop-path on the targets, ever
        return self

    @torch.no_grad()
    def targets(
        self, images: torch.Tensor, masks: MaskBatch, target_encoder: nn.Module | None = None
    ) -> torch.Tensor:
        """Normalised target-encoder tokens at the target blocks, ``[B, T, Kt, D]``."""
        net = target_encoder if target_encoder is not None else self.target_encoder
        h = net(images)  # [B, N, D]
        h = F.layer_norm(h.float(), h.shape[-1:])
        b, t, kt = masks.targets.shape
        idx = masks.targets.reshape(b, t * kt, 1).expand(-1, -1, h.shape[-1])  # [B, T*Kt, D]
        return torch.gather(h, 1, idx).reshape(b, t, kt, h.shape[-1])

    def loss(
        self,
        images: torch.Tensor,
        masks: MaskBatch,
        encoder: nn.Module | None = None,
        predictor: nn.Module | None = None,
        target_encoder: nn.Module | None = None,
    ) -> torch.Tensor:
        """The JEPA loss (0-d). ``encoder``/``predictor``/``target_encoder`` override the held
        modules, e.g. with their DDP- or compile-wrapped versions (same parameters)."""
        enc = encoder if encoder is not None else self.encoder
        pred = predictor if predictor is not None else self.predictor
        target = self.targets(images, masks, target_encoder)  # [B, T, Kt, D] fp32
        z = enc(images, keep=masks.context)  # [B, Kc, D]
        p = pred(z, masks.context, masks.targets).float()  # [B, T, Kt, D]
        if self.loss_kind == "mse":
            return F.mse_loss(p, target)
        return F.smooth_l1_loss(p, target, beta=1.0)

"""The narrow ViT predictor of I-JEPA.

Input: the context encoder's tokens ``[B, Kc, D]`` with their grid indices, and the target
blocks' indices ``[B, T, Kt]``. Each target block gets its own predictor pass (the batch is
repeated T times, as in the method) in which learned mask tokens carrying the target positions
attend to the context. Output: predictions for the target tokens only, ``[B, T, Kt, D]``.

Built from timm's ``Block`` so it reads like the encoder; position embeddings are the same
fixed 2-D sin-cos table at the predictor width.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from timm.models.vision_transformer import Block
from torch import nn

from radjepa.config import Config, ModelConfig
from radjepa.models.pos_embed import sincos_2d

__all__ = ["Predictor", "build_predictor"]


class Predictor(nn.Module):
    """Context tokens + mask tokens at target positions -> predicted target embeddings."""

    def __init__(
        self,
        embed_dim: int,
        grid: int,
        width: int = 384,
        depth: int = 6,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        attention: Literal["sdpa", "manual"] = "sdpa",
    ) -> None:
        super().__init__()
        self.embed_dim, self.width, self.grid = embed_dim, width, grid
        self.embed = nn.Linear(embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", sincos_2d(width, grid), persistent=False)  # [N, W]
        norm = partial(nn.LayerNorm, eps=1e-6)
        dpr = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i], norm_layer=norm)
            for i in range(depth)
        )
        self.norm = norm(width)
        self.proj = nn.Linear(width, embed_dim)
        self._init_weights()
        for blk in self.blocks:
            blk.attn.fused_attn = attention == "sdpa"

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():  # residual projections scaled by 1/sqrt(2 * layer), as in I-JEPA
            for i, blk in enumerate(self.blocks, start=1):
                blk.attn.proj.weight.div_((2.0 * i) ** 0.5)
                blk.mlp.fc2.weight.div_((2.0 * i) ** 0.5)

    def forward(
        self, context: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor
    ) -> torch.Tensor:
        """``context [B, Kc, D]``, ``context_idx [B, Kc]``, ``target_idx [B, T, Kt]``
        -> predictions ``[B, T, Kt, D]``."""
        b, t, kt = target_idx.shape
        kc = context.shape[1]
        pos = self.pos_embed.to(context.dtype)  # [N, W]
        ctx = self.embed(context) + pos[context_idx]  # [B, Kc, W]
        ctx = ctx.repeat_interleave(t, dim=0)  # [B*T, Kc, W]: one pass per target block
        tgt = pos[target_idx.reshape(b * t, kt)] + self.mask_token.to(ctx.dtype)  # [B*T, Kt, W]
        z = torch.cat([ctx, tgt], dim=1)  # [B*T, Kc+Kt, W]
        for blk in self.blocks:
            z = blk(z)
        z = self.proj(self.norm(z[:, kc:]))  # [B*T, Kt, D]
        return z.reshape(b, t, kt, self.embed_dim)


def build_predictor(cfg: ModelConfig | Config) -> Predictor:
    """The predictor described by ``cfg.model`` (a full :class:`Config` is accepted too)."""
    m = cfg.model if isinstance(cfg, Config) else cfg
    return Predictor(
        embed_dim=m.embed_dim,
        grid=m.grid,
        width=m.pred_width,
        depth=m.resolved_pred_depth,
        num_heads=m.resolved_pred_heads,
        drop_path=m.drop_path,
        attention=m.attention,
    )

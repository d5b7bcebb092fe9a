"""The ViT encoder: timm's VisionTransformer, single channel, no class token, patch tokens out.

Why a subclass of timm's class rather than our own blocks: the state-dict keys are then exactly
timm's, so an exported encoder loads with ``timm.create_model(...)`` (see
``radjepa.checkpoint.export_timm``) and the blocks get timm's fused SDPA attention for free.

What differs from a stock timm ViT, and why:
- position embeddings are the fixed 2-D sin-cos table of the method (a non-persistent buffer),
  recomputed for whatever grid the input has, so any input size works without interpolation;
- ``forward(x, keep)`` drops tokens BEFORE the blocks (the JEPA context path: the encoder only
  pays for the tokens it sees);
- init is trunc-normal(0.02) everywhere (patch conv included) with each block's residual
  projections rescaled by 1/sqrt(2 * layer), as in I-JEPA;
- ``attention = "manual"`` switches every block to the explicit q @ k^T softmax path: it is the
  reference's choice and exists only so benchmarks can measure it.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from radjepa.config import Config, ModelConfig
from radjepa.models.pos_embed import sincos_2d

__all__ = ["VisionEncoder", "build_encoder"]

AttentionMode = Literal["sdpa", "manual"]


class VisionEncoder(VisionTransformer):
    """Patch-token ViT encoder. Outputs ``[B, N, D]`` tokens after the final LayerNorm."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        in_chans: int = 1,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        attention: AttentionMode = "sdpa",
    ) -> None:
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool="avg",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            class_token=False,
            pos_embed="none",
            fc_norm=False,
            drop_path_rate=drop_path,
            fix_init=True,
        )
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid = img_size // patch_size
        # timm set a plain ``pos_embed = None``; replace it with the fixed table (not saved:
        # it is a pure function of the grid, so checkpoints stay independent of image size).
        del self.pos_embed
        table = sincos_2d(embed_dim, self.grid)[None]  # [1, N, D]
        self.register_buffer("pos_embed", table, persistent=False)
        with torch.no_grad():  # timm leaves the patch conv at torch's default init
            nn.init.trunc_normal_(self.patch_embed.proj.weight, std=0.02)
            if self.patch_embed.proj.bias is not None:
                nn.init.zeros_(self.patch_embed.proj.bias)
        self._attention: AttentionMode = "sdpa"
        self.attention = attention

    @property
    def attention(self) -> AttentionMode:
        return self._attention

    @attention.setter
    def attention(self, mode: AttentionMode) -> None:
        if mode not in ("sdpa", "manual"):
            raise ValueError(f"attention must be 'sdpa' or 'manual', got {mode!r}")
        for blk in self.blocks:
            blk.attn.fused_attn = mode == "sdpa"
        self._attention = mode

    def pos_for_grid(self, gh: int, gw: int) -> torch.Tensor:
        """[1, gh*gw, D] position table: the cached one at the training grid, else recomputed."""
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        return sincos_2d(self.embed_dim, (gh, gw), device=self.pos_embed.device)[None]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, D] embedded patch tokens with positions, before the blocks."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected images [B, {self.in_chans}, H, W], got shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of patch {self.patch_size}")
        t = self.patch_embed.proj(x)  # [B, D, gh, gw]
        gh, gw = t.shape[-2:]
        t = t.flatten(2).transpose(1, 2)  # [B, N, D], row-major over the grid
        # added in the parameters' precision: under bf16 autocast the projection returns bf16,
        # and a bf16 sum would keep the whole residual stream of every block in bf16 (3x the
        # error of the method's fp32 stream, where only the matmuls run in bf16)
        return t + self.pos_for_grid(gh, gw).to(self.pos_embed.dtype)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens ``[B, N, D]`` (or ``[B, K, D]`` for the ``keep`` indices ``[B, K]``)."""
        t = self.patchify(x)
        if keep is not None:
            if keep.ndim != 2 or keep.shape[0] != t.shape[0]:
                raise ValueError(f"keep must be [B, K] indices, got {tuple(keep.shape)}")
            t = torch.gather(t, 1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # [B, K, D]
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image embedding ``[B, D]``: the mean of the final patch tokens (what probes use)."""
        return self.forward(x).mean(dim=1)


def build_encoder(cfg: ModelConfig | Config) -> VisionEncoder:
    """The encoder described by ``cfg.model`` (a full :class:`Config` is accepted too)."""
    m = cfg.model if isinstance(cfg, Config) else cfg
    return VisionEncoder(
        img_size=m.img_size,
        patch_size=m.patch_size,
        embed_dim=m.embed_dim,
        depth=m.resolved_depth,
        num_heads=m.num_heads,
        in_chans=m.in_chans,
        drop_path=m.drop_path,
        attention=m.attention,
    )

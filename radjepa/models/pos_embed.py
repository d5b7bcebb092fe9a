"""Fixed 2-D sine-cosine position embeddings (I-JEPA / MAE style), for any grid.

They are computed, never learned, so an encoder trained at one resolution runs at another by
recomputing the table for the new grid: no interpolation and no class-token slot to get wrong
(the reference's interpolation assumed a CLS token that its encoder does not have and crashed).
"""

from __future__ import annotations

import torch

__all__ = ["sincos_1d", "sincos_2d"]


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[N] positions -> [N, dim]: half sines, half cosines over geometric frequencies."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / (10000.0**omega)  # [dim/2]
    out = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)  # [N, dim/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(
    dim: int,
    grid: int | tuple[int, int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Position table [H*W, dim] for a row-major patch grid (the token order of a flattened
    conv patch embedding). The first half encodes the column (x) and the second the row (y),
    the layout of the MAE / I-JEPA tables, so weights trained with those tables line up."""
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding dim must be a multiple of 4, got {dim}")
    ys = torch.arange(gh, dtype=torch.float64, device=device)
    xs = torch.arange(gw, dtype=torch.float64, device=device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # [H, W] each
    emb = torch.cat([sincos_1d(dim // 2, xx.flatten()), sincos_1d(dim // 2, yy.flatten())], dim=1)
    return emb.to(dtype)  # [H*W, dim]

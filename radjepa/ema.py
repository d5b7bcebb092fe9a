"""EMA update of the target encoder: ``target <- m * target + (1 - m) * online``.

One fused ``_foreach_lerp_`` over all parameters instead of the reference's python loop of
``mul_``/``add_`` per tensor (kept here as :func:`ema_update_loop` for benchmarks only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ema_update", "ema_update_loop"]


@torch.no_grad()
def ema_update(
    target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], momentum: float
) -> None:
    """In place: each target tensor moves ``1 - momentum`` of the way to its online twin."""
    if len(target) != len(online):
        raise ValueError(f"EMA needs matching parameter lists, got {len(target)} vs {len(online)}")
    if momentum >= 1.0:
        return
    # under no_grad the online parameters need no detach; lists are passed through as-is so
    # the per-step cost is one fused kernel launch, not hundreds of wrapper objects
    tgt = target if isinstance(target, list) else list(target)
    src = online if isinstance(online, list) else list(online)
    torch._foreach_lerp_(tgt, src, 1.0 - momentum)


@torch.no_grad()
def ema_update_loop(
    target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], momentum: float
) -> None:
    """The reference's per-tensor loop (slow; kept so benchmarks can measure it)."""
    for t, o in zip(target, online, strict=True):
        t.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)

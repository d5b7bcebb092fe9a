"""Label-free collapse monitors on a batch of embeddings ``[N, D]``.

- :func:`rankme`: effective rank (Garrido et al. 2023, RankMe): ``exp(H(p))`` with
  ``p_k = s_k / sum(s) + eps`` over the singular values ``s``. ~1 for collapsed features, up to
  ``min(N, D)`` for well-spread ones. Unlike the JEPA loss it is comparable across mask settings.
- :func:`feature_std`: mean per-dimension std of L2-normalised embeddings; ~0 when collapsed,
  ~``1/sqrt(D)`` for isotropic features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["rankme", "feature_std"]


def _check(emb: torch.Tensor) -> torch.Tensor:
    if emb.ndim != 2 or emb.shape[0] < 2:
        raise ValueError(f"expected embeddings [N >= 2, D], got shape {tuple(emb.shape)}")
    return emb.detach().to(torch.float64)


def rankme(emb: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of ``emb [N, D]`` (not centred, as in the paper)."""
    s = torch.linalg.svdvals(_check(emb))
    p = s / s.sum().clamp_min(1e-300) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def feature_std(emb: torch.Tensor) -> float:
    """Mean over dimensions of the std over samples of the L2-normalised embeddings."""
    z = F.normalize(_check(emb), dim=1)
    return float(z.std(dim=0).mean())

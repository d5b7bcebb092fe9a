"""Collapse monitors: RankMe and per-dimension feature std."""

from __future__ import annotations

import pytest
import torch

from radjepa.metrics import feature_std, rankme


def test_rankme_of_rank_one_matrix_is_one():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(256, 1, generator=g), torch.randn(1, 64, generator=g)
    assert rankme(u @ v) == pytest.approx(1.0, abs=0.02)


def test_rankme_counts_equal_singular_directions():
    q, _ = torch.linalg.qr(torch.randn(128, 128, generator=torch.Generator().manual_seed(1)))
    emb = q[:, :8] * 3.0  # 8 orthogonal directions of equal energy
    assert rankme(emb) == pytest.approx(8.0, rel=0.01)


def test_rankme_of_gaussian_is_high():
    emb = torch.randn(1024, 64, generator=torch.Generator().manual_seed(2))
    assert rankme(emb) > 55  # near full rank 64


def test_feature_std_collapsed_vs_isotropic():
    assert feature_std(torch.ones(100, 32) * 5) == pytest.approx(0.0, abs=1e-9)
    emb = torch.randn(4096, 64, generator=torch.Generator().manual_seed(3))
    assert feature_std(emb) == pytest.approx(64**-0.5, rel=0.05)


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N >= 2, D\]"):
        rankme(torch.randn(10))
    with pytest.raises(ValueError):
        feature_std(torch.randn(1, 4))

"""Multi-block masks: method semantics, no positional bias, determinism."""

from __future__ import annotations

import pytest
import torch

from radjepa.config import MasksConfig, load_config
from radjepa.masks import MaskSampler, block_size, derive_seed, fixed_context_lengths

GRID = 14  # ViT-B/16 at 224


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: threads only add contention on a shared box
    yield
    torch.set_num_threads(prev)


def _draws(sampler: MaskSampler, steps: int, batch: int = 256):
    return [sampler.sample(batch, step) for step in range(steps)]


def test_shapes_ranges_and_rectangular_targets():
    cfg = MasksConfig()
    m = MaskSampler(cfg, GRID, seed=0).sample(32, step=0)
    b, t, kt = m.targets.shape
    assert (b, t) == (32, 4) and m.context.shape[0] == 32
    assert m.context.dtype == m.targets.dtype == torch.int64
    n = GRID * GRID
    assert 0 <= int(m.context.min()) and int(m.context.max()) < n
    assert 0 <= int(m.targets.min()) and int(m.targets.max()) < n
    assert 0.1 <= kt / n <= 0.25  # scale (0.15, 0.2) up to rounding
    rows, cols = m.targets // GRID, m.targets % GRID  # [B, T, Kt]
    h = int(rows[0, 0].max() - rows[0, 0].min() + 1)
    w = int(cols[0, 0].max() - cols[0, 0].min() + 1)
    assert h * w == kt  # a full h x w block, every image and target alike
    assert torch.equal(rows.amax(-1) - rows.amin(-1) + 1, torch.full((b, t), h))
    assert torch.all(m.context[:, 1:] > m.context[:, :-1])  # sorted, no duplicates


def test_no_target_context_overlap_and_min_keep():
    cfg = load_config().masks
    sampler = MaskSampler(cfg, GRID, seed=1)
    for m in _draws(sampler, 10, 128):
        b = m.context.shape[0]
        tgt = torch.zeros(b, GRID * GRID, dtype=torch.bool)
        tgt.scatter_(1, m.targets.reshape(b, -1), True)
        assert not torch.gather(tgt, 1, m.context).any()
        assert m.context.shape[1] >= cfg.min_keep


def test_tiny_grid_respects_min_keep():
    cfg = load_config("configs/tiny_cpu.yaml")
    m = MaskSampler(cfg.masks, cfg.model.grid, seed=0).sample(64, step=5)
    assert m.context.shape[1] >= cfg.masks.min_keep


def _target_frequency(sampler: MaskSampler, steps: int) -> torch.Tensor:
    """How often each patch is a target, relative to the mean, ``[GRID, GRID]``."""
    counts = torch.zeros(GRID * GRID)
    for m in _draws(sampler, steps):
        counts += torch.bincount(m.targets.flatten(), minlength=GRID * GRID)
    return (counts / counts.mean()).reshape(GRID, GRID)


def _corners_and_centre(freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    corners = freq[[0, 0, -1, -1], [0, -1, 0, -1]]
    centre = freq[GRID // 2 - 1 : GRID // 2 + 1, GRID // 2 - 1 : GRID // 2 + 1].mean()
    return corners, centre


def test_uniform_placement_is_the_methods_without_its_off_by_one():
    # the default: corners uniform over [0, GRID-size], so the last row and column are
    # targets (the reference never reached them), no side is favoured, the centre is covered
    # far more than the corners, and as many blocks touch the border as uniform corners give
    sampler = MaskSampler(MasksConfig(), GRID, seed=2)
    assert sampler.cfg.placement == "uniform"
    freq = _target_frequency(sampler, 40)
    assert freq.min() > 0  # every position reachable, last row/column included
    assert 0.9 < float(freq[:, -1].sum() / freq[:, 0].sum()) < 1.1
    assert 0.9 < float(freq[-1].sum() / freq[0].sum()) < 1.1
    corners, centre = _corners_and_centre(freq)
    assert float(centre / corners.mean()) > 5  # ~0.7 when placement is clipped

    touching, expected, blocks = 0, 0.0, 0
    for m in _draws(sampler, 40):
        rows, cols = m.targets // GRID, m.targets % GRID  # [B, T, Kt]
        edge = (rows.amin(-1) == 0) | (rows.amax(-1) == GRID - 1)
        edge |= (cols.amin(-1) == 0) | (cols.amax(-1) == GRID - 1)
        touching += int(edge.sum())
        th = int(rows[0, 0].max() - rows[0, 0].min() + 1)
        tw = m.targets.shape[2] // th
        # a block of n possible starts touches a side from 2 of them (1 when n == 1)
        p_row, p_col = min(1.0, 2 / (GRID - th + 1)), min(1.0, 2 / (GRID - tw + 1))
        expected += edge.numel() * (1 - (1 - p_row) * (1 - p_col))
        blocks += edge.numel()
    assert abs(touching - expected) / blocks < 0.03  # ~0.85 touch when placement is clipped


def test_clipped_placement_covers_every_position_with_near_uniform_frequency():
    sampler = MaskSampler(MasksConfig(placement="clipped"), GRID, seed=2)
    freq = _target_frequency(sampler, 40)
    assert freq.min() > 0.4  # every position reachable, last row/column included
    corners, centre = _corners_and_centre(freq)
    edges = torch.cat([freq[0], freq[-1], freq[:, 0], freq[:, -1]])
    # a uniform top-left start gives corners ~0.03x the centre and max/min ~35x
    assert 0.5 < float(corners.mean() / centre) < 1.5
    assert 0.7 < float(edges.mean() / centre) < 1.5
    assert float(freq.max() / freq.min()) < 3.5
    # symmetric: no side of the image is favoured (the reference's off-by-one was)
    assert 0.95 < float(freq[:, -1].sum() / freq[:, 0].sum()) < 1.05
    assert 0.95 < float(freq[-1].sum() / freq[0].sum()) < 1.05


def test_context_has_no_raster_order_bias():
    # the reference kept the first k context indices: the bottom rows starved
    sampler = MaskSampler(MasksConfig(), GRID, seed=3)
    counts = torch.zeros(GRID * GRID)
    for m in _draws(sampler, 20):
        counts += torch.bincount(m.context.flatten(), minlength=GRID * GRID)
    grid = counts.reshape(GRID, GRID)
    assert grid.min() > 0
    top, bottom = grid[:3].mean(), grid[-3:].mean()
    left, right = grid[:, :3].mean(), grid[:, -3:].mean()
    assert 0.85 < float(bottom / top) < 1.15
    assert 0.85 < float(right / left) < 1.15


def test_deterministic_per_seed_step_rank():
    cfg = MasksConfig()
    a = MaskSampler(cfg, GRID, seed=7).sample(16, step=3, rank=1)
    b = MaskSampler(cfg, GRID, seed=7).sample(16, step=3, rank=1)
    assert torch.equal(a.context, b.context) and torch.equal(a.targets, b.targets)
    for other in (
        MaskSampler(cfg, GRID, seed=7).sample(16, step=4, rank=1),
        MaskSampler(cfg, GRID, seed=7).sample(16, step=3, rank=0),
        MaskSampler(cfg, GRID, seed=8).sample(16, step=3, rank=1),
    ):
        assert not torch.equal(a.targets, other.targets)
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 3, 2)


def test_allow_overlap_keeps_targets_in_context():
    sampler = MaskSampler(MasksConfig(allow_overlap=True), GRID, seed=4)
    m = sampler.sample(64, step=0)
    b = m.context.shape[0]
    tgt = torch.zeros(b, GRID * GRID, dtype=torch.bool)
    tgt.scatter_(1, m.targets.reshape(b, -1), True)
    assert torch.gather(tgt, 1, m.context).any()


def test_masking_ratio_maps_to_total_target_area():
    cfg = MasksConfig(masking_ratio=0.7)
    assert cfg.target_scale == pytest.approx((0.15, 0.2))  # the method's default
    cfg = MasksConfig(masking_ratio=0.4, num_targets=4)
    fracs = [
        m.targets.shape[1] * m.targets.shape[2] / GRID**2
        for m in _draws(MaskSampler(cfg, GRID, seed=5), 60, 1)
    ]
    assert sum(fracs) / len(fracs) == pytest.approx(0.4, abs=0.05)


def test_impossible_min_keep_fails_clearly():
    cfg = MasksConfig(min_keep=36, context_scale=(0.5, 0.5))
    with pytest.raises(RuntimeError, match="min_keep"):
        MaskSampler(cfg, 6, seed=0, max_tries=3).sample(8, step=0)
    with pytest.raises(ValueError, match="exceeds"):
        MaskSampler(MasksConfig(min_keep=50), 6)


def test_block_size_clips_to_grid():
    assert block_size(1.0, 1.0, 6, 6) == (6, 6)
    assert block_size(0.2, 1.5, 14, 14) == (8, 5)


@pytest.mark.parametrize("mode", ["fixed", "per_length"])
def test_fixed_context_lengths_are_a_function_of_the_config_and_target_length(mode):
    cfg = MasksConfig(context_length=mode)
    kc = fixed_context_lengths(cfg, (GRID, GRID))
    assert MasksConfig().context_length == "fixed"  # the default: one encoder graph compiled
    assert tuple(sorted(kc)) == MaskSampler(cfg, GRID).target_lengths()
    assert all(cfg.min_keep <= k < GRID * GRID for k in kc.values())
    if mode == "fixed":
        assert len(set(kc.values())) == 1
    else:
        assert kc[max(kc)] < kc[min(kc)]  # larger targets leave less context
    fixed_lengths = []
    for seed, batch in ((0, 256), (9, 7), (3, 1)):
        sampler = MaskSampler(cfg, GRID, seed=seed)
        assert sampler.context_keeps == kc
        for m in _draws(sampler, 5, batch):
            assert m.context.shape == (batch, kc[m.targets.shape[2]])
            assert m.context.shape[1] == sampler.context_keep_for(m.targets.shape[2])
            assert torch.all(m.context[:, 1:] > m.context[:, :-1])
    with pytest.raises(ValueError, match="no target block of 26"):
        MaskSampler(cfg, GRID).context_keep_for(26)
    # the batch-minimum cut of the method changes from step to step
    loose = MaskSampler(cfg.model_copy(update={"context_length": "batch_min"}), GRID, seed=0)
    draws = _draws(loose, 30)
    lengths = [m.context.shape[1] for m in draws]
    assert len(set(lengths)) > 5 and loose.context_keeps is None
    assert loose.context_keep_for(25) is None
    # about the method's average amount of context: the batch minimum at 256 averages close by
    fixed_lengths = [kc[m.targets.shape[2]] for m in draws]
    assert abs(sum(fixed_lengths) - sum(lengths)) / len(lengths) < 15
    # more targets leave less context; a larger grid keeps more patches
    six = fixed_context_lengths(MasksConfig(num_targets=6, context_length=mode), (GRID, GRID))
    assert all(six[kt] < kc[kt] for kt in kc)
    wide = fixed_context_lengths(cfg, (16, 16))
    assert all(wide[kt] > kc[kt] for kt in kc.keys() & wide.keys())


@pytest.mark.parametrize("mode", ["fixed", "per_length"])
def test_per_length_context_redraws_the_same_small_share_at_every_target_length(mode):
    # one Kc for every target size (the default, for one compiled encoder graph) redraws about
    # a fifth of the images of the batches with the largest blocks (keeping the layouts whose
    # targets overlap most) and none of the smallest; per target length, each redraws about
    # context_quantile of its images
    cfg = MasksConfig(context_length=mode)
    for grid in (14, 16):
        fixed = MaskSampler(cfg, grid, seed=0)
        loose = MaskSampler(cfg.model_copy(update={"context_length": "batch_min"}), grid, seed=0)
        shares: dict[int, list[float]] = {kt: [] for kt in fixed.target_lengths()}
        for step in range(6000):
            kt = loose.target_length(step)
            if len(shares[kt]) < 16:  # a batch's share swings with its context block's size
                # the per-image context sizes before any cut: the private draw is the only
                # place they exist (a batch only shows its length)
                g = loose.generator(step)
                target, context = loose._block_sizes(g)
                counts = loose._layout(g, 128, torch.device("cpu"), 1, target, context).counts
                shares[kt].append(float((counts < fixed.context_keep_for(kt)).float().mean()))
        mean = {kt: sum(s) / len(s) for kt, s in shares.items() if s}
        assert len(mean) == len(shares), shares
        if mode == "per_length":
            assert max(mean.values()) < 2 * cfg.context_quantile, (grid, mean)
        else:
            assert mean[max(mean)] > 2 * cfg.context_quantile > mean[min(mean)], (grid, mean)


def test_fixed_context_stays_inside_each_images_context_block():
    # a 10x10 context block on the 14x14 grid: the kept patches never leave it, never hit a
    # target, and (redrawn when short) every image keeps exactly its target length's length
    cfg = MasksConfig(context_scale=(0.5, 0.5))
    sampler = MaskSampler(cfg, GRID, seed=11)
    assert cfg.min_keep <= min(sampler.context_keeps.values())
    assert max(sampler.context_keeps.values()) < 100
    for m in _draws(sampler, 5, 64):
        rows, cols = m.context // GRID, m.context % GRID
        assert int((rows.amax(1) - rows.amin(1)).max()) <= 9
        assert int((cols.amax(1) - cols.amin(1)).max()) <= 9
        tgt = torch.zeros(64, GRID * GRID, dtype=torch.bool)
        tgt.scatter_(1, m.targets.reshape(64, -1), True)
        assert not torch.gather(tgt, 1, m.context).any()
        assert m.context.shape[1] == sampler.context_keep_for(m.targets.shape[2])


def test_target_length_of_a_step_matches_its_batch_without_drawing_it():
    for grid in (14, 16):
        sampler = MaskSampler(MasksConfig(), grid, seed=3)
        seen = set()
        for step in range(60):
            for rank, b in ((0, 1), (1, 8)):
                kt = sampler.target_length(step, rank)
                assert kt == sampler.sample(b, step, rank).targets.shape[2]
                seen.add(kt)
        assert len(seen) > 2  # the lengths do vary, so the equality above is not vacuous


def test_target_lengths_cover_every_drawn_block():
    for cfg, grid in (
        (MasksConfig(), 14),
        (MasksConfig(), 16),
        (MasksConfig(masking_ratio=0.5), 14),
    ):
        sampler = MaskSampler(cfg, grid, seed=0)
        seen = {m.targets.shape[2] for m in _draws(sampler, 80, 1)}
        lengths = sampler.target_lengths()
        assert seen <= set(lengths) and len(lengths) <= 10


@pytest.mark.parametrize(
    "ratio, grid, scale, aspect",
    [
        # a swept masking ratio with 2 targets: these draws give 11x8 = 88 and 9x9 = 81
        # patches, which a 101x101 grid of (scale, aspect) values never evaluated
        (0.7041837138092609, 14, 0.4021111055913674, 1.399574502257464),
        (0.8205980681249097, 16, 0.3520505482261507, 0.9997141155195199),
    ],
)
def test_target_lengths_include_sizes_only_a_sliver_of_the_ranges_reaches(
    ratio, grid, scale, aspect
):
    cfg = MasksConfig(masking_ratio=ratio, num_targets=2)
    assert cfg.target_scale[0] <= scale <= cfg.target_scale[1]
    assert cfg.target_aspect[0] <= aspect <= cfg.target_aspect[1]
    h, w = block_size(scale, aspect, grid, grid)
    assert h * w in MaskSampler(cfg, grid).target_lengths()


def test_target_lengths_are_every_size_a_dense_sample_draws():
    # 200k (scale, aspect) pairs per config, the sampler's own formula vectorised: nothing
    # drawn is missing from target_lengths(), and the method's ranges list no extra sizes
    g = torch.Generator().manual_seed(0)
    for cfg in (MasksConfig(), MasksConfig(masking_ratio=0.55, num_targets=6)):
        for grid in (6, 14, 16):
            (s0, s1), (a0, a1) = cfg.target_scale, cfg.target_aspect
            u, v = torch.rand(2, 200_000, generator=g, dtype=torch.float64)
            n = (s0 + (s1 - s0) * u) * grid * grid
            a = a0 + (a1 - a0) * v
            h = torch.round(torch.sqrt(n * a)).clamp(1, grid)
            w = torch.round(torch.sqrt(n / a)).clamp(1, grid)
            drawn = set((h * w).long().tolist())
            assert drawn <= set(MaskSampler(cfg, grid).target_lengths())
    assert MaskSampler(MasksConfig(), 14).target_lengths() == (25, 28, 30, 35, 36, 40, 42)
    assert MaskSampler(MasksConfig(), 16).target_lengths() == (35, 36, 40, 42, 48, 49, 54, 56)

"""Encoder and predictor: shapes for patch 14/16 and other sizes, positions, init, attention."""

from __future__ import annotations

import pytest
import torch

from radjepa.config import ModelConfig, load_config
from radjepa.models import build_encoder, build_predictor
from radjepa.models.encoder import VisionEncoder
from radjepa.models.pos_embed import sincos_2d

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(patch: int, img: int) -> ModelConfig:
    return ModelConfig(
        arch="vit_tiny", patch_size=patch, img_size=img, depth=2, pred_width=96, pred_depth=1
    )


@pytest.mark.parametrize("patch, img", [(14, 224), (16, 224), (16, 96), (14, 112)])
def test_encoder_and_predictor_shapes(patch, img):
    cfg = _cfg(patch, img)
    enc, pred = build_encoder(cfg), build_predictor(cfg)
    grid = img // patch
    assert (enc.grid, enc.patch_size, enc.img_size, enc.embed_dim) == (grid, patch, img, 192)
    x = torch.randn(2, 1, img, img)
    with torch.no_grad():
        tokens = enc(x)
        assert tokens.shape == (2, grid * grid, 192)
        assert enc.embed(x).shape == (2, 192)
        keep = torch.stack([torch.randperm(grid * grid)[:10] for _ in range(2)])
        ctx = enc(x, keep=keep)
        assert ctx.shape == (2, 10, 192)
        tgt = torch.randint(0, grid * grid, (2, 3, 5))
        assert pred(ctx, keep, tgt).shape == (2, 3, 5, 192)


def test_other_input_sizes_recompute_positions():
    enc = build_encoder(_cfg(16, 96))
    x = torch.randn(1, 1, 160, 128)  # non-square, larger than trained
    with torch.no_grad():
        assert enc(x).shape == (1, 10 * 8, 192)
    assert torch.equal(enc.pos_for_grid(10, 8)[0], sincos_2d(192, (10, 8)))
    assert torch.equal(enc.pos_for_grid(6, 6), enc.pos_embed)
    with pytest.raises(ValueError, match="multiple of patch"):
        enc(torch.randn(1, 1, 100, 96))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        enc(torch.randn(1, 3, 96, 96))


def test_position_table_layout_matches_mae_and_ijepa():
    # first half: column (x); second half: row (y); token t sits at row t // W, column t % W
    from radjepa.models.pos_embed import sincos_1d

    h, w, dim = 3, 5, 16
    table = sincos_2d(dim, (h, w))
    for t in range(h * w):
        row, col = divmod(t, w)
        x_half = sincos_1d(dim // 2, torch.tensor([float(col)]))[0].float()
        y_half = sincos_1d(dim // 2, torch.tensor([float(row)]))[0].float()
        assert torch.allclose(table[t, : dim // 2], x_half)
        assert torch.allclose(table[t, dim // 2 :], y_half)


def test_positions_are_fixed_not_learned_nor_saved():
    enc = build_encoder(_cfg(16, 96))
    names = {n for n, _ in enc.named_parameters()}
    assert not any("pos" in n for n in names) and "cls_token" not in names
    assert "pos_embed" not in enc.state_dict()


def test_keep_drops_tokens_before_the_blocks():
    enc = build_encoder(_cfg(16, 96)).eval()
    x = torch.randn(1, 1, 96, 96)
    keep = torch.tensor([[0, 1, 2, 6, 7, 8]])  # the top-left 2 rows x 3 columns of patches
    y = x.clone()
    y[..., 32:, :] = 5.0  # change only patches outside the kept set
    with torch.no_grad():
        assert torch.allclose(enc(x, keep=keep), enc(y, keep=keep), atol=1e-6)
        full = torch.arange(36)[None]
        assert torch.allclose(enc(x, keep=full), enc(x), atol=1e-6)


def test_manual_attention_matches_sdpa():
    cfg = _cfg(16, 96)
    enc = build_encoder(cfg).eval()
    x = torch.randn(2, 1, 96, 96)
    with torch.no_grad():
        fast = enc(x)
        enc.attention = "manual"
        assert not enc.blocks[0].attn.fused_attn
        slow = enc(x)
    assert torch.allclose(fast, slow, atol=1e-5)
    manual = build_encoder(cfg.model_copy(update={"attention": "manual"}))
    assert manual.attention == "manual"


def test_init_rescales_residual_projections_by_depth():
    torch.manual_seed(0)
    enc = VisionEncoder(img_size=96, patch_size=16, embed_dim=384, depth=4, num_heads=6)
    assert enc.norm.eps == 1e-6 and enc.blocks[0].attn.qkv.bias is not None
    for layer, blk in enumerate(enc.blocks, start=1):
        assert float(blk.attn.qkv.weight.detach().std()) == pytest.approx(0.02, rel=0.1)
        expected = 0.02 / (2.0 * layer) ** 0.5
        assert float(blk.attn.proj.weight.detach().std()) == pytest.approx(expected, rel=0.1)
        assert float(blk.mlp.fc2.weight.detach().std()) == pytest.approx(expected, rel=0.1)


def test_predictor_uses_target_positions():
    cfg = load_config("configs/tiny_cpu.yaml").model
    enc, pred = build_encoder(cfg).eval(), build_predictor(cfg).eval()
    x = torch.randn(1, 1, 96, 96)
    keep = torch.arange(10)[None]
    with torch.no_grad():
        ctx = enc(x, keep=keep)
        a = pred(ctx, keep, torch.tensor([[[20, 21]]]))
        b = pred(ctx, keep, torch.tensor([[[30, 31]]]))
    assert not torch.allclose(a, b)


def test_residual_stream_stays_fp32_under_bf16_autocast():
    # only the matmuls run in bf16 (the method's autocast); a bf16 position add made every
    # block's residual stream bf16
    enc = build_encoder(_cfg(16, 96))
    x = torch.randn(2, 1, 96, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert enc.patch_embed.proj(x).dtype == torch.bfloat16
        assert enc.patchify(x).dtype == torch.float32
        assert enc(x).dtype == torch.float32
    whole = build_encoder(_cfg(16, 96)).to(torch.bfloat16)  # a model cast as a whole stays so
    with torch.no_grad():
        assert whole(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_predictor_heads_default_to_the_encoders():
    # I-JEPA keeps the predictor's head count equal to the backbone's at width 384
    for arch, heads in (("vit_small", 6), ("vit_base", 12), ("vit_large", 16), ("vit_huge", 16)):
        cfg = ModelConfig(arch=arch)
        assert cfg.resolved_pred_heads == heads
        assert build_predictor(cfg).blocks[0].attn.num_heads == heads

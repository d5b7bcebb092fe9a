"""The optimised JEPA step computes the same thing as the plain (reference-mode) step.

``Pretrainer`` by default uses SDPA attention, fused/foreach AdamW, foreach EMA, bf16 autocast
without a GradScaler on CUDA, and optionally ``torch.compile``; ``reference_mode=True`` uses
the reference's manual q@k^T attention, per-tensor AdamW, GradScaler and python-loop EMA. Speed
is only worth having if the two agree, so from the same init, batch and masks we compare the
loss of several steps, the first step's gradients and the parameters after the last step.

- on CPU (always runs, fp32, tiny model): tight tolerances; a deliberately different batch
  must exceed them, so the comparison itself is shown to discriminate;
- on CUDA (``gpu`` marker, bf16): fixed bf16 bounds, and the optimised step must be no less
  accurate than the reference step against an fp32 run of the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from radjepa.config import Config, load_config
from radjepa.engine import Pretrainer
from radjepa.transforms import resize_for_encoder, to_model_input

TINY = "configs/tiny_cpu.yaml"
STEPS = 3


@dataclass
class StepTrace:
    """What one trainer did over ``STEPS`` steps on a fixed batch (all on the CPU, fp32)."""

    init: dict[str, torch.Tensor]
    context: torch.Tensor  # masks of step 0
    targets: torch.Tensor
    losses: torch.Tensor  # [STEPS]
    grads: dict[str, torch.Tensor]  # after step 0
    params: dict[str, torch.Tensor]  # after the last step (online + target encoder + predictor)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


def run_steps(
    cfg: Config, device: str, images: torch.Tensor, reference: bool, steps: int = STEPS
) -> StepTrace:
    """Train ``steps`` steps on ``images`` and record the trace."""
    trainer = Pretrainer(cfg, device, reference_mode=reference)
    init = _snapshot(trainer.model)
    masks = trainer.sampler.sample(images.shape[0], 0, 0)  # what step 0 will draw
    x = images.to(device)
    losses, grads = [], {}
    for i in range(steps):
        out = trainer.train_step(x)
        losses.append(out["loss"].detach().float().cpu())
        if i == 0:
            grads = {
                n: p.grad.detach().float().cpu().clone()
                for n, p in trainer.model.named_parameters()
                if p.requires_grad
            }
    if not grads or any(g is None for g in grads.values()):
        raise AssertionError("a trainable parameter received no gradient")
    return StepTrace(
        init, masks.context, masks.targets, torch.stack(losses), grads, _snapshot(trainer.model)
    )


def _flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d[k].reshape(-1) for k in sorted(d)])


def rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """``||a - b|| / ||b||`` over all tensors together."""
    assert a.keys() == b.keys()
    fa, fb = _flat(a), _flat(b)
    return float((fa - fb).norm() / fb.norm().clamp_min(1e-30))


def worst_cosine(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], floor: float = 1e-3
) -> float:
    """Lowest per-tensor cosine similarity among tensors whose norm in ``b`` is above ``floor``
    times the largest (near-zero gradients are all rounding noise; ``rel_err`` covers them)."""
    scale = max(float(t.norm()) for t in b.values())
    cos = [
        float(torch.nn.functional.cosine_similarity(a[k].reshape(-1), b[k].reshape(-1), dim=0))
        for k in b
        if float(b[k].norm()) > floor * scale
    ]
    return min(cos)


def assert_same_start(ours: StepTrace, ref: StepTrace) -> None:
    assert ours.init.keys() == ref.init.keys()
    for k in ours.init:
        assert torch.equal(ours.init[k], ref.init[k]), f"different init for {k}"
    assert torch.equal(ours.context, ref.context) and torch.equal(ours.targets, ref.targets)


# ---------------------------------------------------------------------------------------------
# CPU, fp32: runs everywhere


@pytest.fixture(scope="module")
def xray_batch(nih_dir) -> torch.Tensor:
    """8 real radiographs as model input at the tiny config's 96 px ``[8, 1, 96, 96]``."""
    paths = sorted((nih_dir / "images").glob("*.png"))[:8]
    px = np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.uint8) for p in paths])
    return resize_for_encoder(to_model_input(torch.from_numpy(px)), 96)


def test_optimised_step_matches_reference_step_fp32_cpu(xray_batch, one_torch_thread):
    cfg = load_config(TINY, ["train.steps=20", "train.batch_size=8"])
    ours = run_steps(cfg, "cpu", xray_batch, reference=False)
    ref = run_steps(cfg, "cpu", xray_batch, reference=True)
    assert_same_start(ours, ref)
    assert torch.isfinite(ours.losses).all()

    # fp32: SDPA vs manual attention, foreach vs loop AdamW/EMA differ only by rounding
    # (measured ~1e-7 relative; the bounds leave 10-100x room for other CPUs and BLAS builds)
    torch.testing.assert_close(ours.losses, ref.losses, rtol=1e-6, atol=1e-7)
    assert rel_err(ours.grads, ref.grads) < 1e-5
    assert worst_cosine(ours.grads, ref.grads) > 0.99999
    assert rel_err(ours.params, ref.params) < 1e-6

    # the training actually moved: the compared parameters are not just the init
    assert rel_err(ref.params, ref.init) > 1e-3

    # the bounds discriminate: a visibly noisier batch breaks each of them at least 10x over
    g = torch.Generator().manual_seed(1)
    noisy = xray_batch + 0.2 * torch.randn(xray_batch.shape, generator=g)
    other = run_steps(cfg, "cpu", noisy, reference=True, steps=1)
    assert abs(float(other.losses[0] - ref.losses[0])) > 1e-5 * float(ref.losses[0])
    assert rel_err(other.grads, ref.grads) > 1e-4
    assert worst_cosine(other.grads, ref.grads) < 0.9999


# ---------------------------------------------------------------------------------------------
# CUDA, bf16: the H100 configuration (skipped without a GPU by conftest)


@pytest.fixture
def no_tf32():
    """The fp32 yardstick must be real fp32 (cuDNN convolutions default to TF32)."""
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


def _gpu_cfg(precision: str, compile_: bool, scope: str = "modules") -> Config:
    """ViT-tiny/16 at 224 (256 tokens, head dim 64: the flash-attention shapes of ViT-B)."""
    return load_config(
        "configs/vit_base_p16.yaml",
        [
            "model.arch=vit_tiny",
            "model.depth=6",
            "model.pred_depth=4",
            "train.batch_size=32",
            "train.steps=20",
            f"train.precision={precision}",
            f"train.compile={str(compile_).lower()}",
            f"train.compile_scope={scope}",
        ],
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("compile_", "scope"),
    [(False, "modules"), (True, "modules"), (True, "blocks")],
    ids=["eager", "compiled", "compiled_blocks"],
)
def test_optimised_step_matches_reference_step_bf16_cuda(compile_, scope, no_tf32):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(32, 1, 224, 224, generator=g)
    ours = run_steps(_gpu_cfg("bf16", compile_, scope), "cuda", images, reference=False)
    ref = run_steps(_gpu_cfg("bf16", False), "cuda", images, reference=True)
    truth = run_steps(_gpu_cfg("fp32", False), "cuda", images, reference=True)
    assert_same_start(ours, ref)
    assert_same_start(ours, truth)
    assert torch.isfinite(ours.losses).all()

    # fixed bf16 bounds (bf16 keeps 8 mantissa bits: ~0.4% per rounding)
    torch.testing.assert_close(ours.losses, ref.losses, rtol=2e-2, atol=1e-4)
    assert rel_err(ours.grads, ref.grads) < 0.1
    assert worst_cosine(ours.grads, ref.grads, floor=1e-2) > 0.98

    # and no less accurate than the reference against the fp32 step
    ours_err, ref_err = rel_err(ours.grads, truth.grads), rel_err(ref.grads, truth.grads)
    assert ours_err <= 1.5 * ref_err + 1e-3, (ours_err, ref_err)
    loss_ours = float((ours.losses[0] - truth.losses[0]).abs())
    loss_ref = float((ref.losses[0] - truth.losses[0]).abs())
    assert loss_ours <= 1.5 * loss_ref + 1e-3 * float(truth.losses[0]), (loss_ours, loss_ref)

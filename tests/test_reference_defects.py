"""Guards against the reference I-JEPA's known defects coming back (docs/CORE.md).

Most of them have a test beside the code they concern: block positions reaching the last
row/column and no raster-order context bias (test_masks), position tables for other grids
without a class-token slot (test_models), no GradScaler under bf16 (test_jepa, on CUDA). What is
here are the ones a CPU run could not see before: which kernels one real training step runs, and
what the step logs. Both are cheap to lose silently (a changed default, a debugging ``log.info``)
and cost speed or log volume on every step of a long run.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from radjepa.checkpoint import load_checkpoint, save_checkpoint
from radjepa.config import load_config
from radjepa.engine import Pretrainer

TINY = "configs/tiny_cpu.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _op_counts(trainer: Pretrainer) -> dict[str, int]:
    """How often each aten op ran in one training step (after a first, warm-up step)."""
    x = torch.randn(2, 1, 96, 96, generator=torch.Generator().manual_seed(0))
    trainer.train_step(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU profiler warns that it has no CUDA to watch
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train_step(x)
    return {e.key: e.count for e in prof.key_averages()}


@pytest.mark.parametrize("reference_mode", [False, True])
def test_a_step_runs_fused_attention_and_one_foreach_ema(reference_mode):
    # the reference wrote attention as q @ k^T -> softmax -> @ v and updated the EMA with a
    # python loop of mul_/add_ per tensor; a step here runs SDPA in every block (context and
    # target encoder, predictor) and one fused lerp over all target parameters. reference_mode
    # (kept for benchmarks) shows the counts tell the two apart.
    cfg = load_config(TINY)
    p = Pretrainer(cfg, "cpu", reference_mode=reference_mode)
    ops = _op_counts(p)
    blocks = 2 * cfg.model.resolved_depth + cfg.model.resolved_pred_depth
    sdpa = ops.get("aten::scaled_dot_product_attention", 0)
    softmax = ops.get("aten::softmax", 0)
    # AdamW on CPU runs per tensor (torch picks foreach only on CUDA), so on this path the one
    # foreach lerp is the EMA's
    foreach_lerp = ops.get("aten::_foreach_lerp_", 0)
    if reference_mode:
        assert (sdpa, softmax, foreach_lerp) == (0, blocks, 0)
    else:
        assert (sdpa, softmax, foreach_lerp) == (blocks, 0, 1)


def test_training_never_logs_a_model(tmp_path, caplog):
    # the reference logged repr(encoder): thousands of lines per run and per restart
    caplog.set_level(logging.DEBUG)
    p = Pretrainer(load_config(TINY), "cpu")
    p.train_step(torch.randn(2, 1, 96, 96))
    path = save_checkpoint(tmp_path / "ckpt", p)
    load_checkpoint(path, Pretrainer(load_config(TINY), "cpu"))
    text = "\n".join(r.getMessage() for r in caplog.records)
    for module_repr in ("VisionEncoder(", "Predictor(", "Block(", "Linear(in_features"):
        assert module_repr not in text

"""What the trainer says about settings its device cannot honour."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from radjepa.config import load_config
from radjepa.engine import Pretrainer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "radjepa.engine"]


def test_gpu_only_settings_on_a_cpu_are_said_once_by_rank_0(caplog):
    # bf16 and compile were dropped on a CPU without a word: the run's speed and numerics
    # were not what its config said
    cfg = load_config(TINY, ["train.precision=bf16", "train.compile=true"])
    with caplog.at_level(logging.WARNING, logger="radjepa.engine"):
        trainer = Pretrainer(cfg, "cpu")
    said = _said(caplog)
    assert len(said) == 2
    assert "train.precision=bf16 is ignored on cpu" in said[0]
    assert "train.compile=true is ignored on cpu" in said[1]
    assert trainer.amp_dtype is None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="radjepa.engine"):
        Pretrainer(cfg, "cpu", rank=1, world_size=2)  # the other ranks of the same run
    assert _said(caplog) == []


def test_settings_a_cpu_honours_say_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="radjepa.engine"):
        Pretrainer(load_config(TINY, ["train.precision=auto"]), "cpu")  # auto: bf16 on GPU
        Pretrainer(load_config(TINY, ["train.compile=true"]), "cpu", reference_mode=True)
    assert _said(caplog) == []


def test_the_logged_loss_is_the_mean_over_the_steps_since_the_last_log():
    # one step's loss swings with its target blocks' sizes: the loss logged every log_every
    # steps was that one step's, a noisy sample, not the interval's mean
    import torch

    from radjepa.engine import IntervalLoss

    trainer = Pretrainer(load_config(TINY), "cpu")
    images = torch.randn(4, 1, 96, 96, generator=torch.Generator().manual_seed(0))
    interval = IntervalLoss("cpu")
    losses = []
    for _ in range(3):
        loss = trainer.train_step(images)["loss"]
        interval.add(loss)
        losses.append(float(loss))
    assert len(set(losses)) == 3
    assert float(interval.take()) == pytest.approx(sum(losses) / 3, rel=1e-6)
    loss = trainer.train_step(images)["loss"]
    interval.add(loss)
    assert float(interval.take()) == pytest.approx(float(loss), rel=1e-6)  # a new interval
    with pytest.raises(RuntimeError, match="no training step"):
        interval.take()

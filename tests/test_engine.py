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

"""Per-step schedules of the method, as pure functions of the step (so resuming is exact).

- learning rate: linear warmup ``start_lr -> lr`` over ``warmup_fraction`` of ``train.steps``,
  then cosine ``lr -> final_lr`` over the rest;
- weight decay: cosine ``weight_decay -> final_weight_decay`` over the whole run;
- EMA momentum: linear ``ema.start -> ema.end`` over the whole run.
Steps past ``train.steps`` hold the final values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from radjepa.config import Config

__all__ = ["ScheduleValues", "lr_at", "wd_at", "momentum_at", "schedule_at"]


@dataclass(frozen=True)
class ScheduleValues:
    lr: float
    weight_decay: float
    momentum: float


def _cosine(start: float, end: float, progress: float) -> float:
    p = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))


def warmup_steps(cfg: Config) -> int:
    return int(round(cfg.optim.warmup_fraction * cfg.train.steps))


def lr_at(step: int, cfg: Config) -> float:
    o, warm, total = cfg.optim, warmup_steps(cfg), cfg.train.steps
    if step < warm:
        return o.start_lr + (o.lr - o.start_lr) * step / warm
    return _cosine(o.lr, o.final_lr, (step - warm) / max(1, total - warm))


def wd_at(step: int, cfg: Config) -> float:
    return _cosine(cfg.optim.weight_decay, cfg.optim.final_weight_decay, step / cfg.train.steps)


def momentum_at(step: int, cfg: Config) -> float:
    p = min(max(step / cfg.train.steps, 0.0), 1.0)
    return cfg.ema.start + (cfg.ema.end - cfg.ema.start) * p


def schedule_at(step: int, cfg: Config) -> ScheduleValues:
    return ScheduleValues(lr_at(step, cfg), wd_at(step, cfg), momentum_at(step, cfg))

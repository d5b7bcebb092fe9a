"""Mask-sampler benchmark: our vectorised batch sampler vs a per-image python loop.

    python bench/masks.py [--batch 256] [--grid 14] [--reps 20] [--threads 1]

Prints one JSON line: ms per batch for both, and the speedup. The loop baseline below is the
straightforward structure of the reference collator (per image, per block: draw a position,
build a mask, retry until min_keep holds), with our unbiased semantics so both do the same job.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from radjepa.config import MasksConfig  # noqa: E402
from radjepa.masks import MaskSampler, block_size  # noqa: E402


def loop_sampler(cfg: MasksConfig, grid: int, batch: int, g: torch.Generator):
    """Per-image python-loop multi-block sampler (baseline)."""

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(1, generator=g))

    th, tw = block_size(uniform(*cfg.target_scale), uniform(*cfg.target_aspect), grid, grid)
    ch, cw = block_size(uniform(*cfg.context_scale), uniform(*cfg.context_aspect), grid, grid)

    def start(size: int) -> int:
        if cfg.placement == "uniform":
            return int(torch.randint(0, grid - size + 1, (1,), generator=g))
        return int(torch.randint(-(size - 1), grid, (1,), generator=g).clamp(0, grid - size))

    def block(h: int, w: int) -> torch.Tensor:
        top, left = start(h), start(w)
        m = torch.zeros(grid, grid, dtype=torch.bool)
        m[top : top + h, left : left + w] = True
        return m

    contexts, targets = [], []
    for _ in range(batch):
        for _ in range(100):
            tmasks = [block(th, tw) for _ in range(cfg.num_targets)]
            ctx = block(ch, cw)
            if not cfg.allow_overlap:
                for t in tmasks:
                    ctx &= ~t
            if int(ctx.sum()) >= cfg.min_keep:
                break
        contexts.append(torch.nonzero(ctx.flatten()).squeeze(1))
        targets.append(torch.stack([torch.nonzero(t.flatten()).squeeze(1) for t in tmasks]))
    keep = min(len(c) for c in contexts)
    contexts = [
        c[torch.randperm(len(c), generator=g)[:keep]].sort().values for c in contexts
    ]  # unbiased cut
    return torch.stack(contexts), torch.stack(targets)


def _time(fn, reps: int, device: torch.device | None = None) -> float:
    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(3):
        fn(-1 - i)
    sync()
    t0 = time.perf_counter()
    for i in range(reps):
        fn(i + 1)
    sync()
    return (time.perf_counter() - t0) / reps * 1e3


def build_parser() -> argparse.ArgumentParser:
    """The bench's flags (the GPU suite's test parses its planned commands with it)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--grid", type=int, default=14)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="where our sampler runs (cpu or cuda)")
    ap.add_argument(
        "--context-length", choices=["fixed", "per_length", "batch_min"], default="fixed"
    )
    ap.add_argument("--placement", choices=["uniform", "clipped"], default="uniform")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    cfg = MasksConfig()
    cfg = cfg.model_copy(
        update={"context_length": args.context_length, "placement": args.placement}
    )
    device = torch.device(args.device)
    sampler = MaskSampler(cfg, args.grid, seed=0)
    keeps = sampler.context_keeps  # the one-off estimate of the fixed lengths: not per-batch
    ours = _time(lambda step: sampler.sample(args.batch, abs(step), 0, device), args.reps, device)
    gen = torch.Generator().manual_seed(0)
    loop = _time(lambda step: loop_sampler(cfg, args.grid, args.batch, gen), max(3, args.reps // 4))
    print(
        json.dumps(
            {
                "bench": "masks",
                "batch": args.batch,
                "grid": args.grid,
                "num_targets": cfg.num_targets,
                "threads": args.threads,
                "device": args.device,
                "context_length": args.context_length,
                "placement": args.placement,
                # Kc per target length Kt (JSON keys are strings)
                "context_keep": None if keeps is None else {str(k): v for k, v in keeps.items()},
                "machine": platform.machine(),
                "ours_ms_per_batch": round(ours, 3),
                "loop_ms_per_batch": round(loop, 3),
                "speedup": round(loop / ours, 2) if ours > 0 else math.inf,
            }
        )
    )


if __name__ == "__main__":
    main()

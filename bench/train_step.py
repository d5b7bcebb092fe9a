"""Training-step benchmark: our JEPA step vs the reference's slow choices, side by side.

    python bench/train_step.py --model vit_tiny --patch 16 --batch 8 --img 224 --device cpu \
        --steps 3 [--reference-mode | --ours-only] [--compile [--compile-scope blocks]] \
        [--peak-tflops 989]

By default both paths run in one process on the same random batch and one JSON line reports
img/s, step ms, peak memory, FLOPs per step (FlopCounterMode over one step) and, on CUDA, MFU
against ``--peak-tflops`` (989 = H100 SXM dense bf16), plus ours/reference speedup.
``--reference-mode`` measures only the reference path (manual q@k^T attention, unfused AdamW +
GradScaler on CUDA, python-loop EMA, no compile). Both paths draw the same masks
(``--context-length``); with ``--compile`` our path first runs one step of each target-block
length (``MaskSampler.steps_covering_target_lengths``), so every graph is built before timing;
``warmup_s`` is how long the warm-up took (with ``--compile``: mostly building graphs, which
``--compile-scope blocks`` shortens).

``--rounds N`` measures each path N times, in turn and in alternating order (ours first in
even rounds, the reference first in odd ones), each round with a trainer built afresh: on a
shared or throttling machine one block of steps per path made the ratio swing with whatever
ran beside it (on the 2-core CPU box, 0.8x to several x between runs). Each path then reports
its median round, ``speedup`` is the median of the rounds' paired ratios and
``speedup_range`` their lowest and highest; ``round_step_ms`` holds every round's step time.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import get_args

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from radjepa.config import CompileScope, load_config  # noqa: E402
from radjepa.engine import Pretrainer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_syncs(trainer: Pretrainer, images: torch.Tensor) -> dict | None:
    """Count the host<->device synchronisations in one step (CUDA only) and say where they are.

    torch's sync debug mode warns at every call that makes the host wait for the GPU; a step
    that the host can queue ahead of the device shows none.
    """
    if images.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step(images)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
    return {"count": len(syncs), "where": where[:10]}


def profile_table(trainer: Pretrainer, images: torch.Tensor, path: Path, steps: int = 3) -> None:
    """torch.profiler over a few steps: the top ops by device (or CPU) time, as a text table."""
    from torch.profiler import ProfilerActivity, profile

    cuda = images.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step(images)
        _sync(images.device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"{steps} steps\n" + prof.key_averages().table(sort_by=key, row_limit=40) + "\n"
    )


def measure(
    cfg,
    device: torch.device,
    reference: bool,
    steps: int,
    warmup: int,
    peak: float,
    warmup_all: bool = False,
    profile_to: Path | None = None,
):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t_start = time.perf_counter()
    trainer = Pretrainer(cfg, device, reference_mode=reference)
    if cfg.train.compile and not reference and device.type != "cuda":
        trainer.compile()  # Pretrainer compiles only on CUDA; here to compare build times
    g = torch.Generator(device=device).manual_seed(0)
    s = cfg.model.img_size
    images = torch.randn(cfg.train.batch_size, 1, s, s, device=device, generator=g)
    # a compiled step builds one graph per target-block length (and per context length, fixed
    # by it): run one step of each length first, so no compilation is timed
    first_steps = trainer.sampler.steps_covering_target_lengths() if warmup_all else []
    for step in first_steps:
        trainer.step = step
        trainer.train_step(images)
    trainer.step = 0
    for _ in range(warmup):
        trainer.train_step(images)
    done = len(first_steps) + warmup
    _sync(device)
    warmup_s = time.perf_counter() - t_start
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(images)
    flops = counter.get_total_flops()
    syncs = host_syncs(trainer, images)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = trainer.train_step(images)
    _sync(device)
    step_s = (time.perf_counter() - t0) / steps
    loss = float(out["loss"])
    if profile_to is not None:
        profile_table(trainer, images, profile_to)
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30
        mfu = flops / step_s / (peak * 1e12)
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process RSS
        mfu = None
    del trainer
    gc.collect()
    return {
        "img_per_s": round(cfg.train.batch_size / step_s, 2),
        "step_ms": round(step_s * 1e3, 2),
        "peak_mem_gib": round(peak_mem, 3),
        "flops_per_step": int(flops),
        "mfu": round(mfu, 4) if mfu is not None else None,
        "loss": round(loss, 5),
        "warmup_steps": done,
        "warmup_s": round(warmup_s, 1),
        "host_syncs_per_step": syncs,
    }


def build_parser() -> argparse.ArgumentParser:
    """The bench's flags (the GPU suite's test parses its planned commands with it)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile our path (on CPU too: build times)"
    )
    ap.add_argument(
        "--compile-scope",
        choices=get_args(CompileScope),
        default="modules",
        help="train.compile_scope: whole modules or each transformer block",
    )
    ap.add_argument("--pred-depth", type=int, default=None)
    ap.add_argument(
        "--context-length",
        choices=["fixed", "per_length", "batch_min"],
        default="fixed",
        help="masks.context_length for both paths (batch_min: the method's per-batch cut)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each path this many times, alternating (median and range reported)",
    )
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="write a torch.profiler table of our step (after timing) to this file",
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--reference-mode", action="store_true", help="measure the reference only")
    mode.add_argument("--ours-only", action="store_true")
    mode.add_argument("--compare", action="store_true", help="both (the default)")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = {
        "model.arch": args.model,
        "model.patch_size": args.patch,
        "model.img_size": args.img,
        "data.crop_size": args.img,
        "ingest.image_size": max(256, args.img),
        "train.batch_size": args.batch,
        "train.steps": 10_000,
        "train.compile": args.compile,
        "train.compile_scope": args.compile_scope,
        "train.precision": "auto",
        "model.pred_depth": args.pred_depth,
        "masks.context_length": args.context_length,
    }
    cfg = load_config(None, overrides)
    result = {
        "bench": "train_step",
        "model": args.model,
        "patch": args.patch,
        "img": args.img,
        "batch": args.batch,
        "pred": f"{cfg.model.resolved_pred_depth}x{cfg.model.pred_width}",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu {platform.machine()} x{torch.get_num_threads()} threads",
        "precision": "bf16" if device.type == "cuda" else "fp32",
        "steps": args.steps,
        "context_length": cfg.masks.context_length,
        "compile": cfg.train.compile_scope if args.compile else False,
        "torch": torch.__version__,
    }

    def run(ref: bool) -> dict:
        # only our compiled path needs every graph built before timing
        warm_all = args.compile and not ref
        prof = None if ref else args.profile
        return measure(cfg, device, ref, args.steps, args.warmup, args.peak_tflops, warm_all, prof)

    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    paths = [
        p for p, skip in (("ours", args.reference_mode), ("reference", args.ours_only)) if not skip
    ]
    rounds: dict[str, list[dict]] = {p: [] for p in paths}
    for r in range(args.rounds):
        for path in paths if r % 2 == 0 else paths[::-1]:
            rounds[path].append(run(path == "reference"))
    result["rounds"] = args.rounds
    for path, runs in rounds.items():
        result[path] = median_round(runs)
    result["round_step_ms"] = {path: [m["step_ms"] for m in runs] for path, runs in rounds.items()}
    if len(paths) == 2:
        ratios = [
            ref["step_ms"] / ours["step_ms"]
            for ours, ref in zip(rounds["ours"], rounds["reference"], strict=True)
        ]
        result["speedup"] = round(statistics.median(ratios), 3)
        result["speedup_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
    print(json.dumps(result))


def median_round(runs: list[dict]) -> dict:
    """The round of median step time (the lower middle of an even count): one measured run's
    figures, kept together, rather than a median of each figure from different rounds."""
    ordered = sorted(runs, key=lambda m: m["step_ms"])
    return ordered[(len(ordered) - 1) // 2]


if __name__ == "__main__":
    main()

"""Compile build time: block-level compile vs whole-module compile of our step, side by side.

    python bench/compile_time.py --model vit_tiny --img 224 --batch 2 --device cpu

Runs ``bench/train_step.py --ours-only --compile`` once per ``train.compile_scope``
(``blocks``, then the baseline ``modules``), each in its own process with its own empty
inductor cache, so neither reuses a kernel the other built (a warm cache cut the block warm-up
from ~104 s to ~12 s on the 2-core box). Prints ONE JSON line: each scope's warm-up seconds
(one step per target-block length, nearly all of it graph building) and step time, and the
warm-up ratio modules / blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCOPES = ("blocks", "modules")  # ours first, then the baseline


def build_parser() -> argparse.ArgumentParser:
    """The bench's flags (passed on to bench/train_step.py)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per scope")
    return ap


def run_scope(scope: str, args: argparse.Namespace) -> dict:
    """One ``train_step.py`` run compiled with ``scope``, in a fresh inductor cache."""
    cache = tempfile.mkdtemp(prefix=f"radjepa-inductor-{scope}-")
    argv = [
        sys.executable, str(REPO / "bench" / "train_step.py"), "--ours-only", "--compile",
        "--compile-scope", scope, "--model", args.model, "--patch", str(args.patch),
        "--img", str(args.img), "--batch", str(args.batch), "--device", args.device,
        "--steps", str(args.steps), "--warmup", "1",
    ]  # fmt: skip
    try:
        res = subprocess.run(
            argv,
            env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache),
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise SystemExit(f"train_step.py --compile-scope {scope} failed:\n{res.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: dict = {"bench": "compile_time", **{k: getattr(args, k) for k in vars(args)}}
    result.pop("timeout")
    for scope in SCOPES:
        line = run_scope(scope, args)
        result.update(device=line["device"], torch=line["torch"])
        result[scope] = {k: line["ours"][k] for k in ("warmup_s", "warmup_steps", "step_ms")}
    result["warmup_speedup"] = round(
        result["modules"]["warmup_s"] / result["blocks"]["warmup_s"], 2
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

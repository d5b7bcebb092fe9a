"""Every GPU figure issue 10 asks for, in one command that fits a short device lease.

    python bench/gpu_suite.py --out "$OUT" --images .gpu/nih/images --budget 420

A lent GPU machine is held for minutes, not hours, and each start costs minutes of it, so the
benches and the bf16 correctness test run here as ONE prepared sequence in priority order: the
eager ViT-B/16 comparison first (the headline figure), then masks, ViT-H/14, the data path,
the GPU tests, and the compiled runs (whose graph builds are the slowest part) last, the
block-compiled ViT-B/16 (quick to build) before the whole-module one. Each step
is a subprocess with its own time limit, cut to what is left of ``--budget``; a step that fails
or runs out of time is recorded and the suite goes on. Results land as they arrive in
``OUT/gpu_suite.jsonl`` (one record per step: command, rc, wall time, the bench's JSON line),
with each step's output in ``OUT/gpu_suite.log``; the last lines printed are a table of the
figures against the issue's targets.

``--smoke`` runs the same sequence with tiny models on the CPU (the test suite does this, so
the script cannot rot between leases). See docs/PERFORMANCE.md, "GPU figures".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: ``bench`` is a folder of the checkout

from bench.sample_images import image_folder  # noqa: E402


@dataclass(frozen=True)
class Target:
    """What one step's JSON must show: ``key`` at least (or at most) ``value``."""

    key: str
    value: float
    at_most: bool = False

    def met(self, record: dict) -> bool | None:
        got = _lookup(record, self.key)
        if got is None:
            return None
        return got <= self.value if self.at_most else got >= self.value

    def __str__(self) -> str:
        return f"{self.key} {'<=' if self.at_most else '>='} {self.value:g}"


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    timeout_s: int
    targets: tuple[Target, ...] = field(default_factory=tuple)
    json_line: bool = True  # False: a test run, judged by its exit status alone


def _lookup(record: dict, dotted: str) -> float | None:
    value: object = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, int | float) else None


def gpu_steps(images: Path, out: Path) -> list[Step]:
    """The lease plan: issue 10's figures, most important first (times for an H100/H200)."""
    py = sys.executable
    train = [py, "bench/train_step.py", "--img", "224", "--device", "cuda"]
    vit_b = [*train, "--model", "vit_base", "--patch", "16", "--batch", "256"]
    vit_h = [*train, "--model", "vit_huge", "--patch", "14", "--batch", "128"]
    b_goal = (Target("ours.img_per_s", 3000), Target("speedup", 2.5))
    h_goal = (Target("ours.img_per_s", 720), Target("speedup", 2.5))
    pytest = [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    return [
        Step("vit_b16_b256_eager",
             [*vit_b, "--steps", "20", "--warmup", "5", "--profile",
              str(out / "profile_vit_b16_eager.txt")], 150, b_goal),
        Step("masks_b256_cuda", [py, "bench/masks.py", "--batch", "256", "--device", "cuda"], 60,
             (Target("ours_ms_per_batch", 5.0, at_most=True),)),
        Step("vit_h14_b128_eager", [*vit_h, "--steps", "10", "--warmup", "3"], 180, h_goal),
        # 16 shard files of 1024 rows: one per reader thread
        Step("data_path_16_workers",
             [py, "bench/data_path.py", "--device", "cuda", "--rows", "16384", "--shard-rows",
              "1024", "--batch", "256", "--workers", "16", "--images", str(images)], 120,
             (Target("ours_img_per_s", 3000),)),
        Step("gpu_tests", [*pytest, "tests/test_gpu_step.py", "tests/test_jepa.py"], 240,
             json_line=False),
        # block-level compile first: its graphs build in a fraction of the whole-module time,
        # so a compiled figure exists even if the lease ends during the next step's build
        Step("vit_b16_b256_compiled_blocks",
             [*vit_b, "--steps", "20", "--compile", "--compile-scope", "blocks"], 240, b_goal),
        Step("vit_b16_b256_compiled",
             [*vit_b, "--steps", "20", "--compile", "--profile",
              str(out / "profile_vit_b16_compiled.txt")], 360, b_goal),
        Step("masks_b256_host", [py, "bench/masks.py", "--batch", "256", "--threads", "1"], 60),
        # 32 blocks inlined into one graph would take most of a lease to build: blocks only
        Step("vit_h14_b128_compiled_blocks",
             [*vit_h, "--steps", "10", "--compile", "--compile-scope", "blocks"], 420, h_goal),
    ]  # fmt: skip


def smoke_steps(images: Path, out: Path) -> list[Step]:
    """The same sequence, tiny and on the CPU: checks the plumbing, measures nothing useful."""
    py = sys.executable
    flags = "--img 128 --device cpu --batch 4 --steps 1 --warmup 1 --threads 1"
    train = [py, "bench/train_step.py", *flags.split(), "--model", "vit_tiny"]
    data = "--device cpu --rows 64 --batch 16 --workers 2 --crop 64".split()
    any_rate = (Target("ours.img_per_s", 0.01), Target("speedup", 0.01))
    return [
        Step("smoke_train_step",
             [*train, "--patch", "16", "--profile", str(out / "profile_smoke.txt")], 120, any_rate),
        Step("smoke_masks", [py, "bench/masks.py", "--batch", "16", "--reps", "2"], 60,
             (Target("ours_ms_per_batch", 1e6, at_most=True),)),
        Step("smoke_gpu_tests",
             [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
              "tests/test_gpu_step.py"], 120, json_line=False),
        Step("smoke_data_path",
             [py, "bench/data_path.py", *data, "--images", str(images)], 120,
             (Target("ours_img_per_s", 1),)),
    ]  # fmt: skip


def environment() -> dict:
    """Versions and the device, so every figure in the record says what it ran on."""
    info: dict[str, object] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    try:
        import timm
        import torch

        info.update(
            torch=torch.__version__,
            cuda=torch.version.cuda,
            timm=timm.__version__,
            gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        )
    except Exception as exc:  # recorded, not fatal: the steps will say what is missing
        info["import_error"] = f"{type(exc).__name__}: {exc}"
    if shutil.which("nvidia-smi"):
        query = "name,memory.total,driver_version,clocks.max.sm,power.limit"
        try:
            res = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                errors="replace",
                timeout=30,
            )
            info["nvidia_smi"] = res.stdout.strip() or res.stderr.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"{type(exc).__name__}: {exc}"
    return info


def last_json(text: str) -> dict | None:
    """The bench's result: the last stdout line that parses as a JSON object."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is already gone
        pass


def run_step(step: Step, limit_s: float, log) -> dict:
    """Run one step as a subprocess under ``limit_s``; never raises for the step's failure."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if "--compile" in step.argv:
        env.setdefault("TORCH_LOGS", "recompiles")  # each graph build shows in the log
    log.write(f"\n===== {step.name}: {' '.join(step.argv)} (limit {limit_s:.0f} s)\n")
    log.flush()
    t0 = time.perf_counter()
    # output to files, not pipes, and the step in its own process group: a timed-out step's
    # leftovers (inductor compile workers, say) are killed with it and cannot hold a pipe open
    # or GPU memory for the steps after it
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        proc = subprocess.Popen(
            step.argv, cwd=REPO, env=env, stdout=out_f, stderr=err_f, start_new_session=True
        )
        try:
            rc: int | str = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            _kill_group(proc.pid)
            proc.wait()
        out_f.seek(0)
        err_f.seek(0)
        # a step cut off mid-character (or printing raw bytes) must not end the suite
        out, err = (f.read().decode(errors="replace") for f in (out_f, err_f))
    wall = time.perf_counter() - t0
    log.write(out + err)
    log.flush()
    record: dict = {"step": step.name, "rc": rc, "wall_s": round(wall, 1), "argv": step.argv}
    if step.json_line:
        record["result"] = last_json(out)
    if rc != 0:  # enough of the output to see why, without opening the log
        record["tail"] = (out + err)[-2000:]
    if step.targets:
        result = record.get("result") or {}
        record["targets"] = {str(t): t.met(result) for t in step.targets}
    return record


def summary(records: list[dict]) -> str:
    """One line per step: status, the figures that matter, and whether the targets are met."""
    lines = []
    for r in records:
        res = r.get("result") or {}
        figures = {
            k: _lookup(res, k)
            for k in (
                "ours.img_per_s",
                "reference.img_per_s",
                "speedup",
                "ours.mfu",
                "ours.host_syncs_per_step.count",
                "ours.warmup_s",
                "ours_ms_per_batch",
                "ours_img_per_s",
                "baseline_img_per_s",
            )
            if _lookup(res, k) is not None
        }
        goals = r.get("targets") or {}
        verdict = (
            "" if not goals else " | " + ", ".join(f"{k}: {_verdict(v)}" for k, v in goals.items())
        )
        shown = " ".join(f"{k}={v:g}" for k, v in figures.items())
        lines.append(f"{r['step']:<30} rc={r['rc']!s:<7} {r['wall_s']:>6.1f}s {shown}{verdict}")
    return "\n".join(lines)


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "no figure"}[met]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-suite-out")))
    ap.add_argument(
        "--images", type=Path, help="folder of NIH PNGs (default: ../shared's, else the bundled)"
    )
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all steps")
    ap.add_argument("--only", nargs="*", default=None, help="run only these step names")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU version of the sequence")
    args = ap.parse_args(argv)
    images = image_folder(args.images)  # scripts/gpu_carry.sh copies 64 NIH PNGs into .gpu/
    plan = smoke_steps if args.smoke else gpu_steps
    steps = plan(images, args.out)
    if args.only is not None:
        if not args.only:
            ap.error("--only needs at least one step name")
        unknown = set(args.only) - {s.name for s in steps}
        if unknown:
            ap.error(f"unknown step(s) {sorted(unknown)}; known: {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in args.only]

    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    records: list[dict] = []
    env = environment()
    print(json.dumps({"step": "environment", **env}), flush=True)
    with (
        (args.out / "gpu_suite.jsonl").open("w") as jsonl,
        (args.out / "gpu_suite.log").open("w") as log,
    ):
        jsonl.write(json.dumps({"step": "environment", **env}) + "\n")
        for step in steps:
            left = deadline - time.monotonic()
            if left < 20:
                record = {"step": step.name, "rc": "skipped", "wall_s": 0.0, "argv": step.argv}
            else:
                try:
                    record = run_step(step, min(step.timeout_s, left), log)
                except Exception as exc:  # the suite's own fault: record it, run the rest
                    tail = f"{type(exc).__name__}: {exc}"
                    record = {"step": step.name, "rc": "error", "wall_s": 0.0, "argv": step.argv}
                    record["tail"] = tail
            records.append(record)
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()
            print(summary([record]), flush=True)
    print("\n" + summary(records), flush=True)
    return 1 if any(r["rc"] != 0 for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())

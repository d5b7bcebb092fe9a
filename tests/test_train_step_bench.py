"""bench/train_step.py's rounds: each path measured in turn, the median round and paired
ratios reported (one block per path made the CPU ratio swing between runs)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = "--model vit_tiny --img 64 --patch 8 --batch 2 --steps 1 --warmup 0 --threads 1"


def _bench(*flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "bench" / "train_step.py"), *TINY.split(), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.slow
def test_rounds_report_the_median_round_and_the_paired_ratios():
    res = _bench("--device", "cpu", "--rounds", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    (line,) = res.stdout.splitlines()
    out = json.loads(line)
    ours, ref = out["round_step_ms"]["ours"], out["round_step_ms"]["reference"]
    assert out["rounds"] == 3 and len(ours) == len(ref) == 3
    assert out["ours"]["step_ms"] == sorted(ours)[1]
    assert out["reference"]["step_ms"] == sorted(ref)[1]
    ratios = [r / o for o, r in zip(ours, ref, strict=True)]
    assert out["speedup"] == round(statistics.median(ratios), 3)
    assert out["speedup_range"] == [round(min(ratios), 3), round(max(ratios), 3)]


def test_one_path_has_no_ratio_and_no_round_count_is_refused():
    res = _bench("--device", "cpu", "--ours-only", "--rounds", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert "reference" not in out and "speedup" not in out
    assert len(out["round_step_ms"]["ours"]) == 2
    refused = _bench("--device", "cpu", "--rounds", "0")
    assert refused.returncode != 0 and "--rounds must be at least 1" in refused.stderr

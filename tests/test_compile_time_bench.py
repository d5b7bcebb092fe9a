"""bench/compile_time.py: a failing build in either scope is reported, not half-printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_failing_scope_run_ends_the_bench_with_its_reason():
    res = subprocess.run(
        [sys.executable, "bench/compile_time.py", "--model", "vit_gigantic", "--timeout", "120"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert res.returncode != 0
    assert res.stdout == ""  # no JSON line for a comparison that did not happen
    assert "--compile-scope blocks failed" in res.stderr
    assert "model.arch" in res.stderr  # the config error of the run underneath

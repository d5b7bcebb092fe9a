"""An interrupted command shuts Ray down with nothing of the run's left to touch it: an object
reference freed on another thread while ray.shutdown tears the core worker down ends the
process at once ("The core worker has already been shutdown ... The process will exit": exit
1, no last line), as an interrupted ingest did now and then on a loaded machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.timeout(180)
def test_an_interrupted_iteration_is_gone_before_ray_shuts_down() -> None:
    proc = subprocess.run(
        [sys.executable, str(TESTS / "interrupted_iteration.py")],
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(TESTS.parent)},
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    # the iteration's pipeline thread and the execution's thread had ended (their references
    # freed on their own threads while Ray was up)
    running = [n for n in seen["threads_at_shutdown"] if n.startswith(("iter_threaded", "Stream"))]
    assert running == [], seen
    # references in garbage cycles (an interrupted iteration leaves such) were freed on the
    # main thread before Ray went, not by whichever thread next ran the collector
    assert seen["sentinel_freed_before_shutdown"] and seen["freed_on_main"], seen
    assert seen["freed_with_ray_up"] and not seen["ray_up_after"], seen

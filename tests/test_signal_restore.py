"""A job called in-process puts the caller's SIGINT and SIGTERM handlers back, however it
ends: a notebook or a service keeps its Ctrl-C and its own SIGTERM handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _call_in_process(entry: str, sig: str, source: Path, out: Path) -> dict:
    """Run tests/in_process_caller.py (a fresh process: Ray not started yet); its result."""
    env = {
        **os.environ,
        "RAY_ADDRESS": "",
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]),
        "RADJEPA_DEID_SECRET": "k" * 32,
    }
    proc = subprocess.run(
        [sys.executable, str(TESTS / "in_process_caller.py"), entry, sig, str(source), str(out)],
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(330)
@pytest.mark.parametrize(
    ("entry", "sig", "raised"),
    [
        # a SIGTERM left SIGTERM ignored for the rest of the caller's life
        ("ingest", "SIGTERM", "IngestInterrupted"),
        ("pretrain", "SIGTERM", "PretrainInterrupted"),
        # ray.init's SIGTERM handler (sys.exit) stayed installed: routed only around Tune's fit,
        # a SIGTERM while Ray started exited 15, and a sweep that ended kept Ray's handler
        ("sweep", "SIGTERM", "SweepInterrupted"),
        ("sweep-refused", "none", "SweepError"),
    ],
)
def test_a_job_called_in_process_puts_the_callers_handlers_back(
    nih_shards, nih_dir, tmp_path, entry, sig, raised
) -> None:
    source = nih_dir / "images" if entry == "ingest" else nih_shards
    got = _call_in_process(entry, sig, source, tmp_path)
    assert (got["raised"] or "").split(":")[0] == raised, got["raised"]
    assert got["after"] == got["before"], got


@pytest.mark.timeout(330)
def test_a_sweep_that_ran_to_its_end_puts_back_the_handler_tune_set(tmp_path) -> None:
    # Ray Tune sets a SIGUSR1 handler of its own in each sweep and leaves it: an in-process
    # caller's later SIGUSR1 went to a sweep long over instead of ending the process (its
    # default) or running the caller's handler
    from shard_tables import write_blank_shards

    shards = write_blank_shards(tmp_path / "shards")
    got = _call_in_process("sweep-finished", "none", shards, tmp_path / "out")
    assert got["raised"] is None, got["raised"]
    assert "SIGUSR1" in got["before"], got
    assert got["after"] == got["before"], got

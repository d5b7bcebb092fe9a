"""`radjepa config` commands, through the real console entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _radjepa(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, cwd=REPO
    )


def test_config_show_prints_resolved_yaml():
    out = _radjepa("config", "show", "-c", "configs/tiny_cpu.yaml", "--set", "train.steps=9")
    assert out.returncode == 0, out.stderr
    data = yaml.safe_load(out.stdout)
    assert data["train"]["steps"] == 9
    assert data["model"]["arch"] == "vit_tiny"


def test_config_validate_rejects_unknown_key_with_exit_2():
    out = _radjepa("config", "validate", "--set", "masks.num_target=3")
    assert out.returncode == 2
    assert "masks.num_target" in out.stderr
    assert "Traceback" not in out.stderr


def test_jobs_without_shards_fail_in_one_line_before_any_work():
    for command in ("pretrain", "sweep"):
        out = _radjepa(command, "-c", "configs/tiny_cpu.yaml")
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().splitlines() == [
            "error: no shards given: pass --data <ingest output> or set data.shards"
        ]


def test_config_from_a_uri(tmp_path):
    (tmp_path / "c.yaml").write_text(f"extends: {REPO / 'configs' / 'tiny_cpu.yaml'}\n")
    out = _radjepa("config", "validate", "-c", (tmp_path / "c.yaml").as_uri())
    assert out.returncode == 0, out.stderr
    assert "vit_tiny" in out.stdout

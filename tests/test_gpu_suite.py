"""bench/gpu_suite.py: the one command a short GPU lease runs must work before the lease.

The GPU plan itself needs CUDA; its smoke version runs the same machinery (subprocess per step,
JSON capture, targets, budget, profile file) with tiny models on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "bench" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["gpu_suite"] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a killed process waiting to be reaped counts as dead)."""
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.1)
    return True


def _records(out: Path) -> dict[str, dict]:
    lines = (out / "gpu_suite.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.mark.slow
def test_smoke_suite_runs_every_step_and_records_figures(nih_dir, tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "bench/gpu_suite.py", "--smoke", "--out", str(out),
         "--images", str(nih_dir / "images"), "--budget", "400"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    records = _records(out)
    assert records["environment"]["torch"] and records["environment"]["cpus"] >= 1
    names = [s.name for s in _suite().smoke_steps(nih_dir / "images", out)]
    assert set(names) <= set(records)
    for name in names:
        assert records[name]["rc"] == 0, records[name]
    train = records["smoke_train_step"]["result"]
    assert train["ours"]["img_per_s"] > 0 and train["reference"]["img_per_s"] > 0
    assert train["ours"]["loss"] == pytest.approx(train["reference"]["loss"], rel=1e-4)
    assert all(train and met for met in records["smoke_train_step"]["targets"].values())
    assert records["smoke_data_path"]["result"]["ours_img_per_s"] > 0
    assert "aten::" in (out / "profile_smoke.txt").read_text()
    # the closing table names every step
    assert all(name in res.stdout.split("\n\n")[-1] for name in names)


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_every_planned_gpu_command_is_accepted_by_its_script(tmp_path):
    """A flag the bench does not know, or a test file with no GPU test, would only show on the
    lent machine and cost the lease; here each planned bench command goes through its own
    script's parser and the planned pytest run collects GPU tests."""
    steps = _suite().gpu_steps(tmp_path / "images", tmp_path / "out")
    assert len({s.name for s in steps}) == len(steps)
    benches = 0
    for step in steps:
        script = Path(step.argv[1])
        if script.suffix == ".py":
            assert (REPO / script).is_file(), step.name
            try:
                _load(REPO / script).build_parser().parse_args(step.argv[2:])
            except SystemExit as exc:  # argparse's way of refusing
                pytest.fail(f"{step.name}: {script} refused {step.argv[2:]} ({exc})")
            benches += 1
            for flag, value in zip(step.argv, step.argv[1:], strict=False):
                if flag == "--profile":
                    assert Path(value).parent == tmp_path / "out", step.name
        else:
            assert step.argv[1:3] == ["-m", "pytest"] and not step.json_line, step.name
            res = subprocess.run(
                [sys.executable, *step.argv[1:], "--collect-only"],
                cwd=REPO, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert res.returncode == 0, res.stdout + res.stderr
            collected = [ln for ln in res.stdout.splitlines() if "::" in ln]
            assert any("compiled_blocks" in ln for ln in collected), res.stdout
            assert {ln.split("::")[0] for ln in collected} == {
                a for a in step.argv if a.endswith(".py")
            }, res.stdout
    assert benches == len(steps) - 1


def test_failing_and_hanging_steps_are_recorded_not_fatal(tmp_path):
    suite = _suite()
    log = (tmp_path / "log").open("w")
    fails = suite.Step(
        "fails",
        [sys.executable, "-c", "import sys; print('{\"rate\": 2.0}'); sys.exit(3)"],
        30,
        (suite.Target("rate", 5.0), suite.Target("rate", 1.0), suite.Target("other", 1.0)),
    )
    rec = suite.run_step(fails, 30, log)
    assert rec["rc"] == 3 and rec["result"] == {"rate": 2.0} and "rate" in rec["tail"]
    assert rec["targets"] == {"rate >= 5": False, "rate >= 1": True, "other >= 1": None}
    assert "NOT met" in suite.summary([rec]) and "no figure" in suite.summary([rec])

    # a step that hangs, with a child of its own that would outlive it (a compile worker, say)
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); "
        "time.sleep(120)"
    )
    hangs = suite.Step("hangs", [sys.executable, "-c", code], 120)
    rec = suite.run_step(hangs, 3, log)
    assert rec["rc"] == "timeout" and rec["wall_s"] < 30 and "started" in rec["tail"]
    assert not _alive(int(pid_file.read_text()))

    # raw bytes that are not UTF-8 (and a cut mid-character) are kept, not fatal
    raw = "import sys; sys.stdout.buffer.write(b'\\xff\\xc3'); sys.stdout.flush()"
    rec = suite.run_step(suite.Step("raw", [sys.executable, "-c", raw], 30), 30, log)
    assert rec["rc"] == 0 and rec["result"] is None

    quiet = suite.Step("test_run", [sys.executable, "-c", "raise SystemExit('boom')"], 30,
                       json_line=False)  # fmt: skip
    rec = suite.run_step(quiet, 30, log)
    assert rec["rc"] == 1 and "boom" in rec["tail"]
    log.close()
    assert "===== hangs" in (tmp_path / "log").read_text()


def test_budget_skips_what_no_longer_fits_and_bad_arguments_are_refused(nih_dir, tmp_path):
    suite = _suite()
    images = str(nih_dir / "images")
    assert suite.main(["--smoke", "--out", str(tmp_path), "--images", images, "--budget", "5"])
    records = _records(tmp_path)
    assert {r["rc"] for name, r in records.items() if name != "environment"} == {"skipped"}

    with pytest.raises(SystemExit) as err:
        suite.main(["--smoke", "--out", str(tmp_path), "--images", images, "--only", "nope"])
    assert err.value.code == 2
    with pytest.raises(SystemExit):
        suite.main(["--smoke", "--out", str(tmp_path), "--images", images, "--only"])
    with pytest.raises(SystemExit):
        suite.main(["--smoke", "--out", str(tmp_path), "--images", str(tmp_path)])

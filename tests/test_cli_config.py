"""`radjepa config` commands, through the real console entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
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


def test_config_validate_names_the_key_of_run_time_failures():
    for override, key in [
        ("masks.min_keep=40", "masks.min_keep"),
        ("model.in_chans=3", "model.in_chans"),
        ("optim.betas=[1.5,0.9]", "optim.betas"),
        ("data.crop_ratio=[-1,1]", "data.crop_ratio"),
        ("tracking.registered_model=team/radjepa", "tracking.registered_model"),
    ]:
        out = _radjepa("config", "validate", "-c", "configs/tiny_cpu.yaml", "--set", override)
        assert out.returncode == 2, (override, out.stderr)
        assert key in out.stderr and "Traceback" not in out.stderr


def test_a_binary_config_file_is_one_line(tmp_path):
    (tmp_path / "c.yaml").write_bytes(bytes(range(256)) * 8)
    out = _radjepa("config", "validate", "-c", str(tmp_path / "c.yaml"))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: cannot read config {tmp_path / 'c.yaml'}: not a UTF-8 text file"
    ]


def test_the_ray_job_entry_point_reports_user_errors_in_one_line(tmp_path):
    # `python -m pipelines.pretrain` is what `radjepa submit` runs inside a Ray job
    def job(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipelines.pretrain", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
        )

    bad = job("--config", "configs/tiny_cpu.yaml", "--set", "optim.lr=abc")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "optim.lr" in bad.stderr
    missing = job("--config", "configs/tiny_cpu.yaml", "--data", str(tmp_path / "nonexistent"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("error: no shards at")


def test_pretrain_refuses_masks_the_grid_cannot_hold_before_starting_ray(tmp_path):
    # 16 targets and min_keep=30 on the tiny 6x6 grid validate, but no draw keeps 30 context
    # patches: the workers found out, once per train.max_failures restart (77 s on the dev box),
    # and the error was a worker traceback. RAY_ADDRESS names a port where nothing listens, so
    # reaching Ray at all fails the test with another message.
    import os

    from serve_helpers import free_port
    from shard_tables import write_metadata_shard

    write_metadata_shard(tmp_path / "shards")
    port = free_port()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "pretrain",
            "-c",
            "configs/tiny_cpu.yaml",
            "--data",
            str(tmp_path / "shards"),
            *("--set", f"train.output_dir={tmp_path / 'runs'}"),
            *("--set", "masks.num_targets=16", "--set", "masks.masking_ratio=0.95"),
            *("--set", "masks.min_keep=30"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"},
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not keep masks.min_keep=30 context patches"), out.stderr
    assert "masks.masking_ratio" in last and "Traceback" not in out.stderr


def test_demo_and_probe_refuse_an_output_path_that_is_a_file(tmp_path):
    # both were a NotADirectoryError / FileExistsError traceback (exit 1)
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder\n")
    for out in (blocker, blocker / "sub"):
        res = _radjepa("demo", "--out", str(out), "--no-serve")
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.strip().splitlines()[-1].startswith("error: "), res.stderr
        assert str(out) in res.stderr and "choose --out" in res.stderr
    from radjepa.checkpoint import save_checkpoint
    from radjepa.config import load_config
    from radjepa.engine import Pretrainer

    tiny = REPO / "configs" / "tiny_cpu.yaml"
    save_checkpoint(tmp_path / "ckpt", Pretrainer(load_config(tiny), "cpu"))
    for out in (blocker, blocker / "sub"):  # refused before the labels are read
        res = _radjepa(
            "probe", str(tmp_path / "ckpt"), "-c", str(tiny), "--csv", str(tmp_path / "labels.csv"),
            "--label", "sex", "--out", str(out), "--no-mlflow",
        )  # fmt: skip
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert (
            res.stderr.strip()
            .splitlines()[-1]
            .startswith(f"error: cannot write the report to {out}: ")
        ), res.stderr
    assert blocker.read_text() == "not a folder\n"


def test_a_demo_that_cannot_run_leaves_the_last_one_in_place(tmp_path):
    # --steps 0 emptied the earlier demo's folder, then crashed on the config: a ConfigError
    # traceback and the last results gone
    from pipelines.demo import MARKER, DemoError, run_demo

    out = tmp_path / "demo"
    out.mkdir()
    (out / MARKER).write_text("made by radjepa demo; safe to delete\n")
    (out / "summary.json").write_text("{}\n")
    res = _radjepa("demo", "--out", str(out), "--steps", "0", "--no-serve")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "--steps" in res.stderr
    with pytest.raises(DemoError, match="cannot run the demo with steps=0: invalid configuration"):
        run_demo(out, steps=0, serve_api=False)
    assert (out / "summary.json").read_text() == "{}\n"


def test_a_config_folder_is_named_as_a_folder():
    # `-c configs/` said "config file not found: configs/", a folder plainly there
    out = _radjepa("config", "validate", "-c", "configs/")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: config configs/ is a folder: give a YAML file in it"
    ]


def test_an_unknown_log_level_is_a_usage_error_not_a_traceback():
    # logging refused it with ValueError("Unknown level: 'VERBOSE'"): a traceback and exit 1
    out = _radjepa("--log-level", "verbose", "version")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "'verbose' is not one of DEBUG, INFO" in out.stderr  # rich wraps the rest
    assert _radjepa("--log-level", "debug", "version").returncode == 0  # any case


def test_counts_below_one_are_usage_errors_before_any_work(tmp_path):
    # `sweep --num-samples 0` was a ConfigError traceback from inside run_sweep, `embed
    # --actors -1` (or --batch-size) Ray's ValueError traceback once Ray had started
    from shard_tables import write_metadata_shard

    shards = str(write_metadata_shard(tmp_path / "shards"))  # passes the checks before it
    for args in (
        ["sweep", "-c", "configs/sweep-tiny.yaml", "--data", shards, "--num-samples", "0"],
        ["embed", str(tmp_path), str(tmp_path / "i"), "--model", str(tmp_path), "--actors", "-1"],
        [
            "embed",
            str(tmp_path),
            str(tmp_path / "i"),
            "--model",
            str(tmp_path),
            "--batch-size",
            "0",
        ],
    ):
        out = _radjepa(*args)
        assert out.returncode == 2, (args, out.stderr)
        said = " ".join(out.stderr.replace("│", " ").split())  # rich wraps it in a box
        assert "Traceback" not in said and "greater than or equal to 1" in said, args


def test_a_location_s_credentials_never_reach_the_console(tmp_path):
    """A config's storage URI may carry credentials (``s3://KEY:SECRET@bucket``); the errors
    and log lines that name it printed them as typed, into job and CI logs."""
    from shard_tables import write_metadata_shard

    shards = write_metadata_shard(tmp_path / "shards")
    out = "s3://AKIAEXAMPLE:TOPSECRET@bucket/runs?endpoint_override=127.0.0.1:9&scheme=http"
    res = _radjepa(
        "pretrain",
        "-c",
        str(REPO / "configs" / "tiny_cpu.yaml"),
        "--data",
        str(shards),
        "--set",
        f"train.output_dir={out}",
    )
    assert res.returncode == 2, res.stderr
    assert "TOPSECRET" not in res.stdout + res.stderr
    assert "AKIAEXAMPLE:***@bucket" in res.stderr


def test_log_records_name_a_location_without_its_credentials(caplog):
    import logging

    from radjepa.log_filters import redact_log_records

    redact_log_records()
    redact_log_records()  # once is enough; again changes nothing
    factory = logging.getLogRecordFactory()
    redact_log_records()
    assert logging.getLogRecordFactory() is factory
    with caplog.at_level(logging.INFO):
        logging.getLogger("radjepa.test").warning(
            "skipping %s (%d)", "s3://KEY:SECRET@b/run/ckpt?secret_key=zzz&region=x", 3
        )
    said = caplog.records[-1].getMessage()
    assert "SECRET" not in said and "zzz" not in said
    assert said.startswith("skipping s3://KEY:***@b/run/ckpt?secret_key=***") and said.endswith(
        "(3)"
    )


def test_the_printed_mlflow_ui_command_names_the_store_without_its_password():
    from pipelines.tracking import ui_command

    for uri in ("postgresql://mlflow:S3cret@db.internal/mlflow", "https://svc:S3cret@mlflow.org"):
        said = ui_command(uri)
        assert "S3cret" not in said and "***@" in said


def test_whatever_a_command_prints_names_locations_without_their_credentials():
    """The lines a command prints on success (its run folder, checkpoint, a sweep's best
    config), the lines Ray forwards from workers and trials, and the tracebacks logging
    attaches never pass through a log record's message: the console streams are redacted."""
    code = (
        "import logging, sys\n"
        "from radjepa.log_filters import redact_console\n"
        "redact_console(); redact_console()\n"
        "print('checkpoint: s3://AKIA:TOPSECRET@bucket/runs/t/checkpoint_1?scheme=http')\n"
        "import click\n"  # the CLI's own lines: click picks its stream apart from print's
        "click.echo('run folder: s3://AKIA:TOPSECRET@bucket/runs/t')\n"
        "click.secho('error: cannot use s3://AKIA:TOPSECRET@bucket/runs', err=True)\n"
        "sys.stderr.write('(worker) damaged gs://u:TOPSECRET@b/x\\n')\n"
        "logging.basicConfig()\n"
        "try:\n"
        "    raise OSError('When reading s3://AKIA:TOPSECRET@bucket/x?secret_key=TOPSECRET')\n"
        "except OSError:\n"
        "    logging.getLogger('t').exception('store failed')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    said = res.stdout + res.stderr
    assert "TOPSECRET" not in said
    assert "checkpoint: s3://AKIA:***@bucket/runs/t/checkpoint_1" in res.stdout
    assert "run folder: s3://AKIA:***@bucket/runs/t" in res.stdout
    assert "error: cannot use s3://AKIA:***@bucket/runs" in res.stderr
    assert "OSError: When reading s3://AKIA:***@bucket/x?secret_key=***" in res.stderr


def test_config_validate_refuses_what_sweep_and_pretrain_refuse_without_ray():
    # both said ok, then the sweep refused the swept values and pretrain the masks; checked
    # here without shards and without importing Ray (seconds at the CLI's start)
    script = """
import sys
from pipelines.cli import UserError, config_validate
cases = [
    ("configs/sweep-tiny.yaml", ['tune.search_space.ema.start.values=[1.5, "abc"]']),
    ("configs/tiny_cpu.yaml", ["masks.min_keep=30", "masks.target_scale=[0.4,0.5]"]),
    ("configs/sweep-tiny.yaml", ["masks.min_keep=30"]),
]
for config, sets in cases:
    try:
        config_validate(config, sets)
    except UserError as err:
        print(str(err).splitlines()[0])
    else:
        print("ok")
config_validate("configs/sweep-tiny.yaml", None)
assert "ray" not in sys.modules, "config validate imported Ray"
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    swept, masks, swept_masks = out.stdout.splitlines()[:3]
    # a random search over choices: a setting among the ones it draws, as the sweep says it
    assert swept.startswith("tune.search_space: masks.target_scale = [")
    assert "ema.start = 1.5: " in swept or "ema.start = 'abc': " in swept
    assert masks.startswith("could not keep masks.min_keep=30 context patches on a 6x6 grid")
    assert swept_masks.startswith("tune.search_space: masks.target_scale = [")
    assert "could not keep masks.min_keep=30" in swept_masks
    # through the console script: exit 2, the error and no traceback
    res = _radjepa(
        "config", "validate", "-c", "configs/tiny_cpu.yaml", "--set", "masks.min_keep=30"
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith("error: could not keep masks.min_keep=30")
    assert "Traceback" not in res.stderr


def test_config_show_says_its_credentials_are_hidden():
    out = _radjepa("config", "show", "--help")
    assert out.returncode == 0, out.stderr
    said = " ".join(out.stdout.replace("│", " ").split())
    assert "***" in said and "refused" in said


def test_a_sweep_s_labels_csv_typo_is_one_line_naming_the_key(tmp_path):
    # the supervised metric's labels CSV not found was a DatasetError traceback, exit 1
    from shard_tables import write_metadata_shard

    shards = str(write_metadata_shard(tmp_path / "shards"))
    res = _radjepa(
        *("sweep", "-c", "configs/sweep-tiny.yaml", "--data", shards),
        *("--set", "tune.metric=knn_auroc", "--set", "tune.label_column=Effusion"),
        *("--set", f"tune.labels_csv={tmp_path / 'nope.csv'}"),
        *("--set", f"train.output_dir={tmp_path / 'runs'}"),
    )
    assert res.returncode == 2, res.stdout + res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "tune.labels_csv" in last and "not found" in last
    assert "Traceback" not in res.stderr

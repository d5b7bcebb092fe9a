"""`radjepa submit` checks a job's --set overrides here even when the job names no config.

The job then reads the built-in defaults, which are here as well: a mistyped key was uploaded,
the driver started on the cluster, and only then did the job fail with the error a second's
check here gives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import jobs

REPO = Path(__file__).resolve().parents[1]
INGEST = ["ingest", "s3://a", "s3://b"]


@pytest.mark.parametrize(
    ("override", "says"),
    [
        (["--set", "ingest.image_siz=3"], "ingest.image_siz: unknown key"),
        (["-s", "ingest.image_size=big"], "ingest.image_size: Input should be a valid integer"),
        (["--set=masks.num_targetz=4"], "masks.num_targetz: unknown key"),
        (["--set", "ingest"], "override 'ingest' must look like section.key=value"),
    ],
    ids=["typo", "type", "equals-form", "malformed"],
)
def test_overrides_of_the_defaults_are_checked_before_the_upload(override, says):
    with pytest.raises(jobs.JobsError) as err:
        jobs.build_submission([*INGEST, *override], working_dir=REPO, environ={})
    message = str(err.value)
    assert message.startswith("not submitted: the job's --set overrides of the default config: ")
    assert says in message


def test_valid_overrides_of_the_defaults_are_submitted_as_given():
    args = [*INGEST, "--set", "ingest.image_size=320", "-s", "masks.num_targets=4"]
    sub = jobs.build_submission(args, working_dir=REPO, environ={})
    assert sub.entrypoint.endswith(
        "ingest s3://a s3://b --set ingest.image_size=320 -s masks.num_targets=4"
    )


def test_radjepa_submit_refuses_a_mistyped_override_before_reaching_the_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_ADDRESS")}
    exe = Path(sys.executable).with_name("radjepa")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipelines.cli"]
    res = subprocess.run(
        [*cmd, "submit", "--address", "http://127.0.0.1:1", "--", *INGEST,
         "--set", "ingest.image_siz=3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith("error: not submitted: the job's --set overrides"), res.stderr
    assert "ingest.image_siz: unknown key" in res.stderr
    assert "cannot reach" not in res.stderr and "Traceback" not in res.stderr

"""`radjepa serve` without a pseudonymisation key gets the server's advice, not ingest's.

Ingest is rightly told to make a new random key; a server given a new random key pseudonymises
uploads so that they match no patient of the index it serves. The server must be told to use
the key the archive was ingested with, or the public development key for a local try."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from serve_helpers import REPO, make_checkpoint

UNSET = "RADJEPA_TEST_KEY_NEVER_SET"


def _refusal(env_name: str) -> str:
    from serve.deployment import check_pseudonym_key
    from serve.security import SecurityConfigError

    assert env_name not in os.environ
    with pytest.raises(SecurityConfigError) as err:
        check_pseudonym_key(None, env_name, {}, allow_development_key=False)
    return str(err.value)


def test_serve_is_told_to_use_the_key_ingest_used_not_a_new_one():
    said = _refusal(UNSET)
    assert said.startswith(f"{UNSET} is not set: set it to the key the archive was ingested with")
    assert "openssl rand" not in said and "long random value" not in said
    assert "\n" not in said


def test_the_development_key_option_it_names_is_a_real_setting():
    """The advice is pasted as is: an option renamed since would be refused as unknown."""
    from radjepa.config import load_config

    said = _refusal(UNSET)
    option = said.split("`--set ")[1].split("`")[0]
    assert option == "ingest.allow_development_key=true"
    cfg = load_config(None, [option])
    assert cfg.ingest.allow_development_key is True
    from serve.deployment import check_pseudonym_key

    # followed, the advice lets the server start (on the public key) when no index is served
    check_pseudonym_key(None, UNSET, {}, allow_development_key=cfg.ingest.allow_development_key)


def test_radjepa_serve_without_the_key_says_so_in_one_line(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))  # short: Ray's socket paths
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RADJEPA_DEID_SECRET", "RADJEPA_API_KEYS", "RAY_ADDRESS")
    }
    env["RAY_TMPDIR"] = str(ray_tmp)
    exe = Path(sys.executable).with_name("radjepa")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipelines.cli"]
    try:
        res = subprocess.run(
            [*cmd, "serve", "--model", str(ckpt), "--port", "0", "--insecure-local"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        started_ray = list(ray_tmp.rglob("session_*"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: RADJEPA_DEID_SECRET is not set: set it to the key the archive was ingested with "
        "(`radjepa ingest` pseudonymised the shards, and so the index, with it; a new key gives "
        "uploads pseudonyms that match none of the index's), or, to try the API locally without "
        "an index, opt in to the PUBLIC development key with "
        "`--set ingest.allow_development_key=true`"
    ], out
    assert not started_ray

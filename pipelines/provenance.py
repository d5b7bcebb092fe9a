"""Which code a run ran: the git commit of the checkout, carried into Ray Jobs.

A run started from a checkout finds its commit with git. A Ray Job runs an uploaded copy of the
working dir without ``.git`` (``radjepa submit`` excludes it: it can be larger than the code),
so the submitter reads the commit before uploading and passes it in the job's env; the cluster
image records the commit it was built from the same way (``--build-arg GIT_COMMIT``). The run
then says where the commit came from (``radjepa.git_source``: ``submitter`` or ``image``),
since nothing on the cluster can check it.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "GIT_COMMIT_ENV",
    "GIT_DIRTY_ENV",
    "GIT_SOURCE_ENV",
    "code_tags",
    "git_state",
    "submitter_env",
]

GIT_COMMIT_ENV = "RADJEPA_GIT_COMMIT"
GIT_DIRTY_ENV = "RADJEPA_GIT_DIRTY"
GIT_SOURCE_ENV = "RADJEPA_GIT_SOURCE"
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # sha-1 or sha-256 object names


def git_state(tracked_file: Path) -> tuple[str, bool] | None:
    """(commit, dirty) of the checkout that tracks ``tracked_file``; None outside one (or
    without git). Tracked, not merely inside: an install that sits in some other repository
    (a site-packages under a project folder) is not that repository's code."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(tracked_file.parent), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout.strip()

    try:
        git("ls-files", "--error-unmatch", tracked_file.name)
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit, dirty


def submitter_env(working_dir: Path) -> dict[str, str]:
    """The env vars that tell a Ray Job the commit of the working dir it was submitted from
    (empty when that is not a radjepa checkout)."""
    state = git_state(working_dir / "pipelines" / "cli.py")
    if state is None:
        return {}
    commit, dirty = state
    # the source too: it overrides the image's own record of the commit it was built from
    return {GIT_COMMIT_ENV: commit, GIT_DIRTY_ENV: str(dirty).lower(), GIT_SOURCE_ENV: "submitter"}


def code_tags(
    tracked_file: Path | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """MLflow tags naming the code that runs: from git when it runs from a checkout, else from
    the env vars a submitter or the cluster image set, else none (``radjepa.radjepa_version``
    remains)."""
    state = git_state(tracked_file or Path(__file__).resolve())
    if state is not None:
        commit, dirty = state
        return {"mlflow.source.git.commit": commit, "radjepa.git_dirty": str(dirty).lower()}
    env = os.environ if environ is None else environ
    commit = env.get(GIT_COMMIT_ENV, "").strip().lower()
    if not _COMMIT.fullmatch(commit):
        return {}
    dirty = env.get(GIT_DIRTY_ENV, "").strip().lower()
    source = env.get(GIT_SOURCE_ENV, "").strip().lower()
    return {
        "mlflow.source.git.commit": commit,
        "radjepa.git_dirty": dirty if dirty in ("true", "false") else "unknown",
        "radjepa.git_source": source if source in ("submitter", "image") else "unknown",
    }

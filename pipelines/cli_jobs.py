"""``radjepa submit`` and ``radjepa jobs list/logs/stop``: the commands that talk to a Ray
cluster's job server instead of running the work here. They share its client (the ``--address``
option, connecting to it) and the log follower that ends a command with its job's status; the
logic is in pipelines/jobs.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from pipelines.cli_common import UserError

jobs_app = typer.Typer(help="List, follow and stop jobs on a Ray cluster.", no_args_is_help=True)

AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray job server (dashboard) URL, e.g. http://HEAD:8265 "
        "(default: $RAY_JOB_ADDRESS, then $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS).",
    ),
]

log = logging.getLogger("radjepa.cli")


def _jobs_client(address: str | None):
    from pipelines.jobs import JobsError, connect

    try:
        return connect(address)
    except JobsError as err:
        raise UserError(str(err)) from None


def _follow_and_exit(client, job_id: str) -> None:
    """Stream a job's logs, then exit with its status (Ctrl-C detaches; the job keeps going)."""
    from pipelines.jobs import EXIT_SERVER_LOST, JobsError, JobServerLost, JobServerRefused, follow

    try:
        res = follow(client, job_id, lambda chunk: typer.echo(chunk, nl=False))
    except (JobServerLost, JobServerRefused) as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(EXIT_SERVER_LOST) from None
    except KeyboardInterrupt:
        typer.echo(
            f"\ndetached; job {job_id} keeps running. Follow: radjepa jobs logs {job_id} "
            f"--follow   stop: radjepa jobs stop {job_id}",
            err=True,
        )
        raise typer.Exit(130) from None
    except JobsError as err:
        raise UserError(str(err)) from None
    if res.status == "SUCCEEDED":
        typer.echo(f"job {job_id} SUCCEEDED", err=True)
        return
    typer.secho(f"job {job_id} {res.status}: {res.message or 'no message'}", fg="red", err=True)
    raise typer.Exit(res.exit_code)


def submit(
    command: Annotated[
        list[str],
        typer.Argument(
            help="The radjepa command to run on the cluster and its arguments, e.g. "
            "`ingest /data/raw /data/shards -c configs/tiny_cpu.yaml` (put `--` before it "
            "when its options could clash with submit's).",
            metavar="COMMAND [ARGS]...",
        ),
    ],
    address: AddressOpt = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Print the job id and return at once.")
    ] = False,
    working_dir: Annotated[
        Path | None,
        typer.Option(
            "--working-dir",
            help="Folder uploaded as the job's working dir (default: the current folder, "
            "which must be a radjepa checkout).",
        ),
    ] = None,
    runtime_env: Annotated[
        Path | None,
        typer.Option(
            "--runtime-env",
            help="Runtime env YAML merged in (default: <working-dir>/cluster/runtime_env.yaml).",
        ),
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="KEY=VALUE for the job (repeat).")
    ] = None,
    pass_env: Annotated[
        list[str] | None,
        typer.Option(
            "--pass-env",
            help="Copy this local env var into the job (repeat); secrets are refused: "
            "the job's record shows its env to every dashboard user.",
        ),
    ] = None,
    pass_deid_secret: Annotated[
        bool,
        typer.Option(
            "--pass-deid-secret",
            help="Refused with the reason: a job's env vars are public to every dashboard user; "
            "the cluster's own environment holds the key (docs/CLUSTER.md).",
            hidden=True,
        ),
    ] = False,
    job_id: Annotated[
        str | None, typer.Option("--job-id", help="Submission id (default: generated).")
    ] = None,
    entrypoint_num_cpus: Annotated[
        float | None, typer.Option("--entrypoint-num-cpus", help="CPUs reserved for the driver.")
    ] = None,
    entrypoint_num_gpus: Annotated[
        float | None, typer.Option("--entrypoint-num-gpus", help="GPUs reserved for the driver.")
    ] = None,
) -> None:
    """Run a radjepa command as a Ray Job on a cluster; stream its logs and exit with its status."""
    from pipelines.cli import app  # here: pipelines.cli imports this module to register it
    from pipelines.jobs import (
        EXIT_SERVER_LOST,
        JobsError,
        JobServerLost,
        build_submission,
        command_name,
    )
    from pipelines.jobs import submit as submit_job

    try:
        name = command_name(command)
    except JobsError as err:
        raise UserError(str(err)) from None
    if name is not None and name not in typer.main.get_command(app).commands:
        raise UserError(f"unknown radjepa command {name!r}; see `radjepa --help`")
    try:
        sub = build_submission(
            command,
            working_dir=working_dir,
            runtime_env_file=runtime_env,
            env=_parse_env(env),
            pass_env=pass_env or [],
            pass_deid_secret=pass_deid_secret,
        )
        client = _jobs_client(address)
        log.debug("%s", sub.describe())  # names only: values may be secrets
        jid = submit_job(
            client,
            sub,
            job_id=job_id,
            entrypoint_num_cpus=entrypoint_num_cpus,
            entrypoint_num_gpus=entrypoint_num_gpus,
        )
    except JobServerLost as err:  # no answer to the submission: the job may have started
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(EXIT_SERVER_LOST) from None
    except JobsError as err:
        raise UserError(str(err)) from None
    if no_wait:
        typer.echo(jid)
        return
    typer.echo(f"submitted {jid}: {sub.entrypoint}", err=True)
    _follow_and_exit(client, jid)


def _parse_env(items: list[str] | None) -> dict[str, str]:
    from pipelines.jobs import parse_env_assignments

    return parse_env_assignments(items or [])


@jobs_app.command("list")
def jobs_list(address: AddressOpt = None) -> None:
    """List submitted jobs, newest first."""
    from datetime import UTC, datetime

    from rich.console import Console
    from rich.table import Table

    from pipelines.jobs import JobsError, list_jobs

    table = Table()
    for col in ("job id", "status", "started (UTC)", "entrypoint"):
        table.add_column(col)
    try:
        listed = list_jobs(_jobs_client(address))
    except JobsError as err:
        raise UserError(str(err)) from None
    for j in listed:
        started = (
            datetime.fromtimestamp(j.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
            if j.start_time
            else "-"
        )
        table.add_row(j.job_id, j.status, started, j.entrypoint)
    Console(width=200).print(table)


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(help="Submission id from `radjepa submit`.")],
    address: AddressOpt = None,
    follow_: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming; exit with the job's status.")
    ] = False,
) -> None:
    """Print a job's logs (or follow them until it ends)."""
    from pipelines.jobs import JobsError, logs

    client = _jobs_client(address)
    if follow_:
        _follow_and_exit(client, job_id)
        return
    try:
        typer.echo(logs(client, job_id), nl=False)
    except JobsError as err:
        raise UserError(str(err)) from None


@jobs_app.command("stop")
def jobs_stop(
    job_id: Annotated[str, typer.Argument(help="Submission id from `radjepa submit`.")],
    address: AddressOpt = None,
) -> None:
    """Ask the cluster to stop a job."""
    from pipelines.jobs import JobsError, stop

    try:
        stopped = stop(_jobs_client(address), job_id)
    except JobsError as err:
        raise UserError(str(err)) from None
    typer.echo(f"stop requested for {job_id}" if stopped else f"{job_id} had already finished")

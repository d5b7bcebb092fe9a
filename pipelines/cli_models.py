"""``radjepa models list/promote`` and ``radjepa runs reap``: the commands that read and change
the MLflow store itself instead of running work. They share finding that store (refused when
there is none) and turning any failure of the store into one line naming it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from pipelines.cli_common import ConfigOpt, SetOpt, UserError, load
from radjepa.error_text import error_line

if TYPE_CHECKING:
    from radjepa.config import Config

models_app = typer.Typer(
    help="List registered models and move their aliases (what servers load).",
    no_args_is_help=True,
)
runs_app = typer.Typer(help="Inspect and clean up MLflow runs.", no_args_is_help=True)

ModelNameOpt = Annotated[
    str | None,
    typer.Option("--name", "-n", help="Registered model (default: tracking.registered_model)."),
]


def _existing_store(cfg: Config) -> str:
    from pipelines.tracking import StoreMissing, existing_store

    try:
        return existing_store(cfg)
    except StoreMissing as err:
        raise UserError(str(err)) from None


@contextmanager
def _reading_store(uri: str) -> Iterator[None]:
    """Turn any failure of the store itself into one line naming it. A file that is not a
    sqlite database, a ``file:`` store MLflow refuses, a server that fails a request: each was
    a 25-line MLflow/sqlalchemy traceback and exit 1 from ``radjepa models``."""
    from pipelines.tracking import redact

    try:
        yield
    except (UserError, typer.Exit):
        raise
    except Exception as err:  # sqlalchemy, MlflowException, requests: no common base
        first = error_line(err)
        raise UserError(f"cannot read the MLflow store {redact(uri)}: {first}") from None


def _registry(config: str | None, set_: list[str] | None) -> tuple[str, str]:
    """(tracking store, default model name) of a config."""
    cfg = load(config, set_)
    return _existing_store(cfg), cfg.tracking.registered_model


@models_app.command("list")
def models_list(name: ModelNameOpt = None, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """The versions of a registered model, newest first, with their aliases and promotions."""
    from rich.console import Console
    from rich.table import Table

    from pipelines.model_registry import RegistryError, list_versions

    uri, default = _registry(config, set_)
    with _reading_store(uri):
        try:
            rows = list_versions(uri, name or default)
        except RegistryError as err:
            raise UserError(str(err)) from None
    table = Table(title=f"{name or default} ({len(rows)} versions)")
    for column in ("version", "aliases", "status", "created (UTC)", "run", "step", "promoted"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(
            r.version,
            ", ".join(r.aliases),
            r.status,
            r.created.strftime("%Y-%m-%d %H:%M"),
            r.run_name or (r.run_id or "")[:12],
            r.step or "",
            r.promoted or "",
        )
    Console(width=160).print(table)


@models_app.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="The version to point the alias at.")],
    reason: Annotated[
        str, typer.Option("--reason", "-r", help="Why (recorded in the registry; required).")
    ],
    alias: Annotated[str, typer.Option("--alias", "-a", help="The alias to move.")] = "champion",
    name: ModelNameOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Point an alias (default: champion) at a version, recording who, when, why and the
    version it replaced. Servers pin the version at start-up: redeploy to serve it."""
    from pipelines.model_registry import RegistryError, promote

    uri, default = _registry(config, set_)
    with _reading_store(uri):
        try:
            done = promote(uri, name or default, version, alias, reason)
        except RegistryError as err:
            raise UserError(str(err)) from None
    if done.previous == done.version:
        typer.echo(f"{done.name}@{done.alias} already points to version {done.version}")
        return
    was = f" (was version {done.previous})" if done.previous else ""
    typer.echo(f"{done.name}@{done.alias} -> version {done.version}{was}")
    # a head is served with --head: "--model" sent a user who promoted one to the wrong option
    option = "--head" if done.kind == "probe-head" else "--model"
    typer.echo(f"serve it: {option} models:/{done.name}@{done.alias} (running servers keep theirs)")


@runs_app.command("reap")
def runs_reap(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than", help="Idle for longer than this (90m, 2h, 1d): no metric, no trial."
        ),
    ],
    experiment: Annotated[
        list[str] | None,
        typer.Option(
            "--experiment", "-e", help="Experiment (repeat; default tracking.experiment)."
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List them, change nothing.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Mark RUNNING MLflow runs whose driver died (SIGKILL, a lost node) as KILLED."""
    import time

    cfg = load(config, set_)
    from rich.console import Console
    from rich.table import Table

    from pipelines.tracking import client, redact
    from pipelines.tracking_runs import iso_utc, parse_duration, reap, stale_runs

    try:
        older_than_s = parse_duration(older_than)
    except ValueError as err:
        raise UserError(f"--older-than: {err}") from None
    uri = _existing_store(cfg)
    names = experiment or [cfg.tracking.experiment]
    with _reading_store(uri):  # an unreachable server, a store without permission, ...
        mc = client(uri)
        experiments = [mc.get_experiment_by_name(n) for n in names]
        missing = [n for n, e in zip(names, experiments, strict=True) if e is None]
        if missing:
            raise UserError(f"no experiment {', '.join(missing)} in the MLflow store {redact(uri)}")
        now_ms = int(time.time() * 1000)
        stale = stale_runs(mc, experiments, older_than_s, now_ms)
        if not dry_run:
            reap(mc, stale, older_than, now_ms)
    console = Console()
    where = ", ".join(names)
    if not stale:
        console.print(f"no RUNNING run idle for over {older_than} in {where}")
        return
    several = len(names) > 1  # else the experiment is the one named below the table
    table = Table("name", *(["experiment"] if several else []))
    table.add_column("last seen (UTC)", no_wrap=True)
    table.add_column("idle", no_wrap=True)
    table.add_column("run id", no_wrap=True, min_width=32)  # whole: it is what the UI searches
    for run in stale:
        idle = int(run.idle_s(now_ms) // 60)
        table.add_row(
            run.name,
            *([run.experiment] if several else []),
            iso_utc(run.last_activity_ms)[:16].replace("T", " "),
            f"{idle // 60}h{idle % 60:02d}m",
            run.run_id,
        )
    console.print(table)
    verb = "would mark" if dry_run else "marked"
    note = " (--dry-run: nothing changed)" if dry_run else ""
    console.print(f"{verb} {len(stale)} run(s) of {where} KILLED{note}")

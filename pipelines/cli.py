"""The ``radjepa`` command line: the front door for every job.

Each command is a plain typed function (tests call them directly) that loads the one config,
then lazily imports the layer that does the work, so ``radjepa --help`` never pays for Ray,
torch or MLflow imports. Errors the user can fix exit with code 2 and one readable message.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from radjepa.config import Config

app = typer.Typer(
    name="radjepa",
    help="RadJEPA on Ray: ingest chest X-ray archives, pretrain I-JEPA encoders, sweep, "
    "evaluate and serve them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect and validate configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
runs_app = typer.Typer(help="Inspect and clean up MLflow runs.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")

ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", "-c", help="YAML config, a path or URI (default: built-in defaults)."),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data", "-d", help="Output of `radjepa ingest`, a path or URI (default: data.shards)."
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Dotted override, e.g. --set masks.num_targets=4 (repeat)."),
]

log = logging.getLogger("radjepa.cli")


class UserError(Exception):
    """A problem the user can fix (bad config, missing input): printed without a traceback."""


class RunFailed(Exception):
    """The command ran and failed (not a usage error): one line without a traceback, exit 1."""


def setup_logging(level: str = "INFO") -> None:
    """Configure logging once, in the entry point (library modules only create loggers)."""
    from rich.logging import RichHandler

    from radjepa.log_filters import redact_log_records

    redact_log_records()
    logging.basicConfig(
        level=level.upper(),
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(rich_tracebacks=False, show_path=False)],
        force=True,
    )


def load(config: str | None, sets: list[str] | None) -> Config:
    """Load and validate the config before any work starts; raises UserError naming the key."""
    from radjepa.config import ConfigError, load_config

    try:
        return load_config(config, sets or [])
    except ConfigError as err:
        raise UserError(str(err)) from None


def check_runnable(cfg: Config) -> None:
    """What pretrain and sweep refuse before their first step, checked without shards or Ray:
    every setting a sweep's trials can get validates, and each one's masks (the config's own
    without a sweep) can be drawn on its model's grid. ``config validate`` said ok to configs
    both refused."""
    from radjepa.config import ConfigError
    from radjepa.masks import MasksUnsatisfiable, check_trial_masks
    from radjepa.search_space import swept_configs

    try:
        trials = swept_configs(cfg) if cfg.tune.search_space else [("", cfg)]
        check_trial_masks(trials, set())
    except (ConfigError, MasksUnsatisfiable) as err:
        raise UserError(str(err)) from None


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@app.callback()
def _root(
    log_level: Annotated[
        str, typer.Option(help=f"Logging level: {', '.join(LOG_LEVELS)} (any case).")
    ] = "INFO",
) -> None:
    # logging's own refusal of an unknown name was a ValueError traceback and exit 1
    if log_level.upper() not in LOG_LEVELS:
        raise typer.BadParameter(
            f"{log_level!r} is not one of {', '.join(LOG_LEVELS)}", param_hint="'--log-level'"
        )
    setup_logging(log_level)


@app.command()
def version() -> None:
    """Print the package version, then the git commit of the code when it is known."""
    from pipelines.provenance import code_tags
    from radjepa import __version__

    typer.echo(__version__)
    tags = code_tags()
    if "mlflow.source.git.commit" in tags:
        dirty = {"true": " with uncommitted changes", "unknown": ""}.get(tags["radjepa.git_dirty"])
        source = {"submitter": " (as submitted)", "image": " (the image's build)"}.get(
            tags.get("radjepa.git_source", ""), ""
        )
        typer.echo(f"commit {tags['mlflow.source.git.commit']}{dirty or ''}{source}")


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the fully resolved config as YAML (defaults + file + overrides).

    Credentials in locations are printed as *** (user:***@host): a config saved from this
    output is refused until the real credential is put back (or the key is left out and the
    environment gives it).
    """
    from radjepa.config import config_to_yaml

    typer.echo(config_to_yaml(load(config, set_)), nl=False)


@config_app.command("validate")
def config_validate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Validate a config, its sweep's settings and its masks on the model's grid; exit 0 when
    valid, 2 with the offending keys otherwise."""
    cfg = load(config, set_)
    check_runnable(cfg)
    typer.echo(
        f"ok: {config or 'defaults'} ({cfg.model.arch}/{cfg.model.patch_size} @ "
        f"{cfg.model.img_size}px)"
    )


@app.command()
def ingest(
    paths: Annotated[
        list[str], typer.Argument(help="Sources (dirs, .zip, .tar(.gz), URIs), then DST.")
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Ingest DICOM/PNG/JPEG archives into de-identified Parquet shards (re-runs are idempotent)."""
    if len(paths) < 2:
        raise UserError("give at least one source and the destination: radjepa ingest SRC... DST")
    cfg = load(config, set_)
    from pipelines.ingest import IngestError, IngestInterrupted, run_ingest_until_stopped
    from pipelines.runtime import ignore_sigterm_after_the_job

    ignore_sigterm_after_the_job()
    try:  # Ctrl-C or SIGTERM (`radjepa jobs stop`, a pod stopping): 130 and one last line
        res = run_ingest_until_stopped(paths[:-1], paths[-1], cfg)
    except IngestError as err:
        raise UserError(str(err)) from None
    except IngestInterrupted as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(130) from None
    before = f" ({res.resolved} quarantined by an earlier run)" if res.resolved else ""
    instances = (
        f" ({res.duplicate_instances} the DICOM instance of a stored file, in other bytes)"
        if res.duplicate_instances
        else ""
    )
    typer.echo(
        f"ingested {res.input} inputs: {res.ok} stored{before}, {res.quarantined} quarantined, "
        f"{res.duplicates} duplicates{instances} -> {paths[-1]} ({res.total_images} images in "
        "total)"
    )


@app.command()
def quarantine(
    paths: Annotated[
        list[str],
        typer.Argument(help="DST, then the sources it was ingested from (to find the files)."),
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    duplicates: Annotated[
        bool, typer.Option("--duplicates", help="Also list the inputs not stored as duplicates.")
    ] = False,
) -> None:
    """List DST's quarantined inputs and why; given the sources, find each one's file."""
    # rows name a file only by a keyed hash of its path (raw paths are stored only with
    # ingest.keep_source_paths): the sources are listed and hashed with the key as ingest did,
    # and the paths that match are printed here, never stored
    cfg = load(config, set_)
    import pyarrow as pa
    from rich.console import Console
    from rich.table import Table

    from radjepa.imaging.deid import SecretRefused, resolve_secret
    from radjepa.ingest.errors import IngestError
    from radjepa.ingest.locate import locate_rows

    dst, sources = paths[0], paths[1:]
    try:
        secret = b""
        if sources:
            secret = resolve_secret(
                cfg.ingest.secret_env, allow_development_key=cfg.ingest.allow_development_key
            )
        with Console(stderr=True).status(f"hashing the names under {len(sources)} source(s)"):
            located = locate_rows(dst, sources, secret, duplicates=duplicates)
    except (SecretRefused, IngestError) as err:
        raise UserError(str(err)) from None
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"cannot read {dst}: {err}") from None
    # rows of files a later run stored: DST's totals no longer count them as quarantined
    resolved = (
        f"; {located.resolved} resolved by a later run, not listed" if located.resolved else ""
    )
    if not located.rows:
        nothing = f"{dst}: nothing quarantined" + (" or duplicated" if duplicates else "")
        typer.echo(nothing + resolved)
        return
    table = Table(title=f"{dst}: {len(located.rows)} row(s)")
    for column in ("file" if sources else "image id", "reason", "message", "run"):
        table.add_column(column, overflow="fold")
    for r in located.rows:
        where = r.path or ("not under the sources" if sources else (r.image_id or "")[:16])
        table.add_row(where, f"{r.table}: {r.reason}", r.message or "", r.run_id)
    Console(soft_wrap=False).print(table)
    if sources:
        found = f"found {located.found} of {len(located.rows)} ({located.names_hashed} names)"
        typer.echo(found + resolved)
    else:
        typer.echo("give the sources after DST to find each row's file" + resolved)


@app.command()
def pretrain(
    data: DataOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Pretrain a JEPA encoder with Ray Train on ingested shards (re-run the same run name to
    resume)."""
    cfg = load(config, set_)
    from pipelines.pretrain import (
        PretrainError,
        PretrainInterrupted,
        run_pretrain,
        shards_location,
    )

    try:
        data = shards_location(data, cfg)
    except PretrainError as err:
        raise UserError(str(err)) from None
    from pipelines.runtime import ignore_sigterm_after_the_job

    ignore_sigterm_after_the_job()
    try:
        res = run_pretrain(cfg, data)
    except PretrainInterrupted as err:  # not a usage error: 130, as an interrupted ingest
        _exit_now(130, f"error: {err}")
    except PretrainError as err:
        raise UserError(str(err)) from None
    from pipelines.tracking import ui_command

    typer.echo(f"run folder:  {res.run_dir}")
    typer.echo(f"checkpoint:  {res.checkpoint}")
    if res.mlflow_run_id:
        typer.echo(f"mlflow run:  {res.mlflow_run_id} (model version {res.model_version})")
        typer.echo(f"mlflow ui:   {ui_command(res.tracking_uri or '')}")
    loss = res.metrics.get("loss")
    if loss is not None:
        typer.echo(f"final loss:  {loss:.4f} at step {res.metrics.get('step')}")
    if res.pruned.folders:
        from pipelines.sweep_checkpoints import human_size

        typer.echo(
            f"pruned:      {len(res.pruned.folders)} stray checkpoint folders "
            f"({human_size(res.pruned.freed_bytes)}: cut short, or never recorded by Ray)"
        )


@app.command()
def sweep(
    data: DataOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    num_samples: Annotated[  # min=1: 0 was a ConfigError traceback from inside run_sweep
        int | None,
        typer.Option("--num-samples", "-n", min=1, help="Override tune.num_samples."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted sweep of the same name.")
    ] = False,
) -> None:
    """Sweep masking and EMA settings with Ray Tune; rank trials by RankMe, kNN or probe AUROC."""
    cfg = load(config, set_)
    from rich.console import Console
    from rich.table import Table

    from pipelines.pretrain import PretrainError, shards_location

    try:
        data = shards_location(data, cfg)
    except PretrainError as err:
        raise UserError(str(err)) from None
    from pipelines.runtime import ignore_sigterm_after_the_job
    from pipelines.sweep import SweepError, SweepInterrupted, run_sweep
    from radjepa.eval.features import DatasetError

    ignore_sigterm_after_the_job()
    try:
        res = run_sweep(cfg, data, num_samples=num_samples, resume=resume)
    except SweepInterrupted as err:  # not a usage error: 130, as an interrupted pretrain
        _exit_now(130, f"error: {err}")
    except (SweepError, PretrainError) as err:
        raise UserError(str(err)) from None
    except DatasetError as err:  # the supervised metric's labels: a typo was a traceback
        raise UserError(f"tune.labels_csv: {err}") from None
    table = Table(title=f"sweep {cfg.tune.name}: {res.metric} (higher is better)")
    keys = sorted({k for t in res.trials for k in t.params})
    for col in ["trial", *keys, res.metric, "steps", "status"]:
        table.add_column(col)
    # best first, trials without a metric last (a metric of exactly 0.0 is a real value)
    ranked = sorted(
        res.trials, key=lambda t: float("-inf") if t.metric is None else t.metric, reverse=True
    )
    for t in ranked:
        metric = "-" if t.metric is None else f"{t.metric:.4f}"
        params = [str(t.params.get(k, "")) for k in keys]
        table.add_row(t.trial_id, *params, metric, str(t.steps or "-"), t.status)
    Console().print(table)
    for t in res.trials:
        if t.error:
            typer.echo(f"trial {t.trial_id} failed: {t.error}")
    if res.best is None:
        if all(t.status == "error" for t in res.trials):
            raise UserError("every trial failed; the reasons are listed above")
        raise UserError("no trial finished without collapsing or failing; see the table above")
    typer.echo(f"best trial:      {res.best.trial_id} ({res.metric}={res.best.metric:.4f})")
    typer.echo(f"best config:     {res.best_config_path}")
    typer.echo(f"best checkpoint: {res.best.checkpoint}")
    if res.tidied is not None and res.tidied.folders:
        from pipelines.sweep_checkpoints import human_size

        typer.echo(
            f"other trials:    {res.tidied.folders} checkpoints deleted, "
            f"{human_size(res.tidied.freed_bytes)} freed (tune.trial_checkpoints=all keeps them)"
        )
    typer.echo(f"pretrain it:     radjepa pretrain -c {res.best_config_path}")


@app.command("serve")
def serve_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Checkpoint folder or URI, or models:/<name>@<alias>."),
    ] = None,
    head: Annotated[
        str | None,
        typer.Option(
            "--head",
            help="Probe head folder (`radjepa probe` DIR/head) or models:/<name>/<version>.",
        ),
    ] = None,
    index: Annotated[
        str | None, typer.Option("--index", help="Embeddings Parquet from `radjepa embed`.")
    ] = None,
    port: Annotated[int | None, typer.Option("--port", help="HTTP port (0: any free).")] = None,
    insecure_local: Annotated[
        bool, typer.Option("--insecure-local", help="Allow running without API keys.")
    ] = False,
) -> None:
    """Serve the embedding API with Ray Serve in the foreground (Ctrl-C or SIGTERM stops it)."""
    import time

    from radjepa.config import ConfigError

    cfg = load(config, set_)
    direct: dict[str, object] = {
        f"serve.{k}": v
        for k, v in {"model": model, "head": head, "index": index, "port": port}.items()
        if v is not None
    }
    if insecure_local:
        direct["serve.insecure_local"] = True
    try:
        cfg = cfg.with_overrides(direct) if direct else cfg
    except ConfigError as err:
        raise UserError(str(err)) from None
    if not cfg.serve.model:
        raise UserError("no model to serve: pass --model PATH or models:/<name>@<alias>")

    from pipelines.cluster_address import env_names_cluster
    from pipelines.runtime import (
        ensure_ray,
        ignore_sigterm_after_the_job,
        sigterm_as_ctrl_c,
        stop_ray_ignoring_sigterm,
    )
    from pipelines.tracking import store_uri
    from serve.deployment import check_pseudonym_key, check_references
    from serve.local import (
        AppAlreadyRunning,
        PortInUse,
        ServeStartFailed,
        check_port_free,
        curl_example,
        refuse_keyless_on_cluster,
        remote_cluster,
        start_failures_said_once,
        start_local,
        stop_local,
    )
    from serve.security import SecurityConfigError, settings_from_config

    # refuse an unprotected service, a taken port, a mistyped path, a registry version that does
    # not exist, a head or index of another encoder, or a missing pseudonymisation key before
    # paying for Ray (~15 s)
    local_ray = not env_names_cluster()
    try:
        settings = settings_from_config(
            cfg.serve,
            secret_env=cfg.ingest.secret_env,
            allow_development_key=cfg.ingest.allow_development_key,
        )
        refuse_keyless_on_cluster(settings, on_cluster=remote_cluster())
        check_port_free(cfg.serve.host, cfg.serve.port)

        def key_check() -> None:  # the replicas of a Ray this process starts have its key
            check_pseudonym_key(
                cfg.serve.index,
                settings.secret_env,
                {},
                allow_development_key=settings.allow_development_key,
            )

        # a local Ray's replicas share this machine's cache: a model this check fetches is
        # not fetched again by them, so the head and index are checked against it here too;
        # the key is checked before that fetch (minutes for a large encoder)
        check_references(
            cfg.serve.model,
            cfg.serve.head,
            cfg.serve.index,
            store_uri(cfg),
            fetch_model=local_ray,
            before_fetch=key_check if local_ray else None,
        )
    except (SecurityConfigError, PortInUse, FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    # said above, on this terminal, where the local API replicas' log lines also arrive: they
    # do not repeat them (keyless mode, the public development key: each was said twice). A
    # cluster's replicas resolve the cluster's key, which this process did not check: they warn.
    if local_ray:
        settings = settings.model_copy(update={"start_warnings_said": True})
    # SIGTERM (kill, systemd, a pod stopping) stops the service as Ctrl-C does, from before
    # ray.init on (whose own handlers, left in place, exited from the sleep below and then
    # aborted in interpreter teardown, exit -6, orphaning the local Ray's agents). Later
    # SIGTERMs are ignored to the end (a supervisor repeating itself must not cut the shutdown
    # short: exit -15 and Ray's processes orphaned); a second Ctrl-C still can, as a user who
    # insists expects.
    ignore_sigterm_after_the_job()
    # a deployment whose replicas fail to start (what only they can read: an index's pages, a
    # model a cluster's replicas fetch) ended the command in Ray's ~230-line traceback, exit 1:
    # now one line naming the deployment and the replica's own error, exit 1, the tracebacks
    # left in the Serve controller's log
    with sigterm_as_ctrl_c(once=True) as routing, start_failures_said_once() as quiet:
        stopping = False
        try:
            ensure_ray()
            try:
                url = start_local(
                    cfg,
                    settings=settings,
                    references_checked=True,
                    key_checked=local_ray,
                    # the replicas of a local Ray all read this machine's files: a retry only
                    # repeats the failure (Serve's default, 3 tries, took 1-2 minutes). A
                    # cluster's replicas may land on another node, so Serve retries there.
                    start_attempts=1 if local_ray else None,
                )
            except (
                SecurityConfigError,
                PortInUse,
                AppAlreadyRunning,
                FileNotFoundError,
                ValueError,
            ) as err:
                raise UserError(str(err)) from None
            except ServeStartFailed as err:
                raise RunFailed(str(err)) from None
            quiet.active = False  # a replica failing from now on is said by Serve, as before
            typer.echo(f"RadJEPA API at {url}  (docs: {url}/docs)")
            typer.echo(curl_example(url, settings))
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            stopping = True
            typer.echo("shutting down")
        finally:
            routing.stop()  # SIGTERM ignored from here: the service is stopping
            import ray

            try:
                if ray.is_initialized():
                    stop_local()  # bounded: the whole stop fits STOP_BUDGET_S
            finally:
                # the local instance this command started, all its processes, before the
                # interpreter exits (a Ray named by RAY_ADDRESS is only disconnected from);
                # ray.shutdown resets SIGTERM to its default, which this keeps ignored
                stop_ray_ignoring_sigterm()
    if stopping:
        # the interpreter's teardown took 6-9 s more on a loaded box (torch, Ray's libraries),
        # past the stop's budget: nothing is left to tear down
        typer.echo("stopped")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@app.command("embed")
def embed_cmd(
    shards: Annotated[str, typer.Argument(help="Output folder (or URI) of `radjepa ingest`.")],
    out: Annotated[str, typer.Argument(help="New folder (or URI) for the embeddings Parquet.")],
    model: Annotated[
        str,
        typer.Option("--model", help="Checkpoint folder or URI, or models:/<name>@<alias>."),
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    # min=1: a negative count was Ray's ValueError traceback once Ray had started
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per forward.")] = None,
    actors: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Encoder actors (default: by free CPUs, at most 4, and no more than batches; "
            "at most the free CPUs less one, and the free GPUs on a GPU run).",
        ),
    ] = None,
) -> None:
    """Embed ingested shards into an archive index (Ray Data) for /v1/similar."""
    cfg = load(config, set_)
    from pipelines.embed import EmbedError, run_embed
    from pipelines.tracking import store_uri

    try:
        res = run_embed(
            cfg,
            shards,
            out,
            model=model,
            tracking_uri=store_uri(cfg),
            batch_size=batch_size,
            actors=actors,
        )
    except EmbedError as err:
        raise UserError(str(err)) from None
    typer.echo(f"embedded {res.rows} images (dim {res.dim}, model {res.model}) into {res.out}")


# --- Ray Jobs: `radjepa submit` and `radjepa jobs` (logic in pipelines/jobs.py) -----------------
jobs_app = typer.Typer(help="List, follow and stop jobs on a Ray cluster.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")

AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray job server (dashboard) URL, e.g. http://HEAD:8265 "
        "(default: $RAY_JOB_ADDRESS, then $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS).",
    ),
]


def _jobs_client(address: str | None):
    from pipelines.jobs import JobsError, connect

    try:
        return connect(address)
    except JobsError as err:
        raise UserError(str(err)) from None


def _follow_and_exit(client, job_id: str) -> None:
    """Stream a job's logs, then exit with its status (Ctrl-C detaches; the job keeps going)."""
    from pipelines.jobs import EXIT_SERVER_LOST, JobsError, JobServerLost, follow

    try:
        res = follow(client, job_id, lambda chunk: typer.echo(chunk, nl=False))
    except JobServerLost as err:
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


@app.command(
    "submit",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
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
        Path, typer.Option("--working-dir", help="Folder uploaded as the job's working dir.")
    ] = Path("."),
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
    from pipelines.jobs import JobsError, build_submission, command_name
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


def _refuse_uri(option: str, value: str | Path | None) -> None:
    """A URI given where a path on this machine is read or written: as a click ``Path``,
    ``probe --out s3://b/out`` was the path ``s3:/b/out``, and the report went to a folder
    ``./s3:`` here. Taken as typed (a string), so a local name with a colon stays a path."""
    scheme, sep, _ = str(value).partition("://")
    if value is not None and sep and re.fullmatch(r"[A-Za-z][\w+.\-]*", scheme):
        raise UserError(
            f"{option} takes a path on this machine, not a {scheme}:// URI: probe reads its "
            "CSVs and writes its report here (its --shards may be a URI)"
        )


def _paired_cells(report: dict[str, Any], label: str) -> list[str]:
    """``ours-pixels +0.052 [+0.010, +0.094] *`` per baseline: the paired AUROC difference,
    marked as the report's table marks it (``*`` interval excludes 0, ``†`` after Holm)."""
    from radjepa.eval.report import diff_marks, fmt3

    comp = report.get("comparisons") or {}
    cells = []
    for method, res in (comp.get("methods") or {}).items():
        row = next((r for r in res["labels"] if r["name"] == label), None)
        d = (row or {}).get("auroc_diff")
        if d is None:
            continue
        cell = f"{comp['reference']}-{method} {fmt3(d['estimate'], signed=True)}"
        if d["draws"]:
            cell += f" [{fmt3(d['low'], True)}, {fmt3(d['high'], True)}]"
            cell += diff_marks(d)
        cells.append(cell)
    return cells


models_app = typer.Typer(
    help="List registered models and move their aliases (what servers load).",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")

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
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
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


@app.command("probe")
def probe_cmd(
    checkpoint: Annotated[
        str,
        typer.Argument(help="Checkpoint folder or URI from `radjepa pretrain`, or models:/..."),
    ],
    label: Annotated[
        list[str],
        typer.Option(
            "--label", "-l", help="Label column, or COLUMN=POSITIVE (e.g. view=AP); repeat."
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Folder for the report, plots and head; an earlier probe's is replaced.",
        ),
    ],
    csv: Annotated[
        str | None,
        typer.Option("--csv", help="Labels CSV: image paths (relative to it) + label columns."),
    ] = None,
    shards: Annotated[
        str | None,
        typer.Option(
            "--shards",
            help="Ingest output instead of --csv (labels from metadata), a path or URI.",
        ),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    image_col: Annotated[str, typer.Option(help="CSV column with image paths.")] = "image",
    group_col: Annotated[
        str | None, typer.Option(help="Patient-id column (default: patient_id, or patient_pid).")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N rows.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: auto).")] = None,
    seg_csv: Annotated[
        str | None,
        typer.Option("--seg-csv", help="Image + mask-path columns for a segmentation probe."),
    ] = None,
    structure: Annotated[
        list[str] | None,
        typer.Option("--structure", help="Mask column of --seg-csv (repeat per structure)."),
    ] = None,
    seg_group_col: Annotated[
        str | None,
        typer.Option(
            "--seg-group-col",
            help="Patient-id column of --seg-csv (default: --group-col's with --csv, else "
            "patient_id).",
        ),
    ] = None,
    mlflow: Annotated[
        bool, typer.Option("--mlflow/--no-mlflow", help="Log the run to MLflow.")
    ] = True,
    register_head: Annotated[
        bool, typer.Option("--register-head", help="Register the head in the MLflow registry.")
    ] = False,
    head_name: Annotated[
        str, typer.Option(help="Registered model name for --register-head.")
    ] = "radjepa-probe-head",
) -> None:
    """Linear-probe a frozen encoder on labelled images; report AUROC/AUPRC vs two baselines."""
    cfg = load(config, set_)
    if register_head and not (mlflow and cfg.tracking.enabled):
        raise UserError("--register-head needs MLflow tracking (drop --no-mlflow)")
    if (csv is None) == (shards is None):
        raise UserError("give exactly one of --csv or --shards")
    for option, value in (("--out", out), ("--csv", csv), ("--seg-csv", seg_csv)):
        _refuse_uri(option, value)
    out_dir = Path(out)
    csv_file, seg_file = (None if v is None else Path(v) for v in (csv, seg_csv))
    if seg_file is not None and not structure:
        raise UserError("--seg-csv needs at least one --structure (a mask column)")
    from pipelines.tracking import check_reachable, store_uri
    from radjepa.checkpoint import CheckpointError
    from radjepa.eval.features import DatasetError, resolve_device
    from radjepa.eval.outdir import check_out_dir
    from radjepa.eval.runner import run_probe
    from serve.registry import ModelNotFound, resolve_model

    try:  # run_probe checks these too; here they come before a models:/ fetch
        check_out_dir(out_dir)
        resolve_device(device)
    except DatasetError as err:
        raise UserError(str(err)) from None
    uri = store_uri(cfg)
    if mlflow and cfg.tracking.enabled:
        # what would refuse the run's record at the end, after the whole probe: said first
        from pipelines.tracking import check_store_in_place
        from pipelines.tracking_probe import probe_store

        try:  # no store (ValueError), or one moved or copied (StoreMoved, a ValueError)
            check_store_in_place(probe_store(cfg), cfg.tracking.experiment)
        except ValueError as err:
            raise UserError(str(err)) from None
    if mlflow and cfg.tracking.enabled and uri and not str(checkpoint).startswith("models:/"):
        # the run is logged after the whole probe: a server that does not answer was found
        # only then, and MLflow retried it for minutes. A models:/ look-up asks it itself,
        # naming the reference (no tracking.enabled=false way out for that one)
        try:
            check_reachable(uri)
        except ConnectionError as err:
            raise UserError(str(err)) from None
    try:
        resolved = resolve_model(str(checkpoint), tracking_uri=uri)
    except ModelNotFound as err:
        raise UserError(str(err)) from None
    try:
        report = run_probe(
            resolved.path,
            csv_file,
            label,
            out_dir,
            cfg,
            shards=shards,
            device=device,
            image_col=image_col,
            limit=limit,
            seg_csv=seg_file,
            structures=structure or [],
            group_col=group_col,  # None: the library's patient column for --csv or --shards
            seg_group_col=seg_group_col,
        )
    except (DatasetError, CheckpointError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    any_diff = False
    for lab in report["methods"]["ours"]["labels"]:
        cells = []
        for method, res in report["methods"].items():
            lr = next(x for x in res["labels"] if x["name"] == lab["name"])
            auc = lr["auroc"]
            if auc is None:
                cells.append(f"{method} skipped")
            elif auc["draws"]:
                cells.append(
                    f"{method} {auc['estimate']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}]"
                )
            else:
                cells.append(f"{method} {auc['estimate']:.3f}")
        unreliable = "  (few patients in a class: interval unreliable)"
        typer.echo(
            f"{lab['name']:>16} AUROC  "
            + "  |  ".join(cells)
            + (unreliable if lab.get("interval_reliable") is False else "")
        )
        diffs = _paired_cells(report, lab["name"])
        if diffs:
            any_diff = True
            typer.echo(f"{'':>16} ΔAUROC " + "  |  ".join(diffs))
    if any_diff:
        typer.echo(
            f"{'':>16} * the interval excludes 0; † it still holds after Holm's correction "
            "over the baseline's labels"
        )
    for method, res in ((report.get("segmentation") or {}).get("methods") or {}).items():
        dice = ", ".join(
            f"{k} {v:.3f}" if math.isfinite(v) else f"{k} absent from the held-out images"
            for k, v in res["dice"].items()
        )
        typer.echo(f"{'segmentation':>16} Dice   {method} {dice}")
    typer.echo(f"report:      {report['files']['markdown']}")
    if report.get("head"):
        typer.echo(f"probe head:  {report['head']}")
    if mlflow and cfg.tracking.enabled:
        from pipelines.tracking import ui_command
        from pipelines.tracking_probe import log_probe_run

        try:
            registered = None
            if resolved.name and resolved.version:
                registered = (resolved.name, str(resolved.version), resolved.source)
            tr = log_probe_run(
                report,
                out_dir,
                cfg,
                register_head=register_head,
                head_model_name=head_name,
                model=registered,
            )
        except ValueError as err:  # no store for remote outputs, no head to register
            raise UserError(str(err)) from None
        typer.echo(f"mlflow run:  {tr.run_id}")
        if tr.head_version:
            typer.echo(f"head model:  models:/{tr.head_model}/{tr.head_version}")
        typer.echo(f"mlflow ui:   {ui_command(tr.uri)}")


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


@app.command()
def demo(
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Output folder (replaced if it holds an earlier demo)."),
    ] = Path("demo-output"),
    steps: Annotated[int, typer.Option(min=1, help="Pretraining steps.")] = 60,
    no_serve: Annotated[bool, typer.Option("--no-serve", help="Skip the HTTP API stage.")] = False,
) -> None:
    """Run everything on the bundled sample: ingest, pretrain, sweep, probe, index, serve."""
    import json

    from rich.console import Console

    from pipelines.demo import DemoError, run_demo
    from serve.local import ServeStartFailed, start_failures_said_once

    console = Console()
    try:
        # a serve stage whose replicas fail to start is one line, as for `radjepa serve`
        with start_failures_said_once():
            summary = run_demo(
                out,
                steps=steps,
                serve_api=not no_serve,
                on_stage=lambda name: console.rule(f"[bold]{name}"),
            )
    except DemoError as err:
        raise UserError(str(err)) from None
    except ServeStartFailed as err:
        raise RunFailed(f"the demo's serve stage: {err}") from None
    console.rule("[bold green]demo summary")
    console.print_json(json.dumps(summary, default=str))
    console.print(f"everything is in {summary['output']}")
    console.print(f"look at the runs: {summary['mlflow_ui']}")


def _exit_now(code: int, message: str) -> NoReturn:
    """Say ``message`` last and exit at once once an interrupted run has been recorded
    (:func:`pipelines.runtime.exit_after_interruption`). SIGTERM is ignored from here on: a
    second one (a supervisor repeating itself) must not cut the shutdown or the last line
    short."""
    from pipelines.runtime import exit_after_interruption

    exit_after_interruption(code, lambda: typer.secho(message, fg=typer.colors.RED, err=True))


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2; a
    local Ray that did not start in time (a loaded machine), or a run that failed (a served
    deployment whose replicas did not start), one line and exit code 1."""
    from pipelines.runtime import ClusterError, RayStartTimeout, declare_process_ends_with_job

    # this process ends when the command does (the console script, python -m pipelines.cli, a
    # Ray Job); not when a caller invokes ``app`` in-process (Click's CliRunner)
    declare_process_ends_with_job()
    from radjepa.log_filters import redact_console

    # every line it prints, error lines included (a location may carry credentials), its own
    # and those Ray forwards from workers
    redact_console()
    try:
        app()
    except (UserError, ClusterError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except (RayStartTimeout, RunFailed) as err:  # not the user's mistake: one line, exit 1
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

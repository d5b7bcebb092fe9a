"""The ``radjepa`` command line: the front door for every job.

Each command is a plain typed function (tests call them directly) that loads the one config,
then lazily imports the layer that does the work, so ``radjepa --help`` never pays for Ray,
torch or MLflow imports. Errors the user can fix exit with code 2 and one readable message.
The job, model-registry and probe commands are in pipelines/cli_jobs.py, cli_models.py and
cli_probe.py; this module registers them, in the order ``radjepa --help`` lists them.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

# UserError and RunFailed, the CLI's public errors, are importable from here too
from pipelines.cli_common import ConfigOpt, DataOpt, RunFailed, SetOpt, UserError, load
from pipelines.cli_jobs import jobs_app, submit
from pipelines.cli_models import models_app, runs_app
from pipelines.cli_probe import probe_cmd

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
app.add_typer(runs_app, name="runs")


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
    from serve.deployment import check_pseudonym_key, pin_and_check
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
        # what the replicas are bound to (an alias as its version, a run folder as its newest
        # checkpoint), pinned before the check and the fetch, not once Ray has started
        pinned = pin_and_check(
            cfg, fetch_model=local_ray, before_fetch=key_check if local_ray else None
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
                    pinned=pinned,
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
            docs = f"{url}/docs" if settings.docs_page else f"{url}/openapi.json"
            typer.echo(f"RadJEPA API at {url}  (docs: {docs})")
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


# --- Ray Jobs (cli_jobs.py), the model registry (cli_models.py), probe (cli_probe.py) ----------
app.add_typer(jobs_app, name="jobs")
app.command(
    "submit",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)(submit)
app.add_typer(models_app, name="models")
app.command("probe")(probe_cmd)


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

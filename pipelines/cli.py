"""The ``radjepa`` command line: the front door for every job.

Each command is a plain typed function (tests call them directly) that loads the one config,
then lazily imports the layer that does the work, so ``radjepa --help`` never pays for Ray,
torch or MLflow imports. Errors the user can fix exit with code 2 and one readable message.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config (default: built-in defaults)."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Dotted override, e.g. --set masks.num_targets=4 (repeat)."),
]

log = logging.getLogger("radjepa.cli")


class UserError(Exception):
    """A problem the user can fix (bad config, missing input): printed without a traceback."""


def setup_logging(level: str = "INFO") -> None:
    """Configure logging once, in the entry point (library modules only create loggers)."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=level.upper(),
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(rich_tracebacks=False, show_path=False)],
        force=True,
    )


def load(config: Path | None, sets: list[str] | None) -> Config:
    """Load and validate the config before any work starts; raises UserError naming the key."""
    from radjepa.config import ConfigError, load_config

    try:
        return load_config(config, sets or [])
    except ConfigError as err:
        raise UserError(str(err)) from None


@app.callback()
def _root(
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    setup_logging(log_level)


@app.command()
def version() -> None:
    """Print the package version."""
    from radjepa import __version__

    typer.echo(__version__)


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the fully resolved config as YAML (defaults + file + overrides)."""
    from radjepa.config import config_to_yaml

    typer.echo(config_to_yaml(load(config, set_)), nl=False)


@config_app.command("validate")
def config_validate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Validate a config; exit 0 when valid, 2 with the offending keys otherwise."""
    cfg = load(config, set_)
    typer.echo(f"ok: {config or 'defaults'} ({cfg.model.arch}/{cfg.model.patch_size} @ "
               f"{cfg.model.img_size}px)")


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except UserError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

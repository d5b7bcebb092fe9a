"""What every ``radjepa`` command module shares: the two errors :func:`pipelines.cli.main`
turns into one line and an exit code (UserError 2, RunFailed 1), loading the config so that a
bad key is a UserError naming it, and the ``--config``/``--data``/``--set`` options, so each
command takes and refuses a config the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from radjepa.config import Config

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


class UserError(Exception):
    """A problem the user can fix (bad config, missing input): printed without a traceback."""


class RunFailed(Exception):
    """The command ran and failed (not a usage error): one line without a traceback, exit 1."""


def load(config: str | None, sets: list[str] | None) -> Config:
    """Load and validate the config before any work starts; raises UserError naming the key."""
    from radjepa.config import ConfigError, load_config

    try:
        return load_config(config, sets or [])
    except ConfigError as err:
        raise UserError(str(err)) from None

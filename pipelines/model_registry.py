"""The model registry for operators: which versions exist, and moving an alias on purpose.

Servers name a model by alias (``models:/radjepa-encoder@champion``) and pin the version it
points to when they start, so moving the alias is how a new encoder or head reaches the next
deployment. MLflow keeps no history of an alias, so ``radjepa models promote`` writes one:
tags on the promoted version (who, when, why, which version held the alias before) and on the
version it replaced, which together read as an audit trail in the registry itself.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from radjepa.error_text import error_line

log = logging.getLogger(__name__)

__all__ = [
    "ModelVersionRow",
    "Promotion",
    "RegistryError",
    "describe",
    "list_versions",
    "promote",
]

# MLflow's own rule for an alias (word characters and '-', at most 255), and the names it
# reserves: "latest" and "v<digits>" in any case (they would shadow a version's own alias)
_ALIAS = re.compile(r"[\w-]{1,255}")
_RESERVED_ALIAS = re.compile(r"v\d+|latest", re.I)
_SHOWN = 10  # names or versions an error lists before "..."


class RegistryError(ValueError):
    """The registry cannot do what was asked (no such model or version, a bad alias)."""


@dataclass(frozen=True)
class ModelVersionRow:
    """One registered version, as ``radjepa models list`` shows it."""

    version: str
    aliases: tuple[str, ...]
    status: str
    created: datetime
    run_id: str | None
    step: str | None  # the training step of an encoder (pretrain tags it)
    run_name: str | None
    promoted: str | None  # "<alias> by <who> at <when>: <why>", the newest promotion


@dataclass(frozen=True)
class Promotion:
    name: str
    alias: str
    version: str
    previous: str | None  # the version the alias pointed to before, None when it was new
    kind: str = "encoder"  # "probe-head" for a head `radjepa probe --register-head` registered


def _client(uri: str) -> Any:
    from pipelines.tracking import client

    return client(uri)


def _registered(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            held = [m.name for m in client.search_registered_models(max_results=_SHOWN + 1)]
            raise RegistryError(
                f"no registered model named {name!r} in this store "
                f"({'it holds ' + _some(held) if held else 'it holds none'})"
            ) from None
        raise


def _some(items: list[str]) -> str:
    return ", ".join(items[:_SHOWN]) + (", ..." if len(items) > _SHOWN else "")


def describe(uri: str, name: str) -> str:
    """What ``name`` holds ("versions 3, 2, 1 and aliases @champion -> 2"), for an error about a
    version or alias it lacks: "not found" alone sent the user to ``radjepa models list`` to
    learn what to type instead. RegistryError (naming the models there are) without ``name``."""
    rows = list_versions(uri, name)
    if not rows:
        return "no versions"
    aliases = [f"@{a} -> {r.version}" for r in rows for a in r.aliases]
    versions = _some([r.version for r in rows])
    return f"versions {versions} and " + (f"aliases {_some(aliases)}" if aliases else "no aliases")


def list_versions(uri: str, name: str) -> list[ModelVersionRow]:
    """Every version of ``name``, newest first, with the aliases that point to it."""
    client = _client(uri)
    aliases: dict[str, list[str]] = {}
    for alias, version in (_registered(client, name).aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in client.search_model_versions(_name_filter(name)):
        tags = mv.tags or {}
        rows.append(
            ModelVersionRow(
                version=str(mv.version),
                aliases=tuple(sorted(aliases.get(str(mv.version), ()))),
                status=str(mv.status),
                created=datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC),
                run_id=mv.run_id,
                step=tags.get("step"),
                run_name=tags.get("run_name"),
                promoted=tags.get("radjepa.promotion"),
            )
        )
    return sorted(rows, key=lambda r: int(r.version), reverse=True)


def promote(
    uri: str, name: str, version: str, alias: str, reason: str, actor: str | None = None
) -> Promotion:
    """Point ``alias`` of ``name`` at ``version`` and record the move on both versions.

    Refuses a version that is not READY (its files may not all be there) and an empty reason:
    the reason is what a reviewer of the registry later reads.

    MLflow moves an alias with no compare-and-set, so two promotes at once can interleave: the
    replaced version is read just before the move (not from the first look-up), and the alias
    just after it. A promote another one overtook records its own move (it did happen) and
    raises RegistryError saying where the alias points now; a record that cannot be written
    after the move raises one saying the alias moved all the same."""
    from mlflow.exceptions import MlflowException

    if not _ALIAS.fullmatch(alias) or _RESERVED_ALIAS.fullmatch(alias):
        raise RegistryError(
            f"alias {alias!r}: use 1 to 255 letters, digits, '_' and '-' (not 'latest' or "
            "'v<number>', which MLflow reserves)"
        )
    reason = " ".join(reason.split())
    if not reason:
        raise RegistryError("a promotion needs a reason (--reason): the registry records it")
    client = _client(uri)
    _registered(client, name)  # refused, naming the models there are, when it is not one
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise RegistryError(f"{name} has no version {version}") from None
        raise
    # the registry's spelling from here on: "01" found version 1, which then was tagged as
    # demoted in favour of itself, its promotion record overwritten
    version = str(mv.version)
    if str(mv.status) != "READY":
        raise RegistryError(f"{name} version {version} is {mv.status}, not READY: not promoted")
    kind = (mv.tags or {}).get("radjepa.kind", "encoder")  # the probe tags its heads
    # read again right before the move, not from the look-up above: the version that held the
    # alias when it moved is the one a promote running meanwhile left there
    previous = _holder(client, name, alias)
    if previous == version:
        log.info("%s@%s already points to version %s", name, alias, version)
        return Promotion(name, alias, version, previous, kind)
    who = actor or _user()
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    record = f"{alias} by {who} at {when}: {reason}"
    if previous is not None:
        record += f" (replaced version {previous})"
    client.set_registered_model_alias(name, alias, version)
    try:
        # MLflow has no compare-and-set of an alias: another promote may have moved it since
        now = _holder(client, name, alias)
        client.set_model_version_tag(name, version, "radjepa.promotion", record[:5000])
        if previous is not None:
            demotion = f"{alias} moved to version {version} by {who} at {when}: {reason}"
            client.set_model_version_tag(name, previous, "radjepa.demotion", demotion[:5000])
    except Exception as err:  # MlflowException, sqlalchemy, requests: no common base
        first = error_line(err)
        raise RegistryError(
            f"{name}@{alias} moved to version {version}, but recording it failed: {first}"
        ) from err
    if now != version:
        where = "nowhere" if now is None else f"version {now}"
        raise RegistryError(
            f"{name}@{alias} moved to version {version}, but something else moved it on at once "
            f"(another promote?): it points to {where} now; check `radjepa models list` and "
            "promote again if that is not right"
        )
    log.info("%s@%s -> version %s (was %s)", name, alias, version, previous or "unset")
    return Promotion(name, alias, version, previous, kind)


def _holder(client: Any, name: str, alias: str) -> str | None:
    """The version ``alias`` of ``name`` points to now, None when it points nowhere."""
    held = (client.get_registered_model(name).aliases or {}).get(alias)
    return None if held is None else str(held)


def _user() -> str:
    """Who runs the command; a container user without a passwd entry (an arbitrary uid on
    OpenShift) has no name, and the promotion is still recorded."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _name_filter(name: str) -> str:
    """MLflow's filter syntax has no escapes: quote with the quote the name does not hold."""
    if "'" not in name:
        return f"name = '{name}'"
    if '"' not in name:
        return f'name = "{name}"'
    raise RegistryError(f"{name!r}: a name holding both kinds of quote cannot be searched")
